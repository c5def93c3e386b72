//! `granary bench write`: (a) a checkpoint-style write of one big file in 1 MiB writes,
//! then fsync and close; (b) many small files created, written and closed by several
//! threads. Raw directory, a plain passthrough FUSE mount of another directory on the
//! same disk (what FUSE itself costs) and the Granary mount alternate run by run; every
//! run writes fresh files. The checkpoint's figures include its fsync everywhere; a small
//! file's close on Granary also uploads it and commits it through the master.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use granary_common::bytesize::ByteSize;
use granary_integration_tests::close;

use super::report::{machine, machine_busy_seconds, median, render, write_section, Row};
use super::targets::{Options, Target, Targets};

pub struct WriteBench {
    pub dir: PathBuf,
    pub big_size: u64,
    pub small_files: u64,
    pub small_size: u64,
    pub small_threads: usize,
    pub runs: usize,
    /// Also measure JuiceFS (the `juicefs` binary on PATH).
    pub juicefs: bool,
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
    Targets::start(
        &b.dir,
        &Options {
            prefix: "write",
            juicefs: b.juicefs,
            kernel_ttl: None,
            capacity: ByteSize((b.big_size * 2).max(1 << 30)),
        },
        |_| Ok(()),
    )?
    .run(|list, others| {
        let (rows, cpu) = measure(&b, list)?;
        report(&b, &rows, others, &cpu)
    })
}

/// The table's rows, and a line with the CPU time per small file on each target.
fn measure(b: &WriteBench, targets: &[Target]) -> anyhow::Result<(Vec<Row>, String)> {
    let mut ckpt: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let mut small: Vec<Vec<SmallFiles>> = targets.iter().map(|_| Vec::new()).collect();
    for run in 0..b.runs {
        eprintln!("run {} of {} ...", run + 1, b.runs);
        for (i, t) in targets.iter().enumerate() {
            let path = t.dir.join(format!("ckpt-{run}"));
            ckpt[i].push(checkpoint(&path, b.big_size)?);
            // Old checkpoints go, as a training job rotates them; disk space stays bounded.
            std::fs::remove_file(&path)?;
        }
        for (i, t) in targets.iter().enumerate() {
            small[i].push(small_files(
                &t.dir.join(format!("small-{run}")),
                b.small_files,
                b.small_size,
                b.small_threads,
            )?);
        }
    }
    let cpu: Option<Vec<String>> = targets
        .iter()
        .zip(&small)
        .map(|(t, runs)| {
            let v: Option<Vec<f64>> = runs.iter().map(|s| s.cpu_per_file).collect();
            Some(format!("{} {:.0} µs", t.name, median(v?) * 1e6))
        })
        .collect();
    let cpu = match cpu {
        Some(each) => format!(
            "CPU time per small file, whole machine (/proc/stat, median): {}.",
            each.join(", ")
        ),
        None => "CPU time per small file: unavailable (/proc/stat unreadable).".to_string(),
    };
    let rows = vec![
        Row::new(
            format!(
                "checkpoint: one {} file, 1 MiB writes + fsync + close",
                ByteSize(b.big_size)
            ),
            "MB/s",
            ckpt.into_iter().map(median).collect(),
        ),
        Row::new(
            format!(
                "{} small files of {}, {} threads (create, write, close)",
                b.small_files,
                ByteSize(b.small_size),
                b.small_threads
            ),
            "files/s",
            small
                .iter()
                .map(|runs| median(runs.iter().map(|s| s.per_s).collect()))
                .collect(),
        ),
    ];
    Ok((rows, cpu))
}

fn report(b: &WriteBench, rows: &[Row], others: &[&str], cpu: &str) -> anyhow::Result<()> {
    let table = render(rows, others);
    println!("\n{table}\n{cpu}");
    if let Some(path) = &b.write_docs {
        let juicefs = if b.juicefs {
            "JuiceFS: a fresh volume with SQLite metadata and its objects in a directory on that disk, default settings (a close uploads and commits). "
        } else {
            ""
        };
        let body = format!(
            "Machine: {}. Raw: a directory on the same disk as the UFS (fsync before close). Plain FUSE: a passthrough FUSE mount (in the bench process, as many threads as Granary's mount, direct I/O for writers) of another directory on that disk; what FUSE alone costs. {juicefs}Granary: `granary local` over that disk; the mount writes into the UFS temp file its worker hands over (local upload; a file of up to 256 KiB is held in memory and sent whole at close), a close or fsync has the worker cache the blocks and rename the file into place, then commits through the master.\n\nCommand: `granary bench write --big-size {} --small-files {} --small-size {} --small-threads {} --runs {}{}` (median of {} interleaved runs)\n\n{table}\n{cpu}\n",
            machine(),
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            b.small_threads,
            b.runs,
            if b.juicefs { " --juicefs" } else { "" },
            b.runs
        );
        write_section(path, "bench-write", &body)?;
    }
    Ok(())
}
