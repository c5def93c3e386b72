//! Uploads. Over the data port a client streams a whole file: the bytes go to the UFS
//! under a temporary name and, block by block, into temp files of the cache. A client on
//! this machine may instead write into the UFS temp file itself (see `local_upload`);
//! its blocks are then cached from that file. Either way, only when the UFS object is
//! renamed into place are the blocks committed to the cache, under the fingerprint the
//! UFS now reports — so a read right after the close is a cache hit, and a cut-off upload
//! leaves neither a partial UFS object nor a cached block.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use granary_common::ufs::{Ufs, UfsObject, UfsUpload};
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

/// An upload's blocks on their way into the cache.
struct CacheFill<'a> {
    store: &'a BlockStore,
    block_size: u64,
    blocks: Vec<PendingBlock>,
    received: u64,
}

impl<'a> CacheFill<'a> {
    fn new(store: &'a BlockStore, block_size: u64) -> FsResult<Self> {
        if block_size == 0 {
            return Err(FsError::InvalidArgument("block_size is zero".into()));
        }
        Ok(CacheFill {
            store,
            block_size,
            blocks: Vec::new(),
            received: 0,
        })
    }

    /// Appends the upload's next bytes.
    fn push(&mut self, mut data: &[u8]) -> FsResult<()> {
        while !data.is_empty() {
            let index = (self.received / self.block_size) as usize;
            if self.blocks.len() <= index {
                let path = self.store.temp_path();
                self.blocks.push(PendingBlock {
                    file: File::create(&path)?,
                    path,
                    crc: 0,
                    len: 0,
                });
            }
            let b = &mut self.blocks[index];
            let room = (self.block_size - b.len) as usize;
            let (now, later) = data.split_at(room.min(data.len()));
            b.file.write_all(now)?;
            b.crc = crc32c::crc32c_append(b.crc, now);
            b.len += now.len() as u64;
            self.received += now.len() as u64;
            data = later;
        }
        Ok(())
    }

    /// Caches the first `size` bytes of `source`, whose pages the client has just
    /// written, a few blocks at a time (the disk serves several writes at once). The
    /// copies of a big file bypass the page cache (O_DIRECT where the cache filesystem
    /// allows it): they are seldom read back soon, and a second set of fresh pages for a
    /// multi-GiB checkpoint would throttle the very writes that made it. A small file is
    /// copied through the page cache, in this thread: waiting for the disk would cost it
    /// more than the pages do.
    fn copy_file(&mut self, source: &File, size: u64) -> FsResult<()> {
        let count = size.div_ceil(self.block_size) as usize;
        let direct = size >= DIRECT_MIN;
        let threads = if direct { COPY_THREADS.min(count) } else { 1 };
        let this = &*self;
        let shares = if threads <= 1 {
            vec![this.copy_share(source, size, direct, 0, 1)]
        } else {
            std::thread::scope(|s| {
                let copiers: Vec<_> = (0..threads)
                    .map(|t| s.spawn(move || this.copy_share(source, size, direct, t, threads)))
                    .collect();
                copiers
                    .into_iter()
                    .map(|c| c.join().expect("copy thread"))
                    .collect()
            })
        };
        let mut result = Ok(());
        let mut copied = Vec::with_capacity(count);
        for (blocks, r) in shares {
            copied.extend(blocks);
            result = result.and(r);
        }
        copied.sort_by_key(|(index, _)| *index);
        self.blocks = copied.into_iter().map(|(_, b)| b).collect();
        result.map(|()| self.received = size)
    }

    /// Copies blocks `first`, `first + step`, ... of `source`, stopping at an error;
    /// returns those copied and how it ended.
    fn copy_share(
        &self,
        source: &File,
        size: u64,
        direct: bool,
        first: usize,
        step: usize,
    ) -> (Vec<(usize, PendingBlock)>, FsResult<()>) {
        let count = size.div_ceil(self.block_size) as usize;
        let fits = size
            .next_multiple_of(DIRECT_ALIGN as u64)
            .max(DIRECT_ALIGN as u64);
        let mut buf = AlignedBuf::new((COPY_CHUNK as u64).min(fits) as usize);
        let mut copied = Vec::new();
        for index in (first..count).step_by(step) {
            match self.copy_block(source, index as u64, size, &mut buf, direct) {
                Ok(b) => copied.push((index, b)),
                Err(e) => return (copied, Err(e)),
            }
        }
        (copied, Ok(()))
    }

