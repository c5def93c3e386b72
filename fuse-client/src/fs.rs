//! Filesystem semantics independent of the kernel interface: lookups and attributes
//! through a metadata cache, directory streams, open handles, reads, and writes staged
//! per inode then uploaded through a worker and committed through the leader on flush,
//! fsync or the last close (close-to-open consistency). The FUSE adapter only translates
//! types; tests drive this type directly.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use granary_common::path::validate_name;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    CommitContent, CreateRequest, FileKind, Inode, RenameRequest, SetAttributes, StatFsReply,
    UfsFingerprint,
};
use moka::sync::Cache;

use crate::block_reader::{DataPath, ReadState};
use crate::meta_client::MetadataService;
use crate::staging::{Backing, SharedStaged, Staged, StagingArea, SMALL_FILE_MAX};

/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 1024;
/// Written ranges of a local upload handed to the disk early, as a file grows past each
/// multiple of this.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Bytes copied per step when committed content is brought into a staging file.
const FILL_CHUNK: u32 = 4 << 20;

#[derive(Debug, Clone)]
pub struct FsOptions {
    pub meta_cache_ttl: Duration,
    pub meta_cache_entries: u64,
    /// Refuse every change (EROFS).
    pub read_only: bool,
    /// Where staging files of writes in progress live (anonymous files).
    pub staging_dir: std::path::PathBuf,
}

struct OpenFile {
    ino: u64,
    /// The mount's commit count when this handle last checked its version.
    seen_commits: AtomicU64,
    /// The committed version reads go to, with the read state that belongs to it.
    read: Mutex<(Inode, ReadState)>,
    /// Open for writing: the inode's shared staged file.
    staged: Option<SharedStaged>,
    append: bool,
}

/// Attribute changes asked for by setattr; `None` leaves a field alone.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

struct DirStream {
    dir: Inode,
    entries: Vec<Inode>,
    complete: bool,
}

/// One entry of a directory stream. `offset` is what the kernel passes back to continue
/// after this entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub inode: Inode,
    pub name: Vec<u8>,
    pub offset: u64,
}

pub struct GranaryFs {
    meta: Arc<dyn MetadataService>,
    data: Arc<dyn DataPath>,
    attrs: Cache<u64, Inode>,
    entries: Cache<(u64, Vec<u8>), u64>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_handle: AtomicU64,
    staging: StagingArea,
    read_only: bool,
    /// The content version of each inode when it was last opened here: the kernel may
    /// keep its page cache across opens only while that has not changed.
    opened_versions: Cache<u64, UfsFingerprint>,
    /// Content commits made through this mount; an open handle looks for a newer version
    /// of its file only when this moved.
    commits: AtomicU64,
}

