//! Multi-block files whose blocks share one data file: filling it block by block,
//! committing each block by its marker, and finding both again at startup.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::path::PathBuf;

use super::names::{self, FilesName};
use super::{
    modified, BlockId, BlockStore, CachedBlock, Doomed, Entry, FileKey, Fingerprint, Found, Index,
    ScanReport,
};

/// Files larger than `capacity / SHARED_FILE_MAX_PART` keep a file per block: a shared
/// data file is evicted whole, and one that large would empty too much of the cache.
const SHARED_FILE_MAX_PART: u64 = 8;

#[derive(Debug, Clone, Copy)]
pub(super) struct SharedAt {
    pub(super) incarnation: u64,
    pub(super) offset: u64,
}

#[derive(Debug)]
pub(super) struct SharedFile {
    /// Names this data file apart from earlier and later ones of the same file version.
    pub(super) incarnation: u64,
    pub(super) blocks: BTreeSet<u32>,
    /// Their bytes.
    pub(super) bytes: u64,
    /// Blocks being written into the data file now: it is not evicted meanwhile, and no
    /// second fill writes the same block (a failed one punches out its range).
    pub(super) filling: BTreeSet<u32>,
}

impl SharedFile {
    pub(super) fn new(incarnation: u64) -> Self {
        SharedFile {
            incarnation,
            blocks: BTreeSet::new(),
            bytes: 0,
            filling: BTreeSet::new(),
        }
    }
}

/// A block being written into its file's shared data file ([`BlockStore::begin_shared`]);
/// dropped without [`SharedFill::commit`], it leaves nothing in the index.
#[derive(Debug)]
pub struct SharedFill<'a> {
    store: &'a BlockStore,
    id: BlockId,
    fingerprint: Fingerprint,
    pub(super) at: SharedAt,
    /// The data file, positioned at the block's offset.
    pub file: File,
    done: bool,
}

impl SharedFill<'_> {
    /// Enters the block, whose `len` bytes with checksum `crc` were written to `file`.
    /// `None`: its data file was dropped while it was written (evicted, or deleted behind
    /// the store's back), so the block is not cached; fill it again. Not committed, the
    /// fill's drop gives its range back (readers of its bytes must be done by then).
    pub fn commit(&mut self, len: u64, crc: u32) -> io::Result<Option<CachedBlock>> {
        let block = self
            .store
            .commit_shared(self.id, self.fingerprint, self.at, len, crc)?;
        self.done = block.is_some();
        Ok(block)
    }

    /// The data file being written, and where the block starts in it.
    pub fn location(&self) -> (PathBuf, u64) {
        let key = (self.id.0, self.fingerprint);
        (
            self.store.data_path(key, self.at.incarnation),
            self.at.offset,
        )
    }
}

/// Frees `len` bytes of `file` from `offset` (they read as zeros after), best effort.
fn punch_hole(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return;
    }
    // SAFETY: an open descriptor and a range; the call only deallocates that range.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        );
    }
}

impl Drop for SharedFill<'_> {
    fn drop(&mut self) {
        if !self.done {
            // What this fill wrote is no block's (no reader was told of it): give the
            // space back, or it would sit in the data file, uncounted, until the file goes.
            if let Ok(end) = self.file.stream_position() {
                punch_hole(
                    &self.file,
                    self.at.offset,
                    end.saturating_sub(self.at.offset),
                );
            }
            self.store
                .end_fill(self.id, self.fingerprint, self.at.incarnation);
        }
    }
}

