//! A local or NFS directory as UFS. Every open goes through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` against a held root fd, so neither `..` nor a
//! symlink (even one swapped in after listing) can reach outside the root.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{
    moved_away, Fingerprint, ObjectKind, Ufs, UfsObject, UfsUpload, MODE_KNOWN, UPLOAD_PREFIX,
};
use crate::error::{FsError, FsResult};
use crate::path::components;

/// An upload temporary file untouched this long is garbage from a crash; listings sweep it.
const ABANDONED_UPLOAD_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct LocalUfs {
    uri: String,
    root: PathBuf,
    root_fd: OwnedFd,
}

impl LocalUfs {
    pub fn open(uri: &str, root: &str) -> FsResult<Self> {
        let root = PathBuf::from(root);
        let dir = File::open(&root)
            .map_err(|e| FsError::NotFound(format!("UFS root {}: {e}", root.display())))?;
        if !dir.metadata()?.is_dir() {
            return Err(FsError::NotDir(format!(
                "UFS root {} is not a directory",
                root.display()
            )));
        }
        Ok(LocalUfs {
            uri: uri.to_string(),
            root,
            root_fd: OwnedFd::from(dir),
        })
    }

    fn open_beneath(&self, path: &[u8], flags: i32) -> FsResult<File> {
        let parts = components(path)?;
        let rel: Vec<u8> = if parts.is_empty() {
            b".".to_vec()
        } else {
            parts.join(&b'/')
        };
        let c = CString::new(rel).map_err(|_| FsError::InvalidArgument("NUL in path".into()))?;
        // SAFETY: open_how is plain data; the path is NUL-terminated and outlives the call.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root_fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let shown = String::from_utf8_lossy(path);
            let msg = format!("{}/{shown}: {err}", self.root.display());
            return Err(match err.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => {
                    FsError::PermissionDenied(format!("{shown}: resolves outside the UFS root"))
                }
                Some(libc::ENOENT) => FsError::NotFound(msg),
                Some(libc::ENOTDIR) => FsError::NotDir(msg),
                Some(libc::EACCES) | Some(libc::EPERM) => FsError::PermissionDenied(msg),
                _ => FsError::ufs_from(msg, err),
            });
        }
        // SAFETY: the syscall returned a fresh descriptor that we now own.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// An upload into `dir` under a hidden temporary name, renamed into place on completion.
struct LocalUpload {
    dir: File,
    tmp: CString,
    name: CString,
    file: Option<File>,
}

impl Write for LocalUpload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("open until completed").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl UfsUpload for LocalUpload {
    fn local_file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    fn complete(mut self: Box<Self>, durable: bool) -> FsResult<UfsObject> {
        let file = self.file.take().expect("open until completed");
        if durable {
            file.sync_all()?;
        }
        let md = file.metadata()?;
        drop(file);
        // SAFETY: both names are NUL-terminated and relative to the held directory fd.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.tmp.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if durable {
            // The rename itself must survive a crash before the caller commits the size.
            self.dir.sync_all()?;
        }
        self.tmp = CString::default();
        object_from(self.name.as_bytes().to_vec(), &md, Vec::new())
            .ok_or_else(|| FsError::ufs("uploaded object is not a file"))
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            // SAFETY: a NUL-terminated name relative to the held directory fd.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

fn last_os_error(what: &str, path: &[u8]) -> FsError {
    os_error(what, path, std::io::Error::last_os_error())
}

/// The error of `what` on `path`: its own errno where it has one (`EEXIST`, `ENOTEMPTY`,
/// ...), else a UFS I/O error keeping `e` as its cause.
fn os_error(what: &str, path: &[u8], e: std::io::Error) -> FsError {
    let msg = format!("{what} {}: {e}", String::from_utf8_lossy(path));
    let specific = match e.raw_os_error() {
        Some(errno) => FsError::from(std::io::Error::from_raw_os_error(errno)),
        None => FsError::from(std::io::Error::from(e.kind())),
    };
    match specific {
        FsError::Io(_) => FsError::ufs_from(msg, e),
        specific => FsError::from_errno(specific.errno(), msg),
    }
}

/// A new file `name` in `dir` (nothing may be there, not even a link), read-write.
fn create_new_at(dir: &File, name: &CString) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name relative to the held directory fd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we now own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn cstring(name: &[u8]) -> FsResult<CString> {
    CString::new(name).map_err(|_| FsError::InvalidArgument("NUL in name".into()))
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

fn object_from(name: Vec<u8>, md: &std::fs::Metadata, target: Vec<u8>) -> Option<UfsObject> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        ObjectKind::File
    } else if ft.is_dir() {
        ObjectKind::Directory
    } else if ft.is_symlink() {
        ObjectKind::Symlink
    } else {
        return None;
    };
    Some(UfsObject {
        name,
        kind,
        size: if kind == ObjectKind::Directory {
            0
        } else {
            md.len()
        },
        mtime_ns: mtime_ns(md),
        mode: md.mode() & 0o7777 | MODE_KNOWN,
        symlink_target: target,
        owner: Some((md.uid(), md.gid())),
    })
}

