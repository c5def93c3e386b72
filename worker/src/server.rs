//! Starting a worker: open (and scan) the cache, listen on the data port, register with
//! the masters. Used by `granary-worker` and by `granary local`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use granary_common::config::ConfigError;
use granary_protos::v1::WorkerInfo;
use tokio::task::JoinHandle;

use crate::block_store::BlockStore;
use crate::config::WorkerConfig;
use crate::data_server::DataServer;
use crate::fetcher::BlockFetcher;
use crate::local_upload::{self, LocalUploads};
use crate::mounts::MountRegistry;
use crate::shards::ShardRegistrations;
use granary_common::auth::{AttachToken, CheckToken};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cache_dir {path}: {source}")]
    CacheDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cache_dir {0} is in use by another running worker (one cache_dir per worker: it holds the worker's id and blocks)")]
    CacheDirInUse(String),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error(transparent)]
    Tls(#[from] granary_common::tls::TlsError),
}

pub struct RunningWorker {
    pub worker_id: String,
    pub data_addr: SocketAddr,
    pub store: Arc<BlockStore>,
    pub links: Arc<ShardRegistrations>,
    /// The UFS mounts it has learned from its masters.
    pub mounts: Arc<MountRegistry>,
    tasks: Vec<JoinHandle<()>>,
    /// Holds the cache directory's lock while the worker runs.
    _lock: std::fs::File,
}

impl RunningWorker {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Locks `cache_dir` for this process: a second worker on it would register under the
/// same id, and the masters would keep whichever address registered last.
fn lock_cache_dir(cache_dir: &Path) -> Result<std::fs::File, WorkerError> {
    use std::os::fd::AsRawFd;
    let path = cache_dir.join("lock");
    let file = std::fs::File::create(&path).map_err(|source| WorkerError::CacheDir {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: an open descriptor; flock only changes its lock.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    let source = std::io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(WorkerError::CacheDirInUse(cache_dir.display().to_string())),
        // ENOLCK on a filesystem without locks (some NFS set-ups), for one.
        _ => Err(WorkerError::CacheDir {
            path: format!("{} (locking it)", path.display()),
            source,
        }),
    }
}

/// The worker's stable id, created on first start and kept in the cache directory so a
/// restarted worker is recognised as the same one.
fn worker_id(cache_dir: &Path) -> std::io::Result<String> {
    let path = cache_dir.join("worker_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = cache_dir.join("worker_id.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::rename(tmp, path)?;
            Ok(id)
        }
    }
}

pub async fn start(config: WorkerConfig) -> Result<RunningWorker, WorkerError> {
    config.validate()?;
    // The worker's calls to masters and routers.
    granary_common::tls::install_client(&config.tls)?;
    let cache_err = |source| WorkerError::CacheDir {
        path: config.cache_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.cache_dir).map_err(cache_err)?;
    let lock = lock_cache_dir(&config.cache_dir)?;
    let id = worker_id(&config.cache_dir).map_err(cache_err)?;
    let (dir, cap, hi, lo) = (
        config.cache_dir.clone(),
        config.capacity.0,
        config.high_watermark,
        config.low_watermark,
    );
    let (store, scan) = tokio::task::spawn_blocking(move || BlockStore::open(&dir, cap, hi, lo))
        .await
        .expect("cache scan task")
        .map_err(cache_err)?;
    let store = Arc::new(store);
    tracing::info!(worker = %id, blocks = scan.blocks, bytes = scan.bytes, discarded = scan.discarded, "cache scanned");

    let (listener, data_addr) = granary_common::net::bind(config.data_listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: config.data_listen,
            source,
        })?;
    let upload_socket = config.cache_dir.join("upload.sock");
    let upload_listener = local_upload::bind(&upload_socket).map_err(cache_err)?;
    let mounts = Arc::new(MountRegistry::new(config.s3.clone()));
    let hostname = crate::hostname();
    let info = WorkerInfo {
        worker_id: id.clone(),
        host: config.advertised_host(),
        data_port: data_addr.port() as u32,
        hostname: hostname.clone(),
        upload_socket: match &upload_listener {
            Some(_) => upload_socket.display().to_string(),
            None => String::new(),
        },
        ..Default::default()
    };
    let token = AttachToken::new(&config.cluster_token)
        .map_err(|e| ConfigError::invalid("cluster_token", e))?;
    let links = ShardRegistrations::start(
        config.masters.clone(),
        config.shards.clone(),
        info,
        store.clone(),
        mounts.clone(),
        token,
    );
    let fetcher = Arc::new(BlockFetcher::new(store.clone(), mounts.clone()));
    let server = Arc::new(DataServer {
        fetcher: fetcher.clone(),
        worker_id: id.clone(),
        hostname,
        token: CheckToken::new(&config.cluster_token),
        tls: config
            .tls
            .rustls_server()?
            .map(tokio_rustls::TlsAcceptor::from),
    });
    let mut tasks = vec![tokio::spawn(server.serve(listener))];
    if let Some(listener) = upload_listener {
        let uploads = Arc::new(LocalUploads {
            worker_id: id.clone(),
            fetcher,
            token: CheckToken::new(&config.cluster_token),
        });
        tasks.push(tokio::spawn(uploads.serve(listener, upload_socket)));
    }
    tracing::info!(worker = %id, %data_addr, "worker serving");
    Ok(RunningWorker {
        worker_id: id,
        data_addr,
        store,
        links,
        mounts,
        tasks,
        _lock: lock,
    })
}

/// Serves until SIGINT/SIGTERM (the `granary-worker` / `granary worker` entry point).
pub async fn run(config: WorkerConfig) -> Result<(), WorkerError> {
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(
            addr,
            &[granary_common::telemetry::WORKER_COUNTERS],
        )
        .map_err(WorkerError::Metrics)?;
    }
    let worker = start(config).await?;
    granary_common::telemetry::shutdown_signal().await;
    worker.stop();
    Ok(())
}
