//! `granary fs load` / `granary fs free`: warm a tree into the worker caches or drop it,
//! with a progress bar (periodic lines when quiet or not on a terminal). Ctrl-C stops a
//! warm-up cleanly: blocks in flight finish whole, and running it again resumes.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use granary_fuse_client::cli::ClusterArgs;
use granary_fuse_client::warmup::{Progress, Tree, Warmup};
use granary_protos::v1::FileKind;
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};

use crate::fs_cmd;

static CANCELLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
    // A second Ctrl-C ends the process at once.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

fn catch_interrupt() {
    // SAFETY: the handler only stores to an atomic and resets the disposition.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
}

pub struct Options {
    pub recursive: bool,
    pub parallel: usize,
    pub quiet: bool,
    /// Into the worker on this machine (a load).
    pub local: bool,
}

enum Work {
    Load,
    Free,
}

pub fn load(t: &ClusterArgs, path: &str, o: &Options) -> anyhow::Result<()> {
    run(t, path, o, Work::Load)
}

pub fn free(t: &ClusterArgs, path: &str, o: &Options) -> anyhow::Result<()> {
    run(t, path, o, Work::Free)
}

/// The files under `path` and the tool that works on them.
fn plan(t: &ClusterArgs, path: &str, o: &Options) -> anyhow::Result<(Warmup, Tree)> {
    let recursive = o.recursive;
    let c = fs_cmd::connect(t)?;
    let root = c.resolve(path)?;
    let warmup = match o.local {
        true => Warmup::new(c.meta.clone(), t.token()).local(),
        false => Warmup::new(c.meta.clone(), t.token()),
    };
    let tree = warmup.tree(&root, recursive)?;
    if !recursive && root.kind == FileKind::Directory as i32 {
        let (page, _) = c.meta.readdir(root.id, b"", 4096)?;
        let dirs = page
            .iter()
            .filter(|e| e.kind == FileKind::Directory as i32)
            .count();
        if dirs > 0 {
            eprintln!(
                "{path}: {dirs} subdirectories left out (add --recursive for the whole tree)"
            );
        }
    }
    Ok((warmup, tree))
}

fn run(t: &ClusterArgs, path: &str, o: &Options, work: Work) -> anyhow::Result<()> {
    let (warmup, tree) = plan(t, path, o)?;
    let (files, bytes) = (tree.files.len() as u64, tree.bytes);
    let verb = match work {
        Work::Load => "loading",
        Work::Free => "freeing",
    };
    eprintln!("{verb} {path}: {files} files, {}", HumanBytes(bytes));
    catch_interrupt();
    let progress = Progress::default();
    let started = Instant::now();
    std::thread::scope(|s| {
        let worker = s.spawn(|| match work {
            Work::Load => warmup.load(tree.files, o.parallel, &CANCELLED, &progress),
            Work::Free => warmup.free(tree.files, &CANCELLED, &progress),
        });
        let display = Display::new(o.quiet, files, bytes);
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(200));
            display.show(&progress, started);
        }
        display.finish(&progress, started);
    });
    let done = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let failed = done(&progress.failed);
    let took = started.elapsed();
    match work {
        Work::Load => eprintln!(
            "{path}: {}/{files} files cached; {} fetched in {} blocks, {} already cached, {} blocks failed, in {}",
            done(&progress.files),
            HumanBytes(done(&progress.bytes_done)),
            done(&progress.blocks_done),
            HumanBytes(done(&progress.bytes_skipped)),
            failed,
            seconds(took)
        ),
        Work::Free => eprintln!(
            "{path}: {} dropped from the caches ({} blocks), {}/{files} files from every worker, {failed} not, in {}",
            HumanBytes(done(&progress.bytes_done)),
            done(&progress.blocks_done),
            done(&progress.files),
            seconds(took)
        ),
    }
    if CANCELLED.load(Ordering::SeqCst) {
        bail!("interrupted: what was cached stays cached; run the command again to go on");
    }
    if failed > 0 {
        let why = progress.first_error.lock().expect("progress lock").clone();
        let what = match work {
            Work::Load => "blocks could not be cached",
            Work::Free => "files could not be dropped from every worker",
        };
        bail!(
            "{failed} {what} (first: {}); run the command again to retry them",
            why.unwrap_or_default()
        );
    }
    Ok(())
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A progress bar on a terminal, else a line every few seconds.
struct Display {
    bar: Option<ProgressBar>,
    files: u64,
    bytes: u64,
    last_line: std::cell::Cell<Instant>,
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Display {
    fn new(quiet: bool, files: u64, bytes: u64) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Display {
            bar,
            files,
            bytes,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn show(&self, p: &Progress, started: Instant) {
        let files = p.files.load(Ordering::Relaxed);
        let moved = p.bytes_done.load(Ordering::Relaxed);
        let position = moved + p.bytes_skipped.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => {
                bar.set_position(position.min(self.bytes));
                bar.set_message(format!("{files}/{} files", self.files));
            }
            None if self.last_line.get().elapsed() >= LINE_EVERY => {
                self.last_line.set(Instant::now());
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let rate = moved as f64 / secs;
                let eta = match rate > 0.0 {
                    true => HumanDuration(Duration::from_secs_f64(
                        self.bytes.saturating_sub(position) as f64 / rate,
                    ))
                    .to_string(),
                    false => "-".into(),
                };
                eprintln!(
                    "{files}/{} files, {}/{}, {}/s, ETA {eta}",
                    self.files,
                    HumanBytes(position),
                    HumanBytes(self.bytes),
                    HumanBytes(rate as u64)
                );
            }
            None => {}
        }
    }

    fn finish(&self, p: &Progress, started: Instant) {
        self.show(p, started);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Bytes of the tree at `path` cached on some worker.
pub fn cached(t: &ClusterArgs, path: &str) -> anyhow::Result<(u64, u64)> {
    let whole = Options {
        recursive: true,
        parallel: 1,
        quiet: true,
        local: false,
    };
    let (warmup, tree) = plan(t, path, &whole)?;
    Ok((warmup.cached_bytes(&tree.files)?, tree.bytes))
}
