//! Dataset warm-up and eviction (`granary fs load` / `granary fs free`): every block of a
//! tree is fetched into the worker that reads would ask for it (the same hash placement),
//! many at once across all workers; a block the worker has already costs one answer from
//! its memory, so a warm-up can be stopped and run again. Eviction asks the workers to
//! drop the blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_common::blocks::{block_count, block_len};
use granary_common::ids::shard_of;
use granary_common::{FsError, FsResult};
use granary_meta_client::MetadataService;
use granary_protos::v1::{FileKind, Inode};

use crate::block_reader::request_for;
use crate::data_client::DataClient;
use crate::worker_list::{data_addr, hashed, with_retries, WorkerList};

/// Entries asked of the masters per directory page.
const PAGE: u32 = 4096;

/// What a warm-up or eviction has done so far; read while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Files (and their bytes) whose every block is now cached (or dropped).
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// Blocks fetched (or dropped) by this run, and their bytes.
    pub blocks_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Blocks found cached already (nothing read from the UFS), and their bytes.
    pub blocks_skipped: AtomicU64,
    pub bytes_skipped: AtomicU64,
    /// Blocks that could not be fetched (a load), or files not dropped from every
    /// worker (a free), and the first reason.
    pub failed: AtomicU64,
    pub first_error: Mutex<Option<String>>,
}

