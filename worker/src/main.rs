//! `granary-worker --config FILE`: one block cache worker.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "granary-worker", version, about = "Granary block cache worker")]
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
    Ok(granary_worker::run(config).await?)
}
