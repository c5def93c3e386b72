//! The filesystems the write and posix benches compare, each in its own directories
//! under the work directory: raw, a plain passthrough FUSE, JuiceFS (optional) and a
//! `granary local` mount, in the table's order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use granary_common::bytesize::ByteSize;
use granary_fuse_client::config::MountConfig;
use granary_integration_tests::force_unmount;

use super::juicefs::JuiceFs;
use super::passthrough;
use granary::local::{self, LocalArgs, LocalCluster};

pub struct Target {
    pub name: &'static str,
    /// Where the bench works through this filesystem.
    pub dir: PathBuf,
    /// Where the same files lie underneath, for filling it faster than through `dir`
    /// (equivalent to it: the backing directory or the UFS; JuiceFS has none).
    pub beneath: PathBuf,
}

pub struct Options {
    /// Directory names start with this, so benches do not share them.
    pub prefix: &'static str,
    pub juicefs: bool,
    /// Kernel entry and attribute cache lifetime on every FUSE mount; None: each one's
    /// defaults.
    pub kernel_ttl: Option<Duration>,
    pub capacity: ByteSize,
}

/// Mounted filesystems; [`Targets::run`] takes them down and removes their files.
pub struct Targets {
    pub list: Vec<Target>,
    rt: tokio::runtime::Runtime,
    cluster: LocalCluster,
    juicefs: Option<JuiceFs>,
    fuse: fuser::BackgroundSession,
    scratch: Vec<PathBuf>,
}

impl Targets {
    /// Mounts every target (fresh directories); `before_granary` runs on them before
    /// Granary starts, as a dataset is in the UFS before a mount first lists it.
    pub fn start(
        work: &Path,
        o: &Options,
        before_granary: impl FnOnce(&[Target]) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let dir = |name: &str| work.join(format!("{}-{name}", o.prefix));
        let (raw, ufs, state) = (dir("raw"), dir("ufs"), dir("state"));
        let (fuse_backing, fuse_mnt) = (dir("fuse-backing"), dir("fuse-mnt"));
        let (jfs_work, jfs_mnt) = (dir("juicefs"), dir("juicefs-mnt"));
        let mnt = dir("mnt");
        for m in [&mnt, &fuse_mnt] {
            force_unmount(m);
        }
        for d in [&ufs, &raw, &fuse_backing, &state] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)?;
        }
        std::fs::create_dir_all(&mnt)?;
        std::fs::create_dir_all(&fuse_mnt)?;
        let defaults = MountConfig::default();
        let fuse = passthrough::mount(
            &fuse_backing,
            &fuse_mnt,
            defaults.fuse_threads,
            o.kernel_ttl
                .unwrap_or(Duration::from_millis(defaults.attr_ttl_ms)),
        )?;
        let mut list = vec![
            Target {
                name: "raw",
                dir: raw.clone(),
                beneath: raw.clone(),
            },
            Target {
                name: "plain FUSE",
                dir: fuse_mnt.clone(),
                beneath: fuse_backing.clone(),
            },
        ];
        let no_cache = [
            "--attr-cache",
            "0",
            "--entry-cache",
            "0",
            "--dir-entry-cache",
            "0",
        ];
        let options: &[&str] = match o.kernel_ttl {
            Some(ttl) if ttl.is_zero() => &no_cache,
            _ => &[],
        };
        let juicefs = o
            .juicefs
            .then(|| JuiceFs::mount(&jfs_work, &jfs_mnt, options))
            .transpose()?;
        if juicefs.is_some() {
            list.push(Target {
                name: "JuiceFS",
                dir: jfs_mnt.clone(),
                beneath: jfs_mnt.clone(),
            });
        }
        list.push(Target {
            name: "Granary",
            dir: mnt.clone(),
            beneath: ufs.clone(),
        });
        before_granary(&list)?;
        let mut mount = defaults;
        if let Some(ttl) = o.kernel_ttl {
            mount.entry_ttl_ms = ttl.as_millis() as u64;
            mount.attr_ttl_ms = ttl.as_millis() as u64;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let cluster = rt.block_on(local::start(&LocalArgs {
            ufs: ufs.display().to_string(),
            mountpoint: mnt,
            state_dir: state.clone(),
            cache_dir: state.join("cache"),
            master_listen: "127.0.0.1:0".parse()?,
            capacity: o.capacity,
            metrics_listen: None,
            shards: 1,
            s3: Default::default(),
            mount,
            master: Default::default(),
        }))?;
        Ok(Targets {
            list,
            rt,
            cluster,
            juicefs,
            fuse,
            scratch: vec![raw, fuse_backing, jfs_work, ufs, state],
        })
    }

    /// Runs `bench` over the targets (and the names of the table's columns between raw
    /// and Granary), then takes them down; `bench`'s error comes first.
    pub fn run(
        self,
        bench: impl FnOnce(&[Target], &[&str]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let others: Vec<&str> = self.list[1..self.list.len() - 1]
            .iter()
            .map(|t| t.name)
            .collect();
        let result = bench(&self.list, &others);
        let finished = self.finish();
        result.and(finished)
    }

    fn finish(self) -> anyhow::Result<()> {
        self.rt.block_on(self.cluster.stop())?;
        drop(self.juicefs);
        drop(self.fuse);
        // Everything goes now, not at the next run's start: on ext4 without a journal an
        // inode freed in the last minutes is skipped by every create in its block group,
        // one lookup each, so mass deletes right before measuring slow the creates measured.
        for d in &self.scratch {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}
