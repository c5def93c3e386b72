//! Opening and reading: the committed version through the block reader, or what this
//! mount has staged for a file being written here.

use std::sync::atomic::Ordering;

use granary_common::{FsError, FsResult};
use granary_protos::v1::{FileKind, Inode};

use super::{shown, FoundChanged, GranaryFs};
use crate::block_reader::ReadState;
use crate::staging::Staged;

/// Whether an open with these flags (or a release, given its open's flags) may change the
/// file.
pub fn changes_file(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl GranaryFs {
    /// Opens a file; returns the handle and whether the kernel may keep the page cache it
    /// holds for this file (the content has not changed since it was last opened here).
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, bool)> {
        if changes_file(flags) {
            self.writable()?;
        }
        let inode = self.committed(ino)?;
        self.open_inode(ino, inode, flags)
    }

    /// [`Self::open`] for reading if the mount's caches answer it without waiting.
    pub fn open_cached(&self, ino: u64, flags: i32) -> Option<FsResult<(u64, bool)>> {
        if changes_file(flags) {
            return None;
        }
        Some(self.open_inode(ino, self.attrs.get(&ino)?, flags))
    }

    fn open_inode(&self, ino: u64, inode: Inode, flags: i32) -> FsResult<(u64, bool)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match FileKind::try_from(inode.kind) {
            Ok(FileKind::File) => {}
            Ok(FileKind::Directory) => return Err(FsError::IsDir(shown(&inode.name))),
            _ => return Err(FsError::InvalidArgument("not a regular file".into())),
        }
        let version = inode.fingerprint.unwrap_or_default();
        let keep_cache = self.opened_versions.get(&ino) == Some(version);
        if !keep_cache {
            self.opened_versions.insert(ino, version);
        }
        let staged = if write {
            let st = self.staging.attach(ino)?;
            if flags & libc::O_TRUNC != 0 {
                let mut st = st.lock();
                st.empty()?;
                st.touch();
            }
            Some(st)
        } else {
            None
        };
        Ok((self.add_handle(ino, inode, staged), keep_cache))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = self.open_file(fh)?;
        if let Some(st) = self.staging.get(file.ino) {
            let st = st.lock();
            if st.content.is_staged() {
                return read_staged(&st, offset, size);
            }
        }
        let mut guard = file.read.lock().expect("read state lock");
        let (inode, state) = &mut *guard;
        let commits = self.commits.load(Ordering::Acquire);
        let committed_here = file.seen_commits.swap(commits, Ordering::AcqRel) != commits;
        if let Some(now) = self.attrs.get(&file.ino) {
            if now.fingerprint != inode.fingerprint || now.size != inode.size {
                // Content committed on this mount since the handle opened replaces what
                // it reads. A version found in the UFS (by any reader here) does too,
                // unless the handle has served bytes of the old one: then it fails, and
                // serves no more of the old version into the page cache a new open of
                // the file shares.
                if !committed_here && state.served() {
                    let why = format!(
                        "{} changed in the UFS while being read: open it again",
                        String::from_utf8_lossy(&inode.ufs_path)
                    );
                    state.stale = Some(why);
                } else {
                    *inode = now;
                    *state = ReadState::default();
                }
            }
        }
        self.read_with(file.ino, inode, state, offset, size)
    }

    /// A read of a file the kernel opened by itself, with no handle (zero-message opens
    /// on a read-only mount).
    pub fn read_unopened(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut inode = self.committed(ino).map_err(|e| match e {
            // Deleted behind the kernel's back while it has the file open: a data error
            // for read(2), as on the handle path.
            FsError::NotFound(why) => FsError::io(format!("{why}; the file is deleted")),
            e => e,
        })?;
        let version = inode.fingerprint.unwrap_or_default();
        let mut state = self.unopened.take(ino, version, offset);
        // A state that failed its reader once goes: with no handle, a later read that
        // continues where it ended is as likely another reader's.
        let failed_before = state.stale.is_some();
        let read = self.read_with(ino, &mut inode, &mut state, offset, size);
        if !failed_before {
            self.unopened
                .put(ino, inode.fingerprint.unwrap_or_default(), state);
        }
        read
    }

    /// Reads `inode` (replaced, with `state`, when it changed in the UFS meanwhile). A
    /// state that has served bytes of the old version fails with ESTALE instead: its
    /// reader would get the new version's bytes after the old one's (blocks of the old
    /// one still cached, the rest of the new). Read again, the file is the new version.
    fn read_with(
        &self,
        ino: u64,
        inode: &mut Inode,
        state: &mut ReadState,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        if let Some(why) = &state.stale {
            return Err(FsError::Stale(why.clone()));
        }
        if offset >= inode.size || size == 0 {
            return Ok(Vec::new());
        }
        match self.reader.read(inode, state, offset, size) {
            Err(FsError::Stale(why)) => {
                let served = state.served();
                let old_size = inode.size;
                *inode = self.after_stale(ino, inode, &why)?;
                if served {
                    Self::mark_changed(FoundChanged::Changed);
                    // Every later read too: the kernel retries a failed readahead as
                    // a plain read, which must not get the new version's bytes either.
                    let why = format!("{why}; it changed while being read: open it again");
                    state.stale = Some(why.clone());
                    return Err(FsError::Stale(why));
                }
                *state = ReadState::default();
                Self::mark_changed(match inode.size < old_size {
                    true => FoundChanged::Shrunk,
                    false => FoundChanged::Changed,
                });
                match offset >= inode.size {
                    true => Ok(Vec::new()),
                    false => self.reader.read(inode, state, offset, size),
                }
            }
            other => other,
        }
    }

    /// `inode` as it is now, after a read of it found its UFS object changed or gone:
    /// the namespace's record if that names another object than this mount's copy (a
    /// directory above it was renamed, a new version committed through another mount),
    /// else what listing its directory again finds (changed in the UFS behind Granary's
    /// back). Never the cached blocks of the old version.
    pub(super) fn after_stale(&self, ino: u64, inode: &Inode, why: &str) -> FsResult<Inode> {
        let current = self.meta.getattr_latest(ino);
        if let Ok(c) = &current {
            if c.ufs_path != inode.ufs_path || c.fingerprint != inode.fingerprint {
                self.attrs.insert(ino, c.clone());
                return Ok(c.clone());
            }
        }
        tracing::info!(ino, %why, "file changed in the UFS; refreshing its metadata");
        // The directory its object is in: its first name's (the name it was opened by
        // may be a hard link elsewhere).
        let parent = current.map_or(inode.parent, |i| i.parent);
        self.meta.refresh(parent)?;
        self.attrs.invalidate(&ino);
        self.committed(ino).map_err(|e| match e {
            // Its last name went (here or elsewhere) and its object with it: a data error
            // for read(2), as a local filesystem's lost block would be.
            FsError::NotFound(_) => FsError::io(format!("{why}; the file is deleted")),
            e => e,
        })
    }

    /// The content version (UFS fingerprint: size, mtime) handle `fh` reads.
    pub fn open_version(&self, fh: u64) -> Option<(u64, i64)> {
        let file = self.files.read().expect("files lock").get(&fh).cloned()?;
        let guard = file.read.lock().expect("read state lock");
        let f = guard.0.fingerprint.unwrap_or_default();
        Some((f.size, f.mtime_ns))
    }

    /// For an open handle, a local file with the same bytes that the kernel may read
    /// directly (see [`DataPath::whole_file`]); never for a file being written.
    pub fn whole_file(&self, fh: u64) -> Option<std::fs::File> {
        let file = self.files.read().expect("files lock").get(&fh).cloned()?;
        if self.staging.get(file.ino).is_some() {
            return None;
        }
        let guard = file.read.lock().expect("read state lock");
        self.reader.whole_file(&guard.0)
    }
}

fn read_staged(st: &Staged, offset: u64, size: u32) -> FsResult<Vec<u8>> {
    if offset >= st.size {
        return Ok(Vec::new());
    }
    let len = (st.size - offset).min(size as u64) as usize;
    let mut buf = vec![0u8; len];
    // Nothing backs a staged file never written to: it is all zeros.
    if let Some(b) = &st.backing {
        b.read_exact_at(&mut buf, offset)?;
    }
    Ok(buf)
}
