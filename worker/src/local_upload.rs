//! Local uploads: the worker's Unix socket for clients on the same machine (protocol in
//! `LocalUploadOpen`, data.proto). The client writes a file's new content straight into
//! the UFS temp file this worker made and handed over, so the bytes cross no socket and
//! are not staged twice; a small file may instead come whole with its request and be
//! published at once. A connection carries one upload after another (the client keeps
//! it for its next file) and gets a thread of its own, since an upload lives as long as
//! the client's staged file; closing it before completing discards the temp file.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use granary_common::auth::CheckToken;
use granary_common::fd_passing::send_file;
use granary_common::ufs::UfsUpload;
use granary_common::{FsError, FsResult};
use granary_protos::data::{LocalUploadComplete, LocalUploadOpen, LocalUploadOpened};
use granary_protos::frame::{read_header, write_header, FrameError};
use tokio::net::UnixListener;

use crate::data_server::{status_of, upload_response};
use crate::fetcher::BlockFetcher;
use crate::uploader::{publish_local, upload_bytes, UploadTarget};

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Largest file a client may send whole (clients send far smaller ones).
const MAX_INLINE: u64 = 4 << 20;

pub struct LocalUploads {
    pub worker_id: String,
    pub fetcher: Arc<BlockFetcher>,
    pub token: CheckToken,
}

/// Binds the socket at `path` (replacing one a previous run left); `None` when the path
/// is too long for a socket address (clients then upload over the data port).
pub fn bind(path: &Path) -> std::io::Result<Option<UnixListener>> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        tracing::warn!(path = %path.display(), "upload socket path too long; local clients will upload over the data port");
        return Ok(None);
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path).map(Some)
}

