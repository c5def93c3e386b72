//! Cache misses: read a block from the UFS into the cache. Concurrent misses on one block
//! share a single UFS read, run by a task of its own. Readers of a range need not wait for
//! the whole block: they take their bytes from the fill as soon as it has written them,
//! and a range far ahead of the fill is read from the UFS directly.

mod fill;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use granary_common::blocks::block_len;
use granary_common::ids::shard_of;
use granary_common::ufs::Ufs;
use granary_common::{FsError, FsResult};
use tokio::sync::watch;

use crate::block_store::{BlockId, BlockStore, CachedBlock, Fingerprint};
use crate::mounts::MountRegistry;
use fill::{fetch, Fill, Progress};

/// Where a block's bytes live in the UFS and which version the client expects.
#[derive(Debug, Clone)]
pub struct BlockSource {
    pub mount_id: u32,
    pub ufs_path: Vec<u8>,
    pub fingerprint: Fingerprint,
    pub block_size: u64,
}

impl BlockSource {
    pub fn block_len(&self, index: u32) -> u64 {
        block_len(self.fingerprint.size, self.block_size, index as u64)
    }

    /// Copies `len` bytes from `offset` of block `index` from `ufs` into `sink`, all of
    /// them or `Stale` (the object is shorter than its version said).
    fn read_from(
        &self,
        ufs: &dyn Ufs,
        index: u32,
        offset: u64,
        len: u64,
        sink: &mut dyn std::io::Write,
    ) -> FsResult<()> {
        let from = index as u64 * self.block_size + offset;
        let copied = ufs.read_range(&self.ufs_path, self.fingerprint, from, len, sink)?;
        if copied != len {
            return Err(FsError::Stale(format!(
                "{}: UFS returned {copied} of {len} bytes",
                String::from_utf8_lossy(&self.ufs_path)
            )));
        }
        Ok(())
    }
}

/// Fills fetching at once. Readers of ranges do not wait for whole blocks, so a random
/// reader would otherwise start a fill per block it touches, all at once: a reader that
/// finds every turn taken reads its range from the UFS directly and starts no fill.
pub const MAX_RUNNING_FILLS: usize = 32;

/// What [`BlockFetcher::read_early`] found.
pub enum EarlyRead {
    /// The range, read before the block was cached.
    Bytes(Vec<u8>),
    /// The block, cached meanwhile (or before).
    Cached(CachedBlock),
}

pub struct BlockFetcher {
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    /// Blocks (of one version) being fetched, each by one task.
    inflight: Mutex<HashMap<(BlockId, Fingerprint), Arc<Fill>>>,
    turns: Arc<tokio::sync::Semaphore>,
}

/// The end of a fill task: whatever ends it (a panic included), the block leaves the
/// in-flight map and its readers get an outcome.
struct Ending {
    fetcher: Arc<BlockFetcher>,
    key: (BlockId, Fingerprint),
    fill: Arc<Fill>,
    outcome: Option<FsResult<CachedBlock>>,
}

impl Ending {
    fn end(mut self, outcome: FsResult<CachedBlock>) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err(FsError::io("the block's fill task ended early")));
        // Out of the map first: a reader coming after this fill failed starts another.
        let mut inflight = self
            .fetcher
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if inflight
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            inflight.remove(&self.key);
        }
        drop(inflight);
        self.fill.progress.send_modify(|p| {
            p.at = None;
            p.outcome = Some(outcome);
        });
    }
}

