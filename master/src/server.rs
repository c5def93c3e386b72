//! Starting a master: open the store, check the UFS, record the root mount, and serve the
//! gRPC API until shut down. Used by `granary-master` and by `granary local`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use granary_common::config::ConfigError;
use granary_common::ufs::{open_ufs, Ufs};
use granary_common::FsError;
use granary_protos::v1::admin_server::AdminServer;
use granary_protos::v1::namespace_server::NamespaceServer;
use granary_protos::v1::peer_server::PeerServer;
use granary_protos::v1::routing_server::RoutingServer;
use granary_protos::v1::workers_server::WorkersServer;
use granary_protos::v1::{command, Command, MountPoint, SetMount};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use granary_common::auth::{AttachToken, CheckToken};
use granary_protos::raft::raft_transport_server::RaftTransportServer;

use crate::block_locations::BlockLocations;
use crate::command_log::CommandLog;
use crate::config::MasterConfig;
use crate::deleted_files::DeletedFiles;
use crate::leader_clients::LeaderClients;
use crate::lease_reads::LeaseIndex;
use crate::loader::MetadataLoader;
use crate::raft::log_store::RaftLogStore;
use crate::raft::node::{NodeConfig, RaftNode};
use crate::raft::transport::{GrpcTransport, RaftService, MAX_RAFT_MESSAGE};
use crate::raft::{Mail, RaftLog, RaftStatus};
use crate::service::MasterService;
use crate::store::{NamespaceStore, StoreError};
use crate::table_follower::TableFollower;
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
    Ufs(#[source] FsError),
    #[error(transparent)]
    Raft(#[from] crate::raft::node::NodeError),
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
    #[error(transparent)]
    Tls(#[from] granary_common::tls::TlsError),
    #[error("[tls]: {0}")]
    TlsServer(String),
    #[error(
        "data_dir holds the namespace of {stored}, but config `ufs` is {configured}; \
         use a fresh data_dir to serve a different UFS"
    )]
    UfsChanged { stored: String, configured: String },
    #[error(
        "data_dir {path} is master {stored}'s, but config `id` is {configured}: a member \
         started on another's data_dir would take part in the group with that member's \
         votes and log. Fix `id`, or give this member a fresh data_dir (and add it with \
         `granary admin quorum add`)"
    )]
    MemberChanged {
        path: String,
        stored: u64,
        configured: u64,
    },
}

/// Checks that `data_dir` was first served by member `id`, recording it on a first start.
/// Kept beside the stores, not in them: an installed snapshot replaces the namespace
/// store with the leader's.
fn check_member_id(data_dir: &std::path::Path, id: u64) -> Result<(), MasterError> {
    let path = data_dir.join("member_id");
    let dir_err = |source| MasterError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(stored) if stored == id => Ok(()),
            Ok(stored) => Err(MasterError::MemberChanged {
                path: data_dir.display().to_string(),
                stored,
                configured: id,
            }),
            Err(_) => Err(dir_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a member id: {text:?}"),
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = data_dir.join("member_id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
                .map_err(dir_err)
        }
        Err(e) => Err(dir_err(e)),
    }
}

/// How long a stopping master lets calls in flight finish.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A master serving in the background.
pub struct RunningMaster {
    pub addr: SocketAddr,
    /// The namespace service for callers in this process (see
    /// [`granary_common::in_process`]).
    pub in_process: granary_common::in_process::LocalService,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    mailbox: std::sync::mpsc::Sender<Mail>,
    raft_thread: Option<std::thread::JoinHandle<()>>,
    raft_end: oneshot::Receiver<String>,
}

