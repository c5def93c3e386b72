//! `granary-fuse [--config FILE] [--master ADDR]... [--cluster-token T]
//! [--read-consistency C] MOUNTPOINT`: mount Granary.

use clap::Parser;
use granary_fuse_client::cli::{ClusterArgs, MountArgs};

#[derive(Parser)]
#[command(
    name = "granary-fuse",
    version,
    about = "Mount a Granary namespace with FUSE"
)]
struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    mount: MountArgs,
}

fn main() -> std::process::ExitCode {
    granary_common::exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let args = Args::parse();
    let cfg = args.mount.config(&args.cluster)?;
    Ok(granary_fuse_client::run_mount(
        &cfg,
        &args.mount.mountpoint,
    )?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_arguments_are_well_formed() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