fn is_dir(i: &Inode) -> bool {
    i.kind == FileKind::Directory as i32
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl GranaryFs {
    pub fn new(
        meta: Arc<dyn MetadataService>,
        data: Arc<dyn DataPath>,
        opts: FsOptions,
    ) -> FsResult<Self> {
        Ok(GranaryFs {
            meta,
            data,
            attrs: Cache::builder()
                .max_capacity(opts.meta_cache_entries)
                .time_to_live(opts.meta_cache_ttl)
                .build(),
            entries: Cache::builder()
                .max_capacity(opts.meta_cache_entries)
                .time_to_live(opts.meta_cache_ttl)
                .build(),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            staging: StagingArea::new(opts.staging_dir)?,
            read_only: opts.read_only,
            opened_versions: Cache::builder()
                .max_capacity(opts.meta_cache_entries)
                .build(),
            commits: AtomicU64::new(0),
        })
    }

    /// The inode as this mount sees it: a file being written here has its staged size.
    fn overlay(&self, mut inode: Inode) -> Inode {
        if let Some(st) = self.staging.get(inode.id) {
            let st = st.lock().expect("staged lock");
            if st.filled {
                inode.size = st.size;
            }
        }
        inode
    }

    /// [`Self::overlay`] of the committed inode, read under the staged file's lock: a
    /// commit that empties the staged file (its content is the UFS object now) holds that
    /// lock until it has remembered what it committed, so the size seen is never the one
    /// from before it.
    fn current(&self, ino: u64) -> FsResult<Inode> {
        let Some(st) = self.staging.get(ino) else {
            return self.committed(ino);
        };
        let st = st.lock().expect("staged lock");
        let mut inode = self.committed(ino)?;
        if st.filled {
            inode.size = st.size;
        }
        Ok(inode)
    }

    fn writable(&self) -> FsResult<()> {
        if self.read_only {
            return Err(FsError::ReadOnly("this Granary mount is read-only".into()));
        }
        Ok(())
    }

    /// A directory's entries changed here: its cached mtime and ctime move to now, as
    /// the master moved them (by its clock), without asking it again — the kernel
    /// re-reads a changed directory's attributes after every create or remove.
    fn dir_changed(&self, dir: u64) {
        if let Some(mut d) = self.attrs.get(&dir) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0);
            d.mtime_ns = now;
            d.ctime_ns = now;
            self.attrs.insert(dir, d);
        }
    }

    fn forget_entry(&self, parent: u64, name: &[u8]) {
        self.dir_changed(parent);
        if let Some(id) = self.entries.get(&(parent, name.to_vec())) {
            self.attrs.invalidate(&id);
        }
        self.entries.invalidate(&(parent, name.to_vec()));
    }

    fn remember(&self, inode: &Inode) {
        self.attrs.insert(inode.id, inode.clone());
        if inode.id != inode.parent {
            self.entries
                .insert((inode.parent, inode.name.clone()), inode.id);
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        validate_name(name)?;
        if let Some(id) = self.entries.get(&(parent, name.to_vec())) {
            if self.attrs.contains_key(&id) {
                return self.current(id);
            }
        }
        let inode = self.meta.lookup(parent, name)?;
        self.remember(&inode);
        Ok(self.overlay(inode))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Inode> {
        self.current(ino)
    }

    /// The inode as the namespace holds it (through the metadata cache).
    fn committed(&self, ino: u64) -> FsResult<Inode> {
        if let Some(i) = self.attrs.get(&ino) {
            return Ok(i);
        }
        let inode = self.meta.getattr(ino)?;
        self.attrs.insert(ino, inode.clone());
        Ok(inode)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.getattr(ino)?;
        if i.kind != FileKind::Symlink as i32 {
            return Err(FsError::InvalidPath("not a symbolic link".into()));
        }
        Ok(i.symlink_target)
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a file; returns the handle and whether the kernel may keep the page cache it
    /// holds for this file (the content has not changed since it was last opened here).
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, bool)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if write || flags & libc::O_TRUNC != 0 {
            self.writable()?;
        }
        let inode = self.committed(ino)?;
        match FileKind::try_from(inode.kind) {
            Ok(FileKind::File) => {}
            Ok(FileKind::Directory) => return Err(FsError::IsDir(shown(&inode.name))),
            _ => return Err(FsError::InvalidPath("not a regular file".into())),
        }
        let version = inode.fingerprint.unwrap_or_default();
        let keep_cache = self.opened_versions.get(&ino) == Some(version);
        if !keep_cache {
            self.opened_versions.insert(ino, version);
        }
        let staged = if write {
            let st = self.staging.attach(ino)?;
            if flags & libc::O_TRUNC != 0 {
                st.lock().expect("staged lock").empty()?;
            }
            Some(st)
        } else {
            None
        };
        Ok((self.add_handle(ino, inode, staged, flags), keep_cache))
    }

    fn add_handle(&self, ino: u64, inode: Inode, staged: Option<SharedStaged>, flags: i32) -> u64 {
        let fh = self.handle();
        let file = Arc::new(OpenFile {
            ino,
            seen_commits: AtomicU64::new(self.commits.load(Ordering::Acquire)),
            read: Mutex::new((inode, ReadState::default())),
            staged,
            append: flags & libc::O_APPEND != 0,
        });
        self.files.write().expect("files lock").insert(fh, file);
        fh
    }

    fn open_file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.files
            .read()
            .expect("files lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::InvalidPath(format!("unknown file handle {fh}")))
    }

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
            // Empty and new: the first close puts an empty object in the UFS.
            st.lock().expect("staged lock").empty()?;
        }
        self.opened_versions
            .insert(inode.id, inode.fingerprint.unwrap_or_default());
        let fh = self.add_handle(inode.id, inode.clone(), Some(st), flags);
        Ok((inode, fh))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = self.open_file(fh)?;
        if let Some(st) = self.staging.get(file.ino) {
            let st = st.lock().expect("staged lock");
            if st.filled {
                return read_staged(&st, offset, size);
            }
        }
        let mut guard = file.read.lock().expect("read state lock");
        let (inode, state) = &mut *guard;
        // Content committed on this mount since the handle opened replaces what it reads.
        let commits = self.commits.load(Ordering::Acquire);
        if file.seen_commits.swap(commits, Ordering::AcqRel) != commits {
            if let Some(now) = self.attrs.get(&file.ino) {
                if now.fingerprint != inode.fingerprint || now.size != inode.size {
                    *inode = now;
                    *state = ReadState::default();
                }
            }
        }
        if offset >= inode.size || size == 0 {
            return Ok(Vec::new());
        }
        match self.data.read(inode, state, offset, size) {
            Err(FsError::Stale(why)) => {
                // Changed in the UFS behind Granary's back: list its directory again and
                // read the new version (never the cached blocks of the old one).
                tracing::info!(ino = file.ino, %why, "file changed in the UFS; refreshing its metadata");
                self.meta.refresh(inode.parent)?;
                self.attrs.invalidate(&file.ino);
                *inode = self.committed(file.ino)?;
                *state = ReadState::default();
                if offset >= inode.size {
                    return Ok(Vec::new());
                }
                self.data.read(inode, state, offset, size)
            }
            other => other,
        }
    }

    /// Brings the committed content into a staging file that has not got it yet.
    fn fill(&self, ino: u64, st: &mut Staged) -> FsResult<()> {
        if st.filled {
            return Ok(());
        }
        if st.published.is_some() {
            // The new content is in the UFS already; what is committed is older.
            self.commit_staged(ino, st, false)?;
        }
        let inode = self.committed(ino)?;
        // Sized for the whole content up front: a big file never starts in memory.
        self.backing_for(ino, st, inode.size)?;
        let mut state = ReadState::default();
        let mut offset = 0;
        while offset < inode.size {
            let want = (inode.size - offset).min(FILL_CHUNK as u64) as u32;
            let data = self.data.read(&inode, &mut state, offset, want)?;
            if data.is_empty() {
                return Err(FsError::Io(format!(
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
        st.filled = true;
        Ok(())
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let file = self.open_file(fh)?;
        let Some(st) = &file.staged else {
            return Err(FsError::InvalidPath("handle not open for writing".into()));
        };
        let mut st = st.lock().expect("staged lock");
        self.fill(file.ino, &mut st)?;
        let at = if file.append { st.size } else { offset };
        let end = at + data.len() as u64;
        self.backing_for(file.ino, &mut st, end)?
            .write_all_at(data, at)?;
        if let Some(Backing::Worker(u)) = &st.backing {
            // A big file written in order: the disk starts on what is written while the
            // rest comes, so the fsync or close that publishes it waits for less.
            let done = end / WRITEBACK_STEP * WRITEBACK_STEP;
            if done > at && done >= WRITEBACK_STEP {
                u.start_writeback(done - WRITEBACK_STEP, WRITEBACK_STEP);
            }
        }
        st.size = st.size.max(end);
        st.modified = true;
        Ok(data.len() as u32)
    }

    /// Makes what this mount wrote to the file visible, and safe from a crash of any
    /// process: upload through a worker, then commit the new size and version through
    /// the leader. `durable` (fsync) also makes it survive a machine crash.
    fn commit_staged(&self, ino: u64, st: &mut Staged, durable: bool) -> FsResult<()> {
        if st.unlinked || !(st.modified || durable && st.undurable) {
            return Ok(());
        }
        if let Some(fingerprint) = st.published.take() {
            if let Err(e) = self.commit_version(ino, st, fingerprint, false) {
                st.published = Some(fingerprint);
                return Err(e);
            }
            if !durable {
                return Ok(());
            }
        }
        // Made durable again after a close published it: the content comes back from
        // what was committed.
        self.fill(ino, st)?;
        self.backing_for(ino, st, st.size)?;
        let inode = self.committed(ino)?;
        let (fingerprint, published) = match st.backing.take().expect("made above") {
            Backing::Memory { socket, data } => {
                match self.data.publish_whole(&socket, &inode, &data, durable) {
                    Ok(fp) => {
                        st.filled = false;
                        (fp, true)
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(ino, error = %e, "publishing through the local worker failed; uploading over the data port");
                        let file = self.staging.own_file()?;
                        file.write_all_at(&data, 0)?;
                        (self.upload_own(&inode, st, file, durable)?, false)
                    }
                    Err(e) => {
                        st.backing = Some(Backing::Memory { socket, data });
                        return Err(e);
                    }
                }
            }
            Backing::Worker(mut u) if u.ufs_path == inode.ufs_path => {
                match u.complete(&inode, st.size, durable) {
                    // The staged file is the UFS object now: what is written next starts
                    // from the committed content.
                    Ok(fp) => {
                        st.filled = false;
                        (fp, true)
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(ino, error = %e, "local upload failed; uploading over the data port");
                        (self.upload_own(&inode, st, u.into_file(), durable)?, false)
                    }
                    Err(e) => {
                        st.backing = Some(Backing::Own(u.into_file()));
                        return Err(e);
                    }
                }
            }
            // Renamed on this mount since the local upload began: it would land under
            // the old name.
            Backing::Worker(u) => (self.upload_own(&inode, st, u.into_file(), durable)?, false),
            Backing::Own(f) => (self.upload_own(&inode, st, f, durable)?, false),
        };
        let committed = self.commit_version(ino, st, fingerprint, durable);
        if committed.is_err() && published {
            // In the UFS but not in the namespace: the next try commits it as it is.
            st.published = Some(fingerprint);
        }
        committed
    }

    /// Records the uploaded `fingerprint` as the file's content through the leader.
    fn commit_version(
        &self,
        ino: u64,
        st: &mut Staged,
        fingerprint: UfsFingerprint,
        durable: bool,
    ) -> FsResult<()> {
        let committed = self.meta.commit(CommitContent {
            id: ino,
            size: st.size,
            fingerprint: Some(fingerprint),
            mtime_ns: 0,
        })?;
        self.remember(&committed);
        self.commits.fetch_add(1, Ordering::AcqRel);
        self.opened_versions.insert(ino, fingerprint);
        st.modified = false;
        st.undurable = !durable;
        Ok(())
    }

    /// Uploads a staged file of this mount over the data port; it stays the staged file.
    fn upload_own(
        &self,
        inode: &Inode,
        st: &mut Staged,
        file: std::fs::File,
        durable: bool,
    ) -> FsResult<UfsFingerprint> {
        let r = self.data.upload(inode, st.size, &file, durable);
        st.backing = Some(Backing::Own(file));
        r
    }

    /// The staged file's bytes, able to hold `end` bytes, made on first use: memory for
    /// a small file where the worker on this machine takes files whole, else the temp
    /// file of a local upload, else an anonymous file here. Memory outgrown moves to a
    /// file.
    fn backing_for<'a>(&self, ino: u64, st: &'a mut Staged, end: u64) -> FsResult<&'a mut Backing> {
        let outgrown = matches!(st.backing, Some(Backing::Memory { .. })) && end > SMALL_FILE_MAX;
        if st.backing.is_none() || outgrown {
            let inode = self.committed(ino)?;
            let socket = (st.backing.is_none() && end <= SMALL_FILE_MAX)
                .then(|| self.data.local_upload_socket())
                .flatten();
            let fresh = match socket {
                Some(socket) => Backing::Memory {
                    socket,
                    data: Vec::new(),
                },
                None => match self.data.begin_upload(&inode) {
                    Some(u) => Backing::Worker(u),
                    None => Backing::Own(self.staging.own_file()?),
                },
            };
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

    /// fsync(2): what was written through the file becomes durable.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        self.commit_handle(fh, true)
    }

    fn commit_handle(&self, fh: u64, durable: bool) -> FsResult<()> {
        let file = self.open_file(fh)?;
        match &file.staged {
            Some(st) => self.commit_staged(file.ino, &mut st.lock().expect("staged lock"), durable),
            None => Ok(()),
        }
    }

    pub fn release(&self, fh: u64) {
        let Some(file) = self.files.write().expect("files lock").remove(&fh) else {
            return;
        };
        if let Some(st) = &file.staged {
            if let Err(e) =
                self.commit_staged(file.ino, &mut st.lock().expect("staged lock"), false)
            {
                tracing::error!(ino = file.ino, error = %e, "committing a file at its last close failed; its changes are lost");
            }
            self.staging.detach(file.ino);
        }
    }

    /// For an open handle, a local file with the same bytes that the kernel may read
    /// directly (see [`DataPath::whole_file`]); never for a file being written.
    pub fn whole_file(&self, fh: u64) -> Option<std::fs::File> {
        let file = self.files.read().expect("files lock").get(&fh).cloned()?;
        if self.staging.get(file.ino).is_some() {
            return None;
        }
        let guard = file.read.lock().expect("read state lock");
        self.data.whole_file(&guard.0)
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr) -> FsResult<Inode> {
        self.writable()?;
        if let Some(size) = a.size {
            let inode = self.committed(ino)?;
            if inode.kind == FileKind::Directory as i32 {
                return Err(FsError::IsDir(shown(&inode.name)));
            }
            let st = self.staging.attach(ino)?;
            let result = (|| -> FsResult<()> {
                let mut s = st.lock().expect("staged lock");
                if !s.filled && size == 0 {
                    s.filled = true;
                }
                self.fill(ino, &mut s)?;
                self.backing_for(ino, &mut s, size)?.set_len(size)?;
                s.size = size;
                s.modified = true;
                // Nobody else writes it here: commit now, as truncate(2) is one call.
                if self.staging.users(ino) == 1 {
                    self.commit_staged(ino, &mut s, false)?;
                }
                Ok(())
            })();
            self.staging.detach(ino);
            result?;
        }
        if a.mode.is_some()
            || a.uid.is_some()
            || a.gid.is_some()
            || a.atime_ns.is_some()
            || a.mtime_ns.is_some()
        {
            let inode = self.meta.set_attr(SetAttributes {
                id: ino,
                mode: a.mode,
                uid: a.uid,
                gid: a.gid,
                atime_ns: a.atime_ns,
                mtime_ns: a.mtime_ns,
                now_ns: 0,
            })?;
            self.remember(&inode);
        }
        self.getattr(ino)
    }

    fn make(&self, req: CreateRequest) -> FsResult<Inode> {
        self.writable()?;
        validate_name(&req.name)?;
        let inode = self.meta.create(req)?;
        self.remember(&inode);
        self.dir_changed(inode.parent);
        Ok(inode)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Inode> {
        self.make(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: FileKind::Directory as i32,
            mode,
            uid,
            gid,
            symlink_target: Vec::new(),
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Inode> {
        self.make(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: FileKind::Symlink as i32,
            mode: 0o777,
            uid,
            gid,
            symlink_target: target.to_vec(),
        })
    }

    /// unlink(2) (`directory` false) or rmdir(2).
    pub fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        self.writable()?;
        validate_name(name)?;
        let victim = self.entries.get(&(parent, name.to_vec()));
        self.meta.remove(parent, name, directory)?;
        self.forget_entry(parent, name);
        if let Some(id) = victim {
            self.unlinked(id);
        }
        Ok(())
    }

    /// A file open for writing here lost its name: its last close must not bring it back
    /// in the UFS. (The kernel looks a name up before removing or replacing it, so an
    /// open file's entry is in the cache; no metadata call is needed.)
    fn unlinked(&self, ino: u64) {
        if let Some(st) = self.staging.get(ino) {
            st.lock().expect("staged lock").unlinked = true;
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> FsResult<()> {
        self.writable()?;
        validate_name(name)?;
        validate_name(new_name)?;
        let replaced = self.entries.get(&(new_parent, new_name.to_vec()));
        let moved = self.meta.rename(RenameRequest {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            no_replace,
        })?;
        self.forget_entry(parent, name);
        self.forget_entry(new_parent, new_name);
        if let Some(id) = replaced.filter(|&id| id != moved.id) {
            self.unlinked(id);
        }
        self.remember(&moved);
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let dir = self.getattr(ino)?;
        if !is_dir(&dir) {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        let fh = self.handle();
        let stream = DirStream {
            dir,
            entries: Vec::new(),
            complete: false,
        };
        self.dirs
            .write()
            .expect("dirs lock")
            .insert(fh, Arc::new(Mutex::new(stream)));
        Ok(fh)
    }

    /// Entries from position `offset` on (0 is `.`, 1 is `..`), at most `max`.
    pub fn readdir(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let stream = self
            .dirs
            .read()
            .expect("dirs lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::InvalidPath(format!("unknown directory handle {fh}")))?;
        let mut s = stream.lock().expect("dir stream lock");
        let mut out = Vec::new();
        let mut pos = offset;
        while out.len() < max {
            match pos {
                0 => out.push(DirEntry {
                    inode: s.dir.clone(),
                    name: b".".to_vec(),
                    offset: 1,
                }),
                1 => {
                    let parent = self.getattr(s.dir.parent).unwrap_or_else(|_| s.dir.clone());
                    out.push(DirEntry {
                        inode: parent,
                        name: b"..".to_vec(),
                        offset: 2,
                    });
                }
                _ => {
                    let i = (pos - 2) as usize;
                    while i >= s.entries.len() && !s.complete {
                        let after = s.entries.last().map(|e| e.name.clone()).unwrap_or_default();
                        let (page, more) = self.meta.readdir(s.dir.id, &after, READDIR_PAGE)?;
                        for e in &page {
                            self.remember(e);
                        }
                        s.complete = !more || page.is_empty();
                        s.entries.extend(page.into_iter().map(|e| self.overlay(e)));
                    }
                    let Some(e) = s.entries.get(i) else { break };
                    out.push(DirEntry {
                        inode: e.clone(),
                        name: e.name.clone(),
                        offset: pos + 1,
                    });
                }
            }
            pos += 1;
        }
        Ok(out)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().expect("dirs lock").remove(&fh);
    }

    pub fn statfs(&self) -> FsResult<StatFsReply> {
        self.meta.statfs()
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

#[cfg(test)]
mod tests {
    //! GranaryFs driven without a kernel, over in-memory metadata and data doubles.

    use super::*;
    use granary_protos::v1::{BlockLocationsReply, WorkerInfo};
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Namespace {
        inodes: Vec<Inode>,
        lookups: AtomicUsize,
    }

    impl MetadataService for Namespace {
        fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            self.inodes
                .iter()
                .find(|i| i.parent == parent && i.name == name && i.id != parent)
                .cloned()
                .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()))
        }
        fn getattr(&self, id: u64) -> FsResult<Inode> {
            self.inodes
                .iter()
                .find(|i| i.id == id)
                .cloned()
                .ok_or_else(|| FsError::NotFound(id.to_string()))
        }
        fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
            let mut kids: Vec<Inode> = self
                .inodes
                .iter()
                .filter(|i| i.parent == id && i.id != id && i.name.as_slice() > start_after)
                .cloned()
                .collect();
            kids.sort_by(|a, b| a.name.cmp(&b.name));
            let more = kids.len() > limit as usize;
            kids.truncate(limit as usize);
            Ok((kids, more))
        }
        fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
            Ok(Vec::new())
        }
        fn block_locations(&self, _: u64) -> FsResult<BlockLocationsReply> {
            Ok(BlockLocationsReply::default())
        }
        fn statfs(&self) -> FsResult<StatFsReply> {
            Ok(StatFsReply::default())
        }
    }

    /// File bytes are a function of (file id, offset).
    struct Bytes;
    impl DataPath for Bytes {
        fn read(
            &self,
            file: &Inode,
            _: &mut ReadState,
            offset: u64,
            len: u32,
        ) -> FsResult<Vec<u8>> {
            let end = (offset + len as u64).min(file.size);
            Ok((offset..end).map(|o| (o as u8) ^ (file.id as u8)).collect())
        }
    }

    fn node(id: u64, parent: u64, name: &str, kind: FileKind, size: u64) -> Inode {
        Inode {
            id,
            parent,
            name: name.as_bytes().to_vec(),
            kind: kind as i32,
            size,
            block_size: 1024,
            ..Default::default()
        }
    }

    fn fs() -> (GranaryFs, Arc<Namespace>) {
        let mut inodes = vec![
            node(1, 1, "", FileKind::Directory, 0),
            node(2, 1, "dir", FileKind::Directory, 0),
        ];
        for i in 0..2500u64 {
            inodes.push(node(100 + i, 2, &format!("f{i:05}"), FileKind::File, i));
        }
        let mut link = node(3, 1, "link", FileKind::Symlink, 0);
        link.symlink_target = b"dir/f00001".to_vec();
        inodes.push(link);
        let ns = Arc::new(Namespace {
            inodes,
            ..Default::default()
        });
        let opts = FsOptions {
            meta_cache_ttl: Duration::from_secs(60),
            meta_cache_entries: 10_000,
            read_only: true,
            staging_dir: std::env::temp_dir(),
        };
        (
            GranaryFs::new(ns.clone(), Arc::new(Bytes), opts).unwrap(),
            ns,
        )
    }

    #[test]
    fn lookups_are_cached_and_errors_are_precise() {
        let (fs, ns) = fs();
        assert_eq!(fs.lookup(1, b"dir").unwrap().id, 2);
        assert_eq!(fs.lookup(1, b"dir").unwrap().id, 2);
        assert_eq!(
            ns.lookups.load(Ordering::Relaxed),
            1,
            "second lookup served from cache"
        );
        assert_eq!(fs.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            fs.lookup(1, &[b'x'; 256]).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        assert_eq!(fs.opendir(100).unwrap_err().errno(), libc::ENOTDIR);
        assert_eq!(
            fs.open(2, libc::O_RDONLY).unwrap_err().errno(),
            libc::EISDIR
        );
        assert_eq!(
            fs.open(100, libc::O_WRONLY).unwrap_err().errno(),
            libc::EROFS
        );
        assert_eq!(fs.readlink(3).unwrap(), b"dir/f00001");
        assert_eq!(fs.readlink(2).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn readdir_pages_through_large_directories_and_fills_the_cache() {
        let (fs, ns) = fs();
        let fh = fs.opendir(2).unwrap();
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let page = fs.readdir(fh, offset, 700).unwrap();
            let Some(last) = page.last() else { break };
            offset = last.offset;
            names.extend(page.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
        }
        fs.releasedir(fh);
        assert_eq!(names.len(), 2 + 2500);
        assert_eq!(&names[..3], &[".", "..", "f00000"]);
        assert_eq!(names.last().unwrap(), "f02499");
        let before = ns.lookups.load(Ordering::Relaxed);
        assert_eq!(fs.lookup(2, b"f01234").unwrap().id, 1334);
        assert_eq!(
            ns.lookups.load(Ordering::Relaxed),
            before,
            "readdir filled the entry cache"
        );
    }

    #[test]
    fn reads_clip_at_end_of_file() {
        let (fs, _) = fs();
        let (fh, _) = fs.open(110, libc::O_RDONLY).unwrap();
        assert_eq!(fs.read(fh, 0, 100).unwrap().len(), 10);
        assert_eq!(fs.read(fh, 4, 2).unwrap(), vec![4 ^ 110u8, 5 ^ 110u8]);
        assert!(fs.read(fh, 10, 5).unwrap().is_empty());
        fs.release(fh);
        assert_eq!(fs.read(fh, 0, 1).unwrap_err().errno(), libc::EINVAL);
    }
}

#[cfg(test)]
#[path = "fs_write_tests.rs"]
mod write_tests;
