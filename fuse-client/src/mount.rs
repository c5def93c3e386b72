//! Mounting: check the mount point, connect to the masters, start a multi-threaded FUSE
//! session, and unmount when the handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use granary_common::config::ConfigError;
use granary_common::FsError;

use crate::block_reader::{BlockReader, ReadOptions};
use crate::config::MountConfig;
use crate::content_store::WorkerContentStore;
use crate::data_client::DataClient;
use crate::fs::{FsOptions, GranaryFs};
use crate::fuse_adapter::{FuseAdapter, Handlers, KernelOptions};
use crate::kernel_view::OwnerOverride;
use crate::passthrough::{self, Passthrough};
use crate::worker_list::WorkerList;
use granary_common::memory::MemoryLimiter;
use granary_meta_client::{ClientOptions, GrpcMetadataClient, MetadataService};
use granary_shard_router::ShardedMetadata;

/// How long a worker list serves before it is listed again (in the background).
const WORKER_LIST_TTL: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mount point {0} does not exist")]
    Missing(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotDirectory(PathBuf),
    #[error("mount point {0} is not empty (mounting would hide its contents)")]
    NotEmpty(PathBuf),
    #[error("{0} is already a mount point (another Granary mount still running, or a stale one: `umount -l` it)")]
    AlreadyMounted(PathBuf),
    #[error("mount point {path}: {source}")]
    Inaccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to the metadata masters {masters:?}: {error}")]
    Masters {
        masters: Vec<String>,
        error: FsError,
    },
    #[error("staging_dir {path}: {error}")]
    Staging { path: PathBuf, error: FsError },
    #[error("metrics_listen: {0}")]
    Metrics(String),
    #[error("FUSE mount at {path} failed: {source}")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Refuses a mount point that is missing, not a directory, or not empty.
pub fn check_mountpoint(path: &Path) -> Result<(), MountError> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => MountError::Missing(path.to_path_buf()),
        // The FUSE mount of a process that died is still there.
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => {
            MountError::AlreadyMounted(path.to_path_buf())
        }
        _ => MountError::Inaccessible {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if !md.is_dir() {
        return Err(MountError::NotDirectory(path.to_path_buf()));
    }
    // A different device than its parent's: something is mounted here already.
    if let Some(parent) = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&parent).is_ok_and(|pm| pm.dev() != md.dev()) {
            return Err(MountError::AlreadyMounted(path.to_path_buf()));
        }
    }
    let mut entries = std::fs::read_dir(path).map_err(|source| MountError::Inaccessible {
        path: path.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty(path.to_path_buf()));
    }
    Ok(())
}

/// A mounted Granary filesystem; dropping it unmounts.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    pub mountpoint: PathBuf,
    /// The FUSE mount's device (from mountinfo), to tell it from anything else mounted
    /// on the same path.
    device: Option<u64>,
    pins: Option<PinFollower>,
}

/// The thread that drops moved prefixes' entries ([`follow_pins`]).
struct PinFollower {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl MountHandle {
    /// True once the session has ended (e.g. unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Returns at SIGINT or SIGTERM, or once the mount is gone (unmounted from outside).
    pub async fn until_stopped(&self) {
        tokio::select! {
            _ = granary_common::telemetry::shutdown_signal() => {}
            _ = async {
                while !self.is_finished() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => {}
        }
    }

    pub fn unmount(mut self) -> std::io::Result<()> {
        self.end()
    }

    fn end(&mut self) -> std::io::Result<()> {
        // Stopped while the session still serves: a kernel notification it is sending
        // may wait on a request in flight to this very mount.
        if let Some(p) = self.pins.take() {
            p.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            p.thread.thread().unpark();
            let _ = p.thread.join();
        }
        match self.session.take() {
            Some(s) => end_session(s, &self.mountpoint, self.device),
            None => Ok(()),
        }
    }
}

/// Unmounts and joins the session's thread; a session ended by an outside unmount
/// (`umount`, `fusermount3 -u`) is only joined: unmounting again fails with EINVAL.
fn end_session(
    s: BackgroundSession,
    mountpoint: &Path,
    device: Option<u64>,
) -> std::io::Result<()> {
    if !s.guard.is_finished() {
        return s.umount_and_join();
    }
    s.join()?;
    // Ended on an error while mounted, the session unmounted it on its way out; had
    // that failed, only this says so (fuser's own warning is off, see telemetry). Only
    // this FUSE mount counts, not another one (a bind mount) on the same path.
    if device.is_some() && crate::mountinfo::fuse_device(mountpoint) == device {
        return Err(std::io::Error::other(format!(
            "the FUSE session ended but {} is still mounted",
            mountpoint.display()
        )));
    }
    Ok(())
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(e) = self.end() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
            }
        }
    }
}

