//! The on-disk block cache. A block of a multi-block file no larger than an eighth of the
//! capacity is written at its offset in one data file shared by that file's blocks, so a
//! fully cached file is one local file the kernel can read for the mount by itself (FUSE
//! passthrough); such a file is evicted whole, which never changes bytes under an open
//! reader. Any other block is a file of its own (one inode per small file). [`names`]
//! says how both are named. Eviction is LRU between a high and a low watermark. On open
//! the directories are listed and every complete block is kept; its checksum is verified
//! before it is first served.

mod names;
mod shared;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use names::SHARDS;
pub use shared::SharedFill;
use shared::{SharedAt, SharedFile};

pub type BlockId = (u64, u32);

/// The UFS object version a block was read from.
pub use granary_common::ufs::Fingerprint;

/// One version of a file whose blocks share a data file.
type FileKey = (u64, Fingerprint);

/// Where a cached block's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBlock {
    pub path: PathBuf,
    /// Where the block starts in `path`.
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
struct Entry {
    len: u64,
    fingerprint: Fingerprint,
    crc: u32,
    verified: bool,
    tick: u64,
    /// Where the block is in its file's shared data file; `None` for a block file.
    shared: Option<SharedAt>,
}

impl Entry {
    /// An entry for a block just written (`verified`) or found on disk at startup (its
    /// checksum checked on first use).
    fn new(
        len: u64,
        fingerprint: Fingerprint,
        crc: u32,
        shared: Option<SharedAt>,
        verified: bool,
    ) -> Self {
        Entry {
            len,
            fingerprint,
            crc,
            verified,
            tick: 0,
            shared,
        }
    }

    fn shared_key(&self, id: BlockId) -> Option<FileKey> {
        self.shared.map(|_| (id.0, self.fingerprint))
    }
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<BlockId, Entry>,
    lru: BTreeMap<u64, BlockId>,
    shared: HashMap<FileKey, SharedFile>,
    /// Shared files with fills under way.
    busy: HashSet<FileKey>,
    next_tick: u64,
    used: u64,
    /// Blocks cached (`true`) or dropped since the last heartbeat: only the last change
    /// of each counts (one cached and dropped within a heartbeat is reported dropped).
    changed: HashMap<BlockId, bool>,
    /// By file: how many of its blocks are cached, and the highest index any of them had
    /// since (a bound, so a file's blocks are found without a pass over every entry).
    files: HashMap<u64, (u32, u32)>,
}

impl Index {
    fn insert(&mut self, id: BlockId, entry: Entry) {
        if self.entries.insert(id, entry).is_none() {
            let (count, highest) = self.files.entry(id.0).or_default();
            *count += 1;
            *highest = (*highest).max(id.1);
        }
    }

