//! In-memory doubles for driving [`GranaryFs`] without a kernel, masters or workers: a
//! namespace with the masters' rules (names, kinds, emptiness, renames over targets) and
//! a store that keeps content by inode, both with counters and injectable failures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    BlockLocationsReply, CommitContent, CreateRequest, FileKind, Inode, RenameRequest,
    SetAttributes, StatFsReply, UfsFingerprint, WorkerInfo,
};

use super::{shown, FsOptions, GranaryFs};
use crate::block_reader::{BlockRead, ReadState};
use crate::content_store::{ContentStore, NotStored, Stored};
use crate::staging::{Backing, SMALL_FILE_MAX};
use granary_common::memory::MemoryLimiter;
use granary_meta_client::MetadataService;

pub const ROOT: u64 = 1;

/// Calls that fail on purpose, each for its next `n` calls.
#[derive(Default)]
pub struct Faults {
    pub commits: AtomicU64,
}

fn take(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The namespace as the masters keep it, in memory.
pub struct MemNamespace {
    inodes: Mutex<HashMap<u64, Inode>>,
    next: AtomicU64,
    pub lookups: AtomicU64,
    pub refreshes: AtomicU64,
    /// UFS objects made durable as they are (fsync(2) of committed content).
    pub syncs: AtomicU64,
    /// Commits that have started (each then takes `commit_delay`).
    pub commits_started: AtomicU64,
    pub commit_delay: Mutex<Duration>,
    pub faults: Faults,
    /// Creates a new file's empty object in the UFS, as a master over a local directory
    /// does (its fingerprint comes with the inode); off: the first close uploads it.
    pub empty_objects: AtomicBool,
    /// What `pins` answers, as a sharded service's routing table would.
    pub pins: Mutex<granary_meta_client::Pins>,
}

impl Default for MemNamespace {
    fn default() -> Self {
        let root = Inode {
            id: ROOT,
            parent: ROOT,
            kind: FileKind::Directory as i32,
            ..Default::default()
        };
        MemNamespace {
            inodes: Mutex::new(HashMap::from([(ROOT, root)])),
            next: AtomicU64::new(100),
            lookups: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            commits_started: AtomicU64::new(0),
            commit_delay: Mutex::new(Duration::ZERO),
            empty_objects: AtomicBool::new(false),
            pins: Mutex::new((0, Vec::new())),
            faults: Faults::default(),
        }
    }
}

fn is_dir(i: &Inode) -> bool {
    i.kind == FileKind::Directory as i32
}

impl MemNamespace {
    /// Adds `inode` as it is (an entry loaded from the UFS).
    pub fn insert(&self, inode: Inode) {
        self.inodes.lock().unwrap().insert(inode.id, inode);
    }

    /// Changes an inode behind the mount's back (the UFS changed and was listed again).
    pub fn update(&self, id: u64, f: impl FnOnce(&mut Inode)) {
        f(self
            .inodes
            .lock()
            .unwrap()
            .get_mut(&id)
            .expect("known inode"));
    }

    fn child(inodes: &HashMap<u64, Inode>, parent: u64, name: &[u8]) -> Option<Inode> {
        inodes
            .values()
            .find(|i| i.parent == parent && i.name == name && i.id != parent)
            .cloned()
    }

    fn dir(inodes: &HashMap<u64, Inode>, id: u64) -> FsResult<Inode> {
        let d = inodes
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("inode {id}")))?;
        if !is_dir(&d) {
            return Err(FsError::NotDir(shown(&d.name)));
        }
        Ok(d)
    }

    fn has_children(inodes: &HashMap<u64, Inode>, id: u64) -> bool {
        inodes.values().any(|i| i.parent == id && i.id != id)
    }
}

impl MetadataService for MemNamespace {
    fn pins(&self) -> granary_meta_client::Pins {
        self.pins.lock().unwrap().clone()
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let inodes = self.inodes.lock().unwrap();
        Self::dir(&inodes, parent)?;
        Self::child(&inodes, parent, name).ok_or_else(|| FsError::NotFound(shown(name)))
    }

