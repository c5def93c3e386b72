//! The block data port: framed TCP (see `granary_protos::frame`). A connection opens with
//! a `Hello`; then each `ReadBlockRequest` is answered by a `ReadBlockResponse` header and,
//! unless the client asked for the local cache path (short-circuit), the bytes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use granary_common::FsError;
use granary_protos::data::{Hello, HelloReply, ReadBlockRequest, ReadBlockResponse, Status};
use granary_protos::frame::{encode_header, read_header_async};
use granary_protos::DATA_PROTOCOL_VERSION;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::block_store::Fingerprint;
use crate::fetcher::{BlockFetcher, BlockSource};

/// Largest byte range one request may ask for.
pub const MAX_READ_LEN: u64 = 16 << 20;

pub struct DataServer {
    pub fetcher: Arc<BlockFetcher>,
    pub worker_id: String,
    pub hostname: String,
}

fn status_of(e: &FsError) -> Status {
    match e {
        FsError::InvalidPath(_) | FsError::NameTooLong(_) => Status::BadRequest,
        FsError::NotFound(_) => Status::NotFound,
        FsError::Stale(_) => Status::Stale,
        FsError::Ufs(_) | FsError::PermissionDenied(_) | FsError::NotDir(_) => Status::UfsError,
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
                if let Err(e) = me.connection(sock).await {
                    if !e.is_eof() {
                        tracing::debug!(%peer, error = %e, "data connection closed");
                    }
                }
            });
        }
    }

    async fn connection(&self, sock: TcpStream) -> Result<(), granary_protos::frame::FrameError> {
        let (rd, mut wr) = sock.into_split();
        let mut rd = BufReader::new(rd);
        let hello: Hello = read_header_async(&mut rd).await?;
        let accepted = hello.version == DATA_PROTOCOL_VERSION;
        let reply = HelloReply {
            ok: accepted,
            error: if accepted {
                String::new()
            } else {
                format!("data protocol version {} not supported (this worker speaks {DATA_PROTOCOL_VERSION})", hello.version)
            },
            worker_id: self.worker_id.clone(),
            hostname: self.hostname.clone(),
        };
        wr.write_all(&encode_header(&reply)).await?;
        if !accepted {
            return Ok(());
        }
        loop {
            let req: ReadBlockRequest = read_header_async(&mut rd).await?;
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
            return Err(FsError::InvalidPath("block_size is zero".into()));
        }
        let block_len = src.block_len(req.index);
        if !req.local_path_only
            && (req.length > MAX_READ_LEN || req.offset.checked_add(req.length).is_none_or(|end| end > block_len))
        {
            return Err(FsError::InvalidPath(format!(
                "range {}+{} outside block {} of {block_len} bytes (or over {MAX_READ_LEN})",
                req.offset, req.length, req.index
            )));
        }
        let id = (req.file_id, req.index);
        // An eviction can race between lookup and open; one retry refetches.
        for attempt in 0..2 {
            let block = self.fetcher.get(id, &src).await?;
            if req.local_path_only {
                return Ok((
                    ReadBlockResponse {
                        request_id: req.request_id,
                        length: block.len,
                        local_path: block.path.to_string_lossy().into_owned(),
                        ..Default::default()
                    },
                    Vec::new(),
                ));
            }
            let (offset, length) = (req.offset, req.length as usize);
            let path = block.path.clone();
            let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let f = std::fs::File::open(path)?;
                let mut buf = vec![0u8; length];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await
            .map_err(|e| FsError::Io(e.to_string()))?;
            match data {
                Ok(buf) => {
                    metrics::counter!("granary_worker_served_bytes_total").increment(buf.len() as u64);
                    return Ok((
                        ReadBlockResponse {
                            request_id: req.request_id,
                            length: buf.len() as u64,
                            ..Default::default()
                        },
                        buf,
                    ));
                }
                Err(e) if attempt == 0 && e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Io("block vanished twice while being read".into()))
    }
}
