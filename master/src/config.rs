//! `granary-master` configuration (TOML). Every key has a default except `ufs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use granary_common::blocks::DEFAULT_BLOCK_SIZE;
use granary_common::bytesize::ByteSize;
use granary_common::config::ConfigError;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MasterConfig {
    /// Metadata shard this master serves (high 16 bits of every inode id).
    pub shard_id: u16,
    /// gRPC listen address for clients, workers and admin.
    pub listen: SocketAddr,
    /// Where the namespace store lives.
    pub data_dir: PathBuf,
    /// Under-storage mounted at the namespace root: `file:///path` (or a plain absolute path).
    pub ufs: String,
    /// Block size for files loaded from now on.
    pub block_size: ByteSize,
    /// Prometheus `/metrics` listen address; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Interval workers are asked to heartbeat at.
    pub worker_heartbeat_ms: u64,
    /// A worker silent this long is considered lost.
    pub worker_timeout_ms: u64,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            shard_id: 0,
            listen: "127.0.0.1:19998".parse().expect("valid"),
            data_dir: PathBuf::from("/var/lib/granary/master"),
            ufs: String::new(),
            block_size: ByteSize(DEFAULT_BLOCK_SIZE),
            metrics_listen: None,
            worker_heartbeat_ms: 1000,
            worker_timeout_ms: 10_000,
        }
    }
}

impl MasterConfig {
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.ufs.is_empty() {
            return Err(ConfigError::invalid(
                "ufs",
                "required: the under-storage URI, e.g. file:///data/datasets",
            ));
        }
        if self.ufs.starts_with('/') {
            self.ufs = format!("file://{}", self.ufs);
        }
        if !(64 << 10..=4 << 30).contains(&self.block_size.0) {
            return Err(ConfigError::invalid(
                "block_size",
                "must be between 64KiB and 4GiB",
            ));
        }
        if self.worker_heartbeat_ms == 0 || self.worker_timeout_ms <= self.worker_heartbeat_ms {
            return Err(ConfigError::invalid(
                "worker_timeout_ms",
                "must be larger than worker_heartbeat_ms (and both non-zero)",
            ));
        }
        Ok(())
    }
}
