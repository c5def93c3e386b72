//! Starting a master: open the store, check the UFS, record the root mount, and serve the
//! gRPC API until shut down. Used by `granary-master` and by `granary local`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_common::config::ConfigError;
use granary_common::ufs::open_ufs;
use granary_common::FsError;
use granary_protos::v1::master_server::MasterServer;
use granary_protos::v1::{command, Command, MountPoint, SetMount};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::block_locations::BlockLocations;
use crate::command_log::{CommandLog, LocalLog};
use crate::config::MasterConfig;
use crate::loader::MetadataLoader;
use crate::service::MasterService;
use crate::store::{NamespaceStore, StoreError};
use crate::workers::WorkerRegistry;

/// Largest gRPC message accepted (big directory pages, block lists of large workers).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("under-storage: {0}")]
    Ufs(FsError),
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("master server stopped: {0}")]
    Stopped(String),
    #[error(
        "data_dir holds the namespace of {stored}, but config `ufs` is {configured}; \
         use a fresh data_dir to serve a different UFS"
    )]
    UfsChanged { stored: String, configured: String },
}

/// A master serving in the background.
pub struct RunningMaster {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningMaster {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }

    /// Waits until the server ends on its own (an error) — normally never.
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

pub async fn start(mut config: MasterConfig) -> Result<RunningMaster, MasterError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| MasterError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let ufs = open_ufs(&config.ufs).map_err(MasterError::Ufs)?;
    let store = Arc::new(NamespaceStore::open(
        &config.data_dir.join("namespace.redb"),
        config.shard_id,
    )?);
    let log = Arc::new(LocalLog::start(store.clone())?);

    const ROOT_MOUNT_ID: u32 = 1;
    let mounts = store.mount_table()?;
    match mounts.mounts.iter().find(|m| m.path == b"/") {
        Some(m) if m.ufs_uri != config.ufs => {
            return Err(MasterError::UfsChanged {
                stored: m.ufs_uri.clone(),
                configured: config.ufs.clone(),
            })
        }
        Some(_) => {}
        None => {
            let cmd = Command {
                op: Some(command::Op::SetMount(SetMount {
                    mount: Some(MountPoint {
                        mount_id: ROOT_MOUNT_ID,
                        path: b"/".to_vec(),
                        ufs_uri: config.ufs.clone(),
                    }),
                    block_size: config.block_size.0,
                })),
            };
            log.propose(cmd).await.map_err(MasterError::Ufs)?;
        }
    }
    let mut ufs_by_mount = HashMap::new();
    ufs_by_mount.insert(ROOT_MOUNT_ID, ufs);

    let workers = Arc::new(WorkerRegistry::default());
    let locations = Arc::new(BlockLocations::default());
    let service = MasterService {
        store: store.clone(),
        loader: Arc::new(MetadataLoader::new(store.clone(), log, ufs_by_mount)),
        workers: workers.clone(),
        locations: locations.clone(),
        heartbeat_interval_ms: config.worker_heartbeat_ms,
    };

    let timeout = Duration::from_millis(config.worker_timeout_ms);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            for id in workers.expire(timeout) {
                tracing::warn!(worker = %id, "worker lost: no heartbeat within {timeout:?}");
                locations.drop_worker(&id);
            }
        }
    });

    let (listener, addr) = granary_common::net::bind(config.listen)
        .await
        .map_err(|source| MasterError::Listen {
            addr: config.listen,
            source,
        })?;
    let (tx, rx) = oneshot::channel::<()>();
    let svc = MasterServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            }),
    );
    tracing::info!(%addr, shard = config.shard_id, ufs = %config.ufs, "master serving");
    Ok(RunningMaster {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// Serves until SIGINT/SIGTERM (the `granary-master` / `granary master` entry point).
pub async fn run(config: MasterConfig) -> Result<(), MasterError> {
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(addr).map_err(MasterError::Stopped)?;
    }
    let mut master = start(config).await?;
    tokio::select! {
        r = master.wait() => r.map_err(MasterError::Stopped),
        _ = granary_common::telemetry::shutdown_signal() => {
            master.stop().await;
            Ok(())
        }
    }
}
