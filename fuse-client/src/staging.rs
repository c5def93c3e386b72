//! Writes in progress on this mount: one staged file per inode, shared by all its open
//! handles, holding the file's whole current content once written to. With a worker on
//! this machine the staged file is the UFS temp file of a local upload (the bytes are
//! written once), or, for a small file (up to [`SMALL_FILE_MAX`]), memory that worker takes
//! whole at commit; otherwise an anonymous file here (O_TMPFILE). Either way a crashed
//! client leaves nothing visible behind; what was not yet committed by a close or fsync
//! is lost with it, as on a local filesystem.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use granary_common::FsResult;
use granary_protos::v1::UfsFingerprint;

use crate::local_upload::LocalUpload;
use granary_common::memory::Reservation;

/// Written ranges of a local upload handed to the disk early, as a file grows past each
/// multiple of this.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Largest file staged in memory (and published whole by the local worker); one that
/// grows past it moves to a file.
pub const SMALL_FILE_MAX: u64 = 256 << 10;

/// Where a staged file's bytes are.
pub enum Backing {
    /// An anonymous file of this mount's staging directory.
    Own(File),
    /// The temp file of a local upload, published by the worker at commit.
    Worker(LocalUpload),
    /// A small file's bytes, sent whole at commit to the worker listening on `socket`
    /// (one exchange instead of opening a local upload and completing it), held against
    /// the mount's buffer memory.
    Memory {
        socket: String,
        data: Vec<u8>,
        memory: Reservation,
    },
}

impl Backing {
    /// Whether it can hold `end` bytes: memory only up to [`SMALL_FILE_MAX`] and while
    /// the mount's buffer memory allows.
    pub fn fits(&mut self, end: u64) -> bool {
        match self {
            Backing::Memory { memory, .. } => end <= SMALL_FILE_MAX && memory.grow_to(end),
            _ => true,
        }
    }

    fn file(&self) -> Option<&File> {
        match self {
            Backing::Own(f) => Some(f),
            Backing::Worker(u) => Some(u.file()),
            Backing::Memory { .. } => None,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (past the end of a memory backing: zeros, as
    /// a sparse file reads).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match (self.file(), self) {
            (Some(f), _) => f.read_exact_at(buf, offset),
            (None, Backing::Memory { data, .. }) => {
                let from = (offset as usize).min(data.len());
                let n = (data.len() - from).min(buf.len());
                buf[..n].copy_from_slice(&data[from..from + n]);
                buf[n..].fill(0);
                Ok(())
            }
            (None, _) => unreachable!("only memory backings have no file"),
        }
    }

    pub fn write_all_at(&mut self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            Backing::Memory { data, .. } => {
                let end = offset as usize + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset as usize..end].copy_from_slice(bytes);
                Ok(())
            }
            other => other
                .file()
                .expect("a file backing")
                .write_all_at(bytes, offset),
        }
    }

    /// `at..end` was just written. A big file written in order into a local upload has
    /// the disk start on what is written while the rest comes, so the fsync or close that
    /// publishes it waits for less.
    pub fn written(&self, at: u64, end: u64) {
        if let Backing::Worker(u) = self {
            let done = end / WRITEBACK_STEP * WRITEBACK_STEP;
            if done > at && done >= WRITEBACK_STEP {
                u.start_writeback(done - WRITEBACK_STEP, WRITEBACK_STEP);
            }
        }
    }

    pub fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        match self {
            Backing::Memory { data, .. } => {
                data.resize(len as usize, 0);
                Ok(())
            }
            other => other.file().expect("a file backing").set_len(len),
        }
    }
}

/// Where a file's current content is, against what is committed through the leader.
/// `synced`: made durable against a machine crash (by an fsync, or never changed here);
/// an fsync of content committed by a close alone stores it again, durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Nothing staged: the committed version is the content.
    Committed { synced: bool },
    /// The staged bytes are the whole content, and it is what is committed.
    Clean { synced: bool },
    /// The staged bytes are the whole content, changed since the last commit: the next
    /// close or fsync stores and commits it.
    Dirty,
    /// Stored in the UFS under the file's name (a worker took the staged bytes), but its
    /// commit through the leader failed: the next try commits it as it is.
    Published {
        fingerprint: UfsFingerprint,
        synced: bool,
    },
}

impl Content {
    /// The staged bytes are the file's whole content: reads and sizes come from them.
    pub fn is_staged(self) -> bool {
        matches!(self, Content::Clean { .. } | Content::Dirty)
    }
}

pub struct Staged {
    /// Made at the first write, truncate or fill (`None` while all is still empty).
    pub backing: Option<Backing>,
    /// Current size of the file as written here.
    pub size: u64,
    pub content: Content,
    /// Removed from the namespace while open: nothing is stored at close.
    pub unlinked: bool,
    /// When the content last changed here (a write, a truncate), since it was last
    /// committed: the file's mtime and ctime until then, and the mtime its commit
    /// records. `None` keeps the times it has (a new file, or times set explicitly).
    pub modified_ns: Option<i64>,
    /// Copied here before the file's last name went, for descriptors still open: this
    /// holds one use of the staged file until the last of them closes.
    pub kept: bool,
}