impl RunningMaster {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // A graceful stop waits for every client to hang up; idle connections (a
        // worker's channel, a mount's) may never do. After the bound the stop goes on
        // without them: their connection tasks end with the process's runtime.
        if tokio::time::timeout(STOP_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        for t in &self.background {
            t.abort();
        }
        let _ = self.mailbox.send(Mail::Shutdown);
        if let Some(t) = self.raft_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Waits until the server ends on its own (an error) — normally never.
    pub async fn wait(&mut self) -> Result<(), String> {
        tokio::select! {
            served = &mut self.task => match served {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Ok(why) = &mut self.raft_end => Err(why),
        }
    }
}

const ROOT_MOUNT_ID: u32 = 1;

pub async fn start(mut config: MasterConfig) -> Result<RunningMaster, MasterError> {
    config.validate()?;
    granary_common::tls::install_client(&config.tls)?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.grpc_server()? {
        server = server
            .tls_config(tls)
            .map_err(|e| MasterError::TlsServer(e.to_string()))?;
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| MasterError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let ufs = open_ufs(&config.ufs, &config.s3).map_err(MasterError::Ufs)?;
    {
        // Metadata already loaded stays served while the UFS is away: say so, go on.
        let ufs = ufs.clone();
        match tokio::task::spawn_blocking(move || ufs.check()).await {
            Ok(Err(e)) => {
                tracing::error!(ufs = %config.ufs, error = %e, "the UFS cannot be reached; serving what is loaded, loads fail until it is back")
            }
            Ok(Ok(())) => tracing::debug!(ufs = %config.ufs, "UFS reachable"),
            Err(_) => {}
        }
    }
    let store = Arc::new(NamespaceStore::open_with_cache(
        &config.data_dir.join("namespace.redb"),
        config.shard_id,
        config.store_cache.0,
    )?);
    check_member_id(&config.data_dir, config.id)?;
    if let Some(m) = store.mount_table()?.mounts.iter().find(|m| m.path == b"/") {
        let ufs = granary_common::ufs::normalized_uri;
        if ufs(&m.ufs_uri) != ufs(&config.ufs) {
            return Err(MasterError::UfsChanged {
                stored: m.ufs_uri.clone(),
                configured: config.ufs.clone(),
            });
        }
    }

    // Bound first, so a listen port of 0 is advertised as the port actually taken.
    let (listener, addr) = granary_common::net::bind(config.listen)
        .await
        .map_err(|source| MasterError::Listen {
            addr: config.listen,
            source,
        })?;
    // A port picked at startup differs from run to run: this member's address in the
    // stored master set is then replaced by today's, or workers and mounts would be told
    // yesterday's.
    let mut moved_to = None;
    if config.advertise.is_none() && config.listen.port() == 0 {
        let mut actual = config.listen;
        actual.set_port(addr.port());
        config.listen = actual;
        moved_to = Some(config.advertised());
    }
    let members = config.initial_members()?;
    // Only an initial member bootstraps; one not listed (or told to join) waits to be added.
    let bootstrap: &[(u64, String)] =
        if !config.join && members.iter().any(|(id, _)| *id == config.id) {
            &members
        } else {
            &[]
        };
    let log_store = RaftLogStore::open(
        &config.data_dir.join("raft.log"),
        config.id,
        store.clone(),
        bootstrap,
    )?;
    let cs = log_store.conf_state()?;
    if bootstrap.is_empty() && cs.voters.is_empty() && cs.learners.is_empty() {
        let ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        tracing::warn!(
            id = config.id,
            members = ?ids,
            "this master is in no group yet: it waits for `granary admin quorum add {} {}` \
             through the group's leader (if it should be one of `members`, fix `id` or `members`)",
            config.id,
            config.advertised()
        );
    }
    let (mailbox, inbox) = std::sync::mpsc::channel();
    let (applied_tx, applied_rx) = tokio::sync::watch::channel(store.applied()?.0);
    let status = Arc::new(RwLock::new(RaftStatus::default()));
    let (peer_key, peer_token) = match config.peer_token.as_str() {
        "" => ("cluster_token", config.cluster_token.as_str()),
        token => ("peer_token", token),
    };
    let attach_peer =
        AttachToken::new(peer_token).map_err(|e| ConfigError::invalid(peer_key, e))?;
    let transport = GrpcTransport::new(
        mailbox.clone(),
        tokio::runtime::Handle::current(),
        attach_peer.clone(),
    );
    let node = RaftNode::new(
        NodeConfig {
            id: config.id,
            tick: Duration::from_millis(config.raft_tick_ms),
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            snapshot_threshold: config.snapshot_threshold,
            initial_members: members,
            ephemeral_addr: moved_to,
        },
        store.clone(),
        log_store,
        Arc::new(transport),
        (mailbox.clone(), inbox),
        status.clone(),
        applied_tx,
    )?;
    // A master whose Ready loop ended would keep answering with a frozen status and
    // never vote again: its end (error or panic) ends the server too.
    let (raft_end_tx, raft_end) = oneshot::channel::<String>();
    let raft_thread = std::thread::Builder::new()
        .name("granary-raft".into())
        .spawn(move || {
            let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.run())) {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("raft node failed: {e}"),
                Err(_) => "the raft loop panicked".to_string(),
            };
            tracing::error!(reason = %why, "raft loop stopped; this master stops");
            let _ = raft_end_tx.send(why);
        })
        .map_err(|source| MasterError::DataDir {
            path: "raft thread".into(),
            source,
        })?;
    let raft = RaftLog::new(mailbox.clone(), status, applied_rx);

    let mut ufs_by_mount = HashMap::new();
    ufs_by_mount.insert(ROOT_MOUNT_ID, ufs.clone());
    let workers = Arc::new(WorkerRegistry::default());
    let locations = Arc::new(BlockLocations::default());
    let deleted = Arc::new(DeletedFiles::default());
    let leader_clients = Arc::new(LeaderClients::new(attach_peer));
    let loader = Arc::new(MetadataLoader::new(
        store.clone(),
        Arc::new(raft.clone()),
        ufs_by_mount,
        config.metadata_sync_interval.0,
    ));
    let settler = tokio::spawn(crate::unsettled::settle(
        loader.clone(),
        raft.clone(),
        leader_clients.clone(),
    ));
    let cluster_token = AttachToken::new(&config.cluster_token)
        .map_err(|e| ConfigError::invalid("cluster_token", e))?;
    let service = MasterService {
        store: store.clone(),
        raft: raft.clone(),
        loader,
        workers: workers.clone(),
        locations: locations.clone(),
        deleted: deleted.clone(),
        heartbeat_interval_ms: config.worker_heartbeat_ms,
        initialised: std::sync::atomic::AtomicBool::new(false),
        lease_index: LeaseIndex::start(raft.clone(), leader_clients.clone()),
        leader_clients,
        routing_follower: match config.shard_id {
            0 => TableFollower::none(),
            _ => TableFollower::start(
                config.routing.clone(),
                cluster_token.clone(),
                store.clone(),
                raft.clone(),
            ),
        },
        routing_changes: tokio::sync::Mutex::new(()),
    };

    let timeout = Duration::from_millis(config.worker_timeout_ms);
    let expiry = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            for id in workers.expire(timeout) {
                tracing::warn!(worker = %id, "worker lost: no heartbeat within {timeout:?}");
                locations.drop_worker(&id);
                deleted.forget(&id);
            }
        }
    });
    let table_masters = crate::table_masters::start(
        raft.clone(),
        store.clone(),
        cluster_token,
        config.routing.clone(),
    );
    let mount_setup = tokio::spawn(ensure_root_mount(
        store.clone(),
        raft.clone(),
        ufs,
        config.block_size.0,
    ));

    let (tx, rx) = oneshot::channel::<()>();
    // Each service checks the token of the callers it is for: the peer services (the
    // group's own calls) the peer token, the others the cluster token.
    let check = CheckToken::new(&config.cluster_token);
    let check_peer = CheckToken::for_peers(peer_token);
    let service = Arc::new(service);
    let namespace_svc = NamespaceServer::from_arc(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let workers_svc = WorkersServer::from_arc(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin_svc = AdminServer::from_arc(service.clone());
    let routing_svc = RoutingServer::from_arc(service.clone());
    let peer_svc = PeerServer::from_arc(service);
    let raft_svc = RaftTransportServer::new(RaftService {
        id: config.id,
        mailbox: mailbox.clone(),
        namespace: store.clone(),
    })
    .max_decoding_message_size(MAX_RAFT_MESSAGE)
    .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let namespace_svc = InterceptedService::new(namespace_svc, check.clone());
    let in_process = granary_common::in_process::local_service(
        namespace_svc.clone(),
        tokio::runtime::Handle::current(),
    );
    let task = tokio::spawn(
        server
            .add_service(namespace_svc)
            .add_service(InterceptedService::new(workers_svc, check.clone()))
            .add_service(InterceptedService::new(admin_svc, check.clone()))
            .add_service(InterceptedService::new(routing_svc, check))
            .add_service(InterceptedService::new(peer_svc, check_peer.clone()))
            .add_service(InterceptedService::new(raft_svc, check_peer))
            // Without TCP_NODELAY on accepted sockets every reply waits out the peer's
            // delayed ACK (40 ms), and the server's own nodelay setting does not reach
            // sockets from a listener passed in. TCP keepalive (answered by the peer's
            // kernel, so idle clients that poll nothing still answer) ends the raft streams
            // and connections of peers that vanished without closing them, e.g. across a
            // network partition; HTTP/2 pings would need every client to poll its idle
            // connections, which a mount's per-thread connections do not.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(10)))
                    .with_keepalive_interval(Some(Duration::from_secs(2)))
                    .with_keepalive_retries(Some(5)),
                async {
                    let _ = rx.await;
                },
            ),
    );
    tracing::info!(%addr, id = config.id, shard = config.shard_id, ufs = %config.ufs, "master serving");
    Ok(RunningMaster {
        addr,
        in_process,
        shutdown: Some(tx),
        task,
        background: vec![expiry, mount_setup, settler, table_masters],
        mailbox,
        raft_thread: Some(raft_thread),
        raft_end,
    })
}