impl BlockFetcher {
    pub fn new(store: Arc<BlockStore>, mounts: Arc<MountRegistry>) -> Self {
        BlockFetcher {
            store,
            mounts,
            inflight: Mutex::new(HashMap::new()),
            turns: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING_FILLS)),
        }
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    pub fn mounts(&self) -> &Arc<MountRegistry> {
        &self.mounts
    }

    /// The cached block, fetching it from the UFS first if needed. Only a hit on a
    /// verified block is answered on the async thread; checking a block cached before a
    /// restart (which reads it whole) and fetching run on the blocking pool.
    pub async fn get(self: &Arc<Self>, id: BlockId, src: &BlockSource) -> FsResult<CachedBlock> {
        if let Some(b) = self.store.cached(id, src.fingerprint) {
            self.store.count_lookup(true);
            return Ok(b);
        }
        let fill = self
            .fill(id, src, true)
            .expect("a queued fill is always made");
        let mut progress = fill.progress.subscribe();
        let ended = progress
            .wait_for(|p| p.outcome.is_some())
            .await
            .expect("the fill outlives its subscribers");
        ended.outcome.clone().expect("waited for")
    }

    /// `len` bytes from `offset` of block `id` before the block is cached: from its fill
    /// once written there, or from the UFS when they lie past what the fill is reading
    /// already (a random reader would otherwise wait for most of a block it does not
    /// read; see `Ufs::read_ahead`), or no fill has a turn; or the block, once cached.
    ///
    /// Bytes served from a fill are those the UFS sent: a local file rewritten in place
    /// meanwhile ends the fill `Stale`, but what was read before is not taken back (as
    /// with a reader of that file on its own disk).
    pub async fn read_early(
        self: &Arc<Self>,
        id: BlockId,
        src: &BlockSource,
        offset: u64,
        len: u64,
    ) -> FsResult<EarlyRead> {
        let Some(fill) = self.fill(id, src, false) else {
            // No turn free: a block cached before a restart is still checked and served.
            return match self.lookup(id, src.fingerprint).await? {
                Some(block) => Ok(EarlyRead::Cached(block)),
                None => self
                    .read_direct(id, src, offset, len)
                    .await
                    .map(EarlyRead::Bytes),
            };
        };
        // A mount not registered yet reads nothing directly: its fill fails alike, or
        // finds the block cached before a restart.
        let ahead = self
            .mounts
            .get(shard_of(id.0), src.mount_id)
            .map_or(u64::MAX, |ufs| ufs.read_ahead());
        let mut progress = fill.progress.subscribe();
        let end = offset + len;
        loop {
            let at = {
                let p = progress
                    .wait_for(|p| {
                        p.outcome.is_some()
                            || p.queued
                            || p.at.is_some()
                                && (p.filled >= end || offset > p.filled.saturating_add(ahead))
                    })
                    .await
                    .expect("the fill outlives its subscribers");
                match (&p.outcome, &p.at) {
                    (Some(Ok(block)), _) => return Ok(EarlyRead::Cached(block.clone())),
                    (Some(Err(e)), _) => return Err(e.clone()),
                    (None, Some(at)) if p.filled >= end => Some(at.clone()),
                    (None, _) => None,
                }
            };
            let Some(at) = at else {
                return self
                    .read_direct(id, src, offset, len)
                    .await
                    .map(EarlyRead::Bytes);
            };
            let reader = fill.clone();
            let read_at = at.clone();
            let bytes = tokio::task::spawn_blocking(move || reader.read(&read_at, offset, len))
                .await
                .map_err(|e| FsError::io(format!("fill read task: {e}")))??;
            if let Some(bytes) = bytes {
                metrics::counter!("granary_worker_early_reads_total").increment(1);
                return Ok(EarlyRead::Bytes(bytes));
            }
            // Moved to another data file, or renamed into the cache as it ended.
            progress
                .wait_for(|p| p.outcome.is_some() || p.at.as_ref() != Some(&at))
                .await
                .expect("the fill outlives its subscribers");
        }
    }

    /// The cached block, verified first if it was cached before a restart (which reads
    /// it whole, on the blocking pool).
    async fn lookup(&self, id: BlockId, fp: Fingerprint) -> FsResult<Option<CachedBlock>> {
        let store = self.store.clone();
        let cached = tokio::task::spawn_blocking(move || store.lookup(id, fp))
            .await
            .map_err(|e| FsError::io(format!("cache lookup task: {e}")))?;
        self.store.count_lookup(cached.is_some());
        Ok(cached)
    }

    /// `len` bytes from `offset` of block `id`, read from the UFS and not cached.
    async fn read_direct(
        &self,
        id: BlockId,
        src: &BlockSource,
        offset: u64,
        len: u64,
    ) -> FsResult<Vec<u8>> {
        let ufs = self.mounts.get(shard_of(id.0), src.mount_id)?;
        let src = src.clone();
        let bytes = tokio::task::spawn_blocking(move || -> FsResult<Vec<u8>> {
            let mut buf = Vec::with_capacity(len as usize);
            src.read_from(&*ufs, id.1, offset, len, &mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| FsError::io(format!("direct read task: {e}")))??;
        metrics::counter!("granary_worker_ufs_direct_reads_total").increment(1);
        metrics::counter!("granary_worker_ufs_direct_bytes_total").increment(len);
        Ok(bytes)
    }

    /// The fill of block `id` in progress, or a new one (`None`: every turn is taken and
    /// the caller does not `queue`). Its task first checks the cache (a block cached
    /// before a restart is verified without a turn), then fetches on the blocking pool,
    /// and carries on if its readers go away.
    fn fill(self: &Arc<Self>, id: BlockId, src: &BlockSource, queue: bool) -> Option<Arc<Fill>> {
        let key = (id, src.fingerprint);
        let (fill, turn) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if let Some(fill) = inflight.get(&key) {
                self.store.count_lookup(false);
                return Some(fill.clone());
            }
            let turn = self.turns.clone().try_acquire_owned().ok();
            if turn.is_none() && !queue {
                return None;
            }
            let fill = Arc::new(Fill {
                progress: watch::Sender::new(Progress::default()),
                reading: RwLock::new(()),
            });
            inflight.insert(key, fill.clone());
            (fill, turn)
        };
        let ending = Ending {
            fetcher: self.clone(),
            key,
            fill: fill.clone(),
            outcome: None,
        };
        let src = src.clone();
        tokio::spawn(async move {
            let fetched = ending
                .fetcher
                .clone()
                .lookup_or_fetch(id, src, ending.fill.clone(), turn)
                .await;
            ending.end(fetched);
        });
        Some(fill)
    }

    async fn lookup_or_fetch(
        self: Arc<Self>,
        id: BlockId,
        src: BlockSource,
        fill: Arc<Fill>,
        turn: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> FsResult<CachedBlock> {
        let looked_up = turn.is_none();
        let turn = match turn {
            Some(turn) => turn,
            None => {
                // Checked before the wait: a block cached before a restart needs no turn.
                if let Some(block) = self.lookup(id, src.fingerprint).await? {
                    return Ok(block);
                }
                fill.progress.send_modify(|p| p.queued = true);
                let turn = self.turns.clone().acquire_owned().await;
                fill.progress.send_modify(|p| p.queued = false);
                turn.expect("the semaphore is never closed")
            }
        };
        let (me, source) = (self.clone(), src.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let cached = me.store.lookup(id, source.fingerprint);
            if !looked_up {
                me.store.count_lookup(cached.is_some());
            }
            if let Some(block) = cached {
                return Ok(block);
            }
            let ufs = me.mounts.get(shard_of(id.0), source.mount_id)?;
            fetch(&me.store, &*ufs, id, &source, &fill)
        })
        .await
        .unwrap_or_else(|e| Err(FsError::io(format!("fill task: {e}"))));
        if let Err(e) = &outcome {
            // A newer version the client reloads is routine.
            if !matches!(e, FsError::Stale(_)) {
                tracing::warn!(
                    shard = shard_of(id.0),
                    mount = src.mount_id,
                    path = %String::from_utf8_lossy(&src.ufs_path),
                    block = id.1,
                    error = %e,
                    "reading a block from the UFS failed"
                );
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::Duration;

    /// A block cached before a restart is checked by reading it whole. Here its file is a
    /// FIFO, so the check blocks until a writer comes: the writer is a task on the same
    /// single-threaded runtime, which runs only if the check is off the async thread.
    #[test]
    fn checking_a_cached_block_leaves_the_async_thread_free() {
        let dir = tempfile::tempdir().unwrap();
        let fp = Fingerprint {
            size: 0,
            mtime_ns: 1,
        };
        let fifo = {
            let (store, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
            let tmp = store.temp_path();
            std::fs::write(&tmp, b"").unwrap();
            let block = store.commit((7, 0), fp, &tmp, 0, 0).unwrap();
            std::fs::remove_file(&block.path).unwrap();
            let path = CString::new(block.path.as_os_str().as_bytes()).unwrap();
            // SAFETY: a plain syscall on a valid C string.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
            block.path
        };
        let (store, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        let fetcher = Arc::new(BlockFetcher::new(
            Arc::new(store),
            Arc::new(MountRegistry::default()),
        ));
        let src = BlockSource {
            mount_id: 1,
            ufs_path: b"f".to_vec(),
            fingerprint: fp,
            block_size: 1 << 20,
        };
        let (done, finished) = std::sync::mpsc::channel();
        let (writer_path, runtime_fifo) = (fifo.clone(), fifo.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let got = rt.block_on(async move {
                let check = tokio::spawn(async move { fetcher.get((7, 0), &src).await });
                // Opening the FIFO for writing ends the check's read (with EOF).
                let writer = tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    drop(std::fs::OpenOptions::new().write(true).open(&writer_path));
                });
                writer.await.unwrap();
                check.await.unwrap()
            });
            let _ = done.send(got.map(|b| b.path == runtime_fifo));
        });
        match finished.recv_timeout(Duration::from_secs(20)) {
            Ok(got) => assert!(got.unwrap(), "the checked block is served"),
            Err(_) => {
                // Unblock the stuck runtime thread before failing.
                drop(std::fs::OpenOptions::new().write(true).open(&fifo));
                panic!("the block check blocked the async thread");
            }
        }
    }
}
