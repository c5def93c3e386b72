//! `granary-fuse [--config FILE] [--master ADDR]... MOUNTPOINT`: mount Granary.

use std::path::PathBuf;

use clap::Parser;
use granary_fuse_client::MountConfig;

#[derive(Parser)]
#[command(
    name = "granary-fuse",
    version,
    about = "Mount a Granary namespace with FUSE"
)]
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
        cfg.masters = args.masters;
    }
    Ok(granary_fuse_client::run_mount(&cfg, &args.mountpoint)?)
}