/// Records the root mount once, through the log, as soon as this master leads and the
/// namespace has none (a fresh cluster).
async fn ensure_root_mount(
    store: Arc<NamespaceStore>,
    raft: RaftLog,
    ufs: Arc<dyn Ufs>,
    block_size: u64,
) {
    let uri = ufs.uri().to_string();
    let options = ufs.shared_options();
    loop {
        let root_mount = store
            .mount_table()
            .map(|t| t.mounts.into_iter().find(|m| m.path == b"/"));
        // Mounted with other options: this master rewrites them once it leads.
        let pause = match &root_mount {
            Ok(Some(_)) => Duration::from_secs(1),
            _ => Duration::from_millis(50),
        };
        match root_mount {
            Ok(Some(m)) if m.ufs_uri != uri => {
                tracing::error!(stored = %m.ufs_uri, configured = %uri, "the replicated namespace mounts a different UFS than this master's config");
                return;
            }
            Ok(Some(m)) if m.ufs_options == options => return,
            Ok(_) if raft.status().is_leader => {
                // Listed before proposing: apply does no I/O.
                let root = {
                    let ufs = ufs.clone();
                    tokio::task::spawn_blocking(move || ufs.stat(b"")).await
                };
                let (root_mtime_ns, root_mode) = match root {
                    Ok(Ok(o)) => (o.mtime_ns, o.mode),
                    _ => (0, 0o755),
                };
                let cmd = Command {
                    op: Some(command::Op::SetMount(SetMount {
                        mount: Some(MountPoint {
                            mount_id: ROOT_MOUNT_ID,
                            path: b"/".to_vec(),
                            ufs_uri: uri.clone(),
                            ufs_options: options.clone(),
                        }),
                        block_size,
                        root_mtime_ns,
                        root_mode,
                    })),
                };
                if let Err(e) = raft.propose(cmd).await {
                    tracing::warn!(error = %e, "recording the root mount failed; retrying");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the mount table"),
        }
        tokio::time::sleep(pause).await;
    }
}

/// Serves until SIGINT/SIGTERM (the `granary-master` / `granary master` entry point).
pub async fn run(config: MasterConfig) -> Result<(), MasterError> {
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(
            addr,
            &[granary_common::telemetry::MASTER_COUNTERS],
        )
        .map_err(MasterError::Stopped)?;
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
