//! `granary bench read`: (a) one big file read sequentially in 1 MiB reads by 1 and 4
//! readers, page cache dropped and warm; (b) many small files read whole by several
//! threads in random order, page cache dropped and warm. The raw directory, a read-only
//! Granary mount (FUSE passthrough, its default) and a default (writable) mount take turns
//! run by run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use granary_common::bytesize::ByteSize;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::report::{machine, median, render, write_section, Row};
use granary::dataset;
use granary::local::{self, LocalArgs};
use granary_fuse_client::config::MountConfig;
use granary_integration_tests::force_unmount;

pub struct ReadBench {
    pub dir: PathBuf,
    pub big_size: u64,
    pub small_files: u64,
    pub small_size: u64,
    pub small_threads: usize,
    pub runs: usize,
    pub write_docs: Option<PathBuf>,
}

pub(crate) const BIG: &str = "big.bin";

fn prepare_dataset(b: &ReadBench, ufs: &Path) -> anyhow::Result<()> {
    let params = format!(
        "big={} small={}x{}\n",
        b.big_size, b.small_files, b.small_size
    );
    let marker = b.dir.join("dataset.params");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(params.as_str()) {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(ufs);
    std::fs::create_dir_all(ufs.join("small"))?;
    eprintln!("generating dataset in {} ...", ufs.display());
    dataset::write_file(&ufs.join(BIG), b.big_size, 1)?;
    dataset::write_small_files(&ufs.join("small"), b.small_files, b.small_size)?;
    std::fs::write(marker, params)?;
    Ok(())
}

pub(crate) fn drop_page_cache() -> std::io::Result<()> {
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

fn read_whole(path: &Path, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut total = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// MB/s of `readers` threads each reading `path` whole in 1 MiB reads.
pub(crate) fn sequential(path: &Path, readers: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..readers)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; 1 << 20];
                    read_whole(path, &mut buf)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .sum::<std::io::Result<u64>>()
    })
    .with_context(|| format!("reading {}", path.display()))?;
    Ok(total as f64 / 1e6 / start.elapsed().as_secs_f64())
}

/// (files/s, MB/s) of `threads` threads reading `files` whole, in the given order.
pub(crate) fn small_files(
    root: &Path,
    files: &[PathBuf],
    threads: usize,
) -> anyhow::Result<(f64, f64)> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> std::io::Result<u64> {
                    let mut buf = vec![0u8; 256 << 10];
                    let mut bytes = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(rel) = files.get(i) else {
                            return Ok(bytes);
                        };
                        bytes += read_whole(&root.join(rel), &mut buf)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .sum::<std::io::Result<u64>>()
    })
    .with_context(|| format!("reading small files under {}", root.display()))?;
    let secs = start.elapsed().as_secs_f64();
    Ok((files.len() as f64 / secs, total as f64 / 1e6 / secs))
}

pub(crate) fn list_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            list_files(root, &e.path(), out)?;
        } else {
            out.push(
                e.path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_path_buf(),
            );
        }
    }
    Ok(())
}

pub fn run(b: ReadBench) -> anyhow::Result<()> {
    let ufs = b.dir.join("ufs");
    let mnt = b.dir.join("mnt");
    prepare_dataset(&b, &ufs)?;
    let alt_mnt = b.dir.join("mnt-alt");
    let zm_mnt = b.dir.join("mnt-open-in-kernel");
    for m in [&mnt, &alt_mnt, &zm_mnt] {
        // A previous run killed mid-way may have left its mount behind.
        force_unmount(m);
        std::fs::create_dir_all(m)?;
    }

    let mut small: Vec<PathBuf> = Vec::new();
    list_files(&ufs, &ufs.join("small"), &mut small)?;
    small.shuffle(&mut rand::rngs::StdRng::seed_from_u64(42));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Room for the dataset eight times over: all of it stays cached, and the big file is
    // small enough beside the capacity for its blocks to share one data file (as a
    // dataset's files do in a worker's default 100 GiB), which passthrough can read.
    let capacity = (b.big_size + b.small_files * (b.small_size + 4096)) * 8;
    let state = b.dir.join("state");
    // A fresh namespace and cache every run (the first pass below fills the cache): a
    // kept one may describe an older dataset, and a restarted local master does not list
    // its UFS again.
    let _ = std::fs::remove_dir_all(&state);
    let cluster = rt.block_on(local::start(&LocalArgs {
        ufs: ufs.display().to_string(),
        mountpoint: mnt.clone(),
        state_dir: state.clone(),
        cache_dir: state.join("cache"),
        master_listen: "127.0.0.1:0".parse()?,
        capacity: ByteSize(capacity),
        metrics_listen: None,
        shards: 1,
        s3: Default::default(),
        mount: Default::default(),
        master: Default::default(),
    }))?;
    // Two read-only mounts of the same cluster: one with its defaults (FUSE passthrough,
    // off on a writable mount), one with zero-message opens, so each way is measured in
    // one run.
    let read_only = |staging: &str, open_in_kernel: bool| MountConfig {
        masters: vec![cluster.master.addr.to_string()],
        staging_dir: state.join(staging),
        read_only: true,
        open_in_kernel,
        ..MountConfig::default()
    };
    let alt = granary_fuse_client::mount(&read_only("staging-alt", false), &alt_mnt)?;
    let zm = granary_fuse_client::mount(&read_only("staging-zm", true), &zm_mnt)?;
    let alts = [
        "granary, read-only (passthrough)",
        "granary, read-only, open_in_kernel",
    ];
    let result = measure(&b, &[&ufs, &alt_mnt, &zm_mnt, &mnt], &small);
    // Report before tearing down, so a slow teardown cannot lose the figures.
    let reported = result.and_then(|rows| report(&b, &rows, &alts));
    drop(zm);
    drop(alt);
    rt.block_on(cluster.stop())?;
    reported
}

