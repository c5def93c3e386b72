//! The data path of an open file: split a read into blocks, pick a worker per block, and
//! read either straight from a co-located worker's cache file (short-circuit) or over the
//! data port with an adaptive readahead buffer. Sequential readers also get the next blocks
//! warmed in the worker cache ahead of time, so cold UFS fetches overlap with reading.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use granary_common::blocks::{block_count, block_len, spans, BlockSpan};
use granary_common::ids::shard_of;
use granary_common::{FsError, FsResult};
use granary_protos::data::ReadBlockRequest;
use granary_protos::v1::{Inode, WorkerInfo};

use crate::data_client::DataClient;
use crate::worker_list::{data_addr, hashed, with_retries, WorkerList};
use granary_common::memory::{MemoryLimiter, Reservation};
use granary_meta_client::MetadataService;

/// Largest range one data-port request asks for (the worker's limit).
const MAX_REQUEST: u64 = 16 << 20;
/// Blocks a sequential reader has cached ahead of the one it reads: fetches from the UFS
/// overlap each other as well as the reading.
const WARM_AHEAD: u32 = 2;
/// Times a short-circuit read asks for a block's cache file that was evicted before it
/// could be opened, before it has the worker send the bytes instead.
const LOCAL_OPEN_TRIES: u32 = 3;

/// Reads file bytes for the filesystem.
pub trait BlockRead: Send + Sync {
    fn read(&self, file: &Inode, state: &mut ReadState, offset: u64, len: u32)
        -> FsResult<Vec<u8>>;

    /// A local file holding exactly `file`'s bytes, if one can be had cheaply (a
    /// single-block file cached by a co-located worker): the kernel can then serve reads
    /// from it directly (FUSE passthrough).
    fn whole_file(&self, _file: &Inode) -> Option<File> {
        None
    }
}

/// Per-open-handle read state.
#[derive(Default)]
pub struct ReadState {
    /// Open cache files of a co-located worker and where each block starts in its file,
    /// by block index.
    local_files: HashMap<u32, (File, u64)>,
    buffer: Option<Buffered>,
    window: u64,
    last_end: u64,
    warmed: HashSet<u32>,
    locations: Option<HashMap<u32, Vec<String>>>,
    /// The block the last short-circuit read was in.
    last_local: Option<u32>,
    /// Why every read of this state fails: it served bytes of a version that changed
    /// in the UFS meanwhile (see [`ReadState::served`]).
    pub stale: Option<String>,
}

impl ReadState {
    /// Lets go of the cache files but the last block's: what a state kept between reads
    /// holds open (each keeps its file's disk space if the worker evicts it meanwhile).
    pub fn trim(&mut self) {
        let last = self.last_local;
        self.local_files.retain(|&index, _| Some(index) == last);
    }

    /// Whether this state has returned any bytes: a reader of it has seen its version,
    /// and must not be handed another's bytes after them.
    pub fn served(&self) -> bool {
        self.last_end > 0
    }

    /// Whether a read at `offset` continues this state's last read (or it is fresh).
    pub fn continues_at(&self, offset: u64) -> bool {
        self.last_end == offset
    }

    #[cfg(test)]
    pub fn ended_at(offset: u64) -> Self {
        ReadState {
            last_end: offset,
            ..Default::default()
        }
    }
}

/// Readahead bytes held for one handle, with the memory they hold.
struct Buffered {
    index: u32,
    offset: u64,
    data: Vec<u8>,
    _memory: Reservation,
}

pub struct ReadOptions {
    pub short_circuit: bool,
    pub readahead_max: u64,
}

/// The read path through workers: short-circuit reads of a co-located worker's cache
/// files, remote reads over the data port with readahead, and warm-up of the next block.
pub struct BlockReader {
    meta: Arc<dyn MetadataService>,
    workers: Arc<WorkerList>,
    data: Arc<DataClient>,
    opts: ReadOptions,
    memory: Arc<MemoryLimiter>,
    warm_tx: SyncSender<(String, ReadBlockRequest)>,
}

pub(crate) fn request_for(
    file: &Inode,
    index: u32,
    offset: u64,
    length: u64,
    local_path_only: bool,
) -> ReadBlockRequest {
    let fp = file.fingerprint.unwrap_or_default();
    ReadBlockRequest {
        request_id: 0,
        file_id: file.id,
        index,
        mount_id: file.mount_id,
        ufs_path: file.ufs_path.clone(),
        file_size: fp.size,
        file_mtime_ns: fp.mtime_ns,
        block_size: file.block_size,
        offset,
        length,
        local_path_only,
        cached_only: false,
    }
}

