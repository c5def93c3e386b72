//! `granary-worker --config FILE`: one block cache worker.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use granary_worker::WorkerConfig;

#[derive(Parser)]
#[command(name = "granary-worker", version, about = "Granary block cache worker")]
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let args = Args::parse();
    let config: WorkerConfig = granary_common::config::load_toml(&args.config)?;
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(addr).map_err(anyhow::Error::msg)?;
    }
    let worker = granary_worker::start(config).await.context("worker failed to start")?;
    granary_common::telemetry::shutdown_signal().await;
    worker.stop();
    Ok(())
}
