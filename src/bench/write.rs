//! `granary bench write`: (a) a checkpoint-style write of one big file in 1 MiB writes,
//! then fsync and close; (b) many small files created, written and closed by several
//! threads. Raw directory and Granary mount alternate run by run; every run writes fresh
//! files (the figures include making them durable: fsync on raw, the upload and commit
//! that close performs on Granary).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use granary_common::bytesize::ByteSize;
use granary_integration_tests::close;

use super::report::{machine, machine_busy_seconds, median, render, write_section, Row};
use crate::local::{self, LocalArgs};

pub struct WriteBench {
    pub dir: PathBuf,
    pub big_size: u64,
    pub small_files: u64,
    pub small_size: u64,
    pub small_threads: usize,
    pub runs: usize,
    pub write_docs: Option<PathBuf>,
}

/// MB/s of writing `size` bytes to `path` in 1 MiB writes, then fsync and close.
fn checkpoint(path: &Path, size: u64) -> anyhow::Result<f64> {
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let start = Instant::now();
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    close(f)?;
    Ok(size as f64 / 1e6 / start.elapsed().as_secs_f64())
}

/// Files/s of `threads` threads creating `count` files of `size` bytes under `dir`, each
/// written whole and closed, and the machine's CPU seconds per file meanwhile (every
/// process: for Granary the mount, master and worker too). Each thread writes its own
/// subdirectories of 100 files (as data-loader or rank processes write their own
/// shards): creates in one directory are serialized by the kernel on any filesystem.
fn small_files(dir: &Path, count: u64, size: u64, threads: usize) -> anyhow::Result<SmallFiles> {
    let threads = threads as u64;
    // Thread t writes its share into directories t, t + threads, t + 2 * threads, ...
    let share = |t: u64| count / threads + u64::from(t < count % threads);
    for d in 0..share(0).div_ceil(100) * threads {
        std::fs::create_dir_all(dir.join(format!("d{d}")))?;
    }
    let data = vec![0x5au8; size as usize];
    let busy = machine_busy_seconds();
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let data = &data;
                s.spawn(move || -> std::io::Result<()> {
                    for i in 0..share(t) {
                        let d = (i / 100) * threads + t;
                        let mut f = File::create(dir.join(format!("d{d}/f{i}")))?;
                        f.write_all(data)?;
                        close(f)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("writer thread"))
    })
    .with_context(|| format!("writing small files under {}", dir.display()))?;
    Ok(SmallFiles {
        per_s: count as f64 / start.elapsed().as_secs_f64(),
        cpu_per_file: busy
            .zip(machine_busy_seconds())
            .map(|(before, after)| (after - before) / count as f64),
    })
}

struct SmallFiles {
    per_s: f64,
    /// None where /proc/stat cannot be read.
    cpu_per_file: Option<f64>,
}

pub fn run(b: WriteBench) -> anyhow::Result<()> {
    let ufs = b.dir.join("write-ufs");
    let raw = b.dir.join("write-raw");
    let mnt = b.dir.join("write-mnt");
    let state = b.dir.join("write-state");
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status();
    for d in [&ufs, &raw, &state] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    std::fs::create_dir_all(&mnt)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = rt.block_on(local::start(&LocalArgs {
        ufs: ufs.clone(),
        mountpoint: mnt.clone(),
        state_dir: state.clone(),
        cache_dir: state.join("cache"),
        master_listen: "127.0.0.1:0".parse()?,
        capacity: ByteSize((b.big_size * 2).max(1 << 30)),
        metrics_listen: None,
    }))?;
    let result = measure(&b, &raw, &mnt);
    let reported = result.and_then(|(rows, cpu)| report(&b, &rows, &cpu));
    rt.block_on(cluster.stop())?;
    // Everything goes now, not at the next run's start: on ext4 without a journal an
    // inode freed in the last minutes is skipped by every create in its block group,
    // one lookup each, so mass deletes right before measuring slow the creates measured.
    for d in [&raw, &ufs, &state] {
        let _ = std::fs::remove_dir_all(d);
    }
    reported
}

/// The table's rows, and a line with the CPU time per small file.
fn measure(b: &WriteBench, raw: &Path, mnt: &Path) -> anyhow::Result<(Vec<Row>, String)> {
    let (mut raw_ckpt, mut gr_ckpt) = (Vec::new(), Vec::new());
    let (mut raw_small, mut gr_small) = (Vec::new(), Vec::new());
    for run in 0..b.runs {
        eprintln!("run {} of {} ...", run + 1, b.runs);
        raw_ckpt.push(checkpoint(&raw.join(format!("ckpt-{run}")), b.big_size)?);
        gr_ckpt.push(checkpoint(&mnt.join(format!("ckpt-{run}")), b.big_size)?);
        // Old checkpoints go, as a training job rotates them; disk space stays bounded.
        std::fs::remove_file(raw.join(format!("ckpt-{run}")))?;
        std::fs::remove_file(mnt.join(format!("ckpt-{run}")))?;
        let sub = format!("small-{run}");
        raw_small.push(small_files(
            &raw.join(&sub),
            b.small_files,
            b.small_size,
            b.small_threads,
        )?);
        gr_small.push(small_files(
            &mnt.join(&sub),
            b.small_files,
            b.small_size,
            b.small_threads,
        )?);
    }
    let cpu_us = |runs: &[SmallFiles]| -> Option<f64> {
        let v: Option<Vec<f64>> = runs.iter().map(|s| s.cpu_per_file).collect();
        Some(median(v?) * 1e6)
    };
    let cpu = match (cpu_us(&raw_small), cpu_us(&gr_small)) {
        (Some(raw), Some(granary)) => format!(
            "CPU time per small file, whole machine (/proc/stat, median): raw {raw:.0} µs, Granary {granary:.0} µs."
        ),
        _ => "CPU time per small file: unavailable (/proc/stat unreadable).".to_string(),
    };
    let rows = vec![
        Row {
            case: format!(
                "checkpoint: one {} file, 1 MiB writes + fsync + close",
                ByteSize(b.big_size)
            ),
            unit: "MB/s",
            raw: median(raw_ckpt),
            granary: median(gr_ckpt),
        },
        Row {
            case: format!(
                "{} small files of {}, {} threads (create, write, close)",
                b.small_files,
                ByteSize(b.small_size),
                b.small_threads
            ),
            unit: "files/s",
            raw: median(raw_small.iter().map(|s| s.per_s).collect()),
            granary: median(gr_small.iter().map(|s| s.per_s).collect()),
        },
    ];
    Ok((rows, cpu))
}

fn report(b: &WriteBench, rows: &[Row], cpu: &str) -> anyhow::Result<()> {
    let table = render(rows);
    println!("\n{table}\n{cpu}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. Raw: a directory on the same disk as the UFS (fsync before close). Granary: `granary local` over that disk; the mount writes into the UFS temp file its worker hands over (local upload; a file of up to 256 KiB is held in memory and sent whole at close), a close or fsync has the worker cache the blocks and rename the file into place, then commits through the master.\n\nCommand: `granary bench write --big-size {} --small-files {} --small-size {} --small-threads {} --runs {}` (median of {} interleaved runs)\n\n{table}\n{cpu}\n",
            machine(),
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            b.small_threads,
            b.runs,
            b.runs
        );
        write_section(path, "bench-write", &body)?;
    }
    Ok(())
}
