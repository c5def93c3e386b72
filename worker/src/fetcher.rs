//! Cache misses: read a block from the UFS into the cache. Concurrent misses on one block
//! share a single UFS read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use granary_common::blocks::block_len;
use granary_common::ids::shard_of;
use granary_common::{FsError, FsResult};

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

pub struct BlockFetcher {
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    inflight: Mutex<HashMap<BlockId, Arc<tokio::sync::Mutex<()>>>>,
}

struct CrcWriter<'a> {
    file: &'a mut File,
    crc: u32,
    len: u64,
    /// The block's length: a UFS sending more must not write into the next block (a
    /// shared data file holds it right after).
    limit: u64,
}

impl Write for CrcWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.limit {
            return Err(io::Error::other("the UFS sent more than the block's bytes"));
        }
        let n = self.file.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
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
    pub async fn get(&self, id: BlockId, src: &BlockSource) -> FsResult<CachedBlock> {
        if let Some(b) = self.store.cached(id, src.fingerprint) {
            self.store.count_lookup(true);
            return Ok(b);
        }
        let gate = self
            .inflight
            .lock()
            .expect("inflight lock")
            .entry(id)
            .or_default()
            .clone();
        let result = async {
            let _turn = gate.lock().await;
            let store = self.store.clone();
            let mounts = self.mounts.clone();
            let src = src.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(b) = store.lookup(id, src.fingerprint) {
                    store.count_lookup(true);
                    return Ok(b);
                }
                store.count_lookup(false);
                fetch(
                    &store,
                    &*mounts.get(shard_of(id.0), src.mount_id)?,
                    id,
                    &src,
                )
            })
            .await
            .map_err(|e| FsError::io_from(format!("fetch task: {e}"), e))?
        }
        .await;
        {
            // The last request of this block out removes its gate: one removed while
            // others still wait on it would let a newcomer fetch alongside them.
            let mut inflight = self.inflight.lock().expect("inflight lock");
            drop(gate);
            if inflight.get(&id).is_some_and(|g| Arc::strong_count(g) == 1) {
                inflight.remove(&id);
            }
        }
        match &result {
            // A newer version the client reloads: routine.
            Err(FsError::Stale(_)) | Ok(_) => {}
            Err(e) => tracing::warn!(
                shard = shard_of(id.0),
                mount = src.mount_id,
                path = %String::from_utf8_lossy(&src.ufs_path),
                block = id.1,
                error = %e,
                "reading a block from the UFS failed"
            ),
        }
        result
    }
}

fn fetch(
    store: &BlockStore,
    ufs: &dyn granary_common::ufs::Ufs,
    id: BlockId,
    src: &BlockSource,
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
        let Some(mut fill) = store.begin_shared(id, src.fingerprint, src.block_size)? else {
            // Cached meanwhile (another fetch's): that copy, not a second one whose
            // commit would drop the whole data file it replaced.
            if let Some(b) = store.lookup(id, src.fingerprint) {
                return Ok(b);
            }
            break;
        };
        let (len, crc) = copy(&mut fill.file)?;
        if let Some(block) = fill.commit(len, crc)? {
            return Ok(block);
        }
    }
    let tmp = store.temp_path();
    let result = (|| {
        let (len, crc) = copy(&mut File::create(&tmp)?)?;
        Ok(store.commit(id, src.fingerprint, &tmp, len, crc)?)
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
