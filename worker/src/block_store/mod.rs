//! The on-disk block cache. A block of a multi-block file no larger than an eighth of the
//! capacity is written at its offset in one data file shared by that file's blocks, so a
//! fully cached file is one local file the kernel can read for the mount by itself (FUSE
//! passthrough); such a file is evicted whole, which never changes bytes under an open
//! reader. Any other block is a file of its own (one inode per small file). [`names`]
//! says how both are named. Eviction is LRU between a high and a low watermark. On open
//! the directories are listed and every complete block is kept; its checksum is verified
//! before it is first served.

mod names;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use names::{FilesName, SHARDS};

pub type BlockId = (u64, u32);

/// The UFS object version a block was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
}

/// One version of a file whose blocks share a data file.
type FileKey = (u64, Fingerprint);

/// Files larger than `capacity / SHARED_FILE_MAX_PART` keep a file per block: a shared
/// data file is evicted whole, and one that large would empty too much of the cache.
const SHARED_FILE_MAX_PART: u64 = 8;

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

#[derive(Debug, Clone, Copy)]
struct SharedAt {
    incarnation: u64,
    offset: u64,
}

impl Entry {
    fn shared_key(&self, id: BlockId) -> Option<FileKey> {
        self.shared.map(|_| (id.0, self.fingerprint))
    }
}

#[derive(Debug)]
struct SharedFile {
    /// Names this data file apart from earlier and later ones of the same file version.
    incarnation: u64,
    blocks: BTreeSet<u32>,
    /// Fills writing into the data file now: it is neither evicted nor deleted meanwhile.
    filling: u32,
}

