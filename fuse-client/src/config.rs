//! Mount configuration (TOML file or CLI flags). Defaults suit an immutable training
//! dataset: long kernel TTLs and the kernel page cache kept across opens.

use granary_common::bytesize::ByteSize;
use granary_common::config::ConfigError;
use granary_common::consistency::ReadConsistency;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountConfig {
    /// Master gRPC addresses of shard 0 (`host:port`); any subset will do, the client
    /// learns the current master set from them.
    pub masters: Vec<String>,
    /// The cluster's shared token (see the master's `cluster_token`).
    pub cluster_token: String,
    /// `linearizable` (default), `lease`, or `bounded-staleness:<ms>` (immutable datasets).
    pub read_consistency: ReadConsistency,
    /// Spread metadata reads over every master (followers answer too).
    pub follower_reads: bool,
    /// `masters` are routers, and every metadata call goes through them (for a client
    /// that should not route by itself); otherwise the mount routes to each shard.
    pub proxy: bool,
    /// Kernel dentry cache lifetime.
    pub entry_ttl_ms: u64,
    /// Kernel attribute cache lifetime.
    pub attr_ttl_ms: u64,
    /// Keep the kernel page cache of a file across opens (re-reads never leave the kernel).
    pub keep_cache: bool,
    /// Userspace metadata cache lifetime and size.
    pub meta_cache_ttl_ms: u64,
    pub meta_cache_entries: u64,
    /// Read a co-located worker's cache files directly instead of over TCP.
    pub short_circuit: bool,
    /// Let the kernel read a file straight from the co-located worker's cache file when
    /// that one file holds all of it — a single-block file, or a bigger one whose blocks
    /// are all cached in its shared data file (FUSE passthrough, Linux ≥ 6.9, root): no
    /// READ request reaches userspace. A file's backing file stays registered after its
    /// last close, so a re-open costs no worker round trip (`granary bench read`: small
    /// files with the page cache dropped 1.6–2.3× faster, warm ones about 15% slower).
    /// Unset: on for read-only mounts, off for the others, where an open for writing of a
    /// file this mount has open for reading in passthrough fails with ETXTBSY (the kernel
    /// allows no other mode for its inode meanwhile).
    pub passthrough: Option<bool>,
    /// Read-only mounts: the kernel opens and closes files by itself, with no request to
    /// the mount (FUSE zero-message opens), keeping each file's page cache across opens
    /// (dropped when its attributes show a new version). A re-read of a file in the page
    /// cache never leaves the kernel; the reads that do reach the mount each look their
    /// file up. Excludes `passthrough`, whose backing file is handed over in an open's
    /// reply.
    pub open_in_kernel: bool,
    /// List directories with READDIRPLUS only where the kernel guesses it pays (FUSE's
    /// auto mode: a directory's first batch, and batches after lookups in it) instead of
    /// always. A plain listing of a huge directory then makes no kernel inode per entry
    /// (~1 KiB of reclaimable kernel memory each), but `ls -l`, `du` or a scan that
    /// stats what it listed sends a lookup per entry past the first batch (1,000,000
    /// entries, `ls -l` after `ls`: 33 s instead of 3.4 s on 2 cores).
    pub readdirplus_auto: bool,
    /// Largest adaptive readahead window for reads over TCP.
    pub readahead_max: ByteSize,
    /// The kernel's readahead window for the mount (its bdi `read_ahead_kb`; root only).
    /// FUSE's own default, 128 KiB, has a sequential reader of uncached pages wait on one
    /// 128 KiB request after another.
    pub kernel_readahead: ByteSize,
    /// Memory readahead buffers and small files being written may use together; past it,
    /// reads fetch only what they are asked for and writes stage in files.
    #[serde(alias = "readahead_memory")]
    pub buffer_memory: ByteSize,
    /// Threads serving the FUSE requests that wait on a master, a worker or a disk
    /// (default: 2 per core, 4 to 64): how many such requests run at once. Raise it for
    /// many readers of cold files over a slow UFS (S3).
    pub fuse_threads: usize,
    /// Threads reading requests from the kernel (default: one per core, at most 16). They
    /// answer from the mount's caches and hand the rest to `fuse_threads`; each one more
    /// than needed adds wake-ups (on 2 cores, 4 served warm small files at 0.85× the
    /// rate of 2).
    pub fuse_readers: usize,
    /// One metadata RPC attempt's timeout.
    pub rpc_timeout_ms: u64,
    /// How long an operation retries across masters before failing with EIO.
    pub retry_deadline_ms: u64,
    /// Let other users access the mount (needs `user_allow_other` for non-root). The
    /// kernel checks permissions against the mode and owner kept in the namespace.
    pub allow_other: bool,
    /// Refuse every change (EROFS), for a dataset that must not be touched.
    pub read_only: bool,
    /// Where writes are staged until close or fsync (anonymous files; needs room for the
    /// largest files written at once).
    pub staging_dir: std::path::PathBuf,
    /// Owner shown for every file; default: the owner recorded in metadata.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// TLS (`[tls]`): with `ca` set, every connection to masters, routers and workers is
    /// TLS, their certificates checked against it (and `server_name`).
    pub tls: granary_common::tls::TlsOptions,
    /// Serve the mount's Prometheus metrics (`granary_client_*`) at `/metrics` here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            masters: vec!["127.0.0.1:19998".into()],
            cluster_token: String::new(),
            read_consistency: ReadConsistency::Linearizable,
            follower_reads: true,
            proxy: false,
            entry_ttl_ms: 300_000,
            attr_ttl_ms: 300_000,
            keep_cache: true,
            meta_cache_ttl_ms: 300_000,
            meta_cache_entries: 1_000_000,
            short_circuit: true,
            passthrough: None,
            open_in_kernel: false,
            readdirplus_auto: false,
            readahead_max: ByteSize(16 << 20),
            kernel_readahead: ByteSize(8 << 20),
            buffer_memory: ByteSize(1 << 30),
            fuse_threads: default_fuse_threads(),
            fuse_readers: default_fuse_readers(),
            rpc_timeout_ms: 5_000,
            retry_deadline_ms: 20_000,
            allow_other: false,
            read_only: false,
            staging_dir: std::env::temp_dir().join("granary-staging"),
            uid: None,
            gid: None,
            tls: Default::default(),
            metrics_listen: None,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn default_fuse_threads() -> usize {
    (2 * cores()).clamp(4, 64)
}

fn default_fuse_readers() -> usize {
    cores().clamp(1, 16)
}

impl MountConfig {
    /// Whether reads go through FUSE passthrough (see [`MountConfig::passthrough`]).
    pub fn passthrough(&self) -> bool {
        self.passthrough
            .unwrap_or(self.read_only && !self.open_in_kernel)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.open_in_kernel && !self.read_only {
            return Err(ConfigError::invalid(
                "open_in_kernel",
                "needs read_only = true (a file opened for writing needs the mount's open)",
            ));
        }
        if self.open_in_kernel && self.passthrough == Some(true) {
            return Err(ConfigError::invalid(
                "passthrough",
                "cannot be true with open_in_kernel = true (passthrough is set up by the mount's open)",
            ));
        }
        if self.masters.is_empty() {
            return Err(ConfigError::invalid(
                "masters",
                "at least one master address is required",
            ));
        }
        if self.fuse_threads == 0 || self.fuse_threads > 1024 {
            return Err(ConfigError::invalid(
                "fuse_threads",
                "must be between 1 and 1024",
            ));
        }
        if self.fuse_readers == 0 || self.fuse_readers > 64 {
            return Err(ConfigError::invalid(
                "fuse_readers",
                "must be between 1 and 64",
            ));
        }
        if self.rpc_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "rpc_timeout_ms",
                "must be greater than zero",
            ));
        }
        if self.kernel_readahead.0 < (128 << 10) || self.kernel_readahead.0 > (256 << 20) {
            return Err(ConfigError::invalid(
                "kernel_readahead",
                "must be between 128KiB and 256MiB",
            ));
        }
        if self.readahead_max.0 < (128 << 10) || self.readahead_max.0 > (16 << 20) {
            return Err(ConfigError::invalid(
                "readahead_max",
                "must be between 128KiB and 16MiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_common::config::parse_toml;

    #[test]
    fn buffer_memory_takes_its_old_name_too() {
        let cfg: MountConfig = parse_toml("readahead_memory = \"64MiB\"", "test").unwrap();
        assert_eq!(cfg.buffer_memory.0, 64 << 20);
        let cfg: MountConfig = parse_toml("buffer_memory = \"2GiB\"", "test").unwrap();
        assert_eq!(cfg.buffer_memory.0, 2 << 30);
    }

    #[test]
    fn passthrough_unset_follows_read_only() {
        let on = |toml: &str| {
            parse_toml::<MountConfig>(toml, "test")
                .unwrap()
                .passthrough()
        };
        assert!(!on(""));
        assert!(on("read_only = true"));
        assert!(!on("read_only = true\npassthrough = false"));
        assert!(on("passthrough = true"));
        assert!(!on("read_only = true\nopen_in_kernel = true"));
    }

    #[test]
    fn open_in_kernel_needs_a_read_only_mount_without_passthrough() {
        let check = |toml: &str| {
            parse_toml::<MountConfig>(toml, "test")
                .unwrap()
                .validate()
                .map_err(|e| e.to_string())
        };
        assert!(check("read_only = true\nopen_in_kernel = true").is_ok());
        let e = check("open_in_kernel = true").unwrap_err();
        assert!(e.contains("open_in_kernel"), "{e}");
        let e = check("read_only = true\nopen_in_kernel = true\npassthrough = true").unwrap_err();
        assert!(e.contains("passthrough"), "{e}");
    }
}
