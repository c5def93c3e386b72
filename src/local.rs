//! `granary local`: a master (or one per shard), a worker and a mount in one process over
//! a local directory.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use granary_common::ufs::S3Options;
use granary_fuse_client::MountConfig;
use granary_master::MasterConfig;
use granary_worker::WorkerConfig;

pub struct LocalArgs {
    /// A local directory or a UFS URI (`s3://bucket/prefix`).
    pub ufs: String,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub master_listen: std::net::SocketAddr,
    pub capacity: granary_common::bytesize::ByteSize,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Metadata shards, one master each (1: no sharding).
    pub shards: u16,
    /// How to reach an `s3://` UFS (the AWS environment by default).
    pub s3: S3Options,
    /// The mount's settings; its masters and staging directory are this cluster's.
    pub mount: MountConfig,
    /// The masters' settings a local cluster takes.
    pub master: LocalMasterKeys,
}

/// `[master]` of `granary local --config`: the master keys that make sense for a cluster
/// in one process (its addresses, directories and UFS come from the flags).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMasterKeys {
    /// See the master's `metadata_sync_interval`.
    #[serde(default)]
    pub metadata_sync_interval: granary_common::interval::Interval,
}

/// What `granary local --config FILE` holds.
#[derive(Debug, Default)]
pub struct LocalConfig {
    pub mount: MountConfig,
    pub s3: S3Options,
    pub master: LocalMasterKeys,
}

/// `granary local --config FILE`: the mount's keys, an `[s3]` table (the keys of the
/// masters' and workers' `[s3]`) for an `s3://` UFS, and a `[master]` table.
pub fn load_config(path: &Path) -> anyhow::Result<LocalConfig> {
    let mut table: toml::Table = granary_common::config::load_toml(path)?;
    let invalid = |what: &str, e: toml::de::Error| {
        anyhow!(
            "invalid config file {}: {what}: {}",
            path.display(),
            e.to_string().trim_end()
        )
    };
    let s3: S3Options = match table.remove("s3") {
        Some(t) => t.try_into().map_err(|e| invalid("[s3]", e))?,
        None => S3Options::default(),
    };
    // Checked whatever the UFS: a wrong value is wrong before it is used.
    s3.check()
        .map_err(|e| anyhow!("invalid config file {}: {e}", path.display()))?;
    let master = match table.remove("master") {
        Some(t) => t.try_into().map_err(|e| invalid("[master]", e))?,
        None => LocalMasterKeys::default(),
    };
    let mount = toml::Value::Table(table)
        .try_into()
        .map_err(|e| invalid("mount keys (and [s3], [master] tables)", e))?;
    Ok(LocalConfig { mount, s3, master })
}

/// Everything `granary local` runs; dropping it unmounts and stops the servers.
pub struct LocalCluster {
    pub mount: granary_fuse_client::MountHandle,
    /// Shard 0's master (it keeps the routing table).
    pub master: granary_master::RunningMaster,
    /// The other shards' masters.
    pub shard_masters: Vec<granary_master::RunningMaster>,
    pub worker: granary_worker::RunningWorker,
}

/// Default state directory for a UFS: stable per UFS, so a restart finds its warm cache
/// and metadata again, and one UFS however spelled (`/data/x/`, `file:///data/x`, a
/// symlink to it) gets one, so a second `granary local` over it finds the first's in use.
/// One made by an older version for the literal spelling of an absolute path or URI is
/// still used (a relative spelling named different directories from different places).
pub fn default_state_dir(ufs: &str) -> PathBuf {
    let normalized = granary_common::ufs::normalized_uri(ufs);
    // A plain path hashes as it did before `file://` URIs were normalized too.
    let dir = state_dir_for(normalized.strip_prefix("file://").unwrap_or(&normalized));
    let literal = state_dir_for(ufs);
    let absolute = ufs.starts_with('/') || ufs.contains("://");
    match absolute && !dir.exists() && literal.exists() {
        true => literal,
        false => dir,
    }
}

fn state_dir_for(key: &str) -> PathBuf {
    let key = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    PathBuf::from("/var/tmp/granary").join(format!("{key:016x}"))
}

