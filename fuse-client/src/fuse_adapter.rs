//! The `fuser::Filesystem` adapter: translates kernel requests into [`GranaryFs`] calls
//! and results into replies. No filesystem logic lives here. A request the mount's caches
//! answer is answered on the thread that read it; one that may wait (on a master, a
//! worker, a disk or a file's commit) goes to the [`Offload`] threads.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use granary_common::FsError;
use granary_protos::v1::{FileKind, Inode};

use crate::fs::{changes_file, FoundChanged, GranaryFs, SetAttr};
use crate::kernel_view::{Attributes, OpenMode, OwnerOverride, BLOCK_SIZE_HINT};
use crate::offload::Offload;
use crate::passthrough::{Claim, Passthrough};
use crate::read_order::{InFlight, InFlightReads};

/// What the kernel is told about caching and ownership.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    pub keep_cache: bool,
    pub owner: OwnerOverride,
    /// READDIRPLUS only where the kernel guesses it pays (see `MountConfig`).
    pub readdirplus_auto: bool,
}

impl KernelOptions {
    /// For replies that carry one TTL for both the name and the attributes (CREATE,
    /// READDIRPLUS entries): the shorter, so attributes are never kept past `attr_ttl`.
    fn entry_and_attr_ttl(&self) -> Duration {
        self.entry_ttl.min(self.attr_ttl)
    }
}

/// What request handlers share, on the FUSE threads and the offload threads alike.
pub struct Handlers {
    pub fs: Arc<GranaryFs>,
    pub opts: KernelOptions,
    pub passthrough: Passthrough,
    /// Files are opened by the kernel alone (zero-message opens; read-only mounts); off
    /// if the kernel cannot.
    pub open_in_kernel: std::sync::atomic::AtomicBool,
    /// Tells the kernel to drop what it caches; set once the session runs.
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    pub reads: Arc<InFlightReads>,
}

impl Handlers {
    fn opens_in_kernel(&self) -> bool {
        self.open_in_kernel
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replies to a read, and has the kernel drop its attributes of `ino` if the read
    /// found the file changed in the UFS. The kernel's cached size bounds what it reads,
    /// so a grown file would read cut at its old size until the attributes expired: they
    /// are dropped before the reply, so they are gone when the reader asks past the old
    /// end. A shrunk file is the other way round: the kernel takes the end of a short
    /// answer as the file's new size only if its attributes did not change since it
    /// asked (else it pads the pages it asked for with zeros up to the old size), and it
    /// may take it after this reply is written (a single-page read applies it in the
    /// reader's task). So they are dropped once no READ of the file has been in flight
    /// for a moment, and an empty answer goes after the READs below it, whose short
    /// answer holds the new end (see [`crate::read_order`]).
    fn reply_read(
        &self,
        read: InFlight,
        ino: u64,
        r: granary_common::FsResult<Vec<u8>>,
        reply: ReplyData,
    ) {
        let changed = GranaryFs::take_changed();
        if changed == FoundChanged::Changed {
            drop_attributes(&self.notifier, ino);
        }
        let empty = r.as_ref().is_ok_and(|data| data.is_empty());
        let send = move || match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", &e)),
        };
        match empty {
            true => read.answer_after_lower(send),
            false => {
                send();
                drop(read);
            }
        }
        if changed == FoundChanged::Shrunk {
            let (notifier, reads) = (self.notifier.clone(), self.reads.clone());
            let _ = std::thread::Builder::new()
                .name("granary-shrunk".into())
                .spawn(move || {
                    for _ in 0..SHRUNK_SETTLE_TRIES {
                        std::thread::sleep(SHRUNK_SETTLE);
                        if reads.idle(ino) {
                            break;
                        }
                    }
                    drop_attributes(&notifier, ino);
                });
        }
    }
}

/// How long a shrunk file's READs must have been answered before the kernel is told to
/// drop its attributes, checked this many times before it is told anyway.
const SHRUNK_SETTLE: Duration = Duration::from_millis(100);
const SHRUNK_SETTLE_TRIES: usize = 50;

