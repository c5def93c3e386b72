//! The write path driven without a kernel: an in-memory namespace that accepts
//! creates and commits, and a data path that keeps uploaded contents by inode.

use super::*;
use crate::content_store::{NotStored, Stored};
use crate::memory::MemoryLimiter;
use crate::staging::{Backing, SMALL_FILE_MAX};
use granary_protos::v1::{BlockLocationsReply, CommitContent, CreateRequest, FileKind, WorkerInfo};

#[derive(Default)]
struct Namespace {
    inodes: Mutex<HashMap<u64, Inode>>,
    next: AtomicU64,
    /// Commits that have started (each then takes `commit_delay`).
    commits_started: AtomicU64,
    commit_delay: Mutex<Duration>,
    /// The next this many commits fail as if the leader were unreachable.
    failing_commits: AtomicU64,
}

impl MetadataService for Namespace {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.inodes
            .lock()
            .unwrap()
            .values()
            .find(|i| i.parent == parent && i.name == name && i.id != parent)
            .cloned()
            .ok_or_else(|| FsError::NotFound(shown(name)))
    }
    fn getattr(&self, id: u64) -> FsResult<Inode> {
        self.inodes
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(id.to_string()))
    }
    fn readdir(&self, _: u64, _: &[u8], _: u32) -> FsResult<(Vec<Inode>, bool)> {
        Ok((Vec::new(), false))
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
    fn create(&self, req: CreateRequest) -> FsResult<Inode> {
        if self.lookup(req.parent, &req.name).is_ok() {
            return Err(FsError::Exists(shown(&req.name)));
        }
        let inode = Inode {
            id: 100 + self.next.fetch_add(1, Ordering::Relaxed),
            parent: req.parent,
            name: req.name,
            kind: req.kind,
            mode: req.mode,
            block_size: 1 << 20,
            ..Default::default()
        };
        self.inodes.lock().unwrap().insert(inode.id, inode.clone());
        Ok(inode)
    }
    fn commit(&self, c: CommitContent) -> FsResult<Inode> {
        self.commits_started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(*self.commit_delay.lock().unwrap());
        let failing = self
            .failing_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(FsError::Unavailable("shard 0 unreachable".into()));
        }
        let mut inodes = self.inodes.lock().unwrap();
        let i = inodes
            .get_mut(&c.id)
            .ok_or_else(|| FsError::NotFound("gone".into()))?;
        i.size = c.size;
        i.fingerprint = c.fingerprint;
        Ok(i.clone())
    }
}

/// Uploaded contents by inode; reads serve them. With `local_worker`, small files are
/// published whole (as through a worker on this machine), counted in `whole` too.
#[derive(Default)]
struct Store {
    files: Mutex<HashMap<u64, Vec<u8>>>,
    uploads: AtomicU64,
    local_worker: bool,
    whole: AtomicU64,
    memory: Option<Arc<MemoryLimiter>>,
}

impl Store {
    fn keep(&self, file: &Inode, data: Vec<u8>) -> UfsFingerprint {
        let size = data.len() as u64;
        self.files.lock().unwrap().insert(file.id, data);
        let n = self.uploads.fetch_add(1, Ordering::Relaxed) as i64;
        UfsFingerprint {
            size,
            mtime_ns: n + 1,
        }
    }
}

impl BlockRead for Store {
    fn read(&self, file: &Inode, _: &mut ReadState, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let files = self.files.lock().unwrap();
        let data = files.get(&file.id).cloned().unwrap_or_default();
        let start = (offset as usize).min(data.len());
        let end = (start + len as usize).min(data.len());
        Ok(data[start..end].to_vec())
    }
}

impl ContentStore for Store {
    fn backing(&self, _: &Inode, end: u64) -> FsResult<Backing> {
        let memory = self.memory.as_ref().expect("made with a limiter");
        if self.local_worker && end <= SMALL_FILE_MAX {
            if let Some(memory) = memory.try_reserve(end) {
                return Ok(Backing::Memory {
                    socket: "upload.sock".into(),
                    data: Vec::new(),
                    memory,
                });
            }
        }
        Ok(Backing::Own(tempfile::tempfile()?))
    }
    fn store(
        &self,
        file: &Inode,
        backing: Backing,
        size: u64,
        _: bool,
    ) -> Result<Stored, NotStored> {
        match backing {
            Backing::Memory { data, .. } => {
                self.whole.fetch_add(1, Ordering::Relaxed);
                Ok(Stored {
                    fingerprint: self.keep(file, data),
                    kept: None,
                })
            }
            Backing::Own(f) => {
                let mut data = vec![0u8; size as usize];
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut data, 0).unwrap();
                Ok(Stored {
                    fingerprint: self.keep(file, data),
                    kept: Some(Backing::Own(f)),
                })
            }
            Backing::Worker(_) => unreachable!("this store makes no local uploads"),
        }
    }
}

