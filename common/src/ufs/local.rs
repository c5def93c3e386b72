//! A local or NFS directory as UFS. Every open goes through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` against a held root fd, so neither `..` nor a
//! symlink (even one swapped in after listing) can reach outside the root.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{ObjectKind, Ufs, UfsObject};
use crate::error::{FsError, FsResult};
use crate::path::components;

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
        let c = CString::new(rel).map_err(|_| FsError::InvalidPath("NUL in path".into()))?;
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
                _ => FsError::Ufs(msg),
            });
        }
        // SAFETY: the syscall returned a fresh descriptor that we now own.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
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
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        mode: md.mode() & 0o7777,
        symlink_target: target,
    })
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
        offset: u64,
        len: u64,
        sink: &mut dyn Write,
    ) -> FsResult<u64> {
        let mut f = self.open_beneath(path, libc::O_RDONLY)?;
        f.seek(SeekFrom::Start(offset))?;
        let copied = std::io::copy(&mut f.take(len), sink)?;
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        let mut out = Vec::new();
        assert_eq!(ufs.read_range(b"sub/f.bin", 6, 100, &mut out).unwrap(), 5);
        assert_eq!(out, b"world");

        let mut sink = Vec::new();
        assert!(ufs.read_range(b"escape", 0, 10, &mut sink).is_err());
        assert!(ufs.list(b"sub/etc").is_err());
        assert!(ufs.read_range(b"../secret", 0, 10, &mut sink).is_err());
        assert_eq!(ufs.stat(b"missing").unwrap_err().errno(), libc::ENOENT);
    }
}
