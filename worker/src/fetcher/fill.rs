//! One fill of a block into the cache: the file it writes and how far it has got, which
//! readers of the block may read from before the block is cached.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::RwLock;

use granary_common::{FsError, FsResult};
use tokio::sync::watch;

use super::BlockSource;
use crate::block_store::{BlockId, BlockStore, CachedBlock};

/// Fills of a block into shared data files evicted under them before it is cached in
/// a file of its own.
const SHARED_FILL_TRIES: usize = 3;

/// One fetch of a block, and how far it has got.
pub(super) struct Fill {
    pub(super) progress: watch::Sender<Progress>,
    /// Held shared while a reader reads the fill's bytes; a fill giving its bytes up takes
    /// it exclusively to withdraw them first (a shared data file then punches them out).
    pub(super) reading: RwLock<()>,
}

#[derive(Default)]
pub(super) struct Progress {
    /// Waiting for a turn ([`super::MAX_RUNNING_FILLS`]) to fetch: its readers read directly.
    pub(super) queued: bool,
    /// The file being written, and where the block starts in it.
    pub(super) at: Option<(PathBuf, u64)>,
    /// The block's bytes written there so far.
    pub(super) filled: u64,
    /// How the fetch ended.
    pub(super) outcome: Option<FsResult<CachedBlock>>,
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
    pub(super) fn read(
        &self,
        at: &(PathBuf, u64),
        offset: u64,
        len: u64,
    ) -> io::Result<Option<Vec<u8>>> {
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

pub(super) fn fetch(
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
        src.read_from(ufs, id.1, 0, len, &mut w)?;
        metrics::counter!("granary_worker_ufs_fetches_total").increment(1);
        metrics::counter!("granary_worker_ufs_bytes_total").increment(len);
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
