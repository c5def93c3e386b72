//! `granary bench posix`: metadata operations through the filesystem, mdtest-style.
//! Each of `threads` threads makes `items` directories, then, phase by phase (every thread
//! finishes a phase before the next starts): creates a file in each, stats it, opens and
//! closes it, lists its directory, renames it, unlinks it, removes the directory. Then
//! `ls -l` (readdir and an lstat per entry, one thread) of a directory of `list_entries`
//! files. Raw directory, a plain passthrough FUSE, JuiceFS (with --juicefs) and the
//! Granary mount run interleaved, run by run.
//!
//! With `--kernel-cache off` every FUSE mount gets entry and attribute TTL 0, so every
//! lookup and stat reaches the filesystem's process: what a FUSE request costs there.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use granary_common::bytesize::ByteSize;
use granary_integration_tests::close;

use super::report::{machine, median, render, write_section, Row};
use super::targets::{Options, Target, Targets};

/// How long a target's first phases wait after the previous target's deletions. ext4
/// without a journal (as this bench's disks may be) passes over every inode freed in the
/// last 60 s (300 s more while its inode table block is dirty) when it allocates one, so
/// whichever target followed another's unlinks and rmdirs paid for them in its mkdirs
/// and creates (raw mkdir here: 4,600/s right after, 9,000/s half a minute later).
const INODE_AGE: Duration = Duration::from_secs(61);

/// The `ls -l` directory, under each target.
const LIST: &str = "list";

pub struct PosixBench {
    pub dir: PathBuf,
    pub items: u64,
    pub threads: usize,
    pub runs: usize,
    pub list_entries: u64,
    pub juicefs: bool,
    /// The kernel caches entries and attributes (each filesystem's defaults); off: TTL 0.
    pub kernel_cache: bool,
    pub write_docs: Option<PathBuf>,
}

type Op = fn(&Path) -> std::io::Result<()>;

/// The phases in order; each op gets its item's directory.
const PHASES: [(&str, Op); 8] = [
    ("mkdir", |d| std::fs::create_dir(d)),
    ("create", |d| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.join("f"))?;
        close(f)
    }),
    ("stat", |d| std::fs::metadata(d.join("f")).map(drop)),
    ("open+close", |d| close(File::open(d.join("f"))?)),
    ("readdir", |d| {
        let n = std::fs::read_dir(d)?.count();
        if n == 1 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "{} lists {n} entries, not 1",
                d.display()
            )))
        }
    }),
    ("rename", |d| std::fs::rename(d.join("f"), d.join("g"))),
    ("unlink", |d| std::fs::remove_file(d.join("g"))),
    ("rmdir", |d| std::fs::remove_dir(d)),
];

