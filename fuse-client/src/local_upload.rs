//! Local uploads, client side: with a worker on this machine, a file's new content is
//! written straight into the UFS temp file that worker hands over (see `LocalUploadOpen`
//! in data.proto), and the worker is then asked to publish it. The bytes are written
//! once, instead of once into a staging file and again by the worker. A small file kept
//! in memory is sent whole instead ([`LocalUpload::put`]): one exchange, no descriptor.
//! A connection that finished an upload is kept for the next one (small files come in
//! thousands).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use granary_common::fd_passing::recv_file;
use granary_common::{FsError, FsResult};
use granary_protos::data::{
    LocalUploadComplete, LocalUploadOpen, LocalUploadOpened, WriteFileResponse,
};
use granary_protos::frame::{read_header, write_header, FrameError};
use granary_protos::v1::{Inode, UfsFingerprint};

use crate::data_client::{status_error, UPLOAD_ANSWER_TIMEOUT};

/// Idle connections to each local worker's upload socket.
#[derive(Default)]
pub struct UploadConnections {
    idle: Mutex<HashMap<String, Vec<UnixStream>>>,
}

/// Idle connections kept per socket; each holds a worker thread.
const MAX_IDLE: usize = 16;

impl UploadConnections {
    fn take(&self, socket: &str) -> Option<UnixStream> {
        self.idle.lock().expect("idle lock").get_mut(socket)?.pop()
    }

    fn put(&self, socket: &str, sock: UnixStream) {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.entry(socket.to_string()).or_default();
        if list.len() < MAX_IDLE {
            list.push(sock);
        }
    }
}

pub struct LocalUpload {
    /// `None` once the upload completed and the connection went back to the pool.
    sock: Option<UnixStream>,
    conns: Arc<UploadConnections>,
    file: File,
    socket: String,
    /// Where the worker will put the file: a rename on this mount since makes the upload
    /// go another way.
    pub ufs_path: Vec<u8>,
}

impl LocalUpload {
    /// Asks the worker listening on `socket` for a temp file for `file`'s new content.
    pub fn open(
        conns: &Arc<UploadConnections>,
        socket: &str,
        cluster_token: &str,
        file: &Inode,
    ) -> FsResult<LocalUpload> {
        let open = LocalUploadOpen {
            cluster_token: cluster_token.to_string(),
            mount_id: file.mount_id,
            ufs_path: file.ufs_path.clone(),
            inline: None,
            shard: granary_common::ids::shard_of(file.id) as u32,
        };
        // An idle connection may be dead (the worker restarted): then a fresh one.
        let (sock, opened) = match conns.take(socket).map(|s| Self::ask(s, &open)) {
            Some(Ok(asked)) => Ok(asked),
            _ => Self::ask(Self::connect(socket)?, &open),
        }
        .map_err(|e| gone(socket, e))?;
        if let Err(e) = status_error(socket, opened.status, &opened.error) {
            // A refusal ends the exchange: the connection serves the next one.
            conns.put(socket, sock);
            return Err(e);
        }
        let file_handle = recv_file(&sock).map_err(|e| gone(socket, e))?;
        Ok(LocalUpload {
            sock: Some(sock),
            conns: conns.clone(),
            file: file_handle,
            socket: socket.to_string(),
            ufs_path: file.ufs_path.clone(),
        })
    }

    /// Publishes `data` as `file`'s whole content through the worker listening on
    /// `socket`; returns the fingerprint of the object now in the UFS.
    pub fn put(
        conns: &Arc<UploadConnections>,
        socket: &str,
        cluster_token: &str,
        file: &Inode,
        data: &[u8],
        durable: bool,
    ) -> FsResult<UfsFingerprint> {
        let open = LocalUploadOpen {
            cluster_token: cluster_token.to_string(),
            mount_id: file.mount_id,
            ufs_path: file.ufs_path.clone(),
            inline: Some(LocalUploadComplete {
                file_id: file.id,
                size: data.len() as u64,
                block_size: file.block_size,
                durable,
            }),
            shard: granary_common::ids::shard_of(file.id) as u32,
        };
        let send = |mut sock: UnixStream| -> Result<(UnixStream, WriteFileResponse), FrameError> {
            write_header(&mut sock, &open)?;
            sock.write_all(data)?;
            let resp = read_header(&mut sock)?;
            Ok((sock, resp))
        };
        // Publishing the same bytes twice is harmless: a dead idle connection is retried
        // on a fresh one.
        let (sock, resp) = match conns.take(socket).map(send) {
            Some(Ok(sent)) => Ok(sent),
            _ => send(Self::connect(socket)?),
        }
        .map_err(|e| gone(socket, e))?;
        published(conns, socket, sock, &resp, data.len() as u64)
    }

    fn connect(socket: &str) -> FsResult<UnixStream> {
        let sock = UnixStream::connect(socket).map_err(|e| gone(socket, e))?;
        sock.set_read_timeout(Some(UPLOAD_ANSWER_TIMEOUT))
            .map_err(|e| gone(socket, e))?;
        Ok(sock)
    }

    fn ask(
        mut sock: UnixStream,
        open: &LocalUploadOpen,
    ) -> Result<(UnixStream, LocalUploadOpened), FrameError> {
        write_header(&mut sock, open)?;
        let opened = read_header(&mut sock)?;
        Ok((sock, opened))
    }

    /// The file to write the content into.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Starts writing the range to disk without waiting for it (an upload is made
    /// durable or at least written back anyway; starting early spreads the work).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a descriptor we own; failure only loses the hint.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Gives up the upload (the worker discards its temp file); the content stays
    /// readable through the returned file.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Publishes the file's `size` bytes as `file`'s content; returns the fingerprint of
    /// the object now in the UFS.
    pub fn complete(&mut self, file: &Inode, size: u64, durable: bool) -> FsResult<UfsFingerprint> {
        let socket = &self.socket;
        let mut sock = self
            .sock
            .take()
            .ok_or_else(|| gone(socket, "upload already completed"))?;
        let done = LocalUploadComplete {
            file_id: file.id,
            size,
            block_size: file.block_size,
            durable,
        };
        write_header(&mut sock, &done).map_err(|e| gone(socket, e))?;
        let resp: WriteFileResponse = read_header(&mut sock).map_err(|e| gone(socket, e))?;
        published(&self.conns, socket, sock, &resp, size)
    }
}

/// The end of a publishing exchange: the connection is free for the next one.
fn published(
    conns: &UploadConnections,
    socket: &str,
    sock: UnixStream,
    resp: &WriteFileResponse,
    size: u64,
) -> FsResult<UfsFingerprint> {
    conns.put(socket, sock);
    status_error(socket, resp.status, &resp.error)?;
    metrics::counter!("granary_client_uploaded_bytes_total").increment(size);
    Ok(UfsFingerprint {
        size: resp.size,
        mtime_ns: resp.mtime_ns,
    })
}

fn gone(socket: &str, e: impl std::fmt::Display) -> FsError {
    FsError::Unavailable(format!("worker {socket}: {e}"))
}