impl Staged {
    /// Truncated to nothing here (O_TRUNC, or a new file): the next flush stores it.
    pub fn empty(&mut self) -> FsResult<()> {
        if let Some(b) = &mut self.backing {
            b.set_len(0)?;
        }
        self.size = 0;
        self.content = Content::Dirty;
        Ok(())
    }

    /// A close would neither store nor commit anything, nor free a file's blocks: it
    /// can be answered without waiting.
    pub fn closes_without_waiting(&self) -> bool {
        let nothing_to_commit = self.unlinked
            || matches!(
                self.content,
                Content::Committed { .. } | Content::Clean { .. }
            );
        nothing_to_commit && matches!(self.backing, None | Some(Backing::Memory { .. }))
    }

    /// The content changed now.
    pub fn touch(&mut self) {
        self.modified_ns = Some(granary_common::time::now_ns());
    }

    /// `inode` as this mount sees it while its content is staged here.
    pub fn show(&self, inode: &mut granary_protos::v1::Inode) {
        self.shown().apply(inode);
    }

    fn shown(&self) -> Shown {
        Shown {
            staged: self.content.is_staged(),
            size: self.size,
            modified_ns: self.modified_ns,
        }
    }
}

/// A staged file and a copy of what [`Staged::show`] shows, taken each time its lock is
/// let go: a commit holds the lock for as long as its upload takes, and a listing that
/// must not wait for it still needs the size this mount shows, not the committed one
/// (the kernel applies a listed size to its inode and cuts its page cache to it).
pub struct StagedFile {
    state: Mutex<Staged>,
    shown: Mutex<Shown>,
}

#[derive(Clone, Copy, Default)]
struct Shown {
    staged: bool,
    size: u64,
    modified_ns: Option<i64>,
}

impl Shown {
    fn apply(&self, inode: &mut granary_protos::v1::Inode) {
        if self.staged {
            inode.size = self.size;
            if let Some(t) = self.modified_ns {
                inode.mtime_ns = t;
                inode.ctime_ns = inode.ctime_ns.max(t);
            }
        }
    }
}

/// The held lock of a [`StagedFile`]; its drop copies what the file shows now.
pub struct StagedGuard<'a> {
    state: std::sync::MutexGuard<'a, Staged>,
    shown: &'a Mutex<Shown>,
}

impl std::ops::Deref for StagedGuard<'_> {
    type Target = Staged;
    fn deref(&self) -> &Staged {
        &self.state
    }
}

impl std::ops::DerefMut for StagedGuard<'_> {
    fn deref_mut(&mut self) -> &mut Staged {
        &mut self.state
    }
}

impl Drop for StagedGuard<'_> {
    fn drop(&mut self) {
        *self.shown.lock().expect("shown lock") = self.state.shown();
    }
}

impl StagedFile {
    fn new(staged: Staged) -> Self {
        Self {
            state: Mutex::new(staged),
            shown: Mutex::default(),
        }
    }

    pub fn lock(&self) -> StagedGuard<'_> {
        StagedGuard {
            state: self.state.lock().expect("staged lock"),
            shown: &self.shown,
        }
    }

    /// The lock if no one holds it.
    pub fn try_lock(&self) -> Option<StagedGuard<'_>> {
        Some(StagedGuard {
            state: self.state.try_lock().ok()?,
            shown: &self.shown,
        })
    }

    /// [`Staged::show`] as of the last time the lock was let go, without waiting for it.
    pub fn show_last(&self, inode: &mut granary_protos::v1::Inode) {
        self.shown.lock().expect("shown lock").apply(inode);
    }
}

pub type SharedStaged = Arc<StagedFile>;

#[derive(Default)]
pub struct StagingArea {
    /// By inode: the staged file and how many handles use it.
    files: RwLock<HashMap<u64, (SharedStaged, usize)>>,
    /// How many inodes have a staged file: reads on a mount that writes nothing never
    /// touch the map.
    active: AtomicUsize,
}

impl StagingArea {
    /// The inode's staged file, made (holding nothing yet) for its first user.
    pub fn attach(&self, ino: u64) -> FsResult<SharedStaged> {
        let mut files = self.files.write().expect("staging lock");
        if let Some((s, users)) = files.get_mut(&ino) {
            *users += 1;
            return Ok(s.clone());
        }
        let s = Arc::new(StagedFile::new(Staged {
            backing: None,
            size: 0,
            content: Content::Committed { synced: true },
            unlinked: false,
            modified_ns: None,
            kept: false,
        }));
        files.insert(ino, (s.clone(), 1));
        self.active.store(files.len(), Ordering::Release);
        Ok(s)
    }

    /// One user is done; the last one drops the staged file.
    pub fn detach(&self, ino: u64) {
        let mut files = self.files.write().expect("staging lock");
        if let Some((_, users)) = files.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                files.remove(&ino);
            }
        }
        self.active.store(files.len(), Ordering::Release);
    }

    /// How many users the inode's staged file has (0: none).
    pub fn users(&self, ino: u64) -> usize {
        self.files
            .read()
            .expect("staging lock")
            .get(&ino)
            .map_or(0, |(_, users)| *users)
    }

    pub fn get(&self, ino: u64) -> Option<SharedStaged> {
        if self.active.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.files
            .read()
            .expect("staging lock")
            .get(&ino)
            .map(|(s, _)| s.clone())
    }
}
