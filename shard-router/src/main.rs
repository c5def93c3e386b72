//! `granary-router --config FILE`: serves the routing table, and metadata calls for
//! clients that cannot route (proxy mode).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "granary-router",
    version,
    about = "Granary shard router: the routing table, and a metadata proxy"
)]
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    granary_common::exit::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let args = Args::parse();
    let config = granary_common::config::load_toml(&args.config)?;
    Ok(granary_shard_router::router::run(config).await?)
}