    /// Copies block `index` of a `size`-byte `source` into a temp file of the cache.
    fn copy_block(
        &self,
        source: &File,
        index: u64,
        size: u64,
        buf: &mut AlignedBuf,
        direct: bool,
    ) -> FsResult<PendingBlock> {
        let path = self.store.temp_path();
        let open = |flags| {
            File::options()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(&path)
        };
        let (file, direct) = match direct {
            false => (open(0)?, false),
            true => match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                // The cache filesystem has no O_DIRECT (tmpfs before Linux 6.6).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
                Err(e) => return Err(e.into()),
            },
        };
        let mut block = PendingBlock {
            path,
            file,
            crc: 0,
            len: 0,
        };
        let start = index * self.block_size;
        let end = (start + self.block_size).min(size);
        let written = (|| {
            while start + block.len < end {
                let want = (end - start - block.len).min(buf.len() as u64) as usize;
                let data = &mut buf.bytes_mut()[..want];
                source.read_exact_at(data, start + block.len)?;
                block.crc = crc32c::crc32c_append(block.crc, data);
                // O_DIRECT writes whole sectors: pad the block's tail, then cut it back.
                let padded = if direct {
                    want.next_multiple_of(DIRECT_ALIGN)
                } else {
                    want
                };
                buf.bytes_mut()[want..padded].fill(0);
                block.file.write_all(&buf.bytes_mut()[..padded])?;
                block.len += want as u64;
            }
            block.file.set_len(block.len)
        })();
        match written {
            Ok(()) => Ok(block),
            Err(e) => {
                let _ = std::fs::remove_file(&block.path);
                Err(e.into())
            }
        }
    }

    fn discard(self) {
        for b in self.blocks {
            let _ = std::fs::remove_file(&b.path);
        }
    }

    /// Caches the blocks as the content of `stored`, now in place in the UFS.
    fn commit(self, file_id: u64, stored: &UfsObject) {
        let fingerprint = Fingerprint {
            size: stored.size,
            mtime_ns: stored.mtime_ns,
        };
        for (index, b) in self.blocks.into_iter().enumerate() {
            drop(b.file);
            // The upload is done; a block that cannot be cached is only a later miss.
            if let Err(e) =
                self.store
                    .commit((file_id, index as u32), fingerprint, &b.path, b.len, b.crc)
            {
                tracing::warn!(error = %e, file_id, index, "caching an uploaded block failed");
                let _ = std::fs::remove_file(&b.path);
            }
        }
    }
}

/// Completes a UFS upload holding `target.size` bytes and caches `fill`'s blocks under
/// the fingerprint the UFS then reports.
fn publish(
    upload: Box<dyn UfsUpload>,
    fill: CacheFill<'_>,
    target: &UploadTarget,
) -> FsResult<UfsObject> {
    let stored = match upload.complete(target.durable) {
        Ok(s) if s.size == target.size => s,
        Ok(s) => {
            fill.discard();
            return Err(FsError::ufs(format!(
                "{} holds {} bytes after an upload of {}",
                String::from_utf8_lossy(&target.ufs_path),
                s.size,
                target.size
            )));
        }
        Err(e) => {
            fill.discard();
            return Err(e);
        }
    };
    metrics::counter!("granary_worker_uploaded_bytes_total").increment(target.size);
    fill.commit(target.file_id, &stored);
    Ok(stored)
}

/// Writes `data`, the whole content, to the UFS and the cache, as [`upload`] does with
/// chunks. Returns the UFS object as now stored.
pub fn upload_bytes(
    store: &BlockStore,
    mut ufs_file: Box<dyn UfsUpload>,
    target: &UploadTarget,
    data: &[u8],
) -> FsResult<UfsObject> {
    let mut fill = CacheFill::new(store, target.block_size)?;
    let written = ufs_file
        .write_all(data)
        .map_err(FsError::from)
        .and_then(|()| fill.push(data));
    match written {
        Ok(()) => publish(ufs_file, fill, target),
        Err(e) => {
            fill.discard();
            Err(e)
        }
    }
}