/// Fetches the routing table from `masters` (shard 0's masters, or routers), connects to
/// every shard it lists and checks that the root answers. With `proxy`, every call goes
/// to the routers in `masters` instead, which route it.
pub fn connect_metadata(cfg: &MountConfig) -> Result<Arc<dyn MetadataService>, MountError> {
    cfg.validate()?;
    granary_common::tls::install_client(&cfg.tls)
        .map_err(|e| ConfigError::invalid("tls", e.to_string()))?;
    let masters_err = |error| MountError::Masters {
        masters: cfg.masters.clone(),
        error,
    };
    let opts = ClientOptions {
        cluster_token: cfg.cluster_token.clone(),
        read_consistency: cfg.read_consistency,
        follower_reads: cfg.follower_reads,
        rpc_timeout: Duration::from_millis(cfg.rpc_timeout_ms),
        retry_deadline: Duration::from_millis(cfg.retry_deadline_ms),
        routing_version: None,
    };
    let meta: Arc<dyn MetadataService> = if cfg.proxy {
        GrpcMetadataClient::connect_proxy(&cfg.masters, &opts).map_err(masters_err)?
    } else {
        ShardedMetadata::connect(&cfg.masters, &opts).map_err(masters_err)?
    };
    meta.getattr(granary_shard_router::ROOT)
        .map_err(masters_err)?;
    Ok(meta)
}

/// Builds the filesystem (metadata client, data paths) without mounting it.
pub fn build_fs(cfg: &MountConfig) -> Result<GranaryFs, MountError> {
    build_fs_over(cfg, connect_metadata(cfg)?)
}

/// Builds the filesystem over a connected metadata service: the read path and the write
/// path share one worker list and one pool of data connections.
pub fn build_fs_over(
    cfg: &MountConfig,
    meta: Arc<dyn MetadataService>,
) -> Result<GranaryFs, MountError> {
    let workers = Arc::new(WorkerList::new(
        meta.clone(),
        granary_common::hostname(),
        WORKER_LIST_TTL,
    ));
    let data = Arc::new(DataClient::new(
        Duration::from_secs(2),
        Duration::from_secs(120),
        &cfg.cluster_token,
    ));
    let memory = MemoryLimiter::new(cfg.buffer_memory.0, "granary_client_buffer_bytes");
    let reader = BlockReader::new(
        meta.clone(),
        workers.clone(),
        data.clone(),
        memory.clone(),
        ReadOptions {
            short_circuit: cfg.short_circuit,
            readahead_max: cfg.readahead_max.0,
        },
    );
    let store = WorkerContentStore::new(
        workers,
        data,
        cfg.cluster_token.clone(),
        cfg.staging_dir.clone(),
        memory,
    )
    .map_err(|error| MountError::Staging {
        path: cfg.staging_dir.clone(),
        error,
    })?;
    Ok(GranaryFs::new(
        meta,
        Arc::new(reader),
        Arc::new(store),
        FsOptions {
            meta_cache_ttl: Duration::from_millis(cfg.meta_cache_ttl_ms),
            meta_cache_entries: cfg.meta_cache_entries,
            read_only: cfg.read_only,
        },
    ))
}