    /// The cached blocks of `file` (looked for up to its highest index, until all counted
    /// are found).
    fn blocks_of(&self, file: u64) -> impl Iterator<Item = BlockId> + '_ {
        let (count, highest) = self.files.get(&file).copied().unwrap_or_default();
        (0..=highest)
            .map(move |i| (file, i))
            .filter(|id| self.entries.contains_key(id))
            .take(count as usize)
    }

    fn touch(&mut self, id: BlockId) {
        self.next_tick += 1;
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(&id) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, id);
        }
    }

    /// Drops the entry, reported to the masters as removed.
    fn remove(&mut self, id: BlockId) -> Option<Entry> {
        let e = self.take(id)?;
        self.changed.insert(id, false);
        Some(e)
    }

    /// Drops the entry without a report (it is replaced at once).
    fn take(&mut self, id: BlockId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        if let Some((count, _)) = self.files.get_mut(&id.0) {
            *count -= 1;
            if *count == 0 {
                self.files.remove(&id.0);
            }
        }
        self.lru.remove(&e.tick);
        self.used -= e.len;
        if let Some(key) = e.shared_key(id) {
            if let Some(f) = self.shared.get_mut(&key) {
                f.blocks.remove(&id.1);
                f.bytes = f.bytes.saturating_sub(e.len);
                // Its last block gone, the data file goes too, and fills still writing
                // into it are not entered.
                if f.blocks.is_empty() {
                    self.forget_shared(key);
                }
            }
        }
        Some(e)
    }

    /// Whether this incarnation of the shared file is the one in the index.
    fn holds(&self, key: FileKey, incarnation: u64) -> bool {
        self.shared
            .get(&key)
            .is_some_and(|f| f.incarnation == incarnation)
    }

    fn forget_shared(&mut self, key: FileKey) {
        self.shared.remove(&key);
        self.busy.remove(&key);
    }

    /// Block `index` of the shared file is being filled.
    fn fill(&mut self, key: FileKey, index: u32) {
        if let Some(f) = self.shared.get_mut(&key) {
            f.filling.insert(index);
            self.busy.insert(key);
        }
    }

    /// Its fill is over; whether the shared file now holds neither blocks nor fills.
    fn unfill(&mut self, key: FileKey, index: u32) -> bool {
        let Some(f) = self.shared.get_mut(&key) else {
            return false;
        };
        f.filling.remove(&index);
        if f.filling.is_empty() {
            self.busy.remove(&key);
        }
        f.blocks.is_empty() && f.filling.is_empty()
    }
}

/// A file to delete once the index no longer names it.
#[derive(Debug)]
enum Doomed {
    /// A block file or a marker, unless that block was cached again under the same name.
    Block(BlockId, PathBuf),
    /// A shared data file (of this incarnation), unless blocks or fills of it are back.
    Data(FileKey, u64),
}

/// Blocks by their last change (`true`: cached), as (added, removed).
pub fn split_changes(
    changes: impl IntoIterator<Item = (BlockId, bool)>,
) -> (Vec<BlockId>, Vec<BlockId>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for (id, cached) in changes {
        match cached {
            true => added.push(id),
            false => removed.push(id),
        }
    }
    (added, removed)
}

/// What the scan at open found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    pub blocks: u64,
    pub bytes: u64,
    pub discarded: u64,
}

#[derive(Debug)]
pub struct BlockStore {
    blocks_dir: PathBuf,
    files_dir: PathBuf,
    tmp_dir: PathBuf,
    capacity: u64,
    high: u64,
    low: u64,
    index: Mutex<Index>,
    /// Lookups answered from the cache and those that went to the UFS, since start (the
    /// masters show the hit ratio from these).
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

/// A block the scan at open kept, with its file's modification time.
type Found = (std::time::SystemTime, BlockId, Entry);

fn modified(md: &fs::Metadata) -> std::time::SystemTime {
    md.modified().unwrap_or(std::time::UNIX_EPOCH)
}

/// CRC32C of `len` bytes of `path` from `offset`.
fn range_crc(path: &Path, offset: u64, len: u64) -> io::Result<u32> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let (mut crc, mut done) = (0u32, 0u64);
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..want], offset + done)?;
        crc = crc32c::crc32c_append(crc, &buf[..want]);
        done += want as u64;
    }
    Ok(crc)
}

impl BlockStore {
    pub fn open(
        cache_dir: &Path,
        capacity: u64,
        high_watermark: f64,
        low_watermark: f64,
    ) -> io::Result<(Self, ScanReport)> {
        let blocks_dir = cache_dir.join("blocks");
        let files_dir = cache_dir.join("files");
        let tmp_dir = cache_dir.join("tmp");
        for shard in 0..SHARDS {
            fs::create_dir_all(blocks_dir.join(format!("{shard:02x}")))?;
            fs::create_dir_all(files_dir.join(format!("{shard:02x}")))?;
        }
        // Partial fetches from before a crash are garbage.
        let _ = fs::remove_dir_all(&tmp_dir);
        fs::create_dir_all(&tmp_dir)?;
        let store = BlockStore {
            blocks_dir,
            files_dir,
            tmp_dir,
            capacity,
            high: (capacity as f64 * high_watermark) as u64,
            low: (capacity as f64 * low_watermark) as u64,
            index: Mutex::new(Index::default()),
            hits: Default::default(),
            misses: Default::default(),
        };
        let report = store.scan()?;
        let doomed = {
            let mut idx = store.index.lock().expect("index lock");
            idx.changed.clear();
            store.evict_locked(&mut idx, None)
        };
        store.delete_files(doomed);
        metrics::gauge!("granary_worker_cache_used_bytes").set(store.used() as f64);
        Ok((store, report))
    }