    fn getattr(&self, id: u64) -> FsResult<Inode> {
        self.inodes
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("inode {id}")))
    }

    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let inodes = self.inodes.lock().unwrap();
        Self::dir(&inodes, id)?;
        let kids: BTreeMap<Vec<u8>, Inode> = inodes
            .values()
            .filter(|i| i.parent == id && i.id != id && i.name.as_slice() > start_after)
            .map(|i| (i.name.clone(), i.clone()))
            .collect();
        let more = kids.len() > limit as usize;
        Ok((kids.into_values().take(limit as usize).collect(), more))
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
        let mut inodes = self.inodes.lock().unwrap();
        Self::dir(&inodes, req.parent)?;
        if Self::child(&inodes, req.parent, &req.name).is_some() {
            return Err(FsError::Exists(shown(&req.name)));
        }
        let inode = Inode {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            parent: req.parent,
            name: req.name,
            kind: req.kind,
            mode: req.mode,
            uid: req.uid,
            gid: req.gid,
            symlink_target: req.symlink_target,
            rdev: req.rdev,
            block_size: 1 << 20,
            fingerprint: (req.kind == FileKind::File as i32
                && self.empty_objects.load(Ordering::SeqCst))
            .then(UfsFingerprint::default),
            ..Default::default()
        };
        inodes.insert(inode.id, inode.clone());
        Ok(inode)
    }

    fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        let mut inodes = self.inodes.lock().unwrap();
        Self::dir(&inodes, parent)?;
        let victim =
            Self::child(&inodes, parent, name).ok_or_else(|| FsError::NotFound(shown(name)))?;
        match (directory, is_dir(&victim)) {
            (true, false) => return Err(FsError::NotDir(shown(name))),
            (false, true) => return Err(FsError::IsDir(shown(name))),
            (true, true) if Self::has_children(&inodes, victim.id) => {
                return Err(FsError::NotEmpty(shown(name)))
            }
            _ => {}
        }
        inodes.remove(&victim.id);
        Ok(())
    }

    fn rename(&self, r: RenameRequest) -> FsResult<Inode> {
        let mut inodes = self.inodes.lock().unwrap();
        Self::dir(&inodes, r.parent)?;
        Self::dir(&inodes, r.new_parent)?;
        let mut moving = Self::child(&inodes, r.parent, &r.name)
            .ok_or_else(|| FsError::NotFound(shown(&r.name)))?;
        let mut up = r.new_parent;
        while is_dir(&moving) && up != ROOT {
            if up == moving.id {
                return Err(FsError::InvalidArgument("beneath itself".into()));
            }
            up = inodes[&up].parent;
        }
        if let Some(target) = Self::child(&inodes, r.new_parent, &r.new_name) {
            if target.id == moving.id {
                return Ok(moving);
            }
            if r.no_replace {
                return Err(FsError::Exists(shown(&r.new_name)));
            }
            match (is_dir(&moving), is_dir(&target)) {
                (true, false) => return Err(FsError::NotDir(shown(&r.new_name))),
                (false, true) => return Err(FsError::IsDir(shown(&r.new_name))),
                (true, true) if Self::has_children(&inodes, target.id) => {
                    return Err(FsError::NotEmpty(shown(&r.new_name)))
                }
                _ => {}
            }
            inodes.remove(&target.id);
        }
        moving.parent = r.new_parent;
        moving.name = r.new_name;
        inodes.insert(moving.id, moving.clone());
        Ok(moving)
    }

    fn set_attr(&self, a: SetAttributes) -> FsResult<Inode> {
        let mut inodes = self.inodes.lock().unwrap();
        let i = inodes
            .get_mut(&a.id)
            .ok_or_else(|| FsError::NotFound(format!("inode {}", a.id)))?;
        if let Some(mode) = a.mode {
            i.mode = mode;
        }
        if let Some(mtime) = a.mtime_ns {
            i.mtime_ns = mtime;
        }
        Ok(i.clone())
    }

    fn refresh(&self, _dir: u64) -> FsResult<()> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&self, id: u64) -> FsResult<()> {
        self.getattr(id)?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn commit(&self, c: CommitContent) -> FsResult<Inode> {
        self.commits_started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(*self.commit_delay.lock().unwrap());
        if take(&self.faults.commits) {
            return Err(FsError::Unavailable("shard 0 unreachable".into()));
        }
        let mut inodes = self.inodes.lock().unwrap();
        let i = inodes
            .get_mut(&c.id)
            .ok_or_else(|| FsError::NotFound(format!("inode {}", c.id)))?;
        i.size = c.size;
        i.fingerprint = c.fingerprint;
        Ok(i.clone())
    }
}