pub fn mount(cfg: &MountConfig, mountpoint: &Path) -> Result<MountHandle, MountError> {
    check_mountpoint(mountpoint)?;
    // As mountinfo will spell it, found while a stat of it cannot reach this mount.
    let real = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let mountpoint = real.as_path();
    let fs = Arc::new(build_fs(cfg)?);
    let pinned = Arc::downgrade(&fs);
    // Registering a backing file takes CAP_SYS_ADMIN (the kernel may still lack
    // passthrough: its INIT reply says, and the mount logs it).
    let passthrough = cfg.passthrough() && cfg.short_circuit && unsafe { libc::geteuid() } == 0;
    let notifier = Arc::new(std::sync::OnceLock::new());
    let handlers = Handlers {
        fs,
        opts: KernelOptions {
            entry_ttl: Duration::from_millis(cfg.entry_ttl_ms),
            attr_ttl: Duration::from_millis(cfg.attr_ttl_ms),
            keep_cache: cfg.keep_cache,
            owner: OwnerOverride {
                uid: cfg.uid,
                gid: cfg.gid,
            },
            readdirplus_auto: cfg.readdirplus_auto,
        },
        passthrough: Passthrough::new(passthrough, passthrough::WRITER_WAIT),
        open_in_kernel: cfg.open_in_kernel.into(),
        notifier: notifier.clone(),
        reads: Default::default(),
    };
    let (initialized, on_init) = std::sync::mpsc::channel();
    let adapter = FuseAdapter::new(handlers, cfg.fuse_threads, initialized).map_err(|source| {
        MountError::Fuse {
            path: mountpoint.to_path_buf(),
            source,
        }
    })?;
    let mut options = vec![
        MountOption::FSName("granary".into()),
        MountOption::Subtype("granary".into()),
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if cfg.read_only {
        options.push(MountOption::RO);
    }
    if cfg.allow_other {
        options.push(MountOption::CUSTOM("allow_other".into()));
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.fuse_readers);
    config.clone_fd = true;
    let underlying_dev = std::fs::metadata(mountpoint)
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .unwrap_or(0);
    let session =
        fuser::spawn_mount(adapter, mountpoint, &config).map_err(|source| MountError::Fuse {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let _ = notifier.set(session.notifier());
    let pins = follow_pins(pinned, Arc::downgrade(&notifier));
    tracing::info!(
        mountpoint = %mountpoint.display(),
        masters = ?cfg.masters,
        read_only = cfg.read_only,
        passthrough,
        open_in_kernel = cfg.open_in_kernel,
        "mounted"
    );
    crate::kernel_readahead::raise_in_background(
        mountpoint,
        underlying_dev,
        cfg.kernel_readahead.0,
        on_init,
    );
    Ok(MountHandle {
        session: Some(session),
        device: crate::mountinfo::fuse_device(mountpoint),
        mountpoint: mountpoint.to_path_buf(),
        pins,
    })
}

/// How often a mount looks for prefixes pinned to another shard.
const PIN_CHECK: Duration = Duration::from_secs(1);

/// Drops the kernel's entries of prefixes that moved to another shard, while the mount
/// lives: a directory the kernel knows by its old shard's inode would show that shard's
/// (emptied) copy until `entry_ttl_ms` expired. The thread holds the filesystem and the
/// notifier (a descriptor of `/dev/fuse`) only while it uses them: a descriptor left open
/// when the process exits keeps the FUSE connection, and any request of this process to
/// its own mount, waiting forever.
fn follow_pins(
    fs: std::sync::Weak<GranaryFs>,
    notifier: std::sync::Weak<std::sync::OnceLock<fuser::Notifier>>,
) -> Option<PinFollower> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let follow = move || loop {
        // Woken early to stop.
        std::thread::park_timeout(PIN_CHECK);
        if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Some(moved) = fs.upgrade().map(|fs| fs.moved_prefixes()) else {
            return;
        };
        if moved.is_empty() {
            continue;
        }
        let Some(notifier) = notifier.upgrade() else {
            return;
        };
        let Some(n) = notifier.get() else { continue };
        for (parent, name) in moved {
            let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&name);
            if let Err(e) = n.inval_entry(fuser::INodeNo(parent), name) {
                tracing::debug!(parent, ?name, error = %e, "cannot drop a moved prefix's entry");
            }
        }
    };
    match std::thread::Builder::new()
        .name("granary-pins".into())
        .spawn(follow)
    {
        Ok(thread) => Some(PinFollower { stop, thread }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow pinned prefixes; a moved one shows once entry_ttl_ms expires");
            None
        }
    }
}

/// Mounts and serves in the foreground until SIGINT/SIGTERM or an outside unmount.
pub fn run_mount(cfg: &MountConfig, mountpoint: &Path) -> Result<(), MountError> {
    let fuse_err = |source| MountError::Fuse {
        path: mountpoint.to_path_buf(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(fuse_err)?;
    if let Some(addr) = cfg.metrics_listen {
        // Its listener runs on `rt`, driven below for as long as the mount lives.
        rt.block_on(async {
            granary_common::telemetry::serve_metrics(
                addr,
                &[granary_common::telemetry::CLIENT_COUNTERS],
            )
        })
        .map_err(MountError::Metrics)?;
    }
    let handle = mount(cfg, mountpoint)?;
    rt.block_on(handle.until_stopped());
    tracing::info!(mountpoint = %mountpoint.display(), "unmounting");
    handle.unmount().map_err(fuse_err)
}