impl LocalUfs {
    /// The parent directory of `path` (opened beneath the root) and the last component.
    fn parent_of(&self, path: &[u8]) -> FsResult<(File, CString)> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(FsError::InvalidArgument("the UFS root itself".into()));
        };
        let dir = self.open_beneath(&dirs.join(&b'/'), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok((dir, cstring(name)?))
    }

    fn stat_at(&self, dir: &File, name: &CString) -> FsResult<UfsObject> {
        // SAFETY: stat is plain data filled by the kernel; the name is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(last_os_error("stat", name.as_bytes()));
        }
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => ObjectKind::Directory,
            libc::S_IFLNK => ObjectKind::Symlink,
            _ => ObjectKind::File,
        };
        Ok(UfsObject {
            name: name.as_bytes().to_vec(),
            kind,
            size: if kind == ObjectKind::Directory {
                0
            } else {
                st.st_size as u64
            },
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            mode: st.st_mode & 0o7777 | MODE_KNOWN,
            symlink_target: Vec::new(),
            owner: Some((st.st_uid, st.st_gid)),
        })
    }
}

impl Ufs for LocalUfs {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn list(&self, dir: &[u8]) -> FsResult<Vec<UfsObject>> {
        let d = self.open_beneath(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let proc_path = format!("/proc/self/fd/{}", d.as_raw_fd());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&proc_path)? {
            let entry = entry?;
            // DirEntry::metadata does not follow symlinks.
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let target = if md.file_type().is_symlink() {
                std::fs::read_link(entry.path())?
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else {
                Vec::new()
            };
            if entry.file_name().as_bytes().starts_with(UPLOAD_PREFIX) {
                // Left by an upload cut off by a crash long ago: no upload runs this long.
                let abandoned = md
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > ABANDONED_UPLOAD_AGE);
                if abandoned {
                    let n = cstring(entry.file_name().as_bytes())?;
                    // SAFETY: a NUL-terminated name relative to the held directory fd.
                    unsafe { libc::unlinkat(d.as_raw_fd(), n.as_ptr(), 0) };
                }
                continue;
            }
            if let Some(obj) = object_from(entry.file_name().as_bytes().to_vec(), &md, target) {
                out.push(obj);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn stat(&self, path: &[u8]) -> FsResult<UfsObject> {
        let f = self.open_beneath(path, libc::O_RDONLY | libc::O_PATH)?;
        let md = f.metadata()?;
        let name = components(path)?
            .last()
            .map(|n| n.to_vec())
            .unwrap_or_default();
        object_from(name, &md, Vec::new()).ok_or_else(|| {
            FsError::Unsupported(format!(
                "{}: not a file or directory",
                String::from_utf8_lossy(path)
            ))
        })
    }

    fn read_range(
        &self,
        path: &[u8],
        version: Fingerprint,
        offset: u64,
        len: u64,
        sink: &mut dyn Write,
    ) -> FsResult<u64> {
        // Never blocking in the open: a FIFO put in the file's place would hold this
        // thread, and every reader of the block behind it, until a writer came.
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
        let f = match self.open_beneath(path, flags) {
            Err(FsError::NotFound(_)) => return Err(moved_away(path)),
            f => f?,
        };
        let unchanged = |f: &File| -> FsResult<()> {
            let md = f.metadata()?;
            if !md.is_file() {
                return Err(moved_away(path));
            }
            version.check(path, md.size(), mtime_ns(&md))
        };
        unchanged(&f)?;
        // Whole megabytes at a time: `io::copy` would hand the sink 8 KiB per call, and
        // a cache fill writes each call to disk.
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut copied = 0;
        while copied < len {
            let want = (len - copied).min(buf.len() as u64) as usize;
            let n = match f.read_at(&mut buf[..want], offset + copied) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            sink.write_all(&buf[..n])?;
            copied += n as u64;
        }
        // Rewritten in place meanwhile: what was copied may mix two versions.
        unchanged(&f)?;
        Ok(copied)
    }

    fn create_upload(&self, path: &[u8]) -> FsResult<Box<dyn UfsUpload>> {
        let (dir, name) = self.parent_of(path)?;
        let mut tmp_name = UPLOAD_PREFIX.to_vec();
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        tmp_name.extend_from_slice(format!("{:x}.{nonce:x}", std::process::id()).as_bytes());
        let tmp = cstring(&tmp_name)?;
        let file = create_new_at(&dir, &tmp).map_err(|e| os_error("create", path, e))?;
        Ok(Box::new(LocalUpload {
            dir,
            tmp,
            name,
            file: Some(file),
        }))
    }

    fn create_empty(&self, path: &[u8]) -> FsResult<Option<UfsObject>> {
        let (dir, name) = self.parent_of(path)?;
        let file = create_new_at(&dir, &name).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => FsError::Exists(String::from_utf8_lossy(path).into_owned()),
            _ => os_error("create", path, e),
        })?;
        let md = file.metadata()?;
        Ok(object_from(name.as_bytes().to_vec(), &md, Vec::new()))
    }

