//! Cache misses: read a block from the UFS into the cache. Concurrent misses on one block
//! share a single UFS read, run by a task of its own. Readers of a range need not wait for
//! the whole block: they take their bytes from the fill as soon as it has written them,
//! and a range far ahead of the fill is read from the UFS directly.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use granary_common::blocks::block_len;
use granary_common::ids::shard_of;
use granary_common::{FsError, FsResult};
use tokio::sync::watch;

use crate::block_store::{BlockId, BlockStore, CachedBlock, Fingerprint};
use crate::mounts::MountRegistry;

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
}

/// Fills of a block into shared data files evicted under them before it is cached in
/// a file of its own.
const SHARED_FILL_TRIES: usize = 3;

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

/// One fetch of a block, and how far it has got.
struct Fill {
    progress: watch::Sender<Progress>,
    /// Held shared while a reader reads the fill's bytes; a fill giving its bytes up takes
    /// it exclusively to withdraw them first (a shared data file then punches them out).
    reading: RwLock<()>,
}

#[derive(Default)]
struct Progress {
    /// Waiting for a turn ([`MAX_RUNNING_FILLS`]) to fetch: its readers read directly.
    queued: bool,
    /// The file being written, and where the block starts in it.
    at: Option<(PathBuf, u64)>,
    /// The block's bytes written there so far.
    filled: u64,
    /// How the fetch ended.
    outcome: Option<FsResult<CachedBlock>>,
}

impl Fill {
    /// Lets readers at the bytes written to `at` until the returned guard drops (unless
    /// it is [`Published::keep`]t, once they are the cached block's).
    fn publish(&self, at: (PathBuf, u64)) -> Published<'_> {
        self.progress.send_modify(|p| {
            p.at = Some(at);
            p.filled = 0;
        });
        Published(Some(self))
    }

    /// `len` bytes from `offset` of the block if the fill at `at` has them (`None`: it
    /// moved, or its file was renamed into the cache).
    fn read(&self, at: &(PathBuf, u64), offset: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
        let _reading = self.reading.read().unwrap_or_else(|e| e.into_inner());
        {
            let p = self.progress.borrow();
            if p.at.as_ref() != Some(at) || p.filled < offset + len {
                return Ok(None);
            }
        }
        let file = match File::open(&at.0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            f => f?,
        };
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, at.1 + offset)?;
        Ok(Some(buf))
    }
}

/// Bytes of a fill open to readers; dropped (on an error or a panic alike), it withdraws
/// them, waiting for readers in the middle of a read. Made after the shared data file's
/// fill, it drops before that fill punches the bytes out.
struct Published<'a>(Option<&'a Fill>);

impl Published<'_> {
    /// The bytes are the cached block's now: readers may go on reading them.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        if let Some(fill) = self.0 {
            let _no_readers = fill.reading.write().unwrap_or_else(|e| e.into_inner());
            fill.progress.send_modify(|p| p.at = None);
        }
    }
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

struct CrcWriter<'a> {
    file: &'a mut File,
    crc: u32,
    len: u64,
    /// The block's length: a UFS sending more must not write into the next block (a
    /// shared data file holds it right after).
    limit: u64,
    fill: &'a Fill,
}

impl Write for CrcWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.limit {
            return Err(io::Error::other("the UFS sent more than the block's bytes"));
        }
        let n = self.file.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        let filled = self.len;
        self.fill.progress.send_modify(|p| p.filled = filled);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
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
            let from = id.1 as u64 * src.block_size + offset;
            let copied = ufs.read_range(&src.ufs_path, src.fingerprint, from, len, &mut buf)?;
            if copied != len {
                return Err(FsError::Stale(format!(
                    "{}: UFS returned {copied} of {len} bytes",
                    String::from_utf8_lossy(&src.ufs_path)
                )));
            }
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

fn fetch(
    store: &BlockStore,
    ufs: &dyn granary_common::ufs::Ufs,
    id: BlockId,
    src: &BlockSource,
    fill: &Fill,
) -> FsResult<CachedBlock> {
    let len = src.block_len(id.1);
    if len == 0 {
        return Err(FsError::InvalidArgument(format!(
            "block {} is past the end of the file",
            id.1
        )));
    }
    let copy = |file: &mut File| -> FsResult<(u64, u32)> {
        let mut w = CrcWriter {
            file,
            crc: 0,
            len: 0,
            limit: len,
            fill,
        };
        let copied = ufs.read_range(
            &src.ufs_path,
            src.fingerprint,
            id.1 as u64 * src.block_size,
            len,
            &mut w,
        )?;
        if copied != len {
            return Err(FsError::Stale(format!(
                "{}: UFS returned {copied} of {len} bytes",
                String::from_utf8_lossy(&src.ufs_path)
            )));
        }
        metrics::counter!("granary_worker_ufs_fetches_total").increment(1);
        metrics::counter!("granary_worker_ufs_bytes_total").increment(copied);
        Ok((w.len, w.crc))
    };
    // Straight into the file's shared data file, when its blocks share one. One evicted
    // (or deleted) while this block was written is not entered: fill it again, in the
    // next data file, or (evicted over and over) as a file of its own.
    let shared_tries = match store.shares_data_file(src.fingerprint.size, src.block_size) {
        true => SHARED_FILL_TRIES,
        false => 0,
    };
    for _ in 0..shared_tries {
        let Some(mut shared) = store.begin_shared(id, src.fingerprint, src.block_size)? else {
            // Cached meanwhile (another fetch's): that copy, not a second one whose
            // commit would drop the whole data file it replaced.
            if let Some(b) = store.lookup(id, src.fingerprint) {
                return Ok(b);
            }
            break;
        };
        let published = fill.publish(shared.location());
        let committed = copy(&mut shared.file).and_then(|(len, crc)| Ok(shared.commit(len, crc)?));
        if let Ok(Some(block)) = committed {
            published.keep();
            return Ok(block);
        }
        // Withdrawn before `shared` gives the bytes back.
        drop(published);
        committed?;
    }
    let tmp = store.temp_path();
    let result = (|| {
        let mut file = File::create(&tmp)?;
        let published = fill.publish((tmp.clone(), 0));
        let (len, crc) = copy(&mut file)?;
        let block = store.commit(id, src.fingerprint, &tmp, len, crc)?;
        published.keep();
        Ok(block)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
