//! Writing: creating files, staging what is written, and at a close or fsync storing it
//! in the UFS (through the content store) and committing the new version through the
//! leader.

use std::sync::atomic::Ordering;

use granary_common::path::validate_name;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{CommitContent, CreateRequest, FileKind, Inode, UfsFingerprint};

use super::{changes_file, shown, GranaryFs};
use crate::block_reader::ReadState;
use crate::content_store::NotStored;
use crate::staging::{Backing, Content, Staged};

/// Bytes copied per step when committed content is brought into a staging file.
const FILL_CHUNK: u32 = 4 << 20;

impl GranaryFs {
    /// Creates and opens a new regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Inode, u64)> {
        self.writable()?;
        validate_name(name)?;
        let created = self.meta.create(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: FileKind::File as i32,
            mode,
            uid,
            gid,
            symlink_target: Vec::new(),
            rdev: 0,
        });
        let inode = match created {
            // Made elsewhere since the kernel looked the name up: open it, as open(2)
            // without O_EXCL does.
            Err(FsError::Exists(_)) if flags & libc::O_EXCL == 0 => {
                let existing = self.meta.lookup(parent, name)?;
                self.remember(&existing);
                let (fh, _) = self.open(existing.id, flags)?;
                return Ok((self.overlay(existing), fh));
            }
            other => other?,
        };
        self.remember(&inode);
        self.dir_changed(parent);
        let st = self.staging.attach(inode.id)?;
        {
            let mut st = st.lock();
            st.empty()?;
            // The master made the empty object already: a close with nothing written
            // stores nothing. Otherwise the first close puts one in the UFS.
            if inode.fingerprint.is_some() {
                st.content = Content::Clean { synced: false };
            }
        }
        self.opened_versions
            .insert(inode.id, inode.fingerprint.unwrap_or_default());
        let fh = self.add_handle(inode.id, inode.clone(), Some(st));
        Ok((inode, fh))
    }

    /// Brings the committed content into a staging file that has not got it yet.
    pub(super) fn fill(&self, ino: u64, st: &mut Staged) -> FsResult<()> {
        let synced = match st.content {
            Content::Clean { .. } | Content::Dirty => return Ok(()),
            Content::Committed { synced } => synced,
            // The new content is in the UFS already; what is committed is older.
            Content::Published { .. } => {
                self.commit_published(ino, st)?;
                return self.fill(ino, st);
            }
        };
        let mut inode = self.committed(ino)?;
        // Sized for the whole content up front: a big file never starts in memory.
        self.backing_for(ino, st, inode.size)?;
        let mut state = ReadState::default();
        let mut offset = 0;
        let mut refreshed = false;
        while offset < inode.size {
            let want = (inode.size - offset).min(FILL_CHUNK as u64) as u32;
            let data = match self.reader.read(&inode, &mut state, offset, want) {
                // Changed or moved since this mount cached it: the writes go on the
                // current content, from the start.
                Err(FsError::Stale(why)) if !refreshed => {
                    inode = self.after_stale(ino, &inode, &why)?;
                    refreshed = true;
                    state = ReadState::default();
                    offset = 0;
                    self.backing_for(ino, st, inode.size)?;
                    continue;
                }
                other => other?,
            };
            if data.is_empty() {
                return Err(FsError::io(format!(
                    "{}: content ended at {offset} of {} bytes",
                    shown(&inode.name),
                    inode.size
                )));
            }
            let end = offset + data.len() as u64;
            self.backing_for(ino, st, end)?
                .write_all_at(&data, offset)?;
            offset = end;
        }
        self.backing_for(ino, st, inode.size)?.set_len(inode.size)?;
        st.size = inode.size;
        st.content = Content::Clean { synced };
        Ok(())
    }

    /// write(2) at `offset`, or at the end when the descriptor's `flags` (as they are
    /// now: fcntl(2) may change `O_APPEND`) say append.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], flags: i32) -> FsResult<u32> {
        let file = self.open_file(fh)?;
        let Some(st) = &file.staged else {
            return Err(FsError::BadHandle("handle not open for writing".into()));
        };
        let mut st = st.lock();
        self.fill(file.ino, &mut st)?;
        let at = match flags & libc::O_APPEND {
            0 => offset,
            _ => st.size,
        };
        let end = at + data.len() as u64;
        let size = st.size;
        let backing = self.backing_for(file.ino, &mut st, end)?;
        if let Err(e) = backing.write_all_at(data, at) {
            // A full disk took part of the write. What it put past the end is not the
            // file's (the size stays what the writes that succeeded made it, as the
            // commit checks); what it changed before the end is, as on a local disk.
            if end > size {
                let _ = backing.set_len(size);
            }
            if at < size {
                st.content = Content::Dirty;
            }
            return Err(e.into());
        }
        backing.written(at, end);
        st.size = st.size.max(end);
        st.content = Content::Dirty;
        st.touch();
        Ok(data.len() as u32)
    }

    /// Makes what this mount wrote to the file visible, and safe from a crash of any
    /// process: store it in the UFS through a worker, then commit the new size and version
    /// through the leader. `durable` (fsync) also makes it survive a machine crash.
    fn commit_staged(&self, ino: u64, st: &mut Staged, durable: bool) -> FsResult<()> {
        if st.unlinked {
            return Ok(());
        }
        if let Content::Published { .. } = st.content {
            self.commit_published(ino, st)?;
        }
        match st.content {
            Content::Dirty => {}
            Content::Committed { synced } | Content::Clean { synced } if synced || !durable => {
                return Ok(())
            }
            // Committed by a close, now fsync'ed: the UFS makes it durable where it is.
            Content::Committed { .. } | Content::Clean { .. } => {
                self.meta.sync(ino)?;
                if let Content::Committed { synced } | Content::Clean { synced } = &mut st.content {
                    *synced = true;
                }
                return Ok(());
            }
            Content::Published { .. } => unreachable!("committed above"),
        }
        self.backing_for(ino, st, st.size)?;
        // Its UFS path as the namespace has it now: a rename of a directory above it
        // (through any mount) moved it, and this mount's cached copy names the old place.
        let inode = match self.meta.getattr_latest(ino) {
            Ok(inode) => inode,
            // Its last name went through another mount: as for a file unlinked here, what
            // its descriptors write goes when they close.
            Err(FsError::NotFound(_)) => {
                st.unlinked = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.attrs.insert(ino, inode.clone());
        let backing = st.backing.take().expect("made above");
        let stored = match self.store.store(&inode, backing, st.size, durable) {
            Ok(stored) => stored,
            Err(NotStored { error, backing }) => {
                st.backing = Some(backing);
                return Err(error);
            }
        };
        // Published by a worker: the staged bytes are the UFS object now, and what is
        // written next starts from the committed content.
        let published = stored.kept.is_none();
        st.backing = stored.kept;
        let committed = self.commit_version(ino, st, stored.fingerprint);
        st.content = match (&committed, published) {
            (Ok(()), true) => Content::Committed { synced: durable },
            (Ok(()), false) => Content::Clean { synced: durable },
            // In the UFS but not in the namespace: the next try commits it as it is.
            (Err(_), true) => Content::Published {
                fingerprint: stored.fingerprint,
                synced: durable,
            },
            (Err(_), false) => st.content,
        };
        committed
    }

    /// Commits content a worker already stored in the UFS.
    fn commit_published(&self, ino: u64, st: &mut Staged) -> FsResult<()> {
        if let Content::Published {
            fingerprint,
            synced,
        } = st.content
        {
            self.commit_version(ino, st, fingerprint)?;
            st.content = Content::Committed { synced };
        }
        Ok(())
    }

    /// Records the stored `fingerprint` (and the staged size and modification time) as
    /// the file's content through the leader.
    fn commit_version(
        &self,
        ino: u64,
        st: &mut Staged,
        fingerprint: UfsFingerprint,
    ) -> FsResult<()> {
        let committed = self.meta.commit(CommitContent {
            id: ino,
            size: st.size,
            fingerprint: Some(fingerprint),
            mtime_ns: st.modified_ns.unwrap_or(0),
        })?;
        st.modified_ns = None;
        self.remember(&committed);
        self.commits.fetch_add(1, Ordering::AcqRel);
        self.opened_versions.insert(ino, fingerprint);
        Ok(())
    }

    /// The staged file's bytes, able to hold `end` bytes, made on first use (see
    /// [`crate::content_store::ContentStore::backing`]). Memory outgrown (past the small
    /// file size, or the mount's buffer memory) moves to a file.
    fn backing_for<'a>(&self, ino: u64, st: &'a mut Staged, end: u64) -> FsResult<&'a mut Backing> {
        let outgrown = st.backing.as_mut().is_some_and(|b| !b.fits(end));
        if st.backing.is_none() || outgrown {
            let inode = self.committed_or_opened(ino)?;
            let fresh = self.store.backing(&inode, end)?;
            if let Some(Backing::Memory { data, .. }) = st.backing.replace(fresh) {
                st.backing
                    .as_mut()
                    .expect("just made")
                    .write_all_at(&data, 0)?;
            }
        }
        Ok(st.backing.as_mut().expect("made above"))
    }

    /// close(2) of one descriptor: what it wrote becomes visible.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.commit_handle(fh, false)
    }

    /// fsync(2), through any descriptor of the file: what was written to it becomes
    /// durable, whether still staged here or already in the UFS.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let file = self.open_file(fh)?;
        if self.read_only {
            return Ok(());
        }
        // A reader's descriptor: the file's writers here share their staged file.
        match file.staged.clone().or_else(|| self.staging.get(file.ino)) {
            Some(st) => self.commit_staged(file.ino, &mut st.lock(), true),
            None => self.meta.sync(file.ino),
        }
    }

    fn commit_handle(&self, fh: u64, durable: bool) -> FsResult<()> {
        let file = self.open_file(fh)?;
        match &file.staged {
            Some(st) => self.commit_staged(file.ino, &mut st.lock(), durable),
            None => Ok(()),
        }
    }

    /// [`Self::flush`] if it has nothing to commit (a reader, or a new file left empty);
    /// never waits: a staged file another call holds counts as having something.
    pub fn flush_cached(&self, fh: u64) -> Option<FsResult<()>> {
        let file = match self.open_file(fh) {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        match &file.staged {
            Some(st) => st
                .try_lock()
                .is_some_and(|st| st.closes_without_waiting())
                .then_some(Ok(())),
            None => Some(Ok(())),
        }
    }

    /// Whether releasing a handle of `ino` opened with `flags` is answered without
    /// waiting (the common cases: a reader, or a new file closed with nothing written).
    /// Asks only the staging area, which is empty on a mount that writes nothing. Never
    /// waits itself: a staged file another call holds counts as not.
    pub fn closes_without_waiting(&self, ino: u64, flags: i32) -> bool {
        let Some(st) = self.staging.get(ino) else {
            return true;
        };
        // A writer's close commits what is staged; a reader's looks at it only to see
        // whether it is kept.
        st.try_lock()
            .is_some_and(|st| !changes_file(flags) || st.closes_without_waiting())
    }

    /// Closes handle `fh`, committing what it wrote; whether that commit failed, so the
    /// file's pages the kernel caches (which hold the writes) are not its content.
    pub fn release(&self, fh: u64) -> bool {
        let Some(file) = self.files.write().expect("files lock").remove(&fh) else {
            return false;
        };
        let mut failed = false;
        if let Some(st) = &file.staged {
            let mut st = st.lock();
            if let Err(e) = self.commit_staged(file.ino, &mut st, false) {
                failed = true;
                match st.content {
                    Content::Published { .. } => {
                        tracing::error!(ino = file.ino, error = %e, "committing a file at its last close failed; its new content is in the UFS and reaches the namespace when another descriptor of it here closes or its directory is listed again (granary fs load-metadata --force)")
                    }
                    _ => {
                        tracing::error!(ino = file.ino, error = %e, "committing a file at its last close failed; its changes are lost")
                    }
                }
            }
            drop(st);
            self.staging.detach(file.ino);
        }
        // Nothing staged (a reader's close, the common case) answers without a lock.
        let kept = self.staging.get(file.ino).is_some_and(|st| st.lock().kept);
        let open = || {
            self.files
                .read()
                .expect("files lock")
                .values()
                .any(|f| f.ino == file.ino)
        };
        if kept && !open() {
            self.let_go(file.ino);
        }
        failed
    }

    /// fallocate(2). The plain mode extends the file with zeros to `offset + len` (the
    /// UFS has no space to reserve ahead); keeping the size, there is nothing to do.
    /// Punching holes and the other modes: EOPNOTSUPP.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        self.writable()?;
        match mode {
            0 => {
                let end = offset
                    .checked_add(len)
                    .ok_or_else(|| FsError::FileTooBig(format!("{offset} + {len}")))?;
                // As written here so far (staged), not only as committed.
                let size = self.overlay(self.committed_or_opened(ino)?).size;
                if end > size {
                    self.truncate(ino, end)?;
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(FsError::Unsupported(format!("fallocate mode {mode:#x}"))),
        }
    }

    /// truncate(2) / ftruncate(2) to `size`.
    pub(super) fn truncate(&self, ino: u64, size: u64) -> FsResult<()> {
        let inode = self.committed_or_opened(ino)?;
        if inode.kind == FileKind::Directory as i32 {
            return Err(FsError::IsDir(shown(&inode.name)));
        }
        let st = self.staging.attach(ino)?;
        let result = (|| -> FsResult<()> {
            let mut s = st.lock();
            // Truncated to nothing: what was committed need not be read first.
            if size == 0 && matches!(s.content, Content::Committed { .. }) {
                s.content = Content::Dirty;
            }
            self.fill(ino, &mut s)?;
            self.backing_for(ino, &mut s, size)?.set_len(size)?;
            s.size = size;
            s.content = Content::Dirty;
            s.touch();
            // Nobody else writes it here: commit now, as truncate(2) is one call.
            if self.staging.users(ino) == 1 {
                self.commit_staged(ino, &mut s, false)?;
            }
            Ok(())
        })();
        self.staging.detach(ino);
        result
    }
}