impl BlockReader {
    pub fn new(
        meta: Arc<dyn MetadataService>,
        workers: Arc<WorkerList>,
        data: Arc<DataClient>,
        memory: Arc<MemoryLimiter>,
        opts: ReadOptions,
    ) -> Self {
        // Warm-ups are best effort: a small pool, and a full queue drops new ones.
        let (warm_tx, warm_rx) = sync_channel::<(String, ReadBlockRequest)>(64);
        let warm_rx = Arc::new(Mutex::new(warm_rx));
        for i in 0..2 {
            let rx = warm_rx.clone();
            let data = data.clone();
            std::thread::Builder::new()
                .name(format!("granary-warm-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().expect("warm queue").recv();
                    let Ok((addr, req)) = next else { return };
                    if let Err(e) = data.request(&addr, req) {
                        tracing::debug!(worker = %addr, error = %e, "block warm-up failed");
                    }
                })
                .expect("spawn warm-up thread");
        }
        BlockReader {
            meta,
            workers,
            data,
            opts,
            memory,
            warm_tx,
        }
    }

    /// The worker to read block `index` from: a co-located one (which caches what it
    /// fetches for this node), else one already caching it, else a stable hash choice;
    /// passing over workers that could not be reached lately while others are there.
    fn pick(
        &self,
        file: &Inode,
        state: &mut ReadState,
        index: u32,
        refresh: bool,
    ) -> FsResult<(WorkerInfo, bool)> {
        let workers = self
            .data
            .usable(&self.workers.live(shard_of(file.id), refresh)?);
        if let Some(w) = self.workers.local(&workers) {
            return Ok((w, true));
        }
        if state.locations.is_none() || refresh {
            let locs = self.meta.block_locations(file.id)?;
            state.locations = Some(
                locs.blocks
                    .into_iter()
                    .map(|b| (b.index, b.worker_ids))
                    .collect(),
            );
        }
        if let Some(ids) = state.locations.as_ref().and_then(|l| l.get(&index)) {
            if let Some(w) = workers.iter().find(|w| ids.contains(&w.worker_id)) {
                return Ok((w.clone(), false));
            }
        }
        Ok((hashed(&workers, file.id, index), false))
    }

    fn request(
        &self,
        worker: &WorkerInfo,
        req: ReadBlockRequest,
    ) -> FsResult<(granary_protos::data::ReadBlockResponse, Vec<u8>)> {
        self.data.request(&data_addr(worker), req)
    }

    fn read_span(
        &self,
        file: &Inode,
        state: &mut ReadState,
        span: BlockSpan,
        out: &mut Vec<u8>,
    ) -> FsResult<()> {
        with_retries("block read", file.id, |refresh| {
            let (worker, local) = self.pick(file, state, span.index as u32, refresh)?;
            let r = if local && self.opts.short_circuit {
                self.read_local(file, state, &worker, span, out)
            } else {
                self.read_remote(file, state, &worker, span, out)
            };
            if r.as_ref().is_err_and(|e| e.is_retryable()) {
                self.data.forget(&data_addr(&worker));
            }
            r
        })
    }