/// File content by inode, as the UFS (through workers) holds it. With `local_worker`,
/// small files stage in memory and are published whole, as through a worker on this
/// machine (counted in `whole`).
pub struct MemStore {
    pub files: Mutex<HashMap<u64, Vec<u8>>>,
    pub uploads: AtomicU64,
    /// Uploads stored durably (fsync(2)).
    pub durable: AtomicU64,
    pub whole: AtomicU64,
    pub local_worker: bool,
    pub memory: Arc<MemoryLimiter>,
    /// Reads of these inodes fail once with ESTALE (changed in the UFS).
    pub stale_once: Mutex<HashSet<u64>>,
}

impl MemStore {
    pub fn new(local_worker: bool, memory: u64) -> Self {
        MemStore {
            files: Mutex::default(),
            uploads: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            whole: AtomicU64::new(0),
            local_worker,
            memory: MemoryLimiter::new(memory, "granary_client_buffer_bytes"),
            stale_once: Mutex::default(),
        }
    }

    /// Keeps `data` as `file`'s content; its fingerprint is new every time.
    pub fn keep(&self, file: &Inode, data: Vec<u8>) -> UfsFingerprint {
        let size = data.len() as u64;
        self.files.lock().unwrap().insert(file.id, data);
        let n = self.uploads.fetch_add(1, Ordering::Relaxed) as i64;
        UfsFingerprint {
            size,
            mtime_ns: n + 1,
        }
    }
}

impl BlockRead for MemStore {
    fn read(
        &self,
        file: &Inode,
        state: &mut ReadState,
        offset: u64,
        len: u32,
    ) -> FsResult<Vec<u8>> {
        if self.stale_once.lock().unwrap().remove(&file.id) {
            return Err(FsError::Stale(format!("{} changed", shown(&file.name))));
        }
        let files = self.files.lock().unwrap();
        let data = files.get(&file.id).map(Vec::as_slice).unwrap_or_default();
        // What the committed inode says, as a worker serves a block of that version.
        let data = &data[..data.len().min(file.size as usize)];
        let start = (offset as usize).min(data.len());
        let end = (start + len as usize).min(data.len());
        if end > start {
            // As the block reader does: the state has served bytes of this version.
            *state = ReadState::ended_at(end as u64);
        }
        Ok(data[start..end].to_vec())
    }
}

impl ContentStore for MemStore {
    fn backing(&self, _: &Inode, end: u64) -> FsResult<Backing> {
        if self.local_worker && end <= SMALL_FILE_MAX {
            if let Some(memory) = self.memory.try_reserve(end) {
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
        durable: bool,
    ) -> Result<Stored, NotStored> {
        self.durable
            .fetch_add(u64::from(durable), Ordering::Relaxed);
        match backing {
            Backing::Memory { mut data, .. } => {
                self.whole.fetch_add(1, Ordering::Relaxed);
                data.resize(size as usize, 0);
                Ok(Stored {
                    fingerprint: self.keep(file, data),
                    kept: None,
                })
            }
            Backing::Own(f) => {
                let mut data = vec![0u8; size as usize];
                f.read_exact_at(&mut data, 0).expect("staging file");
                Ok(Stored {
                    fingerprint: self.keep(file, data),
                    kept: Some(Backing::Own(f)),
                })
            }
            Backing::Worker(_) => unreachable!("this store makes no local uploads"),
        }
    }
}

/// A writable filesystem over fresh doubles.
pub fn writable_fs(
    local_worker: bool,
    memory: u64,
) -> (GranaryFs, Arc<MemNamespace>, Arc<MemStore>) {
    let ns = Arc::new(MemNamespace::default());
    let store = Arc::new(MemStore::new(local_worker, memory));
    let opts = FsOptions {
        meta_cache_ttl: Duration::from_secs(60),
        meta_cache_entries: 10_000,
        read_only: false,
    };
    let fs = GranaryFs::new(ns.clone(), store.clone(), store.clone(), opts);
    (fs, ns, store)
}
