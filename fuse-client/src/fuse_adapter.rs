//! The `fuser::Filesystem` adapter: translates kernel requests into [`GranaryFs`] calls
//! and results into replies. No filesystem logic lives here.

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

use crate::fs::{GranaryFs, SetAttr};
use crate::kernel_view::{Attributes, OpenMode, OwnerOverride, BLOCK_SIZE_HINT};
use crate::passthrough::{Claim, Passthrough};

/// What the kernel is told about caching and ownership.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    pub keep_cache: bool,
    pub owner: OwnerOverride,
}

pub struct FuseAdapter {
    pub fs: Arc<GranaryFs>,
    pub opts: KernelOptions,
    pub passthrough: Passthrough,
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

impl FuseAdapter {
    fn reply_entry(&self, op: &str, r: granary_common::FsResult<Inode>, reply: ReplyEntry) {
        match r {
            Ok(i) => reply.entry(&self.opts.entry_ttl, &self.attr(&i), Generation(0)),
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

impl FuseAdapter {
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
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        if self.passthrough.enabled() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("kernel lacks FUSE passthrough; serving reads in userspace");
                self.passthrough.disable();
            }
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.reply_entry("lookup", self.fs.lookup(parent.0, name.as_bytes()), reply)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(i) => reply.attr(&self.opts.attr_ttl, &self.attr(&i)),
            Err(FsError::NotFound(why)) => match self.fs.open_unlinked(ino.0) {
                // Unlinked while open: its descriptors still work (fstat says nlink 0).
                Some(i) => {
                    let mut attr = self.attr(&i);
                    attr.nlink = 0;
                    reply.attr(&Duration::ZERO, &attr)
                }
                None => reply.error(errno("getattr", &FsError::NotFound(why))),
            },
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if writes && !self.passthrough.writable(ino.0) {
            tracing::warn!(
                ino = ino.0,
                "a file open for reading through FUSE passthrough cannot be opened for writing until those readers close (mount option passthrough = false allows it)"
            );
            let e = FsError::TextBusy(format!("inode {} is read through passthrough", ino.0));
            return reply.error(errno("open", &e));
        }
        let (fh, unchanged) = match self.fs.open(ino.0, flags.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno("open", &e)),
        };
        let mode = OpenMode::for_open(flags.0, self.opts.keep_cache, unchanged);
        if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
            return self.open_read_only(ino.0, fh, mode, reply);
        }
        reply.opened(FileHandle(fh), fopen(mode))
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty("flush", self.fs.flush(fh.0), reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty("fsync", self.fs.fsync(fh.0), reply)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        }
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
        match self
            .fs
            .create(parent.0, name.as_bytes(), mode, flags, req.uid(), req.gid())
        {
            Ok((inode, fh)) => reply.created(
                &self.opts.entry_ttl,
                &self.attr(&inode),
                Generation(0),
                FileHandle(fh),
                fopen(OpenMode::writer()),
            ),
            Err(e) => reply.error(errno("create", &e)),
        }
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
        self.reply_entry(
            "mkdir",
            self.fs
                .mkdir(parent.0, name.as_bytes(), mode, req.uid(), req.gid()),
            reply,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            "symlink",
            self.fs.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                req.uid(),
                req.gid(),
            ),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            "unlink",
            self.fs.remove(parent.0, name.as_bytes(), false),
            reply,
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            "rmdir",
            self.fs.remove(parent.0, name.as_bytes(), true),
            reply,
        )
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
        reply_empty(
            "rename",
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            "link",
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
            reply,
        )
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
        self.reply_entry(
            "mknod",
            self.fs.mknod(
                parent.0,
                name.as_bytes(),
                mode,
                rdev as u64,
                req.uid(),
                req.gid(),
            ),
            reply,
        )
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
        let ns = |t: TimeOrNow| {
            let t = match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => std::time::SystemTime::now(),
            };
            match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i64,
                Err(e) => -(e.duration().as_nanos() as i64),
            }
        };
        let change = SetAttr {
            size,
            mode,
            uid,
            gid,
            atime_ns: atime.map(ns),
            mtime_ns: mtime.map(ns),
        };
        match self.fs.setattr(ino.0, &change) {
            Ok(i) => reply.attr(&self.opts.attr_ttl, &self.attr(&i)),
            Err(e) => reply.error(errno("setattr", &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
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

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.fs.readdir(fh.0, offset, 1024) {
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

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.fs.readdir(fh.0, offset, 1024) {
            Ok(e) => e,
            Err(e) => return reply.error(errno("readdirplus", &e)),
        };
        for e in entries {
            let attr = self.attr(&e.inode);
            if reply.add(
                INodeNo(e.inode.id),
                e.offset,
                OsStr::from_bytes(&e.name),
                &self.opts.entry_ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
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
