//! `granary-fuse [--config FILE] [--master ADDR]... MOUNTPOINT`: mount Granary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use granary_fuse_client::MountConfig;

#[derive(Parser)]
#[command(name = "granary-fuse", version, about = "Mount a Granary namespace with FUSE")]
struct Args {
    /// TOML mount config (see README); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Master address host:port (repeat for every member).
    #[arg(long = "master")]
    masters: Vec<String>,
    mountpoint: PathBuf,
}

fn main() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let args = Args::parse();
    let mut cfg: MountConfig = match &args.config {
        Some(p) => granary_common::config::load_toml(p)?,
        None => MountConfig::default(),
    };
    if !args.masters.is_empty() {
        cfg.masters = args.masters.clone();
    }
    let handle = granary_fuse_client::mount(&cfg, &args.mountpoint).context("mount failed")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        tokio::select! {
            _ = granary_common::telemetry::shutdown_signal() => {}
            _ = async { while !handle.is_finished() { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
        }
    });
    handle.unmount().context("unmount failed")
}