fn fs() -> (GranaryFs, Arc<Namespace>, Arc<Store>) {
    fs_with(false)
}

fn fs_with(local_worker: bool) -> (GranaryFs, Arc<Namespace>, Arc<Store>) {
    fs_with_memory(local_worker, 1 << 30)
}

fn fs_with_memory(local_worker: bool, memory: u64) -> (GranaryFs, Arc<Namespace>, Arc<Store>) {
    let ns = Arc::new(Namespace::default());
    ns.inodes.lock().unwrap().insert(
        1,
        Inode {
            id: 1,
            parent: 1,
            kind: FileKind::Directory as i32,
            ..Default::default()
        },
    );
    let store = Arc::new(Store {
        local_worker,
        memory: Some(MemoryLimiter::new(memory)),
        ..Default::default()
    });
    let opts = FsOptions {
        meta_cache_ttl: Duration::from_secs(60),
        meta_cache_entries: 1000,
        read_only: false,
    };
    let fs = GranaryFs::new(ns.clone(), store.clone(), store.clone(), opts);
    (fs, ns, store)
}

#[test]
fn writes_are_read_back_then_committed_at_close() {
    for local_worker in [false, true] {
        writes_are_read_back_then_committed_at_close_with(local_worker);
    }
}

fn writes_are_read_back_then_committed_at_close_with(local_worker: bool) {
    let (fs, ns, store) = fs_with(local_worker);
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"hello world").unwrap();
    fs.write(fh, 20, b"!").unwrap();
    let (reader, _) = fs.open(inode.id, libc::O_RDONLY).unwrap();
    let mut expected = b"hello world".to_vec();
    expected.resize(20, 0);
    expected.push(b'!');
    assert_eq!(
        fs.read(reader, 0, 100).unwrap(),
        expected,
        "read-your-writes"
    );
    assert_eq!(fs.getattr(inode.id).unwrap().size, 21);
    assert_eq!(
        store.uploads.load(Ordering::Relaxed),
        0,
        "nothing uploaded before close"
    );

    fs.flush(fh).unwrap();
    fs.release(fh);
    fs.release(reader);
    assert_eq!(store.files.lock().unwrap()[&inode.id], expected);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 21);
    // A second close uploads nothing: the content did not change.
    let (again, _) = fs.open(inode.id, libc::O_RDWR).unwrap();
    fs.flush(again).unwrap();
    fs.release(again);
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    assert_eq!(store.whole.load(Ordering::Relaxed), u64::from(local_worker));
}

#[test]
fn overwrite_truncate_and_append_start_from_the_committed_content() {
    for local_worker in [false, true] {
        overwrite_truncate_and_append_with(local_worker);
    }
}

fn overwrite_truncate_and_append_with(local_worker: bool) {
    let (fs, _, store) = fs_with(local_worker);
    let (inode, fh) = fs.create(1, b"log", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"0123456789").unwrap();
    fs.release(fh);

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY).unwrap();
    fs.write(fh, 2, b"ab").unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"01ab456789");

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.write(fh, 0, b"+").unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"01ab456789+");

    let attrs = SetAttr {
        size: Some(4),
        ..Default::default()
    };
    assert_eq!(fs.setattr(inode.id, &attrs).unwrap().size, 4);
    assert_eq!(
        store.files.lock().unwrap()[&inode.id],
        b"01ab",
        "truncate(2) commits at once"
    );

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    fs.release(fh);
    assert!(store.files.lock().unwrap()[&inode.id].is_empty());
}

#[test]
fn create_of_a_name_made_elsewhere_opens_it_unless_exclusive() {
    let (fs, ns, _) = fs();
    let elsewhere = ns
        .create(CreateRequest {
            parent: 1,
            name: b"shared".to_vec(),
            kind: FileKind::File as i32,
            ..Default::default()
        })
        .unwrap();
    let (inode, fh) = fs
        .create(1, b"shared", 0o644, libc::O_WRONLY, 0, 0)
        .unwrap();
    assert_eq!(inode.id, elsewhere.id);
    fs.release(fh);
    let err = fs
        .create(1, b"shared", 0o644, libc::O_WRONLY | libc::O_EXCL, 0, 0)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    let (fh, _) = fs.open(elsewhere.id, libc::O_RDONLY).unwrap();
    assert_eq!(fs.write(fh, 0, b"x").unwrap_err().errno(), libc::EBADF);
}