/// Has the kernel drop its attributes of `ino` (offset -1: attributes only, so no page
/// lock an in-flight read holds is waited for; a new size drops the pages past it).
fn drop_attributes(notifier: &std::sync::OnceLock<fuser::Notifier>, ino: u64) {
    if let Some(n) = notifier.get() {
        if let Err(e) = n.inval_inode(INodeNo(ino), -1, 0) {
            tracing::debug!(ino, error = %e, "cannot drop the kernel's attributes");
        }
    }
}

/// An inode the namespace no longer has, asked for by its number (OPEN, GETATTR): the
/// kernel found it by a name that was renamed over or removed meanwhile (through any
/// mount). ESTALE has it walk the path again from fresh lookups, which find what the
/// name is now, as a local filesystem's open(2) of a name renamed over would; a name
/// that is gone still ends in ENOENT.
fn gone_is_stale(e: FsError) -> FsError {
    match e {
        FsError::NotFound(why) => FsError::Stale(why),
        e => e,
    }
}

pub struct FuseAdapter {
    handlers: Arc<Handlers>,
    offload: Offload,
    /// Told once the kernel's INIT is answered (the readahead setter waits for it).
    initialized: Option<std::sync::mpsc::Sender<()>>,
}

impl FuseAdapter {
    /// `offload_threads`: how many requests may wait at once.
    pub fn new(
        handlers: Handlers,
        offload_threads: usize,
        initialized: std::sync::mpsc::Sender<()>,
    ) -> std::io::Result<Self> {
        Ok(FuseAdapter {
            handlers: Arc::new(handlers),
            offload: Offload::new(offload_threads)?,
            initialized: Some(initialized),
        })
    }

    /// Answers on an offload thread.
    fn offload(&self, job: impl FnOnce(&Handlers) + Send + 'static) {
        let h = self.handlers.clone();
        self.offload.run(move || job(&h));
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::warn!(op, error = %e, "returning EIO");
    } else {
        tracing::debug!(op, error = %e, "returning errno {n}");
    }
    Errno::from_i32(n)
}

fn reply_empty(op: &str, r: granary_common::FsResult<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, &e)),
    }
}

impl Handlers {
    fn reply_entry(&self, op: &str, r: granary_common::FsResult<Inode>, reply: ReplyEntry) {
        match r {
            Ok(i) => reply.entry_with_ttls(
                &self.opts.attr_ttl,
                &self.opts.entry_ttl,
                &self.attr(&i),
                Generation(0),
            ),
            Err(e) => reply.error(errno(op, &e)),
        }
    }

    fn attr(&self, i: &Inode) -> FileAttr {
        let a = Attributes::of(i, self.opts.owner);
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.mtime,
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: BLOCK_SIZE_HINT,
            flags: 0,
        }
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::File | FileKind::Unspecified => FileType::RegularFile,
    }
}

fn fopen(mode: OpenMode) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if mode.direct_io {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if mode.keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if mode.no_flush {
        flags |= FopenFlags::FOPEN_NOFLUSH;
    }
    flags
}

fn reply_readlink(r: granary_common::FsResult<Vec<u8>>, reply: ReplyData) {
    match r {
        Ok(target) => reply.data(&target),
        Err(e) => reply.error(errno("readlink", &e)),
    }
}