    fn mkdir(&self, path: &[u8]) -> FsResult<UfsObject> {
        let (dir, name) = self.parent_of(path)?;
        // SAFETY: a NUL-terminated name relative to the held directory fd.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
            return Err(last_os_error("mkdir", path));
        }
        self.stat_at(&dir, &name)
    }

    fn symlink(&self, target: &[u8], path: &[u8]) -> FsResult<UfsObject> {
        let (dir, name) = self.parent_of(path)?;
        let t = cstring(target)?;
        // SAFETY: NUL-terminated strings; the link is made relative to the held fd.
        if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
            return Err(last_os_error("symlink", path));
        }
        let mut obj = self.stat_at(&dir, &name)?;
        obj.symlink_target = target.to_vec();
        Ok(obj)
    }

    fn sync(&self, path: &[u8]) -> FsResult<()> {
        let f = self.open_beneath(path, libc::O_RDONLY)?;
        f.sync_all().map_err(|e| os_error("fsync", path, e))?;
        if !f.metadata()?.is_dir() && !path.is_empty() {
            // A file's name, which a rename or creation not yet synced may have changed.
            let (dir, _) = self.parent_of(path)?;
            dir.sync_all().map_err(|e| os_error("fsync", path, e))?;
        }
        Ok(())
    }

    fn remove(&self, path: &[u8], directory: bool) -> FsResult<()> {
        let (dir, name) = self.parent_of(path)?;
        let flags = if directory { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a NUL-terminated name relative to the held directory fd.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        let err = last_os_error("remove", path);
        if !matches!(err, FsError::NotEmpty(_)) {
            return Err(err);
        }
        // What an upload cut off by a crash left behind does not keep a directory alive.
        let d = self.open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))? {
            let entry = entry?;
            if entry.file_name().as_bytes().starts_with(UPLOAD_PREFIX) {
                let n = cstring(entry.file_name().as_bytes())?;
                // SAFETY: a NUL-terminated name relative to the held directory fd.
                unsafe { libc::unlinkat(d.as_raw_fd(), n.as_ptr(), 0) };
            }
        }
        // SAFETY: as above.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
            return Err(last_os_error("remove", path));
        }
        Ok(())
    }

    fn rename(&self, from: &[u8], to: &[u8]) -> FsResult<()> {
        let (from_dir, from_name) = self.parent_of(from)?;
        let (to_dir, to_name) = self.parent_of(to)?;
        // SAFETY: NUL-terminated names relative to held directory fds.
        let rc = unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                from_name.as_ptr(),
                to_dir.as_raw_fd(),
                to_name.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(last_os_error("rename", from));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_errno() {
        let tmp = tempfile::tempdir().unwrap();
        let ufs = LocalUfs::open("file:///x", tmp.path().to_str().unwrap()).unwrap();
        ufs.mkdir(b"d").unwrap();
        let e = ufs.mkdir(b"d").unwrap_err();
        assert!(matches!(e, FsError::Exists(_)), "{e:?}");
        assert!(e.to_string().contains("mkdir d"), "{e}");
        std::fs::write(tmp.path().join("d/f"), b"x").unwrap();
        let e = ufs.remove(b"d", true).unwrap_err();
        assert!(matches!(e, FsError::NotEmpty(_)), "{e:?}");
        assert!(matches!(ufs.stat(b"nothing"), Err(FsError::NotFound(_))));
        for synced in [&b""[..], b"d", b"d/f"] {
            ufs.sync(synced).unwrap();
        }
        assert!(matches!(ufs.sync(b"d/nothing"), Err(FsError::NotFound(_))));
    }

    #[test]
    fn lists_reads_and_stays_beneath_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f.bin"), b"hello world").unwrap();
        std::fs::write(tmp.path().join("secret"), b"no").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("sub/etc")).unwrap();

        let uri = super::super::local_uri(&root).unwrap();
        let ufs = LocalUfs::open(&uri, root.to_str().unwrap()).unwrap();
        let names: Vec<_> = ufs
            .list(b"")
            .unwrap()
            .into_iter()
            .map(|o| (o.name, o.kind))
            .collect();
        assert_eq!(
            names,
            vec![
                (b"escape".to_vec(), ObjectKind::Symlink),
                (b"sub".to_vec(), ObjectKind::Directory)
            ]
        );
        let sub = ufs.list(b"sub").unwrap();
        assert_eq!(sub[0].symlink_target, b"/etc");

        let f = ufs.stat(b"sub/f.bin").unwrap();
        let version = Fingerprint {
            size: f.size,
            mtime_ns: f.mtime_ns,
        };
        let mut out = Vec::new();
        assert_eq!(
            ufs.read_range(b"sub/f.bin", version, 6, 100, &mut out)
                .unwrap(),
            5
        );
        assert_eq!(out, b"world");
        let older = Fingerprint {
            mtime_ns: f.mtime_ns - 1,
            ..version
        };
        let mut sink = Vec::new();
        let stale = |r: FsResult<u64>| r.unwrap_err().errno() == libc::ESTALE;
        assert!(stale(ufs.read_range(b"sub/f.bin", older, 0, 10, &mut sink)));
        assert!(stale(ufs.read_range(
            b"sub/gone",
            version,
            0,
            10,
            &mut sink
        )));
        // A FIFO in the file's place answers at once, without a writer.
        let fifo = CString::new(root.join("sub/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a plain syscall on a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(stale(ufs.read_range(
            b"sub/fifo",
            version,
            0,
            10,
            &mut sink
        )));
        assert!(sink.is_empty(), "no bytes of another version");

        assert!(ufs
            .read_range(b"escape", version, 0, 10, &mut sink)
            .is_err());
        assert!(ufs.list(b"sub/etc").is_err());
        assert!(ufs
            .read_range(b"../secret", version, 0, 10, &mut sink)
            .is_err());
        assert_eq!(ufs.stat(b"missing").unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn uploads_appear_whole_and_abandoned_ones_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = super::super::local_uri(tmp.path()).unwrap();
        let ufs = LocalUfs::open(&uri, tmp.path().to_str().unwrap()).unwrap();
        let mut up = ufs.create_upload(b"f").unwrap();
        up.write_all(b"partial").unwrap();
        assert!(
            ufs.list(b"").unwrap().is_empty(),
            "an upload in progress is not listed"
        );
        drop(up);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "a dropped upload leaves nothing"
        );

        let mut up = ufs.create_upload(b"f").unwrap();
        up.write_all(b"whole").unwrap();
        let obj = up.complete(true).unwrap();
        assert_eq!(obj.size, 5);
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"whole");

        // A crash leaves a temp file: hidden, and swept once old enough.
        let stale = tmp.path().join(".granary-upload.dead");
        std::fs::write(&stale, b"x").unwrap();
        let old = std::time::SystemTime::now() - ABANDONED_UPLOAD_AGE * 2;
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let names: Vec<_> = ufs.list(b"").unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, vec![b"f".to_vec()]);
        assert!(!stale.exists());
    }

    #[test]
    fn an_empty_file_is_made_only_where_nothing_is() {
        let tmp = tempfile::tempdir().unwrap();
        let uri = super::super::local_uri(tmp.path()).unwrap();
        let ufs = LocalUfs::open(&uri, tmp.path().to_str().unwrap()).unwrap();
        let made = ufs.create_empty(b"new").unwrap().unwrap();
        assert_eq!((made.kind, made.size), (ObjectKind::File, 0));
        assert_eq!(std::fs::read(tmp.path().join("new")).unwrap(), b"");

        std::fs::write(tmp.path().join("full"), b"kept").unwrap();
        std::os::unix::fs::symlink("nowhere", tmp.path().join("dangling")).unwrap();
        for taken in [&b"new"[..], b"full", b"dangling"] {
            assert!(matches!(ufs.create_empty(taken), Err(FsError::Exists(_))));
        }
        assert_eq!(std::fs::read(tmp.path().join("full")).unwrap(), b"kept");
        assert!(!tmp.path().join("nowhere").exists(), "never follows a link");
        assert!(matches!(
            ufs.create_empty(b"missing/dir/f"),
            Err(FsError::NotFound(_))
        ));
    }
}
