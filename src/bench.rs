//! `granary bench …` runs `granary-bench` (the benchmarks live in their own crate, above
//! the product and the test harness, so this binary carries none of their code).

use granary_common::consistency::ReadConsistency;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::bail;

const BENCH_BINARY: &str = "granary-bench";

/// `granary-bench` next to this binary (a cargo build puts both in `target/<profile>/`),
/// else on `PATH`.
fn bench_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(BENCH_BINARY)))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(BENCH_BINARY))
                .find(|p| p.is_file())
        })
    })
}

/// Replaces this process with `granary-bench ARGS`, passing a global
/// `--read-consistency` given before `bench` along.
pub fn exec(read_consistency: Option<ReadConsistency>, args: Vec<OsString>) -> anyhow::Result<()> {
    let Some(binary) = bench_binary() else {
        bail!(
            "{BENCH_BINARY} is not installed next to granary or on PATH; build it with \
             `cargo build --release` (it builds every binary) or `cargo build --release -p granary-bench`"
        );
    };
    let mut cmd = std::process::Command::new(&binary);
    if let Some(c) = read_consistency {
        cmd.arg("--read-consistency").arg(c.to_string());
    }
    let err = cmd.args(args).exec();
    bail!("cannot run {}: {err}", binary.display())
}