fn report(b: &ReadBench, rows: &[Row], alts: &[&str]) -> anyhow::Result<()> {
    let table = render(rows, alts);
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. Dataset: one {} file; {} files of {}. Granary: a default (writable) mount; read-only: a second mount of the same cluster with `read_only = true`, where FUSE passthrough is on by default; open_in_kernel: a third with `read_only = true` and `open_in_kernel = true` (zero-message opens, no passthrough).\n\nCommand: `granary bench read --big-size {} --small-files {} --small-size {} --small-threads {} --runs {}` (median of {} interleaved runs)\n\n{table}",
            machine(),
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            b.small_threads,
            b.runs,
            b.runs
        );
        write_section(path, "bench-read", &body)?;
    }
    Ok(())
}

/// One row from each target's runs (raw first, Granary's default mount last).
fn row(case: String, unit: &'static str, runs: Vec<Vec<f64>>) -> Row {
    Row::new(case, unit, runs.into_iter().map(median).collect())
}

/// Rows over `targets`: the raw directory, then mounts of it, run by run in turn.
fn measure(b: &ReadBench, targets: &[&Path], small: &[PathBuf]) -> anyhow::Result<Vec<Row>> {
    let is_root = unsafe { libc::geteuid() } == 0;
    // First pass through each mount fills the worker cache (and loads metadata).
    eprintln!("warming the worker cache ...");
    for t in &targets[1..] {
        sequential(&t.join(BIG), 1)?;
        small_files(t, small, b.small_threads)?;
    }
    let runs = || vec![Vec::new(); targets.len()];
    let mut rows = Vec::new();
    for readers in [1usize, 4] {
        let label = if readers == 1 {
            "1 reader".to_string()
        } else {
            format!("{readers} readers")
        };
        if is_root {
            let mut got = runs();
            for _ in 0..b.runs {
                for (i, t) in targets.iter().enumerate() {
                    drop_page_cache()?;
                    got[i].push(sequential(&t.join(BIG), readers)?);
                }
            }
            rows.push(row(
                format!("big file, {label}, page cache dropped (worker cache warm)"),
                "MB/s",
                got,
            ));
        } else {
            eprintln!("not root: skipping the page-cache-dropped cases");
        }
        let mut got = runs();
        for t in targets {
            sequential(&t.join(BIG), 1)?;
        }
        for _ in 0..b.runs {
            for (i, t) in targets.iter().enumerate() {
                got[i].push(sequential(&t.join(BIG), readers)?);
            }
        }
        rows.push(row(
            format!("big file, {label}, page cache warm"),
            "MB/s",
            got,
        ));
    }
    let small_case = |state: &str| {
        format!(
            "{} small files, {} threads, random order, {state}",
            small.len(),
            b.small_threads
        )
    };
    if is_root {
        let mut got = runs();
        for _ in 0..b.runs {
            for (i, t) in targets.iter().enumerate() {
                drop_page_cache()?;
                got[i].push(small_files(t, small, b.small_threads)?.0);
            }
        }
        rows.push(row(
            small_case("page cache dropped (worker cache warm)"),
            "files/s",
            got,
        ));
    }
    for t in targets {
        small_files(t, small, b.small_threads)?;
    }
    let (mut files, mut mb) = (runs(), runs());
    for _ in 0..b.runs {
        for (i, t) in targets.iter().enumerate() {
            let (f, m) = small_files(t, small, b.small_threads)?;
            files[i].push(f);
            mb[i].push(m);
        }
    }
    rows.push(row(small_case("page cache warm"), "files/s", files));
    rows.push(row(small_case("page cache warm"), "MB/s", mb));
    Ok(rows)
}
