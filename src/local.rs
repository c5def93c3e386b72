//! `granary local`: a master, a worker and a mount in one process over a local directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use granary_fuse_client::MountConfig;
use granary_master::MasterConfig;
use granary_worker::WorkerConfig;

pub struct LocalArgs {
    pub ufs: PathBuf,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub master_listen: std::net::SocketAddr,
    pub capacity: granary_common::bytesize::ByteSize,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Everything `granary local` runs; dropping it unmounts and stops the servers.
pub struct LocalCluster {
    pub mount: granary_fuse_client::MountHandle,
    pub master: granary_master::RunningMaster,
    pub worker: granary_worker::RunningWorker,
}

/// Default state directory for a UFS: stable per UFS path, so a restart finds its warm
/// cache and metadata again.
pub fn default_state_dir(ufs: &Path) -> PathBuf {
    let key = ufs
        .to_string_lossy()
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    PathBuf::from("/var/tmp/granary").join(format!("{key:016x}"))
}

pub async fn start(a: &LocalArgs) -> anyhow::Result<LocalCluster> {
    if !a.ufs.is_dir() {
        bail!(
            "UFS directory {} does not exist or is not a directory",
            a.ufs.display()
        );
    }
    granary_fuse_client::check_mountpoint(&a.mountpoint)?;
    let ufs = granary_common::ufs::local_uri(&a.ufs)?;
    let master = granary_master::start(MasterConfig {
        listen: a.master_listen,
        data_dir: a.state_dir.join("master"),
        ufs,
        ..Default::default()
    })
    .await
    .map_err(|e| match &e {
        granary_master::MasterError::Listen { source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            anyhow::Error::new(e).context(format!(
                "master failed to start: {} is taken (another `granary local` or master?); \
                 stop it or pass --master-listen with a free port",
                a.master_listen
            ))
        }
        _ => anyhow::Error::new(e).context("master failed to start"),
    })?;
    let worker = granary_worker::start(WorkerConfig {
        masters: vec![master.addr.to_string()],
        data_listen: "127.0.0.1:0".parse()?,
        cache_dir: a.cache_dir.clone(),
        capacity: a.capacity,
        ..Default::default()
    })
    .await
    .context("worker failed to start")?;
    wait_for_worker(&master.addr.to_string(), &worker.worker_id).await?;
    let mount_cfg = MountConfig {
        masters: vec![master.addr.to_string()],
        staging_dir: a.state_dir.join("staging"),
        ..Default::default()
    };
    let mountpoint = a.mountpoint.clone();
    let mount =
        tokio::task::spawn_blocking(move || granary_fuse_client::mount(&mount_cfg, &mountpoint))
            .await?
            .context("mount failed")?;
    Ok(LocalCluster {
        mount,
        master,
        worker,
    })
}

impl LocalCluster {
    pub async fn stop(self) -> anyhow::Result<()> {
        let LocalCluster {
            mount,
            master,
            worker,
        } = self;
        let mountpoint = mount.mountpoint.clone();
        let unmounted = tokio::task::spawn_blocking(move || mount.unmount()).await?;
        if let Err(e) = unmounted {
            // Still stop the servers; detach the mount so nothing hangs on it.
            eprintln!(
                "unmount of {} failed ({e}); detaching it lazily",
                mountpoint.display()
            );
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&mountpoint)
                .status();
        }
        worker.stop();
        master.stop().await;
        Ok(())
    }
}

/// Waits until the master lists the worker, so the first read finds it.
pub async fn wait_for_worker(master: &str, worker_id: &str) -> anyhow::Result<()> {
    let mut client =
        granary_protos::v1::namespace_client::NamespaceClient::connect(format!("http://{master}"))
            .await?;
    for _ in 0..200 {
        let workers = client
            .list_workers(granary_protos::v1::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        if workers.iter().any(|w| w.worker_id == worker_id) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("worker {worker_id} did not register with master {master} within 10s")
}
