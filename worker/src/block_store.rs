//! The on-disk block cache. Each block is one file in one of 256 shard directories,
//! `blocks/<shard>/<file id>.<index>.<fingerprint size>.<fingerprint mtime>.<len>.<crc>`
//! (hex; for a file no larger than the block size, the whole file): the name carries the
//! UFS version it was read at, its length and its CRC32C, so a block is committed by one
//! rename and costs one inode (small-file writes cache a block per file). Eviction is LRU
//! between a high and a low watermark. On open the directories are listed and every
//! complete block is kept; its checksum is verified before it is first served.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub type BlockId = (u64, u32);

/// The UFS object version a block was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBlock {
    pub path: PathBuf,
    pub len: u64,
}

#[derive(Debug)]
struct Entry {
    len: u64,
    fingerprint: Fingerprint,
    crc: u32,
    verified: bool,
    tick: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<BlockId, Entry>,
    lru: BTreeMap<u64, BlockId>,
    next_tick: u64,
    used: u64,
    added: Vec<BlockId>,
    removed: Vec<BlockId>,
}

impl Index {
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
        self.removed.push(id);
        Some(e)
    }

    /// Drops the entry without a report (it is replaced at once).
    fn take(&mut self, id: BlockId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.lru.remove(&e.tick);
        self.used -= e.len;
        Some(e)
    }
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

/// Shard directories under `blocks/`: bounded, created once, so caching a block never
/// makes a directory.
const SHARDS: u64 = 256;

fn block_name((file_id, index): BlockId, fp: Fingerprint, len: u64, crc: u32) -> String {
    format!(
        "{file_id:016x}.{index:x}.{:x}.{:x}.{len:x}.{crc:08x}",
        fp.size, fp.mtime_ns as u64
    )
}

/// The block and its metadata from a block file's name.
fn parse_block_name(name: &str) -> Option<(BlockId, Fingerprint, u64, u32)> {
    let mut parts = name.split('.');
    let mut field = || u64::from_str_radix(parts.next()?, 16).ok();
    let (file_id, index, size, mtime, len, crc) =
        (field()?, field()?, field()?, field()?, field()?, field()?);
    if parts.next().is_some() {
        return None;
    }
    let fp = Fingerprint {
        size,
        mtime_ns: mtime as i64,
    };
    Some((
        (file_id, u32::try_from(index).ok()?),
        fp,
        len,
        u32::try_from(crc).ok()?,
    ))
}

/// CRC32C of a whole file.
pub fn file_crc(path: &Path) -> io::Result<(u32, u64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut len) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((crc, len));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}

impl BlockStore {
    pub fn open(
        cache_dir: &Path,
        capacity: u64,
        high_watermark: f64,
        low_watermark: f64,
    ) -> io::Result<(Self, ScanReport)> {
        let blocks_dir = cache_dir.join("blocks");
        let tmp_dir = cache_dir.join("tmp");
        for shard in 0..SHARDS {
            fs::create_dir_all(blocks_dir.join(format!("{shard:02x}")))?;
        }
        // Partial fetches from before a crash are garbage.
        let _ = fs::remove_dir_all(&tmp_dir);
        fs::create_dir_all(&tmp_dir)?;
        let store = BlockStore {
            blocks_dir,
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
            idx.added.clear();
            idx.removed.clear();
            store.evict_locked(&mut idx, None)
        };
        store.delete_files(doomed);
        Ok((store, report))
    }

