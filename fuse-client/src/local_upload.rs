//! Local uploads, client side: with a worker on this machine, a file's new content is
//! written straight into the UFS temp file that worker hands over (see `LocalUploadOpen`
//! in data.proto), and the worker is then asked to publish it. The bytes are written
//! once, instead of once into a staging file and again by the worker.

use std::fs::File;
use std::os::unix::net::UnixStream;

use granary_common::fd_passing::recv_file;
use granary_common::{FsError, FsResult};
use granary_protos::data::{
    LocalUploadComplete, LocalUploadOpen, LocalUploadOpened, WriteFileResponse,
};
use granary_protos::frame::{read_header, write_header};
use granary_protos::v1::{Inode, UfsFingerprint};

use crate::data_client::{status_error, UPLOAD_ANSWER_TIMEOUT};

pub struct LocalUpload {
    sock: UnixStream,
    file: File,
    socket: String,
    /// Where the worker will put the file: a rename on this mount since makes the upload
    /// go another way.
    pub ufs_path: Vec<u8>,
}

impl LocalUpload {
    /// Asks the worker listening on `socket` for a temp file for `file`'s new content.
    pub fn open(socket: &str, cluster_token: &str, file: &Inode) -> FsResult<LocalUpload> {
        let gone = |e: std::io::Error| FsError::Unavailable(format!("worker {socket}: {e}"));
        let mut sock = UnixStream::connect(socket).map_err(gone)?;
        sock.set_read_timeout(Some(UPLOAD_ANSWER_TIMEOUT))
            .map_err(gone)?;
        let open = LocalUploadOpen {
            cluster_token: cluster_token.to_string(),
            mount_id: file.mount_id,
            ufs_path: file.ufs_path.clone(),
        };
        write_header(&mut sock, &open).map_err(gone)?;
        let opened: LocalUploadOpened = read_header(&mut sock)
            .map_err(|e| FsError::Unavailable(format!("worker {socket}: {e}")))?;
        status_error(socket, opened.status, &opened.error)?;
        let file_handle = recv_file(&sock).map_err(gone)?;
        Ok(LocalUpload {
            sock,
            file: file_handle,
            socket: socket.to_string(),
            ufs_path: file.ufs_path.clone(),
        })
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
        let gone = |e: String| FsError::Unavailable(format!("worker {socket}: {e}"));
        let done = LocalUploadComplete {
            file_id: file.id,
            size,
            block_size: file.block_size,
            durable,
        };
        write_header(&mut self.sock, &done).map_err(|e| gone(e.to_string()))?;
        let resp: WriteFileResponse =
            read_header(&mut self.sock).map_err(|e| gone(e.to_string()))?;
        status_error(socket, resp.status, &resp.error)?;
        metrics::counter!("granary_client_uploaded_bytes_total").increment(size);
        Ok(UfsFingerprint {
            size: resp.size,
            mtime_ns: resp.mtime_ns,
        })
    }
}
