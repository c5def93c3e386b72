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
    /// This master's id in its shard's Raft group (non-zero, unique in the group).
    pub id: u64,
    /// Metadata shard this master serves (high 16 bits of every inode id).
    pub shard_id: u16,
    /// gRPC listen address for clients, workers, admin and Raft peers.
    pub listen: SocketAddr,
    /// Address other parts use to reach this master; default: `listen` (or the hostname
    /// with `listen`'s port when listening on all interfaces).
    pub advertise: Option<String>,
    /// The group's initial members as `"id@host:port"`; default: this master alone. A
    /// master not listed here joins an existing group (`granary admin quorum add`).
    pub members: Vec<String>,
    /// Start empty and wait to be added with `granary admin quorum add` (a new member, or
    /// a wiped one rejoining), instead of bootstrapping from `members`.
    pub join: bool,
    /// Shared secret every cluster RPC must carry; empty disables the check.
    pub cluster_token: String,
    /// Where a shard other than 0 gets the routing table: routers or shard 0's masters
    /// (`host:port`). Shard 0 keeps the table itself.
    pub routing: Vec<String>,
    /// Secret only the masters of this group share, for the calls between them (Raft
    /// messages, read indexes, forwarded loads): set, it keeps clients that know the
    /// cluster token off those calls. Empty: peers use `cluster_token`.
    pub peer_token: String,
    /// Raft clock: one tick; elections time out after `election_ticks` to twice that.
    pub raft_tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the Raft log (snapshot) once it holds this many applied entries.
    pub snapshot_threshold: u64,
    /// Where the namespace store lives.
    pub data_dir: PathBuf,
    /// Memory for the namespace store's page cache; the rest of the namespace stays on
    /// disk, so a master's memory does not grow with its inode count.
    pub store_cache: ByteSize,
    /// Under-storage mounted at the namespace root: `file:///path` (or a plain absolute
    /// path) or `s3://bucket/prefix`.
    pub ufs: String,
    /// How to reach an `s3://` UFS (`[s3]`); unset keys come from the AWS environment.
    /// Workers get the endpoint, region and addressing style with the mount.
    pub s3: granary_common::ufs::S3Options,
    /// TLS (`[tls]`): `cert`/`key` serve gRPC over TLS, `ca` makes this master's calls
    /// (to its peers, shard 0, routers) TLS. Every member of a cluster does the same.
    pub tls: granary_common::tls::TlsOptions,
    /// Block size for files loaded from now on.
    pub block_size: ByteSize,
    /// Prometheus `/metrics` listen address; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Interval workers are asked to heartbeat at.
    pub worker_heartbeat_ms: u64,
    /// A worker silent this long is considered lost.
    pub worker_timeout_ms: u64,
    /// Re-list a directory from the UFS when it was last listed longer ago than this
    /// (changes made behind Granary's back). `"never"` (default) suits immutable datasets;
    /// `granary fs load-metadata --force PATH` refreshes on demand.
    pub metadata_sync_interval: granary_common::interval::Interval,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            id: 1,
            shard_id: 0,
            listen: "127.0.0.1:19998".parse().expect("valid"),
            advertise: None,
            members: Vec::new(),
            join: false,
            cluster_token: String::new(),
            peer_token: String::new(),
            routing: Vec::new(),
            raft_tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_threshold: 10_000,
            data_dir: PathBuf::from("/var/lib/granary/master"),
            store_cache: ByteSize(crate::store::DEFAULT_CACHE_BYTES),
            ufs: String::new(),
            s3: Default::default(),
            tls: Default::default(),
            block_size: ByteSize(DEFAULT_BLOCK_SIZE),
            metrics_listen: None,
            worker_heartbeat_ms: 1000,
            worker_timeout_ms: 10_000,
            metadata_sync_interval: granary_common::interval::Interval::NEVER,
        }
    }
}

impl MasterConfig {
    /// The address other parts use to reach this master.
    pub fn advertised(&self) -> String {
        granary_common::net::advertised(self.advertise.as_ref(), self.listen)
    }

    /// `members` parsed to (id, address); this master alone when empty.
    pub fn initial_members(&self) -> Result<Vec<(u64, String)>, ConfigError> {
        if self.members.is_empty() {
            return Ok(vec![(self.id, self.advertised())]);
        }
        self.members
            .iter()
            .map(|m| {
                let bad = || ConfigError::invalid("members", format!("`{m}` is not id@host:port"));
                let (id, addr) = m.split_once('@').ok_or_else(bad)?;
                let id: u64 = id.trim().parse().map_err(|_| bad())?;
                if id == 0 || !addr.contains(':') {
                    return Err(bad());
                }
                Ok((id, addr.trim().to_string()))
            })
            .collect()
    }

    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.ufs.is_empty() {
            return Err(ConfigError::invalid(
                "ufs",
                "required: the under-storage URI, e.g. file:///data/datasets or s3://bucket/prefix",
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
        if self.id == 0 {
            return Err(ConfigError::invalid("id", "must be non-zero"));
        }
        if self.shard_id != 0 && self.routing.is_empty() {
            return Err(ConfigError::invalid(
                "routing",
                "a shard other than 0 needs the addresses of routers or of shard 0's masters",
            ));
        }
        let members = self.initial_members()?;
        let mut ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != members.len() {
            return Err(ConfigError::invalid("members", "member ids must be unique"));
        }
        if self.raft_tick_ms == 0
            || self.heartbeat_ticks == 0
            || self.election_ticks <= self.heartbeat_ticks
        {
            return Err(ConfigError::invalid(
                "election_ticks",
                "raft_tick_ms and heartbeat_ticks must be non-zero and election_ticks larger than heartbeat_ticks",
            ));
        }
        if self.snapshot_threshold < 16 {
            return Err(ConfigError::invalid(
                "snapshot_threshold",
                "must be at least 16",
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