fn to_ns(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => std::time::SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

impl Handlers {
    /// Opens `fh` (read-only) with the kernel reading from the inode's backing file where
    /// passthrough allows.
    fn open_read_only(&self, ino: u64, fh: u64, mode: OpenMode, reply: ReplyOpen) {
        // The kernel refuses KEEP_CACHE with passthrough (the page cache is the backing
        // file's own, so it is kept anyway).
        if !self.passthrough.enabled() {
            return reply.opened(FileHandle(fh), fopen(mode));
        }
        let claim = match self.fs.open_version(fh) {
            Some(version) => self.passthrough.claim(ino, fh, version),
            None => Claim::No,
        };
        let id = match claim {
            Claim::No => return reply.opened(FileHandle(fh), fopen(mode)),
            Claim::Backing(id) => id,
            Claim::Register => {
                let Some(file) = self.fs.whole_file(fh) else {
                    self.passthrough.failed(ino);
                    return reply.opened(FileHandle(fh), fopen(mode));
                };
                match reply.open_backing(&file) {
                    Ok(id) => {
                        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                        self.passthrough.registered(ino, id, bytes)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "FUSE passthrough unavailable; serving reads in userspace");
                        self.passthrough.disable();
                        self.passthrough.failed(ino);
                        return reply.opened(FileHandle(fh), fopen(mode));
                    }
                }
            }
        };
        reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id)
    }

    fn reply_attr(&self, ino: u64, r: granary_common::FsResult<Inode>, reply: ReplyAttr) {
        match r {
            Ok(i) => reply.attr(&self.opts.attr_ttl, &self.attr(&i)),
            Err(FsError::NotFound(why)) => match self.fs.open_unlinked(ino) {
                // Unlinked while open: its descriptors still work (fstat says nlink 0).
                Some(i) => {
                    let mut attr = self.attr(&i);
                    attr.nlink = 0;
                    reply.attr(&Duration::ZERO, &attr)
                }
                None => reply.error(errno("getattr", &gone_is_stale(FsError::NotFound(why)))),
            },
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn reply_open(
        &self,
        ino: u64,
        flags: i32,
        r: granary_common::FsResult<(u64, bool)>,
        reply: ReplyOpen,
    ) {
        let (fh, unchanged) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(errno("open", &gone_is_stale(e))),
        };
        metrics::counter!("granary_client_opens_total").increment(1);
        let mode = OpenMode::for_open(flags, self.opts.keep_cache, unchanged);
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return self.open_read_only(ino, fh, mode, reply);
        }
        reply.opened(FileHandle(fh), fopen(mode))
    }

    fn open(&self, ino: u64, flags: i32, reply: ReplyOpen) {
        if changes_file(flags) && !self.passthrough.writable(ino) {
            tracing::warn!(
                ino,
                "a file open for reading through FUSE passthrough cannot be opened for writing until those readers close (mount option passthrough = false allows it)"
            );
            let e = FsError::TextBusy(format!("inode {ino} is read through passthrough"));
            return reply.error(errno("open", &e));
        }
        self.reply_open(ino, flags, self.fs.open(ino, flags), reply)
    }

    fn reply_opendir(&self, r: granary_common::FsResult<(u64, bool)>, reply: ReplyOpen) {
        match r {
            // The kernel keeps the listing in its page cache (dropping it on its own when
            // this mount changes the directory), across opens while the record is as it was.
            Ok((fh, unchanged)) => {
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if self.opts.keep_cache && unchanged {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    /// Closes `fh` of `ino`. A commit that failed leaves the kernel caching the writes
    /// as the file's pages: they are dropped (and its attributes), so that readers here
    /// read what the file holds, not a mix of the lost writes and the old content.
    fn release(&self, ino: u64, fh: u64) -> impl FnOnce() {
        self.passthrough.release(fh);
        let failed = self.fs.release(fh);
        let notifier = self.notifier.clone();
        move || {
            if failed {
                if let Some(n) = notifier.get() {
                    if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                        tracing::debug!(ino, error = %e, "cannot drop the kernel's pages");
                    }
                }
            }
        }
    }

    fn readdir(&self, fh: u64, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.readdir(fh, offset, 1024) {
            Ok(e) => e,
            Err(e) => return reply.error(errno("readdir", &e)),
        };
        for e in entries {
            let kind = self.attr(&e.inode).kind;
            if reply.add(
                INodeNo(e.inode.id),
                e.offset,
                kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, fh: u64, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = match self.fs.readdir(fh, offset, 1024) {
            Ok(e) => e,
            Err(e) => return reply.error(errno("readdirplus", &e)),
        };
        for e in entries {
            let attr = self.attr(&e.inode);
            let ttl = match e.attrs_current {
                true => self.opts.entry_and_attr_ttl(),
                false => Duration::ZERO,
            };
            if reply.add(
                INodeNo(e.inode.id),
                e.offset,
                OsStr::from_bytes(&e.name),
                &ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => {
                const BSIZE: u64 = 4096;
                let free = s.capacity_bytes.saturating_sub(s.used_bytes) / BSIZE;
                // Inodes are not a limited resource; report plenty free so `df -i` adds up.
                const FREE_INODES: u64 = 1 << 32;
                reply.statfs(
                    s.capacity_bytes / BSIZE,
                    free,
                    free,
                    s.inodes + FREE_INODES,
                    FREE_INODES,
                    BSIZE as u32,
                    255,
                    BSIZE as u32,
                )
            }
            Err(e) => reply.error(errno("statfs", &e)),
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let readdirplus_auto = self
            .handlers
            .opts
            .readdirplus_auto
            .then_some(InitFlags::FUSE_READDIRPLUS_AUTO);
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ]
        .into_iter()
        .chain(readdirplus_auto)
        {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        let passthrough = &self.handlers.passthrough;
        if passthrough.enabled() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("kernel lacks FUSE passthrough; serving reads in userspace");
                passthrough.disable();
            }
        }
        if self.handlers.opens_in_kernel() {
            if config
                .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                .is_err()
            {
                tracing::warn!("kernel cannot open files without the mount (zero-message opens); open_in_kernel is off");
                self.handlers
                    .open_in_kernel
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            // With no opens to drop it, a file's page cache goes when its attributes (from
            // a lookup or getattr) show a new version.
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if let Some(tx) = self.initialized.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        metrics::counter!("granary_client_lookups_total").increment(1);
        let h = &self.handlers;
        if let Some(i) = h.fs.lookup_cached(parent.0, name.as_bytes()) {
            return h.reply_entry("lookup", Ok(i), reply);
        }
        let name = name.to_owned();
        self.offload(move |h| {
            h.reply_entry("lookup", h.fs.lookup(parent.0, name.as_bytes()), reply)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let h = &self.handlers;
        if let Some(i) = h.fs.getattr_cached(ino.0) {
            return h.reply_attr(ino.0, Ok(i), reply);
        }
        self.offload(move |h| h.reply_attr(ino.0, h.fs.getattr(ino.0), reply));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let h = &self.handlers;
        if let Some(r) = h.fs.readlink_cached(ino.0) {
            return reply_readlink(r, reply);
        }
        self.offload(move |h| reply_readlink(h.fs.readlink(ino.0), reply));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let h = &self.handlers;
        if h.opens_in_kernel() {
            // The kernel takes ENOSYS as "opens need no request": this open and every later
            // one succeed without one, with the page cache kept (FOPEN_KEEP_CACHE).
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        // A passthrough open that registers a backing file asks the worker for it.
        if h.passthrough.settled(ino.0) {
            if let Some(r) = h.fs.open_cached(ino.0, flags.0) {
                return h.reply_open(ino.0, flags.0, r, reply);
            }
        }
        self.offload(move |h| h.open(ino.0, flags.0, reply));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = self.handlers.reads.begin(ino.0, offset);
        if self.handlers.opens_in_kernel() {
            // A file the kernel opened by itself: no handle.
            return self.offload(move |h| {
                h.reply_read(read, ino.0, h.fs.read_unopened(ino.0, offset, size), reply)
            });
        }
        self.offload(move |h| h.reply_read(read, ino.0, h.fs.read(fh.0, offset, size), reply));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.handlers.opens_in_kernel() {
            // Nothing to commit on a read-only mount; ENOSYS stops flushes altogether.
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        if let Some(r) = self.handlers.fs.flush_cached(fh.0) {
            return reply_empty("flush", r, reply);
        }
        self.offload(move |h| reply_empty("flush", h.fs.flush(fh.0), reply));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.handlers.opens_in_kernel() {
            // Nothing to make durable on a read-only mount; ENOSYS makes fsync succeed in
            // the kernel from now on.
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        self.offload(move |h| reply_empty("fsync", h.fs.fsync(fh.0), reply));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.offload(move |h| match h.fs.write(fh.0, offset, &data, flags.0) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.offload(move |h| {
            match h
                .fs
                .create(parent.0, name.as_bytes(), mode, flags, uid, gid)
            {
                Ok((inode, fh)) => reply.created(
                    &h.opts.entry_and_attr_ttl(),
                    &h.attr(&inode),
                    Generation(0),
                    FileHandle(fh),
                    fopen(OpenMode::writer()),
                ),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.offload(move |h| {
            let r = h.fs.mkdir(parent.0, name.as_bytes(), mode, uid, gid);
            h.reply_entry("mkdir", r, reply)
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_owned(), target.as_os_str().to_owned());
        let (uid, gid) = (req.uid(), req.gid());
        self.offload(move |h| {
            let r =
                h.fs.symlink(parent.0, name.as_bytes(), target.as_bytes(), uid, gid);
            h.reply_entry("symlink", r, reply)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.offload(move |h| {
            reply_empty(
                "unlink",
                h.fs.remove(parent.0, name.as_bytes(), false),
                reply,
            )
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.offload(move |h| {
            reply_empty("rmdir", h.fs.remove(parent.0, name.as_bytes(), true), reply)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // Swapping two entries atomically is not supported.
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.offload(move |h| {
            let r = h.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                no_replace,
            );
            reply_empty("rename", r, reply)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.to_owned();
        self.offload(move |h| {
            let r = h.fs.link(ino.0, newparent.0, newname.as_bytes());
            h.reply_entry("link", r, reply)
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.offload(move |h| {
            let r =
                h.fs.mknod(parent.0, name.as_bytes(), mode, rdev as u64, uid, gid);
            h.reply_entry("mknod", r, reply)
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            size,
            mode,
            uid,
            gid,
            atime_ns: atime.map(to_ns),
            mtime_ns: mtime.map(to_ns),
        };
        self.offload(move |h| h.reply_attr(ino.0, h.fs.setattr(ino.0, &change), reply));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = &self.handlers;
        if h.fs.closes_without_waiting(ino.0, flags.0) {
            let after_reply = h.release(ino.0, fh.0);
            reply.ok();
            return after_reply();
        }
        self.offload(move |h| {
            let after_reply = h.release(ino.0, fh.0);
            // Told after the reply: the kernel may hold the inode's pages until it has it.
            reply.ok();
            after_reply()
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let h = &self.handlers;
        if let Some(r) = h.fs.opendir_cached(ino.0) {
            return h.reply_opendir(r, reply);
        }
        self.offload(move |h| h.reply_opendir(h.fs.opendir(ino.0), reply));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.offload(move |h| h.readdir(fh.0, offset, reply));
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.offload(move |h| h.readdirplus(fh.0, offset, reply));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.offload(move |h| {
            reply_empty(
                "fallocate",
                h.fs.fallocate(ino.0, offset, length, mode),
                reply,
            )
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.offload(move |h| reply_empty("fsyncdir", h.fs.fsyncdir(ino.0), reply));
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handlers.fs.releasedir(fh.0);
        reply.ok();
    }

    // Extended attributes are not kept. ENOSYS (answered quietly, unlike fuser's default
    // that logs a warning) makes the kernel stop asking, including the
    // `security.capability` lookup it does before every write.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    /// Granary files take no ioctls. ENOTTY is what a local regular file answers, and
    /// Python asks it (TCGETS, to see whether the file is a terminal) at every `open()`:
    /// fuser's default would log a warning for each.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.offload(move |h| h.statfs(reply));
    }
}