impl Progress {
    fn failed(&self, e: &FsError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("progress lock");
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// The files of a tree and their total size.
#[derive(Debug, Default)]
pub struct Tree {
    pub files: Vec<Inode>,
    pub bytes: u64,
}

/// One file's blocks still to do, and when the last is done the file counts.
struct FileJob {
    file: Inode,
    left: AtomicU64,
    /// A block of it could not be cached: the file does not count as cached.
    failed: AtomicBool,
}

pub struct Warmup {
    meta: Arc<dyn MetadataService>,
    workers: WorkerList,
    data: DataClient,
    /// Every block to the worker on this machine, as a mount here reads them, instead
    /// of spread over the workers by hash, as a mount without a worker reads them.
    local: bool,
}

impl Warmup {
    pub fn new(meta: Arc<dyn MetadataService>, cluster_token: &str) -> Self {
        Warmup {
            workers: WorkerList::new(
                meta.clone(),
                granary_common::hostname(),
                Duration::from_secs(5),
            ),
            data: DataClient::new(
                Duration::from_secs(2),
                Duration::from_secs(300),
                cluster_token,
            ),
            meta,
            local: false,
        }
    }

    /// Warms the worker on this machine alone (see [`Warmup`]).
    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    /// The files at `root`: itself if it is a file, else those in it (in its whole
    /// subtree with `recursive`).
    pub fn tree(&self, root: &Inode, recursive: bool) -> FsResult<Tree> {
        let mut tree = Tree::default();
        let mut dirs = Vec::new();
        match FileKind::try_from(root.kind) {
            Ok(FileKind::File) => {
                tree.bytes += root.size;
                tree.files.push(root.clone());
            }
            Ok(FileKind::Directory) => dirs.push(root.id),
            _ => {}
        }
        while let Some(dir) = dirs.pop() {
            let mut after = Vec::new();
            loop {
                let (page, more) = self.meta.readdir(dir, &after, PAGE)?;
                if let Some(last) = page.last() {
                    after = last.name.clone();
                }
                for e in page {
                    match FileKind::try_from(e.kind) {
                        Ok(FileKind::File) => {
                            tree.bytes += e.size;
                            tree.files.push(e);
                        }
                        Ok(FileKind::Directory) if recursive => dirs.push(e.id),
                        _ => {}
                    }
                }
                if !more {
                    break;
                }
            }
        }
        Ok(tree)
    }

    /// Caches every block of `files` not cached yet, `parallel` blocks at once, until done
    /// or `cancel` is set (blocks in flight finish; each is cached whole or not at all).
    pub fn load(&self, files: Vec<Inode>, parallel: usize, cancel: &AtomicBool, p: &Progress) {
        let (tx, rx) = sync_channel::<(Arc<FileJob>, u32)>(parallel * 4);
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| loop {
                    let job = rx.lock().expect("warm-up queue").recv();
                    let Ok((job, index)) = job else { return };
                    if cancel.load(Ordering::Relaxed) {
                        continue;
                    }
                    let len = block_len(job.file.size, job.file.block_size, index as u64);
                    match self.fetch(&job.file, index) {
                        Ok(true) => {
                            p.blocks_skipped.fetch_add(1, Ordering::Relaxed);
                            p.bytes_skipped.fetch_add(len, Ordering::Relaxed);
                        }
                        Ok(false) => {
                            p.blocks_done.fetch_add(1, Ordering::Relaxed);
                            p.bytes_done.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::debug!(file = job.file.id, index, error = %e, "warm-up of a block failed");
                            job.failed.store(true, Ordering::Relaxed);
                            p.failed(&e);
                        }
                    }
                    if job.left.fetch_sub(1, Ordering::AcqRel) == 1
                        && !job.failed.load(Ordering::Relaxed)
                    {
                        p.files.fetch_add(1, Ordering::Relaxed);
                        p.bytes.fetch_add(job.file.size, Ordering::Relaxed);
                    }
                });
            }
            for file in files {
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                // Every block goes to its worker, which answers a cached one from memory:
                // the masters' block locations lag a heartbeat behind, too far to skip by.
                let blocks = block_count(file.size, file.block_size.max(1)) as u32;
                if blocks == 0 {
                    p.files.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let job = Arc::new(FileJob {
                    left: AtomicU64::new(blocks as u64),
                    file,
                    failed: AtomicBool::new(false),
                });
                for index in 0..blocks {
                    if tx.send((job.clone(), index)).is_err() {
                        return;
                    }
                }
            }
            drop(tx);
        });
    }

    /// Has the worker reads would pick cache block `index` (it answers once cached);
    /// whether it had the block already.
    fn fetch(&self, file: &Inode, index: u32) -> FsResult<bool> {
        with_retries("block warm-up", file.id, |refresh| {
            let listed = self.workers.live(shard_of(file.id), refresh)?;
            let workers = self.data.usable(&listed);
            let worker = match self.local {
                // This machine's worker even while passed over: there is no other.
                true => self.workers.local(&listed).ok_or_else(|| {
                    FsError::InvalidArgument(format!(
                        "--local: no worker of shard {} runs on this machine ({})",
                        shard_of(file.id),
                        granary_common::hostname()
                    ))
                })?,
                false => hashed(&workers, file.id, index),
            };
            let addr = data_addr(&worker);
            let r = self
                .data
                .request(&addr, request_for(file, index, 0, 0, true));
            if r.as_ref().is_err_and(|e| e.is_retryable()) {
                self.data.forget(&addr);
            }
            r.map(|(resp, _)| resp.was_cached)
        })
    }

    /// Drops every cached block of `files` from the workers holding them.
    pub fn free(&self, files: Vec<Inode>, cancel: &AtomicBool, p: &Progress) {
        for file in files {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = self.free_file(&file, p) {
                p.failed(&e);
                continue;
            }
            p.files.fetch_add(1, Ordering::Relaxed);
            p.bytes.fetch_add(file.size, Ordering::Relaxed);
        }
    }

    /// Asks every live worker of the file's shard: the masters hear of newly cached
    /// blocks only with the next heartbeat, so their locations may miss some. One that
    /// does not answer fails the file, after the others were asked; one that did not
    /// answer lately fails it without being asked (a stopped worker would hold up each
    /// file for the whole wait).
    fn free_file(&self, file: &Inode, p: &Progress) -> FsResult<()> {
        let blocks = block_count(file.size, file.block_size.max(1)) as u32;
        if blocks == 0 {
            return Ok(());
        }
        let mut first_error = None;
        for w in self.workers.live(shard_of(file.id), false)?.iter() {
            let addr = data_addr(w);
            if self.data.failed_lately(&addr) {
                first_error.get_or_insert(FsError::Unavailable(format!(
                    "worker {addr} did not answer lately; its blocks of this file stay cached"
                )));
                continue;
            }
            match self.data.evict(&addr, file.id, (0..blocks).collect()) {
                Ok((blocks, bytes)) => {
                    p.blocks_done.fetch_add(blocks, Ordering::Relaxed);
                    p.bytes_done.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Bytes of `files` cached on some worker, as the masters know it (a heartbeat
    /// behind the workers).
    pub fn cached_bytes(&self, files: &[Inode]) -> FsResult<u64> {
        let mut cached = 0;
        for f in files {
            for b in self.meta.block_locations(f.id)?.blocks {
                if !b.worker_ids.is_empty() {
                    cached += block_len(f.size, f.block_size, b.index as u64);
                }
            }
        }
        Ok(cached)
    }
}