/// Writes the chunks arriving on `chunks` (exactly `target.size` bytes; the channel closing
/// early aborts) to the UFS and the cache. Returns the UFS object as now stored. Once
/// every byte is in the UFS (an S3 upload's last parts take a while after the last
/// chunk), an upload whose client has gone meanwhile (`abandoned`: killed while waiting
/// for the answer, so it will commit nothing) is aborted rather than published: the UFS
/// would hold content its namespace never names.
pub fn upload(
    store: &BlockStore,
    ufs: &dyn Ufs,
    target: &UploadTarget,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    abandoned: &std::sync::atomic::AtomicBool,
) -> FsResult<UfsObject> {
    let mut fill = CacheFill::new(store, target.block_size)?;
    let received = (|| {
        let mut ufs_file = ufs.create_upload(&target.ufs_path)?;
        while let Some(chunk) = chunks.blocking_recv() {
            if fill.received + chunk.len() as u64 > target.size {
                return Err(FsError::InvalidArgument(format!(
                    "upload of {} sends more than its {} bytes",
                    String::from_utf8_lossy(&target.ufs_path),
                    target.size
                )));
            }
            ufs_file.write_all(&chunk)?;
            fill.push(&chunk)?;
        }
        if fill.received != target.size {
            return Err(FsError::io(format!(
                "upload of {} cut off after {} of {} bytes",
                String::from_utf8_lossy(&target.ufs_path),
                fill.received,
                target.size
            )));
        }
        ufs_file.store_written()?;
        if abandoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(FsError::Unavailable(format!(
                "upload of {}: the client went away before it was complete; not published",
                String::from_utf8_lossy(&target.ufs_path)
            )));
        }
        Ok(ufs_file)
    })();
    match received {
        Ok(ufs_file) => publish(ufs_file, fill, target),
        Err(e) => {
            fill.discard();
            Err(e)
        }
    }
}

/// Blocks cached at once when caching from a file.
const COPY_THREADS: usize = 4;
/// Uploads from this size on are cached with O_DIRECT, several blocks at once.
const DIRECT_MIN: u64 = 8 << 20;
/// Bytes read and cached per step when caching from a file.
const COPY_CHUNK: usize = 1 << 20;
/// Alignment O_DIRECT asks of buffers, offsets and lengths (a page covers every device).
const DIRECT_ALIGN: usize = 4096;

/// A page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points at layout.size() initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Publishes a local upload whose bytes a co-located client wrote into the UFS temp
/// file: they are cached from that file, then the file is renamed into place.
pub fn publish_local(
    store: &BlockStore,
    upload: Box<dyn UfsUpload>,
    target: &UploadTarget,
) -> FsResult<UfsObject> {
    let file = upload
        .local_file()
        .ok_or_else(|| FsError::Unsupported("this UFS has no local upload file".into()))?;
    let len = file.metadata()?.len();
    if len != target.size {
        return Err(FsError::InvalidArgument(format!(
            "upload of {}: the file holds {len} bytes, the client says {}",
            String::from_utf8_lossy(&target.ufs_path),
            target.size
        )));
    }
    let mut fill = CacheFill::new(store, target.block_size)?;
    // The disk takes the file's dirty pages while the blocks are copied (the rename's own
    // sync then finds nothing left to write).
    let copied = std::thread::scope(|s| {
        let synced = target.durable.then(|| s.spawn(|| file.sync_data()));
        let copied = fill.copy_file(file, target.size);
        match synced.map(|t| t.join().expect("sync thread")) {
            Some(Err(e)) => Err(e.into()),
            _ => copied,
        }
    });
    match copied {
        Ok(()) => publish(upload, fill, target),
        Err(e) => {
            fill.discard();
            Err(e)
        }
    }
}