pub async fn start(a: &LocalArgs) -> anyhow::Result<LocalCluster> {
    let ufs = granary_common::ufs::ufs_uri(&a.ufs)
        .with_context(|| format!("--ufs {}: not a directory or a UFS URI", a.ufs))?;
    granary_fuse_client::check_mountpoint(&a.mountpoint)?;
    // Reached once before anything starts: a wrong bucket, endpoint or key stops here.
    let opened = granary_common::ufs::open_ufs(&ufs, &a.s3)?;
    tokio::task::spawn_blocking(move || opened.check())
        .await?
        .with_context(|| format!("cannot reach the UFS {ufs}"))?;
    let master = granary_master::start(MasterConfig {
        listen: a.master_listen,
        data_dir: a.state_dir.join("master"),
        ufs: ufs.clone(),
        s3: a.s3.clone(),
        metadata_sync_interval: a.master.metadata_sync_interval,
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
        _ => anyhow::Error::new(e).context(format!(
            "master failed to start (its data_dir is {}, under --state-dir; its ufs is --ufs)",
            a.state_dir.join("master").display()
        )),
    })?;
    let shard_masters = start_shards(a, &master.addr.to_string(), &ufs).await?;
    let worker = granary_worker::start(WorkerConfig {
        masters: vec![master.addr.to_string()],
        data_listen: "127.0.0.1:0".parse()?,
        cache_dir: a.cache_dir.clone(),
        capacity: a.capacity,
        s3: a.s3.clone(),
        ..Default::default()
    })
    .await
    .context("worker failed to start")?;
    wait_for_worker(&master.addr.to_string(), &worker.worker_id).await?;
    wait_for_root_mount(&master.addr.to_string()).await?;
    wait_for_worker_mount(&worker).await?;
    for m in &shard_masters {
        wait_for_worker(&m.addr.to_string(), &worker.worker_id).await?;
    }
    // The mount reaches these masters by direct calls, not over loopback TCP.
    for m in std::iter::once(&master).chain(&shard_masters) {
        granary_common::in_process::register(&m.addr.to_string(), m.in_process.clone());
    }
    let mount_cfg = MountConfig {
        masters: vec![master.addr.to_string()],
        staging_dir: a.state_dir.join("staging"),
        ..a.mount.clone()
    };
    let mountpoint = a.mountpoint.clone();
    let mount =
        tokio::task::spawn_blocking(move || granary_fuse_client::mount(&mount_cfg, &mountpoint))
            .await?
            .context("mount failed")?;
    Ok(LocalCluster {
        mount,
        master,
        shard_masters,
        worker,
    })
}

/// Starts shards 1.. (one master each, on ports 10, 20, … above shard 0's, over the same
/// UFS) and adds them to the routing table shard 0 keeps.
async fn start_shards(
    a: &LocalArgs,
    shard0: &str,
    ufs: &str,
) -> anyhow::Result<Vec<granary_master::RunningMaster>> {
    let mut masters = Vec::new();
    for shard in 1..a.shards.max(1) {
        // Next to shard 0's port, so a restart finds the addresses the table recorded.
        let mut listen = a.master_listen;
        if listen.port() != 0 {
            listen.set_port(listen.port() + 10 * shard);
        }
        let m = granary_master::start(MasterConfig {
            listen,
            shard_id: shard,
            routing: vec![shard0.to_string()],
            data_dir: a.state_dir.join(format!("master-shard-{shard}")),
            ufs: ufs.to_string(),
            s3: a.s3.clone(),
            metadata_sync_interval: a.master.metadata_sync_interval,
            ..Default::default()
        })
        .await
        .with_context(|| format!("master of shard {shard} failed to start"))?;
        masters.push(m);
    }
    let mut routing =
        granary_protos::v1::routing_client::RoutingClient::connect(format!("http://{shard0}"))
            .await?;
    let table = routing
        .get_routing_table(granary_protos::v1::GetRoutingTableRequest {})
        .await?
        .into_inner();
    // The table keeps the address shard 0 was first served at, and the worker registers
    // there: a restart on another port would wait for a master that is not there.
    if let Some(recorded) = table.shards.iter().find(|s| s.id == 0) {
        if let Some(first) = recorded.masters.first() {
            if !recorded.masters.iter().any(|m| m == shard0) {
                bail!(
                    "{} was served with its master at {first}: pass --master-listen {first}, \
                     or use a fresh --state-dir",
                    a.state_dir.display()
                );
            }
        }
    }
    for (i, m) in masters.iter().enumerate() {
        let id = i as u32 + 1;
        let addr = m.addr.to_string();
        let known = table.shards.iter().find(|s| s.id == id);
        if known.is_some_and(|s| s.masters.contains(&addr)) {
            continue;
        }
        if known.is_some() {
            bail!(
                "shard {id} is in the routing table of {} with other masters; use a fresh --state-dir",
                a.state_dir.display()
            );
        }
        routing
            .add_shard(granary_protos::v1::AddShardRequest {
                shard: Some(granary_protos::v1::ShardInfo {
                    id,
                    masters: vec![addr],
                }),
            })
            .await
            .with_context(|| format!("adding shard {id} to the routing table"))?;
    }
    Ok(masters)
}

