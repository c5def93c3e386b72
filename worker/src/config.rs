//! `granary-worker` configuration (TOML).

use std::net::SocketAddr;
use std::path::PathBuf;

use granary_common::bytesize::ByteSize;
use granary_common::config::ConfigError;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Where the routing table comes from (`host:port`): shard 0's masters, or routers.
    /// The worker registers with every master of every shard the table lists and follows
    /// the master set each shard's leader announces.
    pub masters: Vec<String>,
    /// Register only with these shards (workers of a separate cluster that serves some
    /// shards); empty: every shard.
    pub shards: Vec<u16>,
    /// The cluster's shared token (see the master's `cluster_token`).
    pub cluster_token: String,
    /// Block data protocol listen address.
    pub data_listen: SocketAddr,
    /// Host name or IP clients use to reach this worker; default: the listen IP, or this
    /// machine's hostname when listening on all interfaces.
    pub advertise_host: Option<String>,
    /// Directory holding cached blocks (local NVMe).
    pub cache_dir: PathBuf,
    /// Most bytes the cache may hold.
    pub capacity: ByteSize,
    /// Eviction starts above this fraction of capacity...
    pub high_watermark: f64,
    /// ...and stops at this one.
    pub low_watermark: f64,
    /// Prometheus `/metrics` listen address; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// How this worker reaches an `s3://` UFS (`[s3]`): credentials, and overrides of
    /// the endpoint, region and addressing style the masters' mount carries. Unset keys
    /// come from the mount, then the AWS environment.
    pub s3: granary_common::ufs::S3Options,
    /// TLS (`[tls]`): `cert`/`key` serve the data port over TLS, `ca` makes the calls to
    /// masters and routers TLS.
    pub tls: granary_common::tls::TlsOptions,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            masters: vec!["127.0.0.1:19998".into()],
            shards: Vec::new(),
            cluster_token: String::new(),
            data_listen: "127.0.0.1:19999".parse().expect("valid"),
            advertise_host: None,
            cache_dir: PathBuf::from("/var/cache/granary/worker"),
            capacity: ByteSize(100 << 30),
            high_watermark: 0.95,
            low_watermark: 0.85,
            metrics_listen: None,
            s3: Default::default(),
            tls: Default::default(),
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.masters.is_empty() {
            return Err(ConfigError::invalid(
                "masters",
                "at least one master address is required",
            ));
        }
        for m in &self.masters {
            if !m.contains(':') {
                return Err(ConfigError::invalid(
                    "masters",
                    format!("`{m}` is not host:port"),
                ));
            }
        }
        if self.capacity.0 == 0 {
            return Err(ConfigError::invalid(
                "capacity",
                "must be greater than zero",
            ));
        }
        if !(0.0..=1.0).contains(&self.high_watermark) || self.high_watermark == 0.0 {
            return Err(ConfigError::invalid("high_watermark", "must be in (0, 1]"));
        }
        if !(0.0..self.high_watermark).contains(&self.low_watermark) {
            return Err(ConfigError::invalid(
                "low_watermark",
                "must be in [0, high_watermark)",
            ));
        }
        Ok(())
    }

    pub fn advertised_host(&self) -> String {
        if let Some(h) = &self.advertise_host {
            return h.clone();
        }
        let ip = self.data_listen.ip();
        if ip.is_unspecified() {
            crate::hostname()
        } else {
            ip.to_string()
        }
    }
}