    fn read_local(
        &self,
        file: &Inode,
        state: &mut ReadState,
        worker: &WorkerInfo,
        span: BlockSpan,
        out: &mut Vec<u8>,
    ) -> FsResult<()> {
        let index = span.index as u32;
        let mut evicted = 0;
        loop {
            if let Entry::Vacant(slot) = state.local_files.entry(index) {
                let req = request_for(file, index, span.offset, span.len, true);
                let (resp, bytes) = self.request(worker, req)?;
                if resp.local_path.is_empty() {
                    // Not cached yet: the worker sent the span's bytes as they came in.
                    return take_span(&bytes, span, out);
                }
                match File::open(&resp.local_path) {
                    Ok(f) => {
                        slot.insert((f, resp.local_offset));
                    }
                    // Evicted between the answer and the open: ask again, and in a cache
                    // churning that fast, let the worker send the bytes (it holds the
                    // block while it reads it).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        evicted += 1;
                        if evicted == LOCAL_OPEN_TRIES {
                            return self.read_remote(file, state, worker, span, out);
                        }
                        continue;
                    }
                    Err(e) => {
                        return Err(FsError::io_from(
                            format!("cache file {}: {e}", resp.local_path),
                            e,
                        ))
                    }
                }
            }
            state.last_local = Some(index);
            let (f, base) = &state.local_files[&index];
            let start = out.len();
            out.resize(start + span.len as usize, 0);
            let mut done = 0usize;
            while done < span.len as usize {
                let n = f.read_at(&mut out[start + done..], base + span.offset + done as u64)?;
                if n == 0 {
                    out.truncate(start);
                    return Err(FsError::Stale(format!(
                        "cache file of block {index} is shorter than expected"
                    )));
                }
                done += n;
            }
            metrics::counter!("granary_client_short_circuit_bytes_total").increment(span.len);
            return Ok(());
        }
    }

    fn read_remote(
        &self,
        file: &Inode,
        state: &mut ReadState,
        worker: &WorkerInfo,
        span: BlockSpan,
        out: &mut Vec<u8>,
    ) -> FsResult<()> {
        let index = span.index as u32;
        if let Some(b) = &state.buffer {
            if b.index == index
                && span.offset >= b.offset
                && span.offset + span.len <= b.offset + b.data.len() as u64
            {
                let from = (span.offset - b.offset) as usize;
                out.extend_from_slice(&b.data[from..from + span.len as usize]);
                return Ok(());
            }
        }
        state.buffer = None;
        let abs = index as u64 * file.block_size + span.offset;
        state.window = if abs == state.last_end && state.window > 0 {
            (state.window * 2).min(self.opts.readahead_max)
        } else {
            span.len
        };
        let blen = block_len(file.size, file.block_size, index as u64);
        let want = state
            .window
            .max(span.len)
            .min(blen - span.offset)
            .min(MAX_REQUEST);
        let mut memory = self.memory.reserve(want, span.len);
        let (_, data) = self.request(
            worker,
            request_for(file, index, span.offset, memory.bytes(), false),
        )?;
        // The data client never accepts more than was asked for.
        memory.shrink_to(data.len() as u64);
        let buffered = Buffered {
            index,
            offset: span.offset,
            data,
            _memory: memory,
        };
        take_span(&buffered.data, span, out)?;
        state.buffer = Some(buffered);
        Ok(())
    }

    /// Asks the workers that will serve the next blocks to cache them now.
    fn warm_ahead(&self, file: &Inode, state: &mut ReadState, index: u32) {
        let count = block_count(file.size, file.block_size);
        for next in index + 1..=index.saturating_add(WARM_AHEAD) {
            if next as u64 >= count {
                return;
            }
            if !state.warmed.insert(next) {
                continue;
            }
            if let Ok((worker, _)) = self.pick(file, state, next, false) {
                let req = request_for(file, next, 0, 0, true);
                let _ = self.warm_tx.try_send((data_addr(&worker), req));
            }
        }
    }
}

/// The span's bytes, from the start of what a worker sent for it.
fn take_span(sent: &[u8], span: BlockSpan, out: &mut Vec<u8>) -> FsResult<()> {
    if (sent.len() as u64) < span.len {
        return Err(FsError::Stale(format!(
            "worker returned {} of {} bytes",
            sent.len(),
            span.len
        )));
    }
    out.extend_from_slice(&sent[..span.len as usize]);
    metrics::counter!("granary_client_remote_bytes_total").increment(span.len);
    Ok(())
}

impl BlockRead for BlockReader {
    fn whole_file(&self, file: &Inode) -> Option<File> {
        if !self.opts.short_circuit || file.size == 0 || file.block_size == 0 {
            return None;
        }
        let workers = self
            .data
            .usable(&self.workers.live(shard_of(file.id), false).ok()?);
        let worker = self.workers.local(&workers)?;
        let count = block_count(file.size, file.block_size);
        let mut path = None;
        for index in 0..count as u32 {
            // A single-block file is cached now if need be; a bigger one only qualifies
            // once all its blocks are cached in one data file (reads through the mount
            // cache it, so a later open gets it).
            let mut req = request_for(file, index, 0, 0, true);
            req.cached_only = count > 1;
            let (resp, _) = self.request(&worker, req).ok()?;
            let in_place = resp.local_offset == index as u64 * file.block_size;
            if !in_place || *path.get_or_insert_with(|| resp.local_path.clone()) != resp.local_path
            {
                return None;
            }
        }
        let f = File::open(path?).ok()?;
        // Only a complete copy may stand in for the file.
        (f.metadata().ok()?.len() == file.size).then_some(f)
    }

    fn read(
        &self,
        file: &Inode,
        state: &mut ReadState,
        offset: u64,
        len: u32,
    ) -> FsResult<Vec<u8>> {
        if file.block_size == 0 {
            return Err(FsError::io("file has no block size"));
        }
        let sequential = offset == state.last_end;
        let parts = spans(file.size, file.block_size, offset, len as u64);
        let mut out = Vec::with_capacity(parts.iter().map(|s| s.len as usize).sum());
        for span in parts {
            self.read_span(file, state, span, &mut out)?;
            if sequential && span.offset + span.len > file.block_size / 2 {
                self.warm_ahead(file, state, span.index as u32);
            }
        }
        state.last_end = offset + out.len() as u64;
        Ok(out)
    }
}