impl LocalCluster {
    pub async fn stop(self) -> anyhow::Result<()> {
        let LocalCluster {
            mount,
            master,
            shard_masters,
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
        for m in std::iter::once(&master).chain(&shard_masters) {
            granary_common::in_process::withdraw(&m.addr.to_string());
        }
        for m in shard_masters {
            m.stop().await;
        }
        master.stop().await;
        Ok(())
    }
}

/// Waits until the namespace records the UFS it serves (a moment after its master
/// leads): a process stopped before that left a state directory that another UFS could
/// take over without a word.
async fn wait_for_root_mount(master: &str) -> anyhow::Result<()> {
    let mut client =
        granary_protos::v1::admin_client::AdminClient::connect(format!("http://{master}")).await?;
    for _ in 0..400 {
        let report = client
            .report(granary_protos::v1::ReportRequest {})
            .await?
            .into_inner();
        let mounts = report.mounts.map(|t| t.mounts).unwrap_or_default();
        if mounts.iter().any(|m| m.path == b"/") {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("master {master} did not record its UFS within 20s")
}

/// Waits until the worker has learned the UFS from its master (with a heartbeat's answer),
/// so the first write or read through the mount finds it there.
async fn wait_for_worker_mount(worker: &granary_worker::RunningWorker) -> anyhow::Result<()> {
    for _ in 0..400 {
        if worker.mounts.knows_shard(0) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("the worker did not learn the UFS from its master within 20s")
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

#[cfg(test)]
mod tests {
    use super::{default_state_dir, load_config};

    #[test]
    fn a_local_config_holds_mount_keys_s3_and_master_tables_and_names_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("local.toml");
        std::fs::write(
            &cfg,
            "allow_other = true\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nread_part_size = \"64MiB\"\n",
        )
        .unwrap();
        let c = load_config(&cfg).unwrap();
        assert!(c.mount.allow_other);
        assert_eq!(c.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.s3.read_part_size.0, 64 << 20);
        assert_eq!(c.master.metadata_sync_interval, Default::default());
        std::fs::write(&cfg, "[master]\nmetadata_sync_interval = \"30s\"\n").unwrap();
        assert_eq!(
            load_config(&cfg).unwrap().master.metadata_sync_interval,
            granary_common::interval::Interval::parse("30s").unwrap()
        );
        for (text, key) in [
            ("[s3]\nread_part_sise = 1\n", "read_part_sise"),
            ("alow_other = true\n", "alow_other"),
            ("[s3]\nread_part_size = \"lots\"\n", "[s3]"),
            ("[s3]\nread_parts_in_flight = 0\n", "read_parts_in_flight"),
            ("[master]\nblock_size = \"1MiB\"\n", "block_size"),
            ("[master]\nmetadata_sync_interval = \"soon\"\n", "[master]"),
        ] {
            std::fs::write(&cfg, text).unwrap();
            let e = load_config(&cfg).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("local.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn one_ufs_however_spelled_has_one_default_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().canonicalize().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let plain = default_state_dir(&path.display().to_string());
        for spelled in [
            format!("{}/", path.display()),
            format!("file://{}", path.display()),
            format!("{}/./", path.display()),
            link.display().to_string(),
        ] {
            assert_eq!(default_state_dir(&spelled), plain, "{spelled}");
        }
        assert_eq!(
            default_state_dir("s3://bucket/data/"),
            default_state_dir("s3://bucket/data")
        );
        assert_ne!(default_state_dir("s3://bucket/data"), plain);
    }
}
