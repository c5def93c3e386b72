//! Multi-block files whose blocks share one data file: filling it block by block,
//! committing each block by its marker, and finding both again at startup.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};

use super::names::{self, FilesName};
use super::{
    modified, BlockId, BlockStore, CachedBlock, Doomed, Entry, FileKey, Fingerprint, Found,
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
    /// Fills writing into the data file now: it is neither evicted nor deleted meanwhile.
    pub(super) filling: u32,
}

impl SharedFile {
    pub(super) fn new(incarnation: u64) -> Self {
        SharedFile {
            incarnation,
            blocks: BTreeSet::new(),
            filling: 0,
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
    pub fn commit(mut self, len: u64, crc: u32) -> io::Result<CachedBlock> {
        self.done = true;
        self.store
            .commit_shared(self.id, self.fingerprint, self.at, len, crc)
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
                .end_fill((self.id.0, self.fingerprint), self.at.incarnation);
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
    pub(super) fn end_fill(&self, key: FileKey, incarnation: u64) {
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

    pub(super) fn commit_shared(
        &self,
        id: BlockId,
        fingerprint: Fingerprint,
        at: SharedAt,
        len: u64,
        crc: u32,
    ) -> io::Result<CachedBlock> {
        let key = (id.0, fingerprint);
        let entry = Entry::new(len, fingerprint, crc, Some(at), true);
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
}
