//! Cache misses: read a block from the UFS into the cache. Concurrent misses on one block
//! share a single UFS read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use granary_common::blocks::block_len;
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

pub struct BlockFetcher {
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    inflight: Mutex<HashMap<BlockId, Arc<tokio::sync::Mutex<()>>>>,
}

struct CrcWriter {
    file: File,
    crc: u32,
    len: u64,
}

impl Write for CrcWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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

    /// The cached block, fetching it from the UFS first if needed.
    pub async fn get(&self, id: BlockId, src: &BlockSource) -> FsResult<CachedBlock> {
        if let Some(b) = self.store.lookup(id, src.fingerprint) {
            metrics::counter!("granary_worker_cache_hits_total").increment(1);
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
            if let Some(b) = self.store.lookup(id, src.fingerprint) {
                metrics::counter!("granary_worker_cache_hits_total").increment(1);
                return Ok(b);
            }
            metrics::counter!("granary_worker_cache_misses_total").increment(1);
            let store = self.store.clone();
            let ufs = self.mounts.get(src.mount_id)?;
            let src = src.clone();
            tokio::task::spawn_blocking(move || fetch(&store, &*ufs, id, &src))
                .await
                .map_err(|e| FsError::Io(format!("fetch task: {e}")))?
        }
        .await;
        self.inflight.lock().expect("inflight lock").remove(&id);
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
        return Err(FsError::InvalidPath(format!(
            "block {} is past the end of the file",
            id.1
        )));
    }
    let now = ufs.stat(&src.ufs_path)?;
    if now.size != src.fingerprint.size || now.mtime_ns != src.fingerprint.mtime_ns {
        return Err(FsError::Stale(format!(
            "{} changed in the UFS (size {} -> {}); reload its metadata",
            String::from_utf8_lossy(&src.ufs_path),
            src.fingerprint.size,
            now.size
        )));
    }
    let tmp = store.temp_path();
    let result = (|| {
        let mut w = CrcWriter {
            file: File::create(&tmp)?,
            crc: 0,
            len: 0,
        };
        let copied = ufs.read_range(&src.ufs_path, id.1 as u64 * src.block_size, len, &mut w)?;
        if copied != len {
            return Err(FsError::Stale(format!(
                "{}: UFS returned {copied} of {len} bytes",
                String::from_utf8_lossy(&src.ufs_path)
            )));
        }
        metrics::counter!("granary_worker_ufs_fetches_total").increment(1);
        metrics::counter!("granary_worker_ufs_bytes_total").increment(copied);
        Ok(store.commit(id, src.fingerprint, &tmp, w.len, w.crc)?)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
