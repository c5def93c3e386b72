//! A plain passthrough FUSE filesystem over a directory, for the benches: what any FUSE
//! filesystem pays for an operation (the kernel round trips, one host syscall each) with
//! no metadata service, upload or cache behind it. Mounted the way Granary's mount is
//! (threads, `default_permissions`, direct I/O for writers), it shows how much of a gap
//! to the raw disk is FUSE's own. It serves what the benches do: lookups, attributes
//! (read and set), directories made and listed, files created, opened, read, written,
//! closed, renamed and removed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

const ROOT: u64 = 1;

/// Paths by inode number and back; numbers are handed out on first sight.
#[derive(Default)]
struct Inodes {
    paths: HashMap<u64, PathBuf>,
    numbers: HashMap<PathBuf, u64>,
}

/// A directory's entries as read at opendir: readdir pages through them (rereading the
/// directory per page would make listing a big one quadratic).
type Listing = Vec<(u64, FileType, std::ffi::OsString)>;

struct Passthrough {
    inodes: RwLock<Inodes>,
    next_ino: AtomicU64,
    files: RwLock<HashMap<u64, Arc<File>>>,
    listings: RwLock<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    /// Kernel entry and attribute cache lifetime.
    ttl: Duration,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Passthrough {
    fn new(root: &Path, ttl: Duration) -> Self {
        let mut inodes = Inodes::default();
        inodes.paths.insert(ROOT, root.to_path_buf());
        inodes.numbers.insert(root.to_path_buf(), ROOT);
        Passthrough {
            inodes: RwLock::new(inodes),
            next_ino: AtomicU64::new(ROOT + 1),
            files: RwLock::new(HashMap::new()),
            listings: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ttl,
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn reply_attr(&self, reply: ReplyAttr, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    /// Forgets `path`'s number: the name no longer leads there (what went was a file or
    /// an empty directory).
    fn forget_path(&self, path: &Path) {
        let mut inodes = self.inodes.write().expect("inodes lock");
        if let Some(ino) = inodes.numbers.remove(path) {
            inodes.paths.remove(&ino);
        }
    }

    /// Moves the numbers of `from` (and, for a directory, everything under it) to `to`,
    /// so open inodes keep working after a rename.
    fn move_path(&self, from: &Path, to: &Path) {
        self.forget_path(to);
        // Only a directory has numbers under it; a file's rename stays O(1).
        let dir = to.is_dir();
        let mut inodes = self.inodes.write().expect("inodes lock");
        let moved: Vec<(PathBuf, u64)> = match dir {
            true => inodes
                .numbers
                .iter()
                .filter(|(p, _)| p.starts_with(from))
                .map(|(p, &ino)| (p.clone(), ino))
                .collect(),
            false => inodes
                .numbers
                .get(from)
                .map(|&ino| vec![(from.to_path_buf(), ino)])
                .unwrap_or_default(),
        };
        for (p, ino) in moved {
            inodes.numbers.remove(&p);
            let rest = p.strip_prefix(from).expect("under from");
            // join("") would add a trailing slash.
            let new = match rest.as_os_str().is_empty() {
                true => to.to_path_buf(),
                false => to.join(rest),
            };
            inodes.paths.insert(ino, new.clone());
            inodes.numbers.insert(new, ino);
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let inodes = self.inodes.read().expect("inodes lock");
        inodes.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn number(&self, path: &Path) -> u64 {
        if let Some(&ino) = self.inodes.read().expect("inodes lock").numbers.get(path) {
            return ino;
        }
        let mut inodes = self.inodes.write().expect("inodes lock");
        if let Some(&ino) = inodes.numbers.get(path) {
            return ino;
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        inodes.paths.insert(ino, path.to_path_buf());
        inodes.numbers.insert(path.to_path_buf(), ino);
        ino
    }

    fn attr(&self, path: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(path).map_err(errno)?;
        let time = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
        let kind = if m.is_dir() {
            FileType::Directory
        } else if m.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        Ok(FileAttr {
            ino: INodeNo(self.number(path)),
            size: m.size(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.mtime(), m.mtime_nsec()),
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: m.blksize() as u32,
            flags: 0,
        })
    }

    fn add_file(&self, f: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .write()
            .expect("files lock")
            .insert(fh, Arc::new(f));
        FileHandle(fh)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        let files = self.files.read().expect("files lock");
        files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }
}

/// The kernel's open flags as they are (O_CREAT among them, which std would refuse with
/// a read-only descriptor).
fn open_options(flags: i32) -> OpenOptions {
    let mut o = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => o.write(true),
        libc::O_RDWR => o.read(true).write(true),
        _ => o.read(true),
    };
    o.custom_flags(flags & (libc::O_APPEND | libc::O_TRUNC | libc::O_EXCL | libc::O_CREAT));
    o
}

fn system_time(t: TimeOrNow) -> std::time::SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => std::time::SystemTime::now(),
    }
}

/// Descriptors open for writing skip the mount's page cache, as Granary's do.
fn fopen(flags: i32) -> FopenFlags {
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        FopenFlags::empty()
    } else {
        FopenFlags::FOPEN_DIRECT_IO
    }
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.reply_entry(reply, self.child(parent, name).and_then(|p| self.attr(&p)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(reply, self.path(ino).and_then(|p| self.attr(&p)));
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
        let changed = self.path(ino).and_then(|p| {
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&p, uid, gid).map_err(errno)?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if size.is_some() || atime.is_some() || mtime.is_some() {
                let f = OpenOptions::new()
                    .write(size.is_some())
                    .read(size.is_none())
                    .open(&p)
                    .map_err(errno)?;
                if let Some(size) = size {
                    f.set_len(size).map_err(errno)?;
                }
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(system_time(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(system_time(t));
                }
                f.set_times(times).map_err(errno)?;
            }
            self.attr(&p)
        });
        self.reply_attr(reply, changed);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.child(parent, name).and_then(|p| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(errno)?;
            self.attr(&p)
        });
        self.reply_entry(reply, made);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|p| {
            std::fs::remove_file(&p).map_err(errno)?;
            self.forget_path(&p);
            Ok(())
        });
        reply_empty(reply, removed);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|p| {
            std::fs::remove_dir(&p).map_err(errno)?;
            self.forget_path(&p);
            Ok(())
        });
        reply_empty(reply, removed);
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
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let renamed = self.child(parent, name).and_then(|from| {
            let to = self.child(newparent, newname)?;
            std::fs::rename(&from, &to).map_err(errno)?;
            self.move_path(&from, &to);
            Ok(())
        });
        reply_empty(reply, renamed);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let made = self.child(parent, name).and_then(|p| {
            let f = open_options(flags | libc::O_CREAT)
                .mode(mode)
                .open(&p)
                .map_err(errno)?;
            Ok((self.attr(&p)?, f))
        });
        match made {
            Ok((a, f)) => {
                reply.created(&self.ttl, &a, Generation(0), self.add_file(f), fopen(flags))
            }
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self
            .path(ino)
            .and_then(|p| open_options(flags.0).open(p).map_err(errno));
        match opened {
            Ok(f) => reply.opened(self.add_file(f), fopen(flags.0)),
            Err(e) => reply.error(e),
        }
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
        let read = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let n = f.read_at(&mut buf, offset).map_err(errno)?;
            buf.truncate(n);
            Ok(buf)
        });
        match read {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
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
        let written = self.file(fh).and_then(|f| {
            f.write_all_at(data, offset).map_err(errno)?;
            Ok(data.len() as u32)
        });
        match written {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
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
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let synced = self.file(fh).and_then(|f| {
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(errno)
        });
        reply_empty(reply, synced);
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
        self.files.write().expect("files lock").remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let entries = self.path(ino).and_then(|dir| {
            let mut out = Listing::new();
            for e in std::fs::read_dir(&dir).map_err(errno)? {
                let e = e.map_err(errno)?;
                let kind = match e.file_type() {
                    Ok(t) if t.is_dir() => FileType::Directory,
                    Ok(t) if t.is_symlink() => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                out.push((self.number(&e.path()), kind, e.file_name()));
            }
            Ok(out)
        });
        match entries {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.listings
                    .write()
                    .expect("listings lock")
                    .insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
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
        let listing = self
            .listings
            .read()
            .expect("listings lock")
            .get(&fh.0)
            .cloned();
        let Some(entries) = listing else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
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
        self.listings.write().expect("listings lock").remove(&fh.0);
        reply.ok();
    }
}

/// Mounts a passthrough of `backing` at `mountpoint` with `threads` FUSE threads and the
/// kernel caching entries and attributes for `ttl`; the returned session unmounts when
/// dropped.
pub fn mount(
    backing: &Path,
    mountpoint: &Path,
    threads: usize,
    ttl: Duration,
) -> anyhow::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("passthrough".into()),
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    Ok(fuser::spawn_mount(
        Passthrough::new(backing, ttl),
        mountpoint,
        &config,
    )?)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_passthrough_mount_forwards_what_the_benches_do() {
        let backing = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let session = mount(backing.path(), mnt.path(), 4, Duration::from_secs(300)).unwrap();
        let m = mnt.path();
        std::fs::create_dir_all(m.join("d/e")).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = File::create(m.join("d/e/f")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(std::fs::read(backing.path().join("d/e/f")).unwrap(), data);
        let mut back = Vec::new();
        File::open(m.join("d/e/f"))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        let listed: Vec<_> = std::fs::read_dir(m.join("d/e"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(listed, ["f"]);
        assert_eq!(
            File::create_new(m.join("d/e/f")).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        // Opening an existing file with O_TRUNC truncates it (a setattr); chmod too.
        File::create(m.join("d/e/f")).unwrap();
        assert_eq!(
            std::fs::metadata(backing.path().join("d/e/f"))
                .unwrap()
                .len(),
            0
        );
        std::fs::set_permissions(m.join("d/e/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let mode = std::fs::metadata(backing.path().join("d/e/f"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::rename(m.join("d/e"), m.join("d/g")).unwrap();
        assert!(backing.path().join("d/g/f").exists());
        std::fs::rename(m.join("d/g/f"), m.join("d/g/h")).unwrap();
        assert_eq!(std::fs::metadata(m.join("d/g/h")).unwrap().len(), 0);
        std::fs::remove_file(m.join("d/g/h")).unwrap();
        assert!(!backing.path().join("d/g/h").exists());
        assert!(std::fs::metadata(m.join("d/g/h")).is_err());
        std::fs::remove_dir(m.join("d/g")).unwrap();
        assert!(!backing.path().join("d/g").exists());
        drop(session);
    }
}
