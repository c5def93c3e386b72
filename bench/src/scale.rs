//! `granary bench scale --inodes N`: how one shard grows. A generated UFS tree of N files
//! (1000 per directory) is loaded into a single master through `load-metadata`; the table
//! gives the load rate, the bytes each inode takes on disk, the master's memory, and from
//! those how many shards 1 and 10 billion files need.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use granary_common::auth::AttachToken;
use granary_common::bytesize::ByteSize;
use granary_integration_tests::{wait_until, Cluster, MasterSpec};
use granary_shard_router::RoutingTable;

use super::meta::populate;
use super::report::{machine, write_section};

pub struct ScaleBench {
    pub inodes: u64,
    /// Disk a master may give its namespace store (for the extrapolation).
    pub disk_per_master: u64,
    /// The master's page cache (`store_cache`).
    pub store_cache: u64,
    pub write_docs: Option<PathBuf>,
}

/// A UFS directory on tmpfs when there is one: millions of empty files are made and
/// listed many times faster there, and the disk is not what is measured.
fn ufs_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join("granary-bench-scale")
    } else {
        PathBuf::from("/var/tmp/granary-bench-scale")
    }
}

/// Resident and peak memory of a process, from /proc/<pid>/status (bytes).
fn memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kib| kib << 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

pub fn run(b: ScaleBench) -> anyhow::Result<()> {
    let ufs = ufs_root();
    std::fs::create_dir_all(&ufs)?;
    eprintln!("making {} files under {} ...", b.inodes, ufs.display());
    populate(&ufs, b.inodes)?;
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.clone(),
        worker: false,
        store_cache: b.store_cache.to_string(),
        ..Default::default()
    })?;
    let pid = c.masters[&1]
        .proc
        .as_ref()
        .context("the master is not running")?
        .pid();
    let (rss_empty, _) = memory(pid);
    let table = RoutingTable::single(c.master_addrs());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!("loading ...");
    let started = Instant::now();
    let pb = granary::dataset::progress(b.inodes, "loaded");
    let done = rt.block_on(granary_shard_router::load_tree(
        &table,
        b"/",
        true,
        false,
        &AttachToken::default(),
        |p| pb.set_position(p.files),
    ))?;
    let took = started.elapsed();
    pb.finish_and_clear();
    let inodes = done.directories + done.files;
    // The applied state reaches the file within a second; wait for it to settle.
    let store = c.dir.path().join("master-1/namespace.redb");
    let mut size = 0;
    wait_until("the store to settle", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = file_size(&store);
        let settled = now == size;
        size = now;
        settled
    })?;
    let log = file_size(&c.dir.path().join("master-1/raft.log"));
    let (rss, peak) = memory(pid);
    let per_inode = size as f64 / inodes.max(1) as f64;
    let per_shard = (b.disk_per_master as f64 / per_inode) as u64;
    let shards = |files: u64| files.div_ceil(per_shard.max(1));
    let rate = inodes as f64 / took.as_secs_f64();
    let rows = [
        (
            "inodes loaded",
            format!("{inodes} ({} directories)", done.directories),
        ),
        (
            "load time, rate",
            format!("{:.1} s, {:.0} inodes/s", took.as_secs_f64(), rate),
        ),
        (
            "namespace store on disk",
            format!("{} (**{per_inode:.0} B per inode**)", ByteSize(size)),
        ),
        ("Raft log on disk", ByteSize(log).to_string()),
        (
            "master memory (RSS after load / peak / empty)",
            format!(
                "{} / {} / {}",
                ByteSize(rss),
                ByteSize(peak),
                ByteSize(rss_empty)
            ),
        ),
        (
            "inodes per shard with the store given",
            format!("{per_shard} ({} each)", ByteSize(b.disk_per_master)),
        ),
        (
            "shards for 1 billion files",
            format!(
                "{} (each loads its share in parallel: ~{:.1} h at this rate)",
                shards(1_000_000_000),
                1e9 / shards(1_000_000_000) as f64 / rate / 3600.0
            ),
        ),
        (
            "shards for 10 billion files",
            format!("{}", shards(10_000_000_000)),
        ),
    ];
    let mut out = String::from("| measure | value |\n|---|---|\n");
    for (k, v) in rows {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    println!("\n{out}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. One master, the UFS a generated tree of empty files (1000 per directory) on {}, loaded with `load-metadata` (8 directories listed at once, one Raft command per directory). The store's page cache (`store_cache`) is {}; what does not fit stays on disk.\n\nCommand: `granary bench scale --inodes {} --disk-per-master {} --store-cache {}`\n\n{out}",
            machine(),
            ufs.display(),
            ByteSize(b.store_cache),
            b.inodes,
            ByteSize(b.disk_per_master),
            ByteSize(b.store_cache),
        );
        write_section(path, "bench-scale", &body)?;
    }
    Ok(())
}
