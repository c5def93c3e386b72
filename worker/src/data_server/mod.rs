//! The block data port: framed TCP (see `granary_protos::frame`). A connection opens with
//! a `Hello`; then each `ReadBlockRequest` is answered by a `ReadBlockResponse` header and,
//! unless the client asked for the local cache path (short-circuit), the bytes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use granary_common::ids::shard_of;
use granary_common::ufs::UfsObject;
use granary_common::FsError;
use granary_protos::data::{
    data_request, DataRequest, EvictBlocksResponse, Hello, HelloReply, ReadBlockRequest,
    ReadBlockResponse, Status, WriteFileRequest, WriteFileResponse,
};
use granary_protos::frame::{encode_header, read_header_async};
use granary_protos::DATA_PROTOCOL_VERSION;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::block_store::Fingerprint;
use crate::fetcher::{BlockFetcher, BlockSource, EarlyRead};
use crate::uploader::{upload, UploadTarget};
use granary_common::auth::CheckToken;

/// Largest byte range one request may ask for.
pub const MAX_READ_LEN: u64 = 16 << 20;
/// Times a read refetches a block evicted between its lookup and its open.
const VANISHED_RETRIES: usize = 4;

pub struct DataServer {
    pub fetcher: Arc<BlockFetcher>,
    pub worker_id: String,
    pub hostname: String,
    pub token: CheckToken,
    /// Set: every connection is TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The answer to an upload of `ufs_path` (over the data port or a local one).
pub(crate) fn upload_response(
    request_id: u64,
    ufs_path: &[u8],
    outcome: Result<UfsObject, FsError>,
) -> WriteFileResponse {
    match outcome {
        Ok(obj) => WriteFileResponse {
            request_id,
            size: obj.size,
            mtime_ns: obj.mtime_ns,
            ..Default::default()
        },
        Err(e) => {
            tracing::warn!(error = %e, path = %String::from_utf8_lossy(ufs_path), "upload failed");
            WriteFileResponse {
                request_id,
                status: status_of(&e) as i32,
                error: e.to_string(),
                ..Default::default()
            }
        }
    }
}

/// The answer carrying `buf`.
fn served(request_id: u64, buf: Vec<u8>) -> (ReadBlockResponse, Vec<u8>) {
    metrics::counter!("granary_worker_served_bytes_total").increment(buf.len() as u64);
    let resp = ReadBlockResponse {
        request_id,
        length: buf.len() as u64,
        ..Default::default()
    };
    (resp, buf)
}

pub(crate) fn status_of(e: &FsError) -> Status {
    match e {
        FsError::InvalidArgument(_) | FsError::NameTooLong(_) => Status::BadRequest,
        FsError::NotFound(_) => Status::NotFound,
        FsError::Stale(_) => Status::Stale,
        FsError::Unavailable(_) | FsError::TimedOut(_) => Status::Unavailable,
        FsError::PermissionDenied(_) => Status::PermissionDenied,
        FsError::Ufs(_) | FsError::NotDir(_) => Status::UfsError,
        FsError::NoSpace(_) => Status::NoSpace,
        FsError::FileTooBig(_) => Status::FileTooBig,
        _ => Status::IoError,
    }
}

impl DataServer {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "data port accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                let served = match &me.tls {
                    Some(tls) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(sock)).await {
                            Ok(Ok(stream)) => me.connection(stream).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                    None => me.connection(sock).await,
                };
                if let Err(e) = served {
                    if !e.is_eof() {
                        tracing::debug!(%peer, error = %e, "data connection closed");
                    }
                }
            });
        }
    }

    async fn connection<S>(&self, sock: S) -> Result<(), granary_protos::frame::FrameError>
    where
        S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let (rd, mut wr) = tokio::io::split(sock);
        let mut rd = BufReader::new(rd);
        let hello: Hello = read_header_async(&mut rd).await?;
        let refusal = if hello.version != DATA_PROTOCOL_VERSION {
            Some(format!(
                "data protocol version {} not supported (this worker speaks {DATA_PROTOCOL_VERSION})",
                hello.version
            ))
        } else if !self.token.accepts(&hello.cluster_token) {
            Some("wrong or missing cluster token".to_string())
        } else {
            None
        };
        let accepted = refusal.is_none();
        let reply = HelloReply {
            ok: accepted,
            error: refusal.unwrap_or_default(),
            worker_id: self.worker_id.clone(),
            hostname: self.hostname.clone(),
        };
        wr.write_all(&encode_header(&reply)).await?;
        if !accepted {
            return Ok(());
        }
        loop {
            let req = match read_header_async::<DataRequest, _>(&mut rd).await?.op {
                Some(data_request::Op::Read(r)) => r,
                Some(data_request::Op::Write(w)) => {
                    let resp = self.write(&w, &mut rd).await?;
                    wr.write_all(&encode_header(&resp)).await?;
                    continue;
                }
                Some(data_request::Op::Evict(e)) => {
                    let store = self.fetcher.store().clone();
                    let ids: Vec<_> = e.indexes.iter().map(|&i| (e.file_id, i)).collect();
                    let resp = match tokio::task::spawn_blocking(move || store.evict(&ids)).await {
                        Ok((blocks, bytes)) => EvictBlocksResponse {
                            request_id: e.request_id,
                            blocks,
                            bytes,
                            ..Default::default()
                        },
                        Err(err) => EvictBlocksResponse {
                            request_id: e.request_id,
                            status: Status::IoError as i32,
                            error: format!("evicting: {err}"),
                            ..Default::default()
                        },
                    };
                    wr.write_all(&encode_header(&resp)).await?;
                    continue;
                }
                None => ReadBlockRequest::default(),
            };
            let (resp, payload) = match self.read(&req).await {
                Ok(x) => x,
                Err(e) => (
                    ReadBlockResponse {
                        request_id: req.request_id,
                        status: status_of(&e) as i32,
                        error: e.to_string(),
                        ..Default::default()
                    },
                    Vec::new(),
                ),
            };
            wr.write_all(&encode_header(&resp)).await?;
            if !payload.is_empty() {
                wr.write_all(&payload).await?;
            }
        }
    }

    /// Receives an upload's payload and stores it. A payload that stops short is a
    /// connection error (the upload is discarded); any other failure is answered after
    /// the payload has been drained, so the connection stays usable.
    async fn write<R: AsyncRead + Unpin>(
        &self,
        req: &WriteFileRequest,
        rd: &mut R,
    ) -> Result<WriteFileResponse, granary_protos::frame::FrameError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let ufs = self
            .fetcher
            .mounts()
            .get(shard_of(req.file_id), req.mount_id);
        let store = self.fetcher.store().clone();
        let target = UploadTarget {
            file_id: req.file_id,
            ufs_path: req.ufs_path.clone(),
            size: req.size,
            block_size: req.block_size,
            durable: req.durable,
        };
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = abandoned.clone();
        let mut task =
            tokio::task::spawn_blocking(move || upload(&store, &*ufs?, &target, rx, &gone));
        let mut left = req.size;
        let mut sink = Some(tx);
        while left > 0 {
            let mut buf = vec![0u8; left.min(1 << 20) as usize];
            rd.read_exact(&mut buf).await?;
            left -= buf.len() as u64;
            // The uploader may have failed already: keep draining, stop feeding it.
            if let Some(tx) = &sink {
                if tx.send(buf).await.is_err() {
                    sink = None;
                }
            }
        }
        drop(sink);
        // The client sends nothing more until it has the answer: a read that ends is the
        // client gone (killed), and one that returns bytes is a client out of step.
        let mut out_of_step = false;
        let joined = loop {
            let mut byte = [0u8; 1];
            tokio::select! {
                joined = &mut task => break joined,
                read = rd.read(&mut byte), if !abandoned.load(std::sync::atomic::Ordering::Acquire) => {
                    out_of_step = matches!(read, Ok(n) if n > 0);
                    abandoned.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        };
        let outcome = joined
            .map_err(|e| FsError::io_from(format!("upload task: {e}"), e))
            .and_then(|r| r);
        if out_of_step {
            return Err(granary_protos::frame::FrameError::Io(
                std::io::Error::other("the client sent more than its upload before the answer"),
            ));
        }
        Ok(upload_response(req.request_id, &req.ufs_path, outcome))
    }

    async fn read(&self, req: &ReadBlockRequest) -> Result<(ReadBlockResponse, Vec<u8>), FsError> {
        let src = BlockSource {
            mount_id: req.mount_id,
            ufs_path: req.ufs_path.clone(),
            fingerprint: Fingerprint {
                size: req.file_size,
                mtime_ns: req.file_mtime_ns,
            },
            block_size: req.block_size,
        };
        if req.block_size == 0 {
            return Err(FsError::InvalidArgument("block_size is zero".into()));
        }
        let block_len = src.block_len(req.index);
        // A short-circuit request names the range it reads now: a block not cached yet
        // is then answered with those bytes as soon as they are fetched, unless the range
        // is the whole block (a small file read at once): the client reads the cache file.
        let ranged = !req.local_path_only || req.length > 0;
        let whole_block =
            req.local_path_only && (req.length == 0 || req.offset == 0 && req.length == block_len);
        if ranged
            && (req.length > MAX_READ_LEN
                || req
                    .offset
                    .checked_add(req.length)
                    .is_none_or(|end| end > block_len))
        {
            return Err(FsError::InvalidArgument(format!(
                "range {}+{} outside block {} of {block_len} bytes (or over {MAX_READ_LEN})",
                req.offset, req.length, req.index
            )));
        }
        let id = (req.file_id, req.index);
        // An eviction can race between lookup and open (a small cache under many
        // readers); each retry refetches.
        for _ in 0..VANISHED_RETRIES {
            let cached = self.fetcher.store().cached(id, src.fingerprint);
            let was_cached = cached.is_some();
            // A hit is answered here: `get` would look the index up again.
            let block = match cached {
                Some(block) if req.cached_only => block,
                Some(block) => {
                    self.fetcher.store().count_lookup(true);
                    block
                }
                None if req.cached_only => {
                    return Err(FsError::NotFound(format!(
                        "block {} is not cached",
                        req.index
                    )))
                }
                None if whole_block => self.fetcher.get(id, &src).await?,
                None => {
                    match self
                        .fetcher
                        .read_early(id, &src, req.offset, req.length)
                        .await?
                    {
                        EarlyRead::Bytes(buf) => return Ok(served(req.request_id, buf)),
                        EarlyRead::Cached(block) => block,
                    }
                }
            };
            if req.local_path_only {
                return Ok((
                    ReadBlockResponse {
                        request_id: req.request_id,
                        length: block.len,
                        local_path: block.path.to_string_lossy().into_owned(),
                        local_offset: block.offset,
                        was_cached,
                        ..Default::default()
                    },
                    Vec::new(),
                ));
            }
            let (offset, length) = (block.offset + req.offset, req.length as usize);
            let path = block.path.clone();
            let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let f = std::fs::File::open(path)?;
                let mut buf = vec![0u8; length];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await
            .map_err(|e| FsError::io(e.to_string()))?;
            match data {
                Ok(buf) => return Ok(served(req.request_id, buf)),
                // Evicted meanwhile, or deleted behind the cache's back (then it is
                // forgotten, and the next turn fetches it again).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.fetcher.store().forget_missing(id, &block);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The client retries (elsewhere, or here once the cache calms down).
        Err(FsError::Unavailable(format!(
            "block evicted {VANISHED_RETRIES} times while being read"
        )))
    }
}

#[cfg(test)]
mod tests;