    /// The shard directories under `dir`; anything else there is removed (e.g. the
    /// per-file directories of an older layout).
    fn shard_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut shards = Vec::new();
        for d in fs::read_dir(dir)? {
            let d = d?;
            let name = d.file_name();
            let shard = name.to_str().and_then(|s| u64::from_str_radix(s, 16).ok());
            if name.len() == 2 && shard.is_some() {
                shards.push(d.path());
            } else {
                let _ = fs::remove_dir_all(d.path());
            }
        }
        Ok(shards)
    }

    fn scan(&self) -> io::Result<ScanReport> {
        let mut found: Vec<Found> = Vec::new();
        let mut report = ScanReport::default();
        for dir in Self::shard_dirs(&self.blocks_dir)? {
            for f in fs::read_dir(dir)? {
                let f = f?;
                let parsed = f.file_name().to_str().and_then(names::parse_block_name);
                let valid = parsed.and_then(|(id, fingerprint, len, crc)| {
                    let md = f.metadata().ok()?;
                    let entry = Entry::new(len, fingerprint, crc, None, false);
                    (md.len() == len && self.entry_path(id, &entry) == f.path()).then_some((
                        modified(&md),
                        id,
                        entry,
                    ))
                });
                match valid {
                    Some(block) => found.push(block),
                    None => {
                        report.discarded += 1;
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        found.extend(self.scan_shared(&mut report)?);
        // Oldest first, so eviction after a restart still prefers cold blocks, and of two
        // versions of one block (a crash between caching the new and deleting the old)
        // the newer stays.
        found.sort_by_key(|(t, _, _)| *t);
        let mut doomed = Vec::new();
        let mut idx = self.index.lock().expect("index lock");
        for (_, id, entry) in found {
            if let Some(stale) = idx.take(id) {
                report.blocks -= 1;
                report.bytes -= stale.len;
                report.discarded += 1;
                doomed.extend(self.doom(&idx, id, &stale));
            }
            report.blocks += 1;
            report.bytes += entry.len;
            idx.used += entry.len;
            if let (Some(key), Some(at)) = (entry.shared_key(id), entry.shared) {
                let file = idx
                    .shared
                    .entry(key)
                    .or_insert_with(|| SharedFile::new(at.incarnation));
                file.blocks.insert(id.1);
                file.bytes += entry.len;
            }
            idx.insert(id, entry);
            idx.touch(id);
        }
        drop(idx);
        self.delete_files(doomed);
        Ok(report)
    }

    fn shard_dir(dir: &Path, file_id: u64) -> PathBuf {
        dir.join(names::shard_name(file_id))
    }

    /// The file whose name commits the entry: its block file, or its marker.
    fn entry_path(&self, id: BlockId, e: &Entry) -> PathBuf {
        match e.shared {
            None => Self::shard_dir(&self.blocks_dir, id.0).join(names::block_name(
                id,
                e.fingerprint,
                e.len,
                e.crc,
            )),
            Some(at) => Self::shard_dir(&self.files_dir, id.0).join(names::marker_name(
                id,
                e.fingerprint,
                at.incarnation,
                at.offset,
                e.len,
                e.crc,
            )),
        }
    }

    fn data_path(&self, (file_id, fp): FileKey, incarnation: u64) -> PathBuf {
        Self::shard_dir(&self.files_dir, file_id).join(names::data_name(file_id, fp, incarnation))
    }

    /// Where the entry's bytes are.
    fn served(&self, id: BlockId, e: &Entry) -> CachedBlock {
        match e.shared {
            None => CachedBlock {
                path: self.entry_path(id, e),
                offset: 0,
                len: e.len,
            },
            Some(at) => CachedBlock {
                path: self.data_path((id.0, e.fingerprint), at.incarnation),
                offset: at.offset,
                len: e.len,
            },
        }
    }

    /// The files to delete for an entry just dropped from `idx`.
    fn doom(&self, idx: &Index, id: BlockId, e: &Entry) -> Vec<Doomed> {
        let mut doomed = vec![Doomed::Block(id, self.entry_path(id, e))];
        if let (Some(key), Some(at)) = (e.shared_key(id), e.shared) {
            if !idx.holds(key, at.incarnation) {
                doomed.push(Doomed::Data(key, at.incarnation));
            }
        }
        doomed
    }

    /// The cached block if it is present, read from the same UFS version and verified,
    /// from memory alone (no disk I/O: safe on an async thread); otherwise
    /// [`BlockStore::lookup`] decides.
    pub fn cached(&self, id: BlockId, fingerprint: Fingerprint) -> Option<CachedBlock> {
        let mut idx = self.index.lock().expect("index lock");
        let entry = idx.entries.get(&id)?;
        if entry.fingerprint != fingerprint || !entry.verified {
            return None;
        }
        let block = self.served(id, entry);
        idx.touch(id);
        Some(block)
    }

    /// The cached block if present and read from the same UFS version. Verifies the
    /// checksum on first use after a scan. A block of another version stays until this
    /// one is cached (the UFS decides which is current, not a client whose metadata may
    /// lag). Blocking: it may read the whole block or delete files.
    pub fn lookup(&self, id: BlockId, fingerprint: Fingerprint) -> Option<CachedBlock> {
        let (block, path, expected_crc) = {
            let mut idx = self.index.lock().expect("index lock");
            let entry = idx.entries.get(&id)?;
            if entry.fingerprint != fingerprint {
                return None;
            }
            let block = self.served(id, entry);
            if entry.verified {
                idx.touch(id);
                return Some(block);
            }
            (block, self.entry_path(id, entry), entry.crc)
        };
        let ok = matches!(range_crc(&block.path, block.offset, block.len), Ok(crc) if crc == expected_crc);
        let mut idx = self.index.lock().expect("index lock");
        // Cached anew or dropped meanwhile: the checked file is not the entry's any more
        // (a commit deletes the file it replaces); this read is a miss.
        let entry = idx
            .entries
            .get_mut(&id)
            .filter(|e| !e.verified && self.entry_path(id, e) == path)?;
        if ok {
            entry.verified = true;
            idx.touch(id);
            return Some(block);
        }
        tracing::warn!(
            file_id = id.0,
            index = id.1,
            "cached block failed its checksum; dropping it"
        );
        metrics::counter!("granary_worker_checksum_failures_total").increment(1);
        let mut doomed = Vec::new();
        self.remove_with_file(&mut idx, id, &mut doomed);
        drop(idx);
        self.delete_files(doomed);
        None
    }

    /// Drops `id` if the index still has its bytes at `block`, which a reader found
    /// missing (deleted behind the store's back), so that the next lookup fetches it again.
    pub fn forget_missing(&self, id: BlockId, block: &CachedBlock) {
        let mut doomed = Vec::new();
        {
            let mut idx = self.index.lock().expect("index lock");
            let listed = idx.entries.get(&id).map(|e| self.served(id, e));
            if listed.as_ref() == Some(block) {
                tracing::warn!(file_id = id.0, index = id.1, path = %block.path.display(), "cached block's file is gone; fetching it again");
                self.remove_with_file(&mut idx, id, &mut doomed);
            }
        }
        self.delete_files(doomed);
    }

    /// A fresh temp file path for a fetch in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp_dir.join(uuid::Uuid::new_v4().to_string())
    }

    /// Adds a committed entry and evicts what that makes too much.
    fn enter(&self, idx: &mut Index, id: BlockId, entry: Entry, doomed: &mut Vec<Doomed>) {
        idx.used += entry.len;
        idx.insert(id, entry);
        idx.touch(id);
        idx.changed.insert(id, true);
        doomed.extend(self.evict_locked(idx, Some(id)));
        metrics::gauge!("granary_worker_cache_used_bytes").set(idx.used as f64);
    }

    /// Moves a fully written temp file into the cache as block `id`, a file of its own.
    pub fn commit(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        tmp: &Path,
        len: u64,
        crc: u32,
    ) -> io::Result<CachedBlock> {
        let entry = Entry::new(len, fingerprint, crc, None, true);
        let block = self.served(id, &entry);
        let mut doomed = Vec::new();
        {
            // Renamed under the lock: a deletion of the same name decided before (an
            // eviction) then sees this entry and leaves the file alone.
            let mut idx = self.index.lock().expect("index lock");
            if let Err(e) = fs::rename(tmp, &block.path) {
                if e.kind() != io::ErrorKind::NotFound || !tmp.exists() {
                    return Err(e);
                }
                // A shard directory removed behind our back.
                fs::create_dir_all(Self::shard_dir(&self.blocks_dir, id.0))?;
                fs::rename(tmp, &block.path)?;
            }
            self.drop_replaced(&mut idx, id, &mut doomed);
            self.enter(&mut idx, id, entry, &mut doomed);
        }
        self.delete_files(doomed);
        Ok(block)
    }

    /// Drops the entry a block being committed replaces; one in a shared data file takes
    /// that file whole, which would otherwise keep its bytes, uncounted.
    fn drop_replaced(&self, idx: &mut Index, id: BlockId, doomed: &mut Vec<Doomed>) {
        match idx.entries.get(&id).and_then(|e| e.shared_key(id)) {
            Some(key) => {
                self.retire(idx, key, doomed);
            }
            None => {
                if let Some(old) = idx.take(id) {
                    doomed.extend(self.doom(idx, id, &old));
                }
            }
        }
    }

    /// Drops the given blocks (those cached, and the other blocks of their shared data
    /// files); returns how many and their bytes.
    pub fn evict(&self, ids: &[BlockId]) -> (u64, u64) {
        let mut doomed = Vec::new();
        let (mut blocks, mut bytes) = (0, 0);
        {
            let mut idx = self.index.lock().expect("index lock");
            for &id in ids {
                let (b, n) = self.remove_with_file(&mut idx, id, &mut doomed);
                blocks += b;
                bytes += n;
            }
            metrics::gauge!("granary_worker_cache_used_bytes").set(idx.used as f64);
        }
        self.delete_files(doomed);
        (blocks, bytes)
    }

    /// Drops every cached block of the files `file_ids`, whatever version they were of:
    /// a file that was longer before (overwritten, truncated) has blocks past its last
    /// size's. Returns the blocks and bytes dropped.
    pub fn evict_files(&self, file_ids: &HashSet<u64>) -> (u64, u64) {
        let ids: Vec<BlockId> = {
            let idx = self.index.lock().expect("index lock");
            file_ids.iter().flat_map(|&f| idx.blocks_of(f)).collect()
        };
        self.evict(&ids)
    }

    /// Drops `id`, reported as removed, and with a block of a shared data file every
    /// block of that file: the file keeps all their bytes until its last block goes, so a
    /// block alone would leave its bytes on disk, uncounted. Returns the blocks and bytes
    /// dropped; adds the files to delete to `doomed`.
    fn remove_with_file(
        &self,
        idx: &mut Index,
        id: BlockId,
        doomed: &mut Vec<Doomed>,
    ) -> (u64, u64) {
        if let Some(key) = idx.entries.get(&id).and_then(|e| e.shared_key(id)) {
            return self.retire(idx, key, doomed);
        }
        match idx.remove(id) {
            Some(e) => {
                doomed.extend(self.doom(idx, id, &e));
                (1, e.len)
            }
            None => (0, 0),
        }
    }

    /// Drops least recently used blocks until usage is at the low watermark, if it is
    /// above the high one. Returns the files to delete.
    fn evict_locked(&self, idx: &mut Index, keep: Option<BlockId>) -> Vec<Doomed> {
        if idx.used <= self.high {
            return Vec::new();
        }
        let mut doomed = self.evict_to(idx, self.low, keep, false);
        // Files being filled were left; past the capacity (many read at once) they go
        // too, retired: fills under way are not entered and fill again.
        if idx.used > self.capacity {
            doomed.extend(self.evict_to(idx, self.high, keep, true));
        }
        doomed
    }

    /// Drops least recently used blocks until usage is at most `target`; a block of a
    /// shared data file takes the file's other blocks with it. Files being filled stay
    /// unless `busy_too`; the file of `keep` stays. Returns the files to delete.
    fn evict_to(
        &self,
        idx: &mut Index,
        target: u64,
        keep: Option<BlockId>,
        busy_too: bool,
    ) -> Vec<Doomed> {
        let mut doomed = Vec::new();
        let keep_key = keep.and_then(|id| idx.entries.get(&id)?.shared_key(id));
        let mut evicted = 0u64;
        // Walked from the oldest tick by a cursor, not a copy of the whole LRU: this runs
        // under the index lock, and past the watermark on every commit.
        let mut next_tick = 0;
        while idx.used > target {
            let Some((&tick, &id)) = idx.lru.range(next_tick..).next() else {
                break;
            };
            next_tick = tick + 1;
            let Some(e) = idx.entries.get(&id) else {
                continue;
            };
            let busy = |key| Some(key) == keep_key || (!busy_too && idx.busy.contains(&key));
            if Some(id) == keep || e.shared_key(id).is_some_and(busy) {
                continue;
            }
            let (blocks, _) = self.remove_with_file(idx, id, &mut doomed);
            evicted += blocks;
        }
        metrics::counter!("granary_worker_evictions_total").increment(evicted);
        doomed
    }

    /// Deletes the files of dropped blocks, one at a time under the index lock, unless
    /// the index names them again meanwhile. Markers go before their data file.
    fn delete_files(&self, doomed: Vec<Doomed>) {
        for d in doomed {
            let idx = self.index.lock().expect("index lock");
            match d {
                Doomed::Block(id, path) => {
                    if idx.entries.get(&id).map(|e| self.entry_path(id, e)) != Some(path.clone()) {
                        let _ = fs::remove_file(&path);
                    }
                }
                Doomed::Data(key, incarnation) => {
                    if !idx.holds(key, incarnation) {
                        let _ = fs::remove_file(self.data_path(key, incarnation));
                    }
                }
            }
        }
    }

    /// Blocks added and removed since the last call (for heartbeats); none is in both.
    pub fn take_deltas(&self) -> (Vec<BlockId>, Vec<BlockId>) {
        split_changes(std::mem::take(
            &mut self.index.lock().expect("index lock").changed,
        ))
    }

    /// Every cached block (for a full registration). Pending deltas stay: replaying them
    /// after a registration is harmless, dropping them could lose a change.
    pub fn snapshot(&self) -> Vec<BlockId> {
        let idx = self.index.lock().expect("index lock");
        idx.entries.keys().copied().collect()
    }

    /// A lookup answered from the cache (`hit`) or sent to the UFS.
    pub fn count_lookup(&self, hit: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if hit {
            self.hits.fetch_add(1, Relaxed);
            metrics::counter!("granary_worker_cache_hits_total").increment(1);
        } else {
            self.misses.fetch_add(1, Relaxed);
            metrics::counter!("granary_worker_cache_misses_total").increment(1);
        }
    }

    /// (hits, misses) since start.
    pub fn lookups(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }

    pub fn used(&self) -> u64 {
        self.index.lock().expect("index lock").used
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.index.lock().expect("index lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
