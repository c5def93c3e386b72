//! `granary-master --config FILE`: one metadata master.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use granary_master::MasterConfig;

#[derive(Parser)]
#[command(name = "granary-master", version, about = "Granary metadata master")]
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let args = Args::parse();
    let config: MasterConfig = granary_common::config::load_toml(&args.config)?;
    if let Some(addr) = config.metrics_listen {
        granary_common::telemetry::serve_metrics(addr).map_err(anyhow::Error::msg)?;
    }
    let mut master = granary_master::start(config).await.context("master failed to start")?;
    tokio::select! {
        r = master.wait() => r.map_err(anyhow::Error::msg).context("master server stopped"),
        _ = granary_common::telemetry::shutdown_signal() => { master.stop().await; Ok(()) }
    }
}