/// Ops/s of every phase, `threads` threads over their own `items` directories under `root`.
fn phases(root: &Path, items: u64, threads: usize) -> anyhow::Result<Vec<f64>> {
    let tops: Vec<PathBuf> = (0..threads).map(|t| root.join(format!("t{t}"))).collect();
    for t in &tops {
        std::fs::create_dir_all(t).with_context(|| format!("creating {}", t.display()))?;
    }
    let mut rates = Vec::new();
    for (name, op) in PHASES {
        let start = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = tops
                .iter()
                .map(|top| {
                    s.spawn(move || -> std::io::Result<()> {
                        (0..items).try_for_each(|i| op(&top.join(format!("d{i}"))))
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("bench thread"))
        })
        .with_context(|| format!("{name} under {}", root.display()))?;
        rates.push((items * threads as u64) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// Entries/s of `ls -l`: the directory listed, then each entry lstat'ed.
fn ls_l(dir: &Path, expected: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        std::fs::symlink_metadata(e?.path())?;
        n += 1;
    }
    if n != expected {
        bail!("{} lists {n} entries, not {expected}", dir.display());
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Fills `dir` with `count` empty files, 4 threads.
fn fill(dir: &Path, count: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                s.spawn(move || -> std::io::Result<()> {
                    (t..count)
                        .step_by(4)
                        .try_for_each(|i| close(File::create(dir.join(format!("entry-{i:07}")))?))
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("fill thread"))
    })
    .with_context(|| format!("filling {}", dir.display()))
}

pub fn run(b: PosixBench) -> anyhow::Result<()> {
    Targets::start(
        &b.dir,
        &Options {
            prefix: "posix",
            juicefs: b.juicefs,
            kernel_ttl: (!b.kernel_cache).then_some(Duration::ZERO),
            capacity: ByteSize(1 << 30),
        },
        |targets| {
            if b.list_entries > 0 {
                eprintln!(
                    "filling the ls -l directories ({} entries) ...",
                    b.list_entries
                );
                for t in targets {
                    fill(&t.beneath.join(LIST), b.list_entries)?;
                }
            }
            Ok(())
        },
    )?
    .run(|list, others| {
        let (rows, first) = measure(&b, list)?;
        report(&b, &rows, others, &first)
    })
}

/// The table's rows, and a line with each target's first `ls -l`.
fn measure(b: &PosixBench, targets: &[Target]) -> anyhow::Result<(Vec<Row>, String)> {
    let mut rates: Vec<Vec<Vec<f64>>> = targets
        .iter()
        .map(|_| vec![Vec::new(); PHASES.len()])
        .collect();
    let mut deleted_at: Option<Instant> = None;
    for run in 0..b.runs {
        eprintln!("run {} of {} ...", run + 1, b.runs);
        for (i, t) in targets.iter().enumerate() {
            if let Some(wait) = deleted_at.map(|at| INODE_AGE.saturating_sub(at.elapsed())) {
                std::thread::sleep(wait);
            }
            let got = phases(&t.dir.join(format!("run{run}")), b.items, b.threads)?;
            deleted_at = Some(Instant::now());
            for (p, r) in got.into_iter().enumerate() {
                rates[i][p].push(r);
            }
        }
    }
    let mut rows: Vec<Row> = PHASES
        .iter()
        .enumerate()
        .map(|(p, (name, _))| {
            Row::new(
                format!("{name}, {} threads", b.threads),
                "ops/s",
                rates.iter().map(|t| median(t[p].clone())).collect(),
            )
        })
        .collect();
    if b.list_entries == 0 {
        return Ok((rows, String::new()));
    }
    let first: Vec<String> = targets
        .iter()
        .map(|t| {
            Ok(format!(
                "{} {:.0}",
                t.name,
                ls_l(&t.dir.join(LIST), b.list_entries)?
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut listed: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..b.runs {
        for (i, t) in targets.iter().enumerate() {
            listed[i].push(ls_l(&t.dir.join(LIST), b.list_entries)?);
        }
    }
    rows.push(Row::new(
        format!("ls -l of {} entries, again", b.list_entries),
        "entries/s",
        listed.into_iter().map(median).collect(),
    ));
    let first = format!(
        "First `ls -l` (entries/s; Granary's loads the directory from the UFS): {}.",
        first.join(", ")
    );
    Ok((rows, first))
}

fn report(b: &PosixBench, rows: &[Row], others: &[&str], first: &str) -> anyhow::Result<()> {
    let table = render(rows, others);
    let versus_juicefs = match others.iter().position(|&n| n == "JuiceFS") {
        Some(j) => format!(
            "Granary / JuiceFS: {}.",
            rows.iter()
                .map(|r| format!(
                    "{} {:.2}x",
                    r.case.split(',').next().unwrap_or_default(),
                    r.granary / r.others[j]
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    println!("\n{table}\n{versus_juicefs}\n{first}");
    if let Some(path) = &b.write_docs {
        let cache = if b.kernel_cache {
            "Kernel caches: each filesystem's defaults (Granary and the plain FUSE keep entries and attributes 300 s, JuiceFS 1 s)."
        } else {
            "Kernel caches off: entry and attribute TTL 0 on every FUSE mount (JuiceFS: `--attr-cache 0 --entry-cache 0 --dir-entry-cache 0`), so every lookup and stat reaches the filesystem's process."
        };
        let juicefs = if b.juicefs {
            " JuiceFS: a fresh volume with SQLite metadata and its objects in a directory on that disk."
        } else {
            ""
        };
        let body = format!(
            "Machine: {}. {cache} Raw: a directory on the same disk. Plain FUSE: a passthrough FUSE mount in the bench process (as many threads as Granary's mount) of another directory there.{juicefs} Granary: `granary local` over that disk (one master, linearizable reads).\n\nCommand: `granary bench posix --items {} --threads {} --runs {} --list-entries {}{}{}` (median of {} interleaved runs)\n\n{table}\n{versus_juicefs}\n{first}\n",
            machine(),
            b.items,
            b.threads,
            b.runs,
            b.list_entries,
            if b.juicefs { " --juicefs" } else { "" },
            if b.kernel_cache { "" } else { " --kernel-cache off" },
            b.runs
        );
        let marker = if b.kernel_cache {
            "bench-posix"
        } else {
            "bench-posix-nocache"
        };
        write_section(path, marker, &body)?;
    }
    Ok(())
}
