//! The write path through workers: where a staged file's bytes live while it is written
//! (memory, a local upload's temp file, or an anonymous file here) and how they reach the
//! UFS at a close or fsync (published by the worker on this machine, or uploaded over the
//! data port when there is none or it fails). Committing the stored version through the
//! leader is the filesystem's business.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use granary_common::ids::shard_of;
use granary_common::{FsError, FsResult};
use granary_protos::data::WriteFileRequest;
use granary_protos::v1::{Inode, UfsFingerprint};

use crate::data_client::DataClient;
use crate::local_upload::{LocalUpload, UploadConnections};
use crate::staging::{Backing, SMALL_FILE_MAX};
use crate::worker_list::{data_addr, hashed, with_retries, WorkerList};
use granary_common::memory::MemoryLimiter;

/// A staged file's content, stored in the UFS.
pub struct Stored {
    pub fingerprint: UfsFingerprint,
    /// Where the content still is here: `None` when the backing itself became the UFS
    /// object (a worker published it), so what is written next starts from the committed
    /// content.
    pub kept: Option<Backing>,
}

/// A store that failed; the content is still in `backing`, for the next try.
pub struct NotStored {
    pub error: FsError,
    pub backing: Backing,
}

/// Where file content goes on its way to the UFS.
pub trait ContentStore: Send + Sync {
    /// A fresh backing for a staged file of `file` that must hold `end` bytes.
    fn backing(&self, file: &Inode, end: u64) -> FsResult<Backing>;

    /// Stores `size` bytes of `backing` as `file`'s new content in the UFS, durably
    /// against machine crashes if asked.
    fn store(
        &self,
        file: &Inode,
        backing: Backing,
        size: u64,
        durable: bool,
    ) -> Result<Stored, NotStored>;
}

pub struct WorkerContentStore {
    workers: Arc<WorkerList>,
    data: Arc<DataClient>,
    uploads: Arc<UploadConnections>,
    cluster_token: String,
    /// Where anonymous staging files are made.
    staging_dir: PathBuf,
    memory: Arc<MemoryLimiter>,
}

impl WorkerContentStore {
    pub fn new(
        workers: Arc<WorkerList>,
        data: Arc<DataClient>,
        cluster_token: String,
        staging_dir: PathBuf,
        memory: Arc<MemoryLimiter>,
    ) -> FsResult<Self> {
        std::fs::create_dir_all(&staging_dir).map_err(|e| {
            FsError::io_from(
                format!("staging directory {}: {e}", staging_dir.display()),
                e,
            )
        })?;
        Ok(WorkerContentStore {
            workers,
            data,
            uploads: Arc::default(),
            cluster_token,
            staging_dir,
            memory,
        })
    }

    /// An anonymous file in the staging directory.
    fn own_file(&self) -> FsResult<File> {
        tempfile::tempfile_in(&self.staging_dir).map_err(|e| {
            FsError::io_from(
                format!("staging file in {}: {e}", self.staging_dir.display()),
                e,
            )
        })
    }

    /// Uploads a file of this mount over the data port; it stays the backing.
    fn upload_own(
        &self,
        file: &Inode,
        own: File,
        size: u64,
        durable: bool,
    ) -> Result<Stored, NotStored> {
        match self.upload(file, size, &own, durable) {
            Ok(fingerprint) => Ok(Stored {
                fingerprint,
                kept: Some(Backing::Own(own)),
            }),
            Err(error) => Err(NotStored {
                error,
                backing: Backing::Own(own),
            }),
        }
    }

