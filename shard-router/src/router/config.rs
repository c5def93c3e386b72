//! `granary-router` configuration (TOML).

use std::net::SocketAddr;

use granary_common::config::ConfigError;
use granary_common::consistency::ReadConsistency;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// gRPC address clients and admins reach this router on.
    pub listen: SocketAddr,
    /// How clients reach it (what it answers for its own address); default: `listen`.
    pub advertise: Option<String>,
    /// Shard 0's masters (`host:port`): where the routing table is kept.
    pub masters: Vec<String>,
    /// The cluster's shared token (see the master's `cluster_token`).
    pub cluster_token: String,
    /// Serve metadata calls for clients that cannot route themselves (proxy mode).
    pub proxy: bool,
    /// Consistency of the metadata reads this router makes for proxied clients.
    pub read_consistency: ReadConsistency,
    /// One metadata call's timeout, and how long a call retries before failing.
    pub rpc_timeout_ms: u64,
    pub retry_deadline_ms: u64,
    /// Prometheus `/metrics` listen address; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS (`[tls]`): `cert`/`key` serve over TLS, `ca` makes the calls to masters TLS.
    pub tls: granary_common::tls::TlsOptions,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: "127.0.0.1:19997".parse().expect("valid"),
            advertise: None,
            masters: vec!["127.0.0.1:19998".into()],
            cluster_token: String::new(),
            proxy: true,
            read_consistency: ReadConsistency::Linearizable,
            rpc_timeout_ms: 5_000,
            retry_deadline_ms: 20_000,
            tls: Default::default(),
            metrics_listen: None,
        }
    }
}

impl RouterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.masters.is_empty() {
            return Err(ConfigError::invalid(
                "masters",
                "shard 0's master addresses are required (the routing table is kept there)",
            ));
        }
        if let Some(m) = self.masters.iter().find(|m| !m.contains(':')) {
            return Err(ConfigError::invalid(
                "masters",
                format!("`{m}` is not host:port"),
            ));
        }
        if self.rpc_timeout_ms == 0 || self.retry_deadline_ms < self.rpc_timeout_ms {
            return Err(ConfigError::invalid(
                "retry_deadline_ms",
                "rpc_timeout_ms must be non-zero and retry_deadline_ms at least as long",
            ));
        }
        Ok(())
    }

    /// The address this router gives out as its own.
    pub fn advertised(&self) -> String {
        granary_common::net::advertised(self.advertise.as_ref(), self.listen)
    }
}
