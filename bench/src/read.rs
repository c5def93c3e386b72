//! `granary bench read`: (a) one big file read sequentially in 1 MiB reads by 1 and 4
//! readers, page cache dropped and warm; (b) many small files read whole by several
//! threads in random order, warm. Raw directory and Granary mount alternate run by run.

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
    // A previous run killed mid-way may have left its mount behind.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status();
    std::fs::create_dir_all(&mnt)?;

    let mut small: Vec<PathBuf> = Vec::new();
    list_files(&ufs, &ufs.join("small"), &mut small)?;
    small.shuffle(&mut rand::rngs::StdRng::seed_from_u64(42));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let capacity = (b.big_size + b.small_files * (b.small_size + 4096)) * 2;
    let cluster = rt.block_on(local::start(&LocalArgs {
        ufs: ufs.display().to_string(),
        mountpoint: mnt.clone(),
        state_dir: b.dir.join("state"),
        cache_dir: b.dir.join("state/cache"),
        master_listen: "127.0.0.1:0".parse()?,
        capacity: ByteSize(capacity),
        metrics_listen: None,
        shards: 1,
        s3: Default::default(),
        mount: Default::default(),
    }))?;
    let result = measure(&b, &ufs, &mnt, &small);
    // Report before tearing down, so a slow teardown cannot lose the figures.
    let reported = result.and_then(|rows| report(&b, &rows));
    rt.block_on(cluster.stop())?;
    reported
}

fn report(b: &ReadBench, rows: &[Row]) -> anyhow::Result<()> {
    let table = render(rows, &[]);
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. Dataset: one {} file; {} files of {}.\n\nCommand: `granary bench read --big-size {} --small-files {} --small-size {} --small-threads {} --runs {}` (median of {} interleaved runs)\n\n{table}",
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

fn measure(b: &ReadBench, ufs: &Path, mnt: &Path, small: &[PathBuf]) -> anyhow::Result<Vec<Row>> {
    let is_root = unsafe { libc::geteuid() } == 0;
    // First pass through the mount fills the worker cache (and loads metadata).
    eprintln!("warming the worker cache ...");
    sequential(&mnt.join(BIG), 1)?;
    small_files(mnt, small, b.small_threads)?;

    let mut rows = Vec::new();
    for readers in [1usize, 4] {
        let label = if readers == 1 {
            "1 reader".to_string()
        } else {
            format!("{readers} readers")
        };
        if is_root {
            let (mut raw, mut gr) = (Vec::new(), Vec::new());
            for _ in 0..b.runs {
                drop_page_cache()?;
                raw.push(sequential(&ufs.join(BIG), readers)?);
                drop_page_cache()?;
                gr.push(sequential(&mnt.join(BIG), readers)?);
            }
            rows.push(Row {
                case: format!("big file, {label}, page cache dropped (worker cache warm)"),
                unit: "MB/s",
                raw: median(raw),
                others: Vec::new(),
                granary: median(gr),
            });
        } else {
            eprintln!("not root: skipping the page-cache-dropped cases");
        }
        sequential(&ufs.join(BIG), 1)?;
        sequential(&mnt.join(BIG), 1)?;
        let (mut raw, mut gr) = (Vec::new(), Vec::new());
        for _ in 0..b.runs {
            raw.push(sequential(&ufs.join(BIG), readers)?);
            gr.push(sequential(&mnt.join(BIG), readers)?);
        }
        rows.push(Row {
            case: format!("big file, {label}, page cache warm"),
            unit: "MB/s",
            raw: median(raw),
            others: Vec::new(),
            granary: median(gr),
        });
    }
    small_files(ufs, small, b.small_threads)?;
    small_files(mnt, small, b.small_threads)?;
    let (mut raw, mut gr) = (Vec::new(), Vec::new());
    for _ in 0..b.runs {
        raw.push(small_files(ufs, small, b.small_threads)?);
        gr.push(small_files(mnt, small, b.small_threads)?);
    }
    let case = format!(
        "{} small files, {} threads, random order, page cache warm",
        small.len(),
        b.small_threads
    );
    rows.push(Row {
        case: case.clone(),
        unit: "files/s",
        raw: median(raw.iter().map(|r| r.0).collect()),
        others: Vec::new(),
        granary: median(gr.iter().map(|r| r.0).collect()),
    });
    rows.push(Row {
        case,
        unit: "MB/s",
        raw: median(raw.iter().map(|r| r.1).collect()),
        others: Vec::new(),
        granary: median(gr.iter().map(|r| r.1).collect()),
    });
    Ok(rows)
}