#[test]
fn a_small_file_kept_in_memory_moves_to_a_file_when_it_grows() {
    let (fs, _, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"grows", 0o644, libc::O_RDWR, 0, 0).unwrap();
    let chunk = vec![7u8; 100 << 10];
    let mut expected = Vec::new();
    for i in 0..4u64 {
        fs.write(fh, i * chunk.len() as u64, &chunk).unwrap();
        expected.extend_from_slice(&chunk);
        assert_eq!(fs.read(fh, 0, expected.len() as u32).unwrap(), expected);
    }
    assert!(expected.len() as u64 > SMALL_FILE_MAX);
    fs.flush(fh).unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], expected);
    assert_eq!(
        store.whole.load(Ordering::Relaxed),
        0,
        "too big to send whole"
    );

    // Truncated back to a small size, then grown past the limit by a truncate alone.
    let attrs = |size| SetAttr {
        size: Some(size),
        ..Default::default()
    };
    fs.setattr(inode.id, &attrs(10)).unwrap();
    assert_eq!(store.files.lock().unwrap()[&inode.id], vec![7u8; 10]);
    fs.setattr(inode.id, &attrs(SMALL_FILE_MAX + 1)).unwrap();
    let mut grown = vec![7u8; 10];
    grown.resize(SMALL_FILE_MAX as usize + 1, 0);
    assert_eq!(store.files.lock().unwrap()[&inode.id], grown);
}

#[test]
fn attributes_read_during_a_commit_show_the_new_size() {
    for local_worker in [false, true] {
        let (fs, ns, _) = fs_with(local_worker);
        let fs = Arc::new(fs);
        let (inode, fh) = fs.create(1, b"racy", 0o644, libc::O_WRONLY, 0, 0).unwrap();
        fs.write(fh, 0, b"eleven byte").unwrap();
        *ns.commit_delay.lock().unwrap() = Duration::from_millis(300);
        let flusher = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.flush(fh))
        };
        while ns.commits_started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The upload is done and the commit under way: neither the staged size nor the
        // size from before the write may be shown as if committed.
        assert_eq!(fs.getattr(inode.id).unwrap().size, 11);
        flusher.join().unwrap().unwrap();
        assert_eq!(fs.getattr(inode.id).unwrap().size, 11);
        fs.release(fh);
    }
}

#[test]
fn small_files_stage_in_files_once_the_buffer_memory_is_spent() {
    let (fs, _, store) = fs_with_memory(true, 150 << 10);
    let memory = store.memory.clone().unwrap();
    let chunk = vec![3u8; 100 << 10];
    let (a, fa) = fs.create(1, b"a", 0o644, libc::O_RDWR, 0, 0).unwrap();
    let (b, fb) = fs.create(1, b"b", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fa, 0, &chunk).unwrap();
    assert_eq!(memory.used(), 100 << 10, "a is held in memory");
    fs.write(fb, 0, &chunk).unwrap();
    assert_eq!(memory.used(), 100 << 10, "b did not fit: it went to a file");
    // a grows past what is left: it moves to a file too, and gives its memory back.
    fs.write(fa, chunk.len() as u64, &chunk).unwrap();
    assert_eq!(memory.used(), 0);
    for fh in [fa, fb] {
        fs.flush(fh).unwrap();
        fs.release(fh);
    }
    let files = store.files.lock().unwrap();
    assert_eq!(files[&a.id], [chunk.clone(), chunk.clone()].concat());
    assert_eq!(files[&b.id], chunk);
    assert_eq!(
        store.whole.load(Ordering::Relaxed),
        0,
        "neither was sent whole"
    );
}

#[test]
fn content_stored_but_not_committed_is_committed_by_the_next_try_as_it_is() {
    let (fs, ns, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"version one").unwrap();
    ns.failing_commits.store(1, Ordering::SeqCst);
    assert!(fs.flush(fh).unwrap_err().is_retryable());
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1, "stored once");
    assert_eq!(ns.getattr(inode.id).unwrap().size, 0, "not committed");
    // The retry commits what is in the UFS already; it is not stored again.
    fs.flush(fh).unwrap();
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 11);
    assert_eq!(fs.read(fh, 0, 100).unwrap(), b"version one");
    fs.release(fh);
}

#[test]
fn truncating_content_whose_commit_failed_truncates_what_was_stored() {
    let (fs, ns, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"log", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"0123456789").unwrap();
    ns.failing_commits.store(1, Ordering::SeqCst);
    fs.flush(fh).unwrap_err();
    let attrs = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    fs.setattr(inode.id, &attrs).unwrap();
    fs.release(fh);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 0);
    assert!(store.files.lock().unwrap()[&inode.id].is_empty());
}

#[test]
fn an_fsync_after_a_close_stores_the_content_again_durably_and_only_once() {
    let (fs, _, store) = fs_with(false);
    let (inode, fh) = fs.create(1, b"f", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"abc").unwrap();
    fs.flush(fh).unwrap();
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    fs.fsync(fh).unwrap();
    assert_eq!(store.uploads.load(Ordering::Relaxed), 2, "made durable");
    fs.fsync(fh).unwrap();
    fs.flush(fh).unwrap();
    assert_eq!(
        store.uploads.load(Ordering::Relaxed),
        2,
        "nothing new to store"
    );
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"abc");
    fs.release(fh);
}