impl BlockStore {
    /// The valid markers under `files/`. Markers whose data file is missing (or too short
    /// for them) and data files without markers are deleted; of two incarnations of one
    /// file version (a crash while one replaced the other) the one with more blocks stays.
    pub(super) fn scan_shared(&self, report: &mut ScanReport) -> io::Result<Vec<Found>> {
        type Incarnation = (FileKey, u64);
        let mut found = Vec::new();
        for dir in Self::shard_dirs(&self.files_dir)? {
            let mut data_files: HashMap<Incarnation, (u64, std::path::PathBuf)> = HashMap::new();
            let mut markers = Vec::new();
            for f in fs::read_dir(dir)? {
                let f = f?;
                match f.file_name().to_str().and_then(names::parse_files_name) {
                    Some(FilesName::Data(file_id, fp, incarnation)) => {
                        data_files.insert(
                            ((file_id, fp), incarnation),
                            (f.metadata()?.len(), f.path()),
                        );
                    }
                    Some(FilesName::Marker {
                        id,
                        fp,
                        incarnation,
                        offset,
                        len,
                        crc,
                    }) => {
                        let at = SharedAt {
                            incarnation,
                            offset,
                        };
                        let entry = Entry::new(len, fp, crc, Some(at), false);
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
                let fits = data_files
                    .get(&file)
                    .is_some_and(|(l, _)| *l >= offset.saturating_add(entry.len));
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
            for ((key, incarnation), (_, path)) in data_files {
                // The path found, not the one it should have: a data file in another
                // shard's directory must not take the right one with it.
                if kept.get(&key).map(|k| k.0) != Some(incarnation)
                    || path != self.data_path(key, incarnation)
                {
                    let _ = fs::remove_file(path);
                }
            }
        }
        Ok(found)
    }

    /// Whether the blocks of a `file_size`-byte file share a data file.
    pub fn shares_data_file(&self, file_size: u64, block_size: u64) -> bool {
        block_size > 0
            && file_size > block_size
            && file_size <= self.capacity / SHARED_FILE_MAX_PART
    }

    /// Where to write block `id` of file version `fingerprint` if that file's blocks
    /// share a data file; `None` if it is cached as a file of its own ([`Self::commit`]):
    /// a file that does not share one, a new data file that does not fit in the cache
    /// even after idle blocks are evicted, or a block being filled or cached already.
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
        let mut doomed = Vec::new();
        // Opened (or made) under the lock: a data file is deleted under it too, so one
        // found missing here was deleted behind the store's back, not being made.
        let opened = {
            let mut idx = self.index.lock().expect("index lock");
            self.open_shared(&mut idx, id, key, &mut doomed)
        };
        self.delete_files(doomed);
        let Some((incarnation, file)) = opened? else {
            return Ok(None);
        };
        let at = SharedAt {
            incarnation,
            offset: id.1 as u64 * block_size,
        };
        // Registered already: dropped on an error, the fill ends.
        let mut fill = SharedFill {
            store: self,
            id,
            fingerprint,
            at,
            file,
            done: false,
        };
        fill.file.seek(SeekFrom::Start(at.offset))?;
        Ok(Some(fill))
    }

    /// The incarnation and an open data file to write block `id` into, registered as
    /// being filled.
    fn open_shared(
        &self,
        idx: &mut Index,
        id: BlockId,
        key: FileKey,
        doomed: &mut Vec<Doomed>,
    ) -> io::Result<Option<(u64, File)>> {
        if let Some(f) = idx.shared.get(&key) {
            if f.filling.contains(&id.1) || f.blocks.contains(&id.1) {
                return Ok(None);
            }
            let incarnation = f.incarnation;
            match File::options()
                .write(true)
                .open(self.data_path(key, incarnation))
            {
                Ok(file) => {
                    idx.fill(key, id.1);
                    return Ok(Some((incarnation, file)));
                }
                // Deleted behind our back: made anew, it would read as zeros where its
                // blocks were. Those are dropped; a new incarnation starts.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(
                        file_id = id.0,
                        "a cached data file is gone; caching the file anew"
                    );
                    self.retire(idx, key, doomed);
                }
                Err(e) => return Err(e),
            }
        }
        if !self.admit(idx, key.1.size, doomed) {
            return Ok(None);
        }
        let incarnation = uuid::Uuid::new_v4().as_u64_pair().0;
        let path = self.data_path(key, incarnation);
        let create = || File::options().write(true).create_new(true).open(&path);
        let file = match create() {
            // A shard directory removed behind our back.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(Self::shard_dir(&self.files_dir, id.0))?;
                create()?
            }
            r => r?,
        };
        idx.shared.insert(key, SharedFile::new(incarnation));
        idx.fill(key, id.1);
        Ok(Some((incarnation, file)))
    }

    /// Whether a new data file of `size` bytes fits once idle blocks are evicted to make
    /// room for it (else its blocks are cached as files of their own).
    fn admit(&self, idx: &mut Index, size: u64, doomed: &mut Vec<Doomed>) -> bool {
        if size > self.high {
            return false;
        }
        if idx.used + size > self.high {
            doomed.extend(self.evict_to(idx, (self.high - size).min(self.low), None, false));
            metrics::gauge!("granary_worker_cache_used_bytes").set(idx.used as f64);
        }
        idx.used + size <= self.high
    }

    /// Drops every block of the shared file and the file itself. Fills still writing
    /// into it are not entered ([`Self::commit_shared`]); the next ones start a new
    /// incarnation. Returns the blocks and bytes dropped.
    pub(super) fn retire(
        &self,
        idx: &mut Index,
        key: FileKey,
        doomed: &mut Vec<Doomed>,
    ) -> (u64, u64) {
        let Some(f) = idx.shared.get(&key) else {
            return (0, 0);
        };
        let incarnation = f.incarnation;
        let ids: Vec<BlockId> = f.blocks.iter().map(|&i| (key.0, i)).collect();
        let (mut blocks, mut bytes) = (0, 0);
        for id in ids {
            if let Some(e) = idx.remove(id) {
                blocks += 1;
                bytes += e.len;
                doomed.push(Doomed::Block(id, self.entry_path(id, &e)));
            }
        }
        idx.forget_shared(key);
        doomed.push(Doomed::Data(key, incarnation));
        (blocks, bytes)
    }

    /// A fill that enters nothing is over.
    pub(super) fn end_fill(&self, id: BlockId, fingerprint: Fingerprint, incarnation: u64) {
        let key = (id.0, fingerprint);
        let mut doomed = Vec::new();
        {
            let mut idx = self.index.lock().expect("index lock");
            if idx.holds(key, incarnation) && idx.unfill(key, id.1) {
                idx.forget_shared(key);
                doomed.push(Doomed::Data(key, incarnation));
            }
        }
        self.delete_files(doomed);
    }

    /// `None`: the data file was retired while the block was written.
    pub(super) fn commit_shared(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        at: SharedAt,
        len: u64,
        crc: u32,
    ) -> io::Result<Option<CachedBlock>> {
        let key = (id.0, fingerprint);
        let entry = Entry::new(len, fingerprint, crc, Some(at), true);
        let marker = self.entry_path(id, &entry);
        let block = self.served(id, &entry);
        let mut doomed = Vec::new();
        {
            let mut idx = self.index.lock().expect("index lock");
            if !idx.holds(key, at.incarnation) {
                return Ok(None);
            }
            // The marker commits the block (made under the lock, as a block file's rename).
            File::create(&marker)?;
            self.drop_replaced(&mut idx, id, &mut doomed);
            // The fill still counts, so the file is in the index with this incarnation.
            let file = idx.shared.get_mut(&key).expect("a fill keeps its file");
            file.blocks.insert(id.1);
            file.bytes += len;
            idx.unfill(key, id.1);
            self.enter(&mut idx, id, entry, &mut doomed);
        }
        self.delete_files(doomed);
        Ok(Some(block))
    }
}