    fn scan(&self) -> io::Result<ScanReport> {
        let mut found: Vec<(std::time::SystemTime, BlockId, Entry)> = Vec::new();
        let mut report = ScanReport::default();
        for dir in fs::read_dir(&self.blocks_dir)? {
            let dir = dir?;
            let name = dir.file_name();
            let shard = name.to_str().and_then(|s| u64::from_str_radix(s, 16).ok());
            if name.len() != 2 || shard.is_none() {
                // Not a shard (e.g. the per-file directories of an older layout).
                let _ = fs::remove_dir_all(dir.path());
                continue;
            }
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let parsed = f.file_name().to_str().and_then(parse_block_name);
                let valid = parsed.and_then(|(id, fingerprint, len, crc)| {
                    let md = f.metadata().ok()?;
                    let entry = Entry {
                        len,
                        fingerprint,
                        crc,
                        verified: false,
                        tick: 0,
                    };
                    let mtime = md.modified().unwrap_or(std::time::UNIX_EPOCH);
                    (md.len() == len && self.block_path(id, &entry) == f.path())
                        .then_some((mtime, id, entry))
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
        // Oldest first, so eviction after a restart still prefers cold blocks, and of two
        // versions of one block (a crash between caching the new and deleting the old)
        // the newer stays.
        found.sort_by_key(|(t, _, _)| *t);
        let mut idx = self.index.lock().expect("index lock");
        for (_, id, entry) in found {
            if let Some(stale) = idx.take(id) {
                report.blocks -= 1;
                report.bytes -= stale.len;
                report.discarded += 1;
                let _ = fs::remove_file(self.block_path(id, &stale));
            }
            report.blocks += 1;
            report.bytes += entry.len;
            idx.used += entry.len;
            idx.entries.insert(id, entry);
            idx.touch(id);
        }
        Ok(report)
    }

    fn shard_dir(&self, file_id: u64) -> PathBuf {
        self.blocks_dir.join(format!("{:02x}", file_id % SHARDS))
    }

    fn block_path(&self, id: BlockId, e: &Entry) -> PathBuf {
        self.shard_dir(id.0)
            .join(block_name(id, e.fingerprint, e.len, e.crc))
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
        let block = CachedBlock {
            path: self.block_path(id, entry),
            len: entry.len,
        };
        idx.touch(id);
        Some(block)
    }

    /// The cached block if present and read from the same UFS version; a block cached
    /// from another version is dropped. Verifies the checksum on first use after a scan.
    /// Blocking: it may read the whole block or delete files.
    pub fn lookup(&self, id: BlockId, fingerprint: Fingerprint) -> Option<CachedBlock> {
        let (path, expected_crc) = {
            let mut idx = self.index.lock().expect("index lock");
            let entry = idx.entries.get(&id)?;
            if entry.fingerprint != fingerprint {
                let stale = idx.remove(id).expect("present");
                drop(idx);
                self.delete_files(vec![(id, self.block_path(id, &stale))]);
                return None;
            }
            let path = self.block_path(id, entry);
            let (verified, len, crc) = (entry.verified, entry.len, entry.crc);
            if verified {
                idx.touch(id);
                return Some(CachedBlock { path, len });
            }
            (path, crc)
        };
        let ok = matches!(file_crc(&path), Ok((crc, _)) if crc == expected_crc);
        let mut idx = self.index.lock().expect("index lock");
        // Cached anew or dropped meanwhile: the checked file is not the entry's any more
        // (a commit deletes the file it replaces); this read is a miss.
        let entry = idx
            .entries
            .get_mut(&id)
            .filter(|e| !e.verified && self.block_path(id, e) == path)?;
        if ok {
            entry.verified = true;
            let len = entry.len;
            idx.touch(id);
            return Some(CachedBlock { path, len });
        }
        tracing::warn!(
            file_id = id.0,
            index = id.1,
            "cached block failed its checksum; dropping it"
        );
        metrics::counter!("granary_worker_checksum_failures_total").increment(1);
        idx.remove(id);
        drop(idx);
        self.delete_files(vec![(id, path)]);
        None
    }

    /// A fresh temp file path for a fetch in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp_dir.join(uuid::Uuid::new_v4().to_string())
    }

    /// Moves a fully written temp file into the cache as block `id`.
    pub fn commit(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        tmp: &Path,
        len: u64,
        crc: u32,
    ) -> io::Result<CachedBlock> {
        let entry = Entry {
            len,
            fingerprint,
            crc,
            verified: true,
            tick: 0,
        };
        let path = self.block_path(id, &entry);
        let mut doomed = Vec::new();
        {
            // Renamed under the lock: a deletion of the same name decided before (an
            // eviction) then sees this entry and leaves the file alone.
            let mut idx = self.index.lock().expect("index lock");
            if let Err(e) = fs::rename(tmp, &path) {
                if e.kind() != io::ErrorKind::NotFound || !tmp.exists() {
                    return Err(e);
                }
                // A shard directory removed behind our back.
                fs::create_dir_all(self.shard_dir(id.0))?;
                fs::rename(tmp, &path)?;
            }
            if let Some(old) = idx.take(id) {
                let old_path = self.block_path(id, &old);
                if old_path != path {
                    doomed.push((id, old_path));
                }
            }
            idx.entries.insert(id, entry);
            idx.used += len;
            idx.touch(id);
            idx.added.push(id);
            doomed.extend(self.evict_locked(&mut idx, Some(id)));
        }
        self.delete_files(doomed);
        metrics::gauge!("granary_worker_cache_used_bytes").set(self.used() as f64);
        Ok(CachedBlock { path, len })
    }

    /// Drops the given blocks (those cached); returns how many and their bytes.
    pub fn evict(&self, ids: &[BlockId]) -> (u64, u64) {
        let mut doomed = Vec::new();
        let mut bytes = 0;
        {
            let mut idx = self.index.lock().expect("index lock");
            for &id in ids {
                if let Some(e) = idx.remove(id) {
                    bytes += e.len;
                    doomed.push((id, self.block_path(id, &e)));
                }
            }
        }
        let blocks = doomed.len() as u64;
        self.delete_files(doomed);
        metrics::gauge!("granary_worker_cache_used_bytes").set(self.used() as f64);
        (blocks, bytes)
    }

    /// Drops least recently used blocks until usage is at the low watermark, if it is
    /// above the high one. Returns the files to delete.
    fn evict_locked(&self, idx: &mut Index, keep: Option<BlockId>) -> Vec<(BlockId, PathBuf)> {
        let mut doomed = Vec::new();
        if idx.used <= self.high {
            return doomed;
        }
        let candidates: Vec<BlockId> = idx.lru.values().copied().collect();
        for id in candidates {
            if idx.used <= self.low {
                break;
            }
            if Some(id) == keep {
                continue;
            }
            if let Some(e) = idx.remove(id) {
                doomed.push((id, self.block_path(id, &e)));
            }
        }
        metrics::counter!("granary_worker_evictions_total").increment(doomed.len() as u64);
        doomed
    }

    /// Deletes the files of dropped blocks, one at a time under the index lock, unless the
    /// block was cached again under the same name meanwhile.
    fn delete_files(&self, doomed: Vec<(BlockId, PathBuf)>) {
        for (id, path) in doomed {
            let idx = self.index.lock().expect("index lock");
            if idx.entries.get(&id).map(|e| self.block_path(id, e)) != Some(path.clone()) {
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// Blocks added and removed since the last call (for heartbeats).
    pub fn take_deltas(&self) -> (Vec<BlockId>, Vec<BlockId>) {
        let mut idx = self.index.lock().expect("index lock");
        (
            std::mem::take(&mut idx.added),
            std::mem::take(&mut idx.removed),
        )
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
mod tests {
    use super::*;

    const FP: Fingerprint = Fingerprint {
        size: 100,
        mtime_ns: 1,
    };

    fn put(store: &BlockStore, id: BlockId, data: &[u8]) -> CachedBlock {
        let tmp = store.temp_path();
        fs::write(&tmp, data).unwrap();
        store
            .commit(id, FP, &tmp, data.len() as u64, crc32c::crc32c(data))
            .unwrap()
    }

    #[test]
    fn lru_eviction_between_watermarks() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = BlockStore::open(dir.path(), 1000, 0.9, 0.5).unwrap();
        let blocks: Vec<CachedBlock> = (0..4).map(|i| put(&s, (1, i), &[i as u8; 200])).collect();
        assert_eq!(s.used(), 800);
        assert!(s.lookup((1, 0), FP).is_some()); // block 0 is now the most recent
        put(&s, (1, 4), &[4; 200]); // 1000 > 900: evict down to <= 500
        assert!(s.used() <= 500, "used {}", s.used());
        assert!(s.lookup((1, 0), FP).is_some());
        assert!(s.lookup((1, 4), FP).is_some());
        assert!(s.lookup((1, 1), FP).is_none());
        assert!(!blocks[1].path.exists());
        let (added, removed) = s.take_deltas();
        assert_eq!(added.len(), 5);
        assert_eq!(removed.len(), 3);
    }

    #[test]
    fn restart_keeps_valid_blocks_and_drops_corrupt_or_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (truncated, old_version, old_layout) = {
            let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            put(&s, (7, 0), b"good block");
            let corrupt = put(&s, (7, 1), b"will be corrupted");
            let truncated = put(&s, (8, 0), b"cut short by a crash");
            let old_version = put(&s, (9, 0), b"old version");
            fs::write(&corrupt.path, b"WILL BE CORRUPTED").unwrap();
            fs::write(&truncated.path, b"cut").unwrap();
            fs::write(s.temp_path(), b"partial fetch").unwrap();
            // A crash between caching a new version and deleting the old one.
            let kept = old_version.path.with_file_name("kept");
            fs::copy(&old_version.path, &kept).unwrap();
            let new_version = put(&s, (9, 0), b"new version!");
            let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
            File::options()
                .write(true)
                .open(&kept)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
            assert!(new_version.path.exists());
            fs::rename(&kept, &old_version.path).unwrap();
            let old_layout = dir.path().join("blocks/0000000000000007");
            fs::create_dir_all(&old_layout).unwrap();
            fs::write(old_layout.join("0"), b"older layout").unwrap();
            (truncated, old_version, old_layout)
        };
        let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        assert_eq!(report.blocks, 3);
        assert_eq!(s.lookup((7, 0), FP).unwrap().len, 10);
        assert!(
            s.lookup((7, 1), FP).is_none(),
            "checksum mismatch must not be served"
        );
        assert!(s.lookup((8, 0), FP).is_none());
        assert!(!truncated.path.exists());
        let newest = s.lookup((9, 0), FP).unwrap();
        assert_eq!(fs::read(newest.path).unwrap(), b"new version!");
        assert!(!old_version.path.exists());
        assert!(!old_layout.exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_new_ufs_version_invalidates_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        let v1 = put(&s, (1, 0), b"v1");
        let newer = Fingerprint {
            size: 100,
            mtime_ns: 2,
        };
        assert!(s.lookup((1, 0), newer).is_none());
        assert!(s.lookup((1, 0), FP).is_none(), "the stale block is gone");
        assert!(!v1.path.exists());
    }

    #[test]
    fn shrinking_capacity_evicts_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            for i in 0..10 {
                put(&s, (2, i), &[0; 100]);
            }
        }
        let (s, _) = BlockStore::open(dir.path(), 500, 0.9, 0.6).unwrap();
        assert!(s.used() <= 300, "used {}", s.used());
    }
}
