//! Uploads: a client streams a whole file; the bytes go to the UFS under a temporary name
//! and, block by block, into temp files of the cache. Only when the UFS object is durable
//! and renamed into place are the blocks committed to the cache, under the fingerprint the
//! UFS now reports — so a read right after the close is a cache hit, and a cut-off upload
//! leaves neither a partial UFS object nor a cached block.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use granary_common::ufs::{Ufs, UfsObject};
use granary_common::{FsError, FsResult};

use crate::block_store::{BlockStore, Fingerprint};

/// One block being written into the cache's temp directory.
struct PendingBlock {
    path: PathBuf,
    file: File,
    crc: u32,
    len: u64,
}

/// What is uploaded and where: `file_id` keys the cached blocks.
pub struct UploadTarget {
    pub file_id: u64,
    pub ufs_path: Vec<u8>,
    pub size: u64,
    pub block_size: u64,
    pub durable: bool,
}

/// Writes the chunks arriving on `chunks` (exactly `target.size` bytes; the channel closing
/// early aborts) to the UFS and the cache. Returns the UFS object as now stored.
pub fn upload(
    store: &BlockStore,
    ufs: &dyn Ufs,
    target: &UploadTarget,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> FsResult<UfsObject> {
    if target.block_size == 0 {
        return Err(FsError::InvalidPath("block_size is zero".into()));
    }
    let mut blocks: Vec<PendingBlock> = Vec::new();
    let result = (|| {
        let mut ufs_file = ufs.create_upload(&target.ufs_path)?;
        let mut received = 0u64;
        while let Some(chunk) = chunks.blocking_recv() {
            if received + chunk.len() as u64 > target.size {
                return Err(FsError::InvalidPath(format!(
                    "upload of {} sends more than its {} bytes",
                    String::from_utf8_lossy(&target.ufs_path),
                    target.size
                )));
            }
            ufs_file.write_all(&chunk)?;
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let index = (received / target.block_size) as usize;
                if blocks.len() <= index {
                    let path = store.temp_path();
                    blocks.push(PendingBlock {
                        file: File::create(&path)?,
                        path,
                        crc: 0,
                        len: 0,
                    });
                }
                let b = &mut blocks[index];
                let room = (target.block_size - b.len) as usize;
                let (now, later) = rest.split_at(room.min(rest.len()));
                b.file.write_all(now)?;
                b.crc = crc32c::crc32c_append(b.crc, now);
                b.len += now.len() as u64;
                received += now.len() as u64;
                rest = later;
            }
        }
        if received != target.size {
            return Err(FsError::Io(format!(
                "upload of {} cut off after {received} of {} bytes",
                String::from_utf8_lossy(&target.ufs_path),
                target.size
            )));
        }
        let stored = ufs_file.complete(target.durable)?;
        if stored.size != target.size {
            return Err(FsError::Ufs(format!(
                "{} holds {} bytes after an upload of {}",
                String::from_utf8_lossy(&target.ufs_path),
                stored.size,
                target.size
            )));
        }
        metrics::counter!("granary_worker_uploaded_bytes_total").increment(received);
        Ok(stored)
    })();
    let stored = match result {
        Ok(s) => s,
        Err(e) => {
            for b in blocks {
                let _ = std::fs::remove_file(&b.path);
            }
            return Err(e);
        }
    };
    let fingerprint = Fingerprint {
        size: stored.size,
        mtime_ns: stored.mtime_ns,
    };
    for (index, b) in blocks.into_iter().enumerate() {
        drop(b.file);
        // The upload is done; a block that cannot be cached is only a later miss.
        if let Err(e) = store.commit(
            (target.file_id, index as u32),
            fingerprint,
            &b.path,
            b.len,
            b.crc,
        ) {
            tracing::warn!(error = %e, file_id = target.file_id, index, "caching an uploaded block failed");
            let _ = std::fs::remove_file(&b.path);
        }
    }
    Ok(stored)
}