    /// Sends `size` bytes of `source` to a worker, which stores them in the UFS.
    fn upload(
        &self,
        file: &Inode,
        size: u64,
        source: &File,
        durable: bool,
    ) -> FsResult<UfsFingerprint> {
        let fingerprint = with_retries("upload", file.id, |refresh| {
            let workers = self
                .data
                .usable(&self.workers.live(shard_of(file.id), refresh)?);
            // The co-located worker caches what it uploads for this node's next read.
            let worker = self
                .workers
                .local(&workers)
                .unwrap_or_else(|| hashed(&workers, file.id, 0));
            let req = WriteFileRequest {
                request_id: 0,
                file_id: file.id,
                mount_id: file.mount_id,
                ufs_path: file.ufs_path.clone(),
                size,
                block_size: file.block_size,
                durable,
            };
            let addr = data_addr(&worker);
            let r = self.data.upload(&addr, req, source);
            if r.as_ref().is_err_and(|e| e.is_retryable()) {
                self.data.forget(&addr);
            }
            r.map(|r| UfsFingerprint {
                size: r.size,
                mtime_ns: r.mtime_ns,
            })
        })?;
        metrics::counter!("granary_client_uploaded_bytes_total").increment(size);
        Ok(fingerprint)
    }
}

impl ContentStore for WorkerContentStore {
    /// Memory for a small file where the worker on this machine takes files whole (and
    /// the mount's buffer memory allows), else the temp file of a local upload, else an
    /// anonymous file here.
    fn backing(&self, file: &Inode, end: u64) -> FsResult<Backing> {
        let socket = self.workers.local_upload_socket(shard_of(file.id));
        if let Some(socket) = socket.clone().filter(|_| end <= SMALL_FILE_MAX) {
            if let Some(memory) = self.memory.try_reserve(end) {
                return Ok(Backing::Memory {
                    socket,
                    data: Vec::new(),
                    memory,
                });
            }
        }
        if let Some(socket) = socket {
            match LocalUpload::open(&self.uploads, &socket, &self.cluster_token, file) {
                Ok(u) => return Ok(Backing::Worker(u)),
                Err(e) => tracing::debug!(error = %e, "no local upload; staging the file here"),
            }
        }
        Ok(Backing::Own(self.own_file()?))
    }

    fn store(
        &self,
        file: &Inode,
        backing: Backing,
        size: u64,
        durable: bool,
    ) -> Result<Stored, NotStored> {
        match backing {
            Backing::Memory {
                socket,
                data,
                memory,
            } => {
                match LocalUpload::put(
                    &self.uploads,
                    &socket,
                    &self.cluster_token,
                    file,
                    &data,
                    durable,
                ) {
                    Ok(fingerprint) => Ok(Stored {
                        fingerprint,
                        kept: None,
                    }),
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(ino = file.id, error = %e, "publishing through the local worker failed; uploading over the data port");
                        let moved = self.own_file().and_then(|own| {
                            std::os::unix::fs::FileExt::write_all_at(&own, &data, 0)?;
                            Ok(own)
                        });
                        match moved {
                            Ok(own) => self.upload_own(file, own, size, durable),
                            Err(error) => Err(NotStored {
                                error,
                                backing: Backing::Memory {
                                    socket,
                                    data,
                                    memory,
                                },
                            }),
                        }
                    }
                    Err(error) => Err(NotStored {
                        error,
                        backing: Backing::Memory {
                            socket,
                            data,
                            memory,
                        },
                    }),
                }
            }
            // The staged file is the UFS temp file: the worker renames it into place.
            Backing::Worker(mut u) if u.ufs_path == file.ufs_path => {
                match u.complete(file, size, durable) {
                    Ok(fingerprint) => Ok(Stored {
                        fingerprint,
                        kept: None,
                    }),
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(ino = file.id, error = %e, "local upload failed; uploading over the data port");
                        self.upload_own(file, u.into_file(), size, durable)
                    }
                    Err(error) => Err(NotStored {
                        error,
                        backing: Backing::Own(u.into_file()),
                    }),
                }
            }
            // Renamed on this mount since the local upload began: it would land under
            // the old name.
            Backing::Worker(u) => self.upload_own(file, u.into_file(), size, durable),
            Backing::Own(own) => self.upload_own(file, own, size, durable),
        }
    }
}