impl SharedFile {
    fn new(incarnation: u64) -> Self {
        SharedFile {
            incarnation,
            blocks: BTreeSet::new(),
            filling: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<BlockId, Entry>,
    lru: BTreeMap<u64, BlockId>,
    shared: HashMap<FileKey, SharedFile>,
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
        if let Some(key) = e.shared_key(id) {
            self.release_shared(key, Some(id.1));
        }
        Some(e)
    }

    /// Whether this incarnation of the shared file is the one in the index.
    fn holds(&self, key: FileKey, incarnation: u64) -> bool {
        self.shared
            .get(&key)
            .is_some_and(|f| f.incarnation == incarnation)
    }

    /// Drops block `index` from a shared file; forgets the file once it holds no block
    /// and no fill.
    fn release_shared(&mut self, key: FileKey, index: Option<u32>) {
        if let Some(f) = self.shared.get_mut(&key) {
            if let Some(index) = index {
                f.blocks.remove(&index);
            }
            if f.blocks.is_empty() && f.filling == 0 {
                self.shared.remove(&key);
            }
        }
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

/// A block being written into its file's shared data file ([`BlockStore::begin_shared`]);
/// dropped without [`SharedFill::commit`], it leaves nothing in the index.
#[derive(Debug)]
pub struct SharedFill<'a> {
    store: &'a BlockStore,
    id: BlockId,
    fingerprint: Fingerprint,
    at: SharedAt,
    /// The data file, positioned at the block's offset.
    pub file: File,
    done: bool,
}

impl SharedFill<'_> {
    /// Enters the block, whose `len` bytes with checksum `crc` were written to `file`.
    pub fn commit(mut self, len: u64, crc: u32) -> io::Result<CachedBlock> {
        self.done = true;
        self.store
            .commit_shared(self.id, self.fingerprint, self.at, len, crc)
    }
}

impl Drop for SharedFill<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.store
                .end_fill((self.id.0, self.fingerprint), self.at.incarnation);
        }
    }
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
            idx.added.clear();
            idx.removed.clear();
            store.evict_locked(&mut idx, None)
        };
        store.delete_files(doomed);
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
                    let entry = Entry {
                        len,
                        fingerprint,
                        crc,
                        verified: false,
                        tick: 0,
                        shared: None,
                    };
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
                idx.shared
                    .entry(key)
                    .or_insert_with(|| SharedFile::new(at.incarnation))
                    .blocks
                    .insert(id.1);
            }
            idx.entries.insert(id, entry);
            idx.touch(id);
        }
        drop(idx);
        self.delete_files(doomed);
        Ok(report)
    }

    /// The valid markers under `files/`. Markers whose data file is missing (or too short
    /// for them) and data files without markers are deleted; of two incarnations of one
    /// file version (a crash while one replaced the other) the one with more blocks stays.
    fn scan_shared(&self, report: &mut ScanReport) -> io::Result<Vec<Found>> {
        type Incarnation = (FileKey, u64);
        let mut found = Vec::new();
        for dir in Self::shard_dirs(&self.files_dir)? {
            let mut data_len: HashMap<Incarnation, u64> = HashMap::new();
            let mut markers = Vec::new();
            for f in fs::read_dir(dir)? {
                let f = f?;
                match f.file_name().to_str().and_then(names::parse_files_name) {
                    Some(FilesName::Data(file_id, fp, incarnation)) => {
                        data_len.insert(((file_id, fp), incarnation), f.metadata()?.len());
                    }
                    Some(FilesName::Marker {
                        id,
                        fp,
                        incarnation,
                        offset,
                        len,
                        crc,
                    }) => {
                        let entry = Entry {
                            len,
                            fingerprint: fp,
                            crc,
                            verified: false,
                            tick: 0,
                            shared: Some(SharedAt {
                                incarnation,
                                offset,
                            }),
                        };
                        markers.push((f, id, entry, incarnation, offset));
                    }
                    None => {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
            let mut by_file: HashMap<Incarnation, Vec<Found>> = HashMap::new();
            for (f, id, entry, incarnation, offset) in markers {
                let file = ((id.0, entry.fingerprint), incarnation);
                let fits = data_len
                    .get(&file)
                    .is_some_and(|&l| l >= offset.saturating_add(entry.len));
                match f.metadata() {
                    Ok(md) if fits && self.entry_path(id, &entry) == f.path() => by_file
                        .entry(file)
                        .or_default()
                        .push((modified(&md), id, entry)),
                    _ => {
                        report.discarded += 1;
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
            let mut kept: HashMap<FileKey, (u64, usize)> = HashMap::new();
            for ((key, incarnation), blocks) in &by_file {
                let best = kept.entry(*key).or_insert((*incarnation, blocks.len()));
                if blocks.len() > best.1 {
                    *best = (*incarnation, blocks.len());
                }
            }
            for ((key, incarnation), blocks) in by_file {
                if kept[&key].0 == incarnation {
                    found.extend(blocks);
                    continue;
                }
                for (_, id, entry) in blocks {
                    report.discarded += 1;
                    let _ = fs::remove_file(self.entry_path(id, &entry));
                }
            }
            for (key, incarnation) in data_len.into_keys() {
                if kept.get(&key).map(|k| k.0) != Some(incarnation) {
                    let _ = fs::remove_file(self.data_path(key, incarnation));
                }
            }
        }
        Ok(found)
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

    /// The cached block if present and read from the same UFS version; a block cached
    /// from another version is dropped. Verifies the checksum on first use after a scan.
    /// Blocking: it may read the whole block or delete files.
    pub fn lookup(&self, id: BlockId, fingerprint: Fingerprint) -> Option<CachedBlock> {
        let (block, path, expected_crc) = {
            let mut idx = self.index.lock().expect("index lock");
            let entry = idx.entries.get(&id)?;
            if entry.fingerprint != fingerprint {
                let stale = idx.remove(id).expect("present");
                let doomed = self.doom(&idx, id, &stale);
                drop(idx);
                self.delete_files(doomed);
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
        let bad = idx.remove(id).expect("present");
        let doomed = self.doom(&idx, id, &bad);
        drop(idx);
        self.delete_files(doomed);
        None
    }

    /// A fresh temp file path for a fetch in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp_dir.join(uuid::Uuid::new_v4().to_string())
    }

    /// Whether the blocks of a `file_size`-byte file share a data file.
    pub fn shares_data_file(&self, file_size: u64, block_size: u64) -> bool {
        block_size > 0
            && file_size > block_size
            && file_size <= self.capacity / SHARED_FILE_MAX_PART
    }

    /// Where to write block `id` of file version `fingerprint` if that file's blocks
    /// share a data file; `None` if it is cached as a file of its own ([`Self::commit`]).
    pub fn begin_shared(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        block_size: u64,
    ) -> io::Result<Option<SharedFill<'_>>> {
        if !self.shares_data_file(fingerprint.size, block_size) {
            return Ok(None);
        }
        let key = (id.0, fingerprint);
        // Registered before the file is opened: the incarnation is then neither evicted
        // nor deleted until the fill is over.
        let incarnation = {
            let mut idx = self.index.lock().expect("index lock");
            let file = idx
                .shared
                .entry(key)
                .or_insert_with(|| SharedFile::new(uuid::Uuid::new_v4().as_u64_pair().0));
            file.filling += 1;
            file.incarnation
        };
        let at = SharedAt {
            incarnation,
            offset: id.1 as u64 * block_size,
        };
        let path = self.data_path(key, incarnation);
        let opened = (|| {
            // Kept as it is: the file's other blocks are in it.
            let open = || {
                File::options()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
            };
            let mut file = match open() {
                // A shard directory removed behind our back.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(Self::shard_dir(&self.files_dir, id.0))?;
                    open()?
                }
                r => r?,
            };
            file.seek(SeekFrom::Start(at.offset))?;
            Ok(file)
        })();
        match opened {
            Ok(file) => Ok(Some(SharedFill {
                store: self,
                id,
                fingerprint,
                at,
                file,
                done: false,
            })),
            Err(e) => {
                self.end_fill(key, incarnation);
                Err(e)
            }
        }
    }

    /// A fill that enters nothing is over.
    fn end_fill(&self, key: FileKey, incarnation: u64) {
        let doomed = {
            let mut idx = self.index.lock().expect("index lock");
            idx.shared
                .get_mut(&key)
                .expect("a fill keeps its file")
                .filling -= 1;
            idx.release_shared(key, None);
            if idx.holds(key, incarnation) {
                Vec::new()
            } else {
                vec![Doomed::Data(key, incarnation)]
            }
        };
        self.delete_files(doomed);
    }

    fn commit_shared(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        at: SharedAt,
        len: u64,
        crc: u32,
    ) -> io::Result<CachedBlock> {
        let key = (id.0, fingerprint);
        let entry = Entry {
            len,
            fingerprint,
            crc,
            verified: true,
            tick: 0,
            shared: Some(at),
        };
        let marker = self.entry_path(id, &entry);
        let block = self.served(id, &entry);
        let mut doomed = Vec::new();
        {
            let mut idx = self.index.lock().expect("index lock");
            // The marker commits the block (made under the lock, as a block file's rename).
            if let Err(e) = File::create(&marker) {
                drop(idx);
                self.end_fill(key, at.incarnation);
                return Err(e);
            }
            if let Some(old) = idx.take(id) {
                doomed.extend(self.doom(&idx, id, &old));
            }
            // The fill still counts, so the file is in the index with this incarnation.
            let file = idx.shared.get_mut(&key).expect("a fill keeps its file");
            file.blocks.insert(id.1);
            file.filling -= 1;
            self.enter(&mut idx, id, entry, &mut doomed);
        }
        self.delete_files(doomed);
        Ok(block)
    }

    /// Adds a committed entry and evicts what that makes too much.
    fn enter(&self, idx: &mut Index, id: BlockId, entry: Entry, doomed: &mut Vec<Doomed>) {
        idx.used += entry.len;
        idx.entries.insert(id, entry);
        idx.touch(id);
        idx.added.push(id);
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
        let entry = Entry {
            len,
            fingerprint,
            crc,
            verified: true,
            tick: 0,
            shared: None,
        };
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
            if let Some(old) = idx.take(id) {
                doomed.extend(self.doom(&idx, id, &old));
            }
            self.enter(&mut idx, id, entry, &mut doomed);
        }
        self.delete_files(doomed);
        Ok(block)
    }

    /// Drops the given blocks (those cached); returns how many and their bytes.
    pub fn evict(&self, ids: &[BlockId]) -> (u64, u64) {
        let mut doomed = Vec::new();
        let (mut blocks, mut bytes) = (0, 0);
        {
            let mut idx = self.index.lock().expect("index lock");
            for &id in ids {
                if let Some(e) = idx.remove(id) {
                    blocks += 1;
                    bytes += e.len;
                    doomed.extend(self.doom(&idx, id, &e));
                }
            }
            metrics::gauge!("granary_worker_cache_used_bytes").set(idx.used as f64);
        }
        self.delete_files(doomed);
        (blocks, bytes)
    }

    /// Drops least recently used blocks until usage is at the low watermark, if it is
    /// above the high one; a block of a shared data file takes the file's other blocks
    /// with it. Returns the files to delete.
    fn evict_locked(&self, idx: &mut Index, keep: Option<BlockId>) -> Vec<Doomed> {
        let mut doomed = Vec::new();
        if idx.used <= self.high {
            return doomed;
        }
        let keep_key = keep.and_then(|id| idx.entries.get(&id)?.shared_key(id));
        let mut evicted = 0u64;
        let candidates: Vec<BlockId> = idx.lru.values().copied().collect();
        for id in candidates {
            if idx.used <= self.low {
                break;
            }
            let Some(e) = idx.entries.get(&id) else {
                continue; // gone with a shared file
            };
            let victims: Vec<BlockId> = match e.shared_key(id) {
                _ if Some(id) == keep => continue,
                None => vec![id],
                Some(key) => {
                    let file = &idx.shared[&key];
                    if Some(key) == keep_key || file.filling > 0 {
                        continue;
                    }
                    file.blocks.iter().map(|&i| (id.0, i)).collect()
                }
            };
            for v in victims {
                if let Some(e) = idx.remove(v) {
                    evicted += 1;
                    doomed.extend(self.doom(idx, v, &e));
                }
            }
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

    /// Caches block `index` of a file of `size` bytes in 100-byte blocks through its
    /// shared data file.
    fn put_shared(store: &BlockStore, id: BlockId, fp: Fingerprint, data: &[u8]) -> CachedBlock {
        use std::io::Write;
        let mut fill = store.begin_shared(id, fp, 100).unwrap().expect("shared");
        fill.file.write_all(data).unwrap();
        fill.commit(data.len() as u64, crc32c::crc32c(data))
            .unwrap()
    }

    const SHARED_FP: Fingerprint = Fingerprint {
        size: 250,
        mtime_ns: 5,
    };

    #[test]
    fn blocks_of_a_file_share_one_data_file_that_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let path = {
            let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            assert!(
                !s.shares_data_file(100, 100),
                "one block: a file of its own"
            );
            assert!(
                !s.shares_data_file((1 << 20) / 8 + 1, 100),
                "too big to evict whole"
            );
            let blocks: Vec<CachedBlock> = [2u32, 0, 1]
                .iter()
                .map(|&i| {
                    let start = i as usize * 100;
                    put_shared(&s, (3, i), SHARED_FP, &data[start..(start + 100).min(250)])
                })
                .collect();
            assert!(blocks.iter().all(|b| b.path == blocks[0].path));
            assert_eq!(
                blocks.iter().map(|b| (b.offset, b.len)).collect::<Vec<_>>(),
                [(200, 50), (0, 100), (100, 100)]
            );
            assert_eq!(fs::read(&blocks[0].path).unwrap(), data, "the file, whole");
            blocks[0].path.clone()
        };
        let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        assert_eq!((report.blocks, report.bytes), (3, 250));
        // Bytes changed behind the cache's back fail only their own block's checksum.
        let f = File::options().write(true).open(&path).unwrap();
        f.write_all_at(b"XX", 120).unwrap();
        let first = s.lookup((3, 0), SHARED_FP).unwrap();
        assert_eq!(
            (first.path, first.offset, first.len),
            (path.clone(), 0, 100)
        );
        assert!(s.lookup((3, 1), SHARED_FP).is_none());
        assert!(s.lookup((3, 2), SHARED_FP).is_some());
        assert!(path.exists(), "the file's other blocks are still cached");
    }

    #[test]
    fn a_shared_file_is_evicted_whole_and_open_readers_keep_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = BlockStore::open(dir.path(), 2000, 0.9, 0.5).unwrap();
        put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
        let last = put_shared(&s, (3, 2), SHARED_FP, &[3; 50]);
        put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
        let reader = File::open(&last.path).unwrap();
        for i in 0..7 {
            put(&s, (10, i), &[0; 200]);
        }
        // 250 + 1400 = 1650 <= 1800; one more block goes over and evicts from the
        // least recently used, the shared file, all of whose blocks go together.
        put(&s, (10, 7), &[0; 200]);
        for i in 0..3 {
            assert!(s.lookup((3, i), SHARED_FP).is_none());
        }
        assert!(!last.path.exists());
        assert_eq!(
            fs::read_dir(last.path.parent().unwrap()).unwrap().count(),
            0
        );
        let mut buf = [0u8; 250];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf[..100], [1; 100]);
        assert_eq!(buf[200..], [3; 50]);
        let (_, removed) = s.take_deltas();
        assert!(removed.contains(&(3, 1)));
        // Cached again, the file gets a data file of another name: a reader told the old
        // name before the eviction finds nothing there rather than a file with holes.
        let again = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
        assert_ne!(again.path, last.path);
        assert!(!last.path.exists());
    }

    #[test]
    fn of_two_incarnations_of_a_file_the_restart_keeps_the_fuller() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, stray) = {
            let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
            let kept = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
            // Left by a crash: an older data file of the same version, with one block.
            let stray = s.data_path((3, SHARED_FP), 7);
            fs::write(&stray, [1; 100]).unwrap();
            let entry = Entry {
                len: 100,
                fingerprint: SHARED_FP,
                crc: crc32c::crc32c(&[1; 100]),
                verified: false,
                tick: 0,
                shared: Some(SharedAt {
                    incarnation: 7,
                    offset: 0,
                }),
            };
            File::create(s.entry_path((3, 0), &entry)).unwrap();
            (kept, stray)
        };
        let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        assert_eq!((report.blocks, report.discarded), (2, 1));
        assert!(!stray.exists());
        assert_eq!(s.lookup((3, 0), SHARED_FP).unwrap().path, kept.path);
        assert_eq!(fs::read_dir(stray.parent().unwrap()).unwrap().count(), 3);
    }

    #[test]
    fn a_fill_that_is_not_committed_leaves_nothing() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        let path = {
            let mut fill = s.begin_shared((4, 1), SHARED_FP, 100).unwrap().unwrap();
            fill.file.write_all(b"half").unwrap();
            s.data_path((4, SHARED_FP), fill.at.incarnation)
        };
        assert!(!path.exists());
        assert!(s.is_empty());
        let block = put_shared(&s, (4, 0), SHARED_FP, &[9; 100]);
        assert_eq!(fs::metadata(&block.path).unwrap().len(), 100);
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