impl LocalUploads {
    pub async fn serve(self: Arc<Self>, listener: UnixListener, path: PathBuf) {
        let _socket = RemoveOnDrop(path);
        loop {
            let sock = match listener.accept().await.and_then(|(s, _)| s.into_std()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "upload socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("granary-upload".into())
                .spawn(move || {
                    if let Err(e) = sock.set_nonblocking(false) {
                        tracing::warn!(error = %e, "upload connection setup failed");
                        return;
                    }
                    if let Err(e) = me.session(sock) {
                        if !e.is_eof() {
                            tracing::debug!(error = %e, "local upload connection closed");
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread for a local upload");
            }
        }
    }

    /// A new UFS upload for an authorised client.
    fn create(&self, req: &LocalUploadOpen) -> FsResult<Box<dyn UfsUpload>> {
        if !self.token.accepts(&req.cluster_token) {
            return Err(FsError::PermissionDenied(
                "wrong or missing cluster token".into(),
            ));
        }
        self.fetcher
            .mounts()
            .get(req.shard as u16, req.mount_id)?
            .create_upload(&req.ufs_path)
    }

    /// [`Self::create`], for a client that writes the temp file itself.
    fn open(&self, req: &LocalUploadOpen) -> FsResult<Box<dyn UfsUpload>> {
        let upload = self.create(req)?;
        if upload.local_file().is_none() {
            return Err(FsError::Unsupported(
                "this UFS has no local upload file".into(),
            ));
        }
        Ok(upload)
    }

    /// Serves uploads one after another until the client closes the connection.
    fn session(&self, mut sock: UnixStream) -> Result<(), FrameError> {
        loop {
            let open: LocalUploadOpen = match read_header(&mut sock) {
                Err(e) if e.is_eof() => return Ok(()),
                other => other?,
            };
            self.upload(&mut sock, open)?;
        }
    }

    fn upload(&self, sock: &mut UnixStream, open: LocalUploadOpen) -> Result<(), FrameError> {
        if let Some(done) = open.inline {
            return self.upload_inline(sock, open, done);
        }
        let upload = match self.open(&open) {
            Ok(u) => u,
            Err(e) => {
                let reply = LocalUploadOpened {
                    status: status_of(&e) as i32,
                    error: e.to_string(),
                    worker_id: self.worker_id.clone(),
                };
                return Ok(write_header(sock, &reply)?);
            }
        };
        let opened = LocalUploadOpened {
            worker_id: self.worker_id.clone(),
            ..Default::default()
        };
        write_header(sock, &opened)?;
        send_file(sock, upload.local_file().expect("checked at open"))?;
        // The client writes now; it ends by asking to complete, or by going away (the
        // upload is then dropped, which discards the temp file).
        let done: LocalUploadComplete = read_header(sock)?;
        let target = UploadTarget {
            file_id: done.file_id,
            ufs_path: open.ufs_path,
            size: done.size,
            block_size: done.block_size,
            durable: done.durable,
        };
        let outcome = publish_local(self.fetcher.store(), upload, &target);
        let resp = upload_response(0, &target.ufs_path, outcome);
        Ok(write_header(sock, &resp)?)
    }

    /// A small file sent whole: written to the UFS and the cache from the bytes received,
    /// then published.
    fn upload_inline(
        &self,
        sock: &mut UnixStream,
        open: LocalUploadOpen,
        done: LocalUploadComplete,
    ) -> Result<(), FrameError> {
        if done.size > MAX_INLINE {
            // The bytes that follow cannot be skipped cheaply: end the connection.
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "inline upload of {} bytes over the {MAX_INLINE}-byte limit",
                    done.size
                ),
            )));
        }
        let mut data = vec![0u8; done.size as usize];
        sock.read_exact(&mut data)?;
        let target = UploadTarget {
            file_id: done.file_id,
            ufs_path: open.ufs_path.clone(),
            size: done.size,
            block_size: done.block_size,
            durable: done.durable,
        };
        let outcome = self
            .create(&open)
            .and_then(|upload| upload_bytes(self.fetcher.store(), upload, &target, &data));
        let resp = upload_response(0, &target.ufs_path, outcome);
        Ok(write_header(sock, &resp)?)
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_store::{BlockStore, Fingerprint};
    use crate::mounts::MountRegistry;
    use granary_common::fd_passing::recv_file;
    use granary_common::ufs::LocalUfs;
    use granary_protos::data::WriteFileResponse;
    use std::os::unix::fs::FileExt;

    struct Setup {
        ufs_dir: tempfile::TempDir,
        _cache: tempfile::TempDir,
        socket: PathBuf,
        store: Arc<BlockStore>,
    }

    async fn setup() -> Setup {
        let ufs_dir = tempfile::tempdir().unwrap();
        let mounts = Arc::new(MountRegistry::default());
        mounts.insert(
            0,
            1,
            Arc::new(LocalUfs::open("file://test", ufs_dir.path().to_str().unwrap()).unwrap()),
        );
        let cache = tempfile::tempdir().unwrap();
        let (store, _) = BlockStore::open(cache.path(), 1 << 30, 0.9, 0.8).unwrap();
        let store = Arc::new(store);
        let socket = cache.path().join("upload.sock");
        let listener = bind(&socket).unwrap().expect("short path");
        let uploads = Arc::new(LocalUploads {
            worker_id: "w".into(),
            fetcher: Arc::new(BlockFetcher::new(store.clone(), mounts)),
            token: CheckToken::new("secret"),
        });
        tokio::spawn(uploads.serve(listener, socket.clone()));
        Setup {
            ufs_dir,
            _cache: cache,
            socket,
            store,
        }
    }

    fn ask(sock: &mut UnixStream, token: &str, path: &str) -> LocalUploadOpened {
        let req = LocalUploadOpen {
            shard: 0,
            cluster_token: token.into(),
            mount_id: 1,
            ufs_path: path.as_bytes().to_vec(),
            inline: None,
        };
        write_header(sock, &req).unwrap();
        read_header(sock).unwrap()
    }

    fn open(socket: &Path, token: &str, path: &str) -> (UnixStream, LocalUploadOpened) {
        let mut sock = UnixStream::connect(socket).unwrap();
        let opened = ask(&mut sock, token, path);
        (sock, opened)
    }

    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_written_file_is_published_whole_and_cached_block_by_block() {
        let s = setup().await;
        let socket = s.socket.clone();
        let ufs = s.ufs_dir.path().to_path_buf();
        let store = s.store.clone();
        tokio::task::spawn_blocking(move || {
            // Small: blocks copied through the page cache; big: with O_DIRECT, several at
            // once. Both end in a tail that is no whole sector. One connection carries both.
            let mut sock = UnixStream::connect(&socket).unwrap();
            for (name, size, block_size) in [
                ("small", 3 * 65536 + 1000, 65536u64),
                ("big", (8 << 20) + 1000, 1 << 20),
            ] {
                let data: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
                let opened = ask(&mut sock, "secret", name);
                assert_eq!(opened.status, 0, "{}", opened.error);
                let file = recv_file(&sock).unwrap();
                file.write_all_at(&data, 0).unwrap();
                assert!(!ufs.join(name).exists(), "nothing under the final name yet");
                let done = LocalUploadComplete {
                    file_id: size,
                    size,
                    block_size,
                    durable: true,
                };
                write_header(&mut sock, &done).unwrap();
                let resp: WriteFileResponse = read_header(&mut sock).unwrap();
                assert_eq!(resp.status, 0, "{}", resp.error);
                assert_eq!(resp.size, size);
                assert!(std::fs::read(ufs.join(name)).unwrap() == data);
                let fingerprint = Fingerprint {
                    size: resp.size,
                    mtime_ns: resp.mtime_ns,
                };
                for (index, chunk) in data.chunks(block_size as usize).enumerate() {
                    let block = store
                        .lookup((size, index as u32), fingerprint)
                        .expect("block cached");
                    assert!(
                        std::fs::read(&block.path).unwrap() == chunk,
                        "{name} block {index}"
                    );
                }
            }
            // A small file sent whole, on the same connection.
            let whole = b"sent whole with its request".to_vec();
            let req = LocalUploadOpen {
                shard: 0,
                cluster_token: "secret".into(),
                mount_id: 1,
                ufs_path: b"whole".to_vec(),
                inline: Some(LocalUploadComplete {
                    file_id: 42,
                    size: whole.len() as u64,
                    block_size: 65536,
                    durable: false,
                }),
            };
            write_header(&mut sock, &req).unwrap();
            std::io::Write::write_all(&mut sock, &whole).unwrap();
            let resp: WriteFileResponse = read_header(&mut sock).unwrap();
            assert_eq!(resp.status, 0, "{}", resp.error);
            assert_eq!(std::fs::read(ufs.join("whole")).unwrap(), whole);
            let fingerprint = Fingerprint {
                size: resp.size,
                mtime_ns: resp.mtime_ns,
            };
            let block = store.lookup((42, 0), fingerprint).expect("cached");
            assert_eq!(std::fs::read(block.path).unwrap(), whole);
            assert_eq!(
                visible(&ufs),
                vec!["big".to_string(), "small".to_string(), "whole".to_string()]
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_client_that_goes_away_or_lies_leaves_nothing_behind() {
        let s = setup().await;
        let socket = s.socket.clone();
        let ufs = s.ufs_dir.path().to_path_buf();
        std::fs::write(ufs.join("old"), b"previous version").unwrap();
        tokio::task::spawn_blocking(move || {
            let (mut sock, opened) = open(&socket, "wrong", "f");
            assert_ne!(opened.status, 0, "a wrong token is refused");

            // Too big to come whole: the connection ends, nothing is written.
            let mut big = UnixStream::connect(&socket).unwrap();
            let req = LocalUploadOpen {
                shard: 0,
                cluster_token: "secret".into(),
                mount_id: 1,
                ufs_path: b"huge".to_vec(),
                inline: Some(LocalUploadComplete {
                    file_id: 7,
                    size: MAX_INLINE + 1,
                    block_size: 65536,
                    durable: false,
                }),
            };
            write_header(&mut big, &req).unwrap();
            assert!(read_header::<WriteFileResponse, _>(&mut big).is_err());

            let opened = ask(&mut sock, "secret", "old");
            assert_eq!(opened.status, 0, "{}", opened.error);
            let file = recv_file(&sock).unwrap();
            file.write_all_at(b"half of a new version", 0).unwrap();
            drop(sock);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while visible(&ufs).len() > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(
                visible(&ufs),
                vec!["old".to_string()],
                "temp file discarded"
            );

            // A size that is not what the file holds is refused; the old version stays.
            let (mut sock, _) = open(&socket, "secret", "old");
            let file = recv_file(&sock).unwrap();
            file.write_all_at(b"short", 0).unwrap();
            let done = LocalUploadComplete {
                file_id: 1,
                size: 100,
                block_size: 65536,
                durable: false,
            };
            write_header(&mut sock, &done).unwrap();
            let resp: WriteFileResponse = read_header(&mut sock).unwrap();
            assert_ne!(resp.status, 0);
            assert_eq!(std::fs::read(ufs.join("old")).unwrap(), b"previous version");
        })
        .await
        .unwrap();
    }
}
