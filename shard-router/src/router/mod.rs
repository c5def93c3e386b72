//! The `granary-router` daemon: serves the routing table to clients (which cache it and
//! route themselves) and, in proxy mode, metadata calls for clients that cannot route.
//! Shard 0's group keeps the table; routers keep none of their own.

mod config;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_common::auth::{AttachToken, CheckToken};
use granary_common::config::ConfigError;
use granary_common::FsError;
use granary_meta_client::ClientOptions;
use granary_protos::v1::namespace_server::NamespaceServer;
use granary_protos::v1::routing_server::RoutingServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

pub use config::RouterConfig;
use service::RouterService;

use crate::ShardedMetadata;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("shard 0's masters {masters:?} did not give a routing table: {error}")]
    Table {
        masters: Vec<String>,
        error: FsError,
    },
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("router server stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Tls(#[from] granary_common::tls::TlsError),
}

/// A router serving in the background.
pub struct RunningRouter {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningRouter {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        self.task.abort();
    }
}

pub async fn start(config: RouterConfig) -> Result<RunningRouter, RouterError> {
    config.validate()?;
    granary_common::tls::install_client(&config.tls)?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.grpc_server()? {
        server = server
            .tls_config(tls)
            .map_err(|e| RouterError::Stopped(format!("[tls]: {e}")))?;
    }
    let opts = ClientOptions {
        cluster_token: config.cluster_token.clone(),
        read_consistency: config.read_consistency,
        follower_reads: true,
        rpc_timeout: Duration::from_millis(config.rpc_timeout_ms),
        retry_deadline: Duration::from_millis(config.retry_deadline_ms),
        routing_version: None,
    };
    let masters = config.masters.clone();
    let meta = tokio::task::spawn_blocking(move || ShardedMetadata::connect(&masters, &opts))
        .await
        .map_err(|e| RouterError::Stopped(e.to_string()))?
        .map_err(|error| RouterError::Table {
            masters: config.masters.clone(),
            error,
        })?;
    let token = AttachToken::new(&config.cluster_token)
        .map_err(|e| ConfigError::invalid("cluster_token", e))?;
    let (listener, addr) = granary_common::net::bind(config.listen)
        .await
        .map_err(|source| RouterError::Listen {
            addr: config.listen,
            source,
        })?;
    let advertised = match &config.advertise {
        Some(a) => a.clone(),
        None if config.listen.port() == 0 => addr.to_string(),
        None => config.advertised(),
    };
    let service = Arc::new(RouterService {
        meta,
        token,
        advertised,
    });
    let check = CheckToken::new(&config.cluster_token);
    let routing = InterceptedService::new(RoutingServer::from_arc(service.clone()), check.clone());
    let namespace = config.proxy.then(|| {
        InterceptedService::new(
            NamespaceServer::from_arc(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            check,
        )
    });
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(
        server
            .add_service(routing)
            .add_optional_service(namespace)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            ),
    );
    tracing::info!(%addr, masters = ?config.masters, proxy = config.proxy, "router serving");
    Ok(RunningRouter {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// Serves until SIGINT/SIGTERM (the `granary-router` / `granary router` entry point).
pub async fn run(config: RouterConfig) -> Result<(), RouterError> {
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(addr, &[]).map_err(RouterError::Metrics)?;
    }
    let router = start(config).await?;
    granary_common::telemetry::shutdown_signal().await;
    router.stop().await;
    Ok(())
}
