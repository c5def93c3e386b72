//! The on-disk block cache. Each block is one file `blocks/<file id>/<index>` (for a file
//! no larger than the block size, the whole file) with a sidecar `<index>.meta` holding the
//! UFS fingerprint it was read at, its length and its CRC32C. Eviction is LRU between a
//! high and a low watermark. On open the directory is scanned and every complete block is
//! kept; its checksum is verified before it is first served.

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

    fn remove(&mut self, id: BlockId) -> bool {
        match self.entries.remove(&id) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.used -= e.len;
                self.removed.push(id);
                true
            }
            None => false,
        }
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
}

const META_MAGIC: &[u8; 4] = b"GRB1";
const META_LEN: usize = 32;

fn encode_meta(fp: Fingerprint, len: u64, crc: u32) -> [u8; META_LEN] {
    let mut m = [0u8; META_LEN];
    m[..4].copy_from_slice(META_MAGIC);
    m[4..12].copy_from_slice(&fp.size.to_be_bytes());
    m[12..20].copy_from_slice(&fp.mtime_ns.to_be_bytes());
    m[20..28].copy_from_slice(&len.to_be_bytes());
    m[28..32].copy_from_slice(&crc.to_be_bytes());
    m
}

fn decode_meta(m: &[u8]) -> Option<(Fingerprint, u64, u32)> {
    if m.len() != META_LEN || &m[..4] != META_MAGIC {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_be_bytes(m[r].try_into().expect("8 bytes"));
    Some((
        Fingerprint {
            size: u(4..12),
            mtime_ns: u(12..20) as i64,
        },
        u(20..28),
        u32::from_be_bytes(m[28..32].try_into().expect("4 bytes")),
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
        fs::create_dir_all(&blocks_dir)?;
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
            let Some(file_id) = name.to_str().and_then(|s| u64::from_str_radix(s, 16).ok()) else {
                let _ = fs::remove_dir_all(dir.path());
                continue;
            };
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let fname = f.file_name();
                let fname = fname.to_string_lossy();
                let Some(index) = fname
                    .strip_suffix(".meta")
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                let block_path = self.block_path((file_id, index));
                let valid = fs::read(f.path())
                    .ok()
                    .and_then(|m| decode_meta(&m))
                    .and_then(|(fp, len, crc)| {
                        let md = fs::metadata(&block_path).ok()?;
                        (md.len() == len)
                            .then(|| (md.modified().unwrap_or(std::time::UNIX_EPOCH), fp, len, crc))
                    });
                match valid {
                    Some((mtime, fingerprint, len, crc)) => found.push((
                        mtime,
                        (file_id, index),
                        Entry {
                            len,
                            fingerprint,
                            crc,
                            verified: false,
                            tick: 0,
                        },
                    )),
                    None => {
                        report.discarded += 1;
                        let _ = fs::remove_file(f.path());
                        let _ = fs::remove_file(&block_path);
                    }
                }
            }
            // Block files without a sidecar were never committed.
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let n = f.file_name().to_string_lossy().into_owned();
                if !n.ends_with(".meta")
                    && !found
                        .iter()
                        .any(|(_, (fid, i), _)| *fid == file_id && i.to_string() == n)
                {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
        // Oldest first, so eviction after a restart still prefers cold blocks.
        found.sort_by_key(|(t, _, _)| *t);
        let mut idx = self.index.lock().expect("index lock");
        for (_, id, entry) in found {
            report.blocks += 1;
            report.bytes += entry.len;
            idx.used += entry.len;
            idx.entries.insert(id, entry);
            idx.touch(id);
        }
        Ok(report)
    }

    pub fn block_path(&self, (file_id, index): BlockId) -> PathBuf {
        self.blocks_dir
            .join(format!("{file_id:016x}"))
            .join(index.to_string())
    }

    fn meta_path(&self, (file_id, index): BlockId) -> PathBuf {
        self.blocks_dir
            .join(format!("{file_id:016x}"))
            .join(format!("{index}.meta"))
    }

    /// The cached block if present and read from the same UFS version; a block cached
    /// from another version is dropped. Verifies the checksum on first use after a scan.
    pub fn lookup(&self, id: BlockId, fingerprint: Fingerprint) -> Option<CachedBlock> {
        let path = self.block_path(id);
        let expected_crc = {
            let mut idx = self.index.lock().expect("index lock");
            let entry = idx.entries.get(&id)?;
            if entry.fingerprint != fingerprint {
                idx.remove(id);
                drop(idx);
                self.delete_files(vec![id]);
                return None;
            }
            let (verified, len, crc) = (entry.verified, entry.len, entry.crc);
            if verified {
                idx.touch(id);
                return Some(CachedBlock { path, len });
            }
            crc
        };
        let ok = matches!(file_crc(&path), Ok((crc, _)) if crc == expected_crc);
        let mut idx = self.index.lock().expect("index lock");
        if ok {
            let entry = idx.entries.get_mut(&id)?;
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
        self.delete_files(vec![id]);
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
        let path = self.block_path(id);
        fs::create_dir_all(path.parent().expect("block has a parent dir"))?;
        fs::rename(tmp, &path)?;
        // The sidecar is written last: a block without one is discarded by the next scan.
        let meta_tmp = self.temp_path();
        fs::write(&meta_tmp, encode_meta(fingerprint, len, crc))?;
        fs::rename(&meta_tmp, self.meta_path(id))?;
        let doomed = {
            let mut idx = self.index.lock().expect("index lock");
            if let Some(old) = idx.entries.remove(&id) {
                idx.lru.remove(&old.tick);
                idx.used -= old.len;
            }
            idx.entries.insert(
                id,
                Entry {
                    len,
                    fingerprint,
                    crc,
                    verified: true,
                    tick: 0,
                },
            );
            idx.used += len;
            idx.touch(id);
            idx.added.push(id);
            self.evict_locked(&mut idx, Some(id))
        };
        self.delete_files(doomed);
        metrics::gauge!("granary_worker_cache_used_bytes").set(self.used() as f64);
        Ok(CachedBlock { path, len })
    }

    /// Drops least recently used blocks until usage is at the low watermark, if it is
    /// above the high one. Returns the blocks whose files must be deleted.
    fn evict_locked(&self, idx: &mut Index, keep: Option<BlockId>) -> Vec<BlockId> {
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
            idx.remove(id);
            doomed.push(id);
        }
        metrics::counter!("granary_worker_evictions_total").increment(doomed.len() as u64);
        doomed
    }

    fn delete_files(&self, ids: Vec<BlockId>) {
        for id in ids {
            let _ = fs::remove_file(self.meta_path(id));
            let _ = fs::remove_file(self.block_path(id));
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
        for i in 0..4 {
            put(&s, (1, i), &[i as u8; 200]);
        }
        assert_eq!(s.used(), 800);
        assert!(s.lookup((1, 0), FP).is_some()); // block 0 is now the most recent
        put(&s, (1, 4), &[4; 200]); // 1000 > 900: evict down to <= 500
        assert!(s.used() <= 500, "used {}", s.used());
        assert!(s.lookup((1, 0), FP).is_some());
        assert!(s.lookup((1, 4), FP).is_some());
        assert!(s.lookup((1, 1), FP).is_none());
        assert!(!s.block_path((1, 1)).exists());
        let (added, removed) = s.take_deltas();
        assert_eq!(added.len(), 5);
        assert_eq!(removed.len(), 3);
    }

    #[test]
    fn restart_keeps_valid_blocks_and_drops_corrupt_or_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            put(&s, (7, 0), b"good block");
            put(&s, (7, 1), b"will be corrupted");
            put(&s, (8, 0), b"sidecar lost");
            fs::write(s.block_path((7, 1)), b"WILL BE CORRUPTED").unwrap();
            fs::remove_file(s.meta_path((8, 0))).unwrap();
            fs::write(s.temp_path(), b"partial fetch").unwrap();
        }
        let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        assert_eq!(report.blocks, 2);
        assert_eq!(s.lookup((7, 0), FP).unwrap().len, 10);
        assert!(
            s.lookup((7, 1), FP).is_none(),
            "checksum mismatch must not be served"
        );
        assert!(s.lookup((8, 0), FP).is_none());
        assert!(!s.block_path((8, 0)).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_new_ufs_version_invalidates_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        put(&s, (1, 0), b"v1");
        let newer = Fingerprint {
            size: 100,
            mtime_ns: 2,
        };
        assert!(s.lookup((1, 0), newer).is_none());
        assert!(s.lookup((1, 0), FP).is_none(), "the stale block is gone");
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
