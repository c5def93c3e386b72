//! The `fuser::Filesystem` adapter: translates kernel requests into [`GranaryFs`] calls
//! and results into replies. No filesystem logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use granary_common::FsError;
use granary_protos::v1::{FileKind, Inode};

use crate::fs::GranaryFs;

/// What the kernel is told about caching and ownership.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    pub keep_cache: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

pub struct FuseAdapter {
    pub fs: Arc<GranaryFs>,
    pub opts: KernelOptions,
    pub passthrough: Passthrough,
}

/// FUSE passthrough state: one backing file per inode, shared by all its open handles
/// (the kernel requires that), closed when the last one is released.
#[derive(Default)]
pub struct Passthrough {
    enabled: AtomicBool,
    by_inode: Mutex<HashMap<u64, (Arc<BackingId>, usize)>>,
    by_handle: Mutex<HashMap<u64, u64>>,
}

impl Passthrough {
    pub fn new(wanted: bool) -> Self {
        Passthrough {
            enabled: AtomicBool::new(wanted),
            ..Default::default()
        }
    }

    fn release(&self, fh: u64) {
        let Some(ino) = self.by_handle.lock().expect("passthrough lock").remove(&fh) else {
            return;
        };
        let mut by_inode = self.by_inode.lock().expect("passthrough lock");
        if let Some((_, users)) = by_inode.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                by_inode.remove(&ino);
            }
        }
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

impl FuseAdapter {
    fn attr(&self, i: &Inode) -> FileAttr {
        let kind = match FileKind::try_from(i.kind) {
            Ok(FileKind::Directory) => FileType::Directory,
            Ok(FileKind::Symlink) => FileType::Symlink,
            _ => FileType::RegularFile,
        };
        let dir = kind == FileType::Directory;
        let size = if kind == FileType::Symlink {
            i.symlink_target.len() as u64
        } else {
            i.size
        };
        let t = UNIX_EPOCH + Duration::from_nanos(i.mtime_ns.max(0) as u64);
        let perm = match i.mode & 0o7777 {
            0 if dir => 0o755,
            0 => 0o644,
            p => p,
        };
        FileAttr {
            ino: INodeNo(i.id),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: perm as u16,
            nlink: if dir { 2 } else { 1 },
            uid: self.opts.uid.unwrap_or(i.uid),
            gid: self.opts.gid.unwrap_or(i.gid),
            rdev: 0,
            blksize: 1 << 17,
            flags: 0,
        }
    }
}

impl FuseAdapter {
    /// The inode's backing file for passthrough, registering it on first use.
    fn backing_for(&self, ino: u64, fh: u64, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let pt = &self.passthrough;
        let mut by_inode = pt.by_inode.lock().expect("passthrough lock");
        let backing = match by_inode.get_mut(&ino) {
            Some((id, users)) => {
                *users += 1;
                id.clone()
            }
            None => {
                let file = self.fs.whole_file(fh)?;
                match reply.open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        by_inode.insert(ino, (id.clone(), 1));
                        id
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "FUSE passthrough unavailable; serving reads in userspace");
                        pt.enabled.store(false, Ordering::Relaxed);
                        return None;
                    }
                }
            }
        };
        pt.by_handle
            .lock()
            .expect("passthrough lock")
            .insert(fh, ino);
        metrics::counter!("granary_client_passthrough_opens_total").increment(1);
        Some(backing)
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        if self.passthrough.enabled.load(Ordering::Relaxed) {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("kernel lacks FUSE passthrough; serving reads in userspace");
                self.passthrough.enabled.store(false, Ordering::Relaxed);
            }
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(i) => reply.entry(&self.opts.entry_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(i) => reply.attr(&self.opts.attr_ttl, &self.attr(&i)),
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
        let fh = match self.fs.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno("open", &e)),
        };
        let flags = if self.opts.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        if self.passthrough.enabled.load(Ordering::Relaxed) {
            if let Some(backing) = self.backing_for(ino.0, fh, &reply) {
                // The kernel refuses KEEP_CACHE with passthrough (the page cache is the
                // backing file's own, so it is kept anyway).
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
            }
        }
        reply.opened(FileHandle(fh), flags)
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
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only mount; ENOSYS makes the kernel stop sending
        // FLUSH on every close(), saving a round trip per file.
        reply.error(Errno::ENOSYS);
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
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
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
