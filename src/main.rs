//! `granary`: the user CLI. Runs the all-in-one local mode, the individual services, the
//! mount, namespace commands, admin reports and benchmarks.

mod admin;
mod bench;
mod fs_cmd;
mod report;
mod shards_cmd;
mod warmup_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use granary::{dataset, local};
use granary_common::bytesize::ByteSize;
use granary_fuse_client::cli::{ClusterArgs, MountArgs};

#[derive(Parser)]
#[command(
    name = "granary",
    version,
    about = "Granary: a POSIX caching filesystem for GPU training clusters"
)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a master, a worker and a FUSE mount over a local directory or an S3 bucket, in
    /// this process.
    Local {
        /// The dataset (the under-storage): a directory, or s3://bucket/prefix (endpoint,
        /// region and credentials from the AWS environment: AWS_ENDPOINT_URL, AWS_REGION,
        /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE).
        #[arg(long, required_unless_present = "demo")]
        ufs: Option<String>,
        /// Empty directory to mount on.
        #[arg(long = "mount", required_unless_present = "demo")]
        mountpoint: Option<PathBuf>,
        /// Generate a sample dataset and use /tmp/granary-demo/{ufs,mnt} unless given.
        #[arg(long)]
        demo: bool,
        /// Where metadata and cached blocks live (default: /var/tmp/granary/<hash of --ufs>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Block cache directory (default: <state-dir>/cache); put it on local NVMe.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Block cache capacity.
        #[arg(long, default_value = "10GiB")]
        cache_capacity: ByteSize,
        /// Master gRPC address (for `granary fs` / `admin` while this runs).
        #[arg(long, default_value = "127.0.0.1:19998")]
        master_listen: SocketAddr,
        /// Serve Prometheus metrics here.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Metadata shards, each with its own master (paths spread by their first
        /// component; `granary admin shards list` shows the table).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        shards: u16,
        /// TOML mount config (the keys of `granary mount --config`, e.g. `allow_other`,
        /// `passthrough`; its masters and staging directory are this process's own), an
        /// `[s3]` table for an s3:// UFS, and a `[master]` table (`metadata_sync_interval`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a metadata master.
    Master {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a block cache worker.
    Worker {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a shard router (the routing table, and a metadata proxy).
    Router {
        #[arg(long)]
        config: PathBuf,
    },
    /// Mount a Granary namespace (runs in the foreground; Ctrl-C unmounts).
    Mount {
        #[command(flatten)]
        mount: MountArgs,
    },
    /// Namespace commands against a master.
    Fs {
        #[command(subcommand)]
        cmd: FsCommand,
    },
    /// Cluster administration.
    Admin {
        #[command(subcommand)]
        cmd: AdminCommand,
    },
    /// Benchmarks that compare Granary with the raw under-storage side by side (runs
    /// `granary-bench`; `granary bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum FsCommand {
    /// List a directory.
    Ls { path: String },
    /// Show an inode, its UFS fingerprint, where its blocks are cached and what
    /// fraction of it (of a directory: of its whole tree) is cached.
    Stat { path: String },
    /// Load a file's or a tree's blocks into the worker caches (a dataset warm-up):
    /// spread over the workers as reads spread, many blocks at once, skipping what is
    /// cached already (run it again to resume; Ctrl-C stops cleanly).
    Load {
        path: String,
        /// The whole tree under a directory, not only the files directly in it.
        #[arg(short, long)]
        recursive: bool,
        /// Blocks fetched at once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
        parallel: u32,
        /// A line every few seconds instead of a progress bar.
        #[arg(short, long)]
        quiet: bool,
        /// Into the worker on this machine, which this machine's mounts read through,
        /// instead of spread over every worker by hash (as mounts without a worker of
        /// their own read). Run it on each training node.
        #[arg(long)]
        local: bool,
    },
    /// Drop a file's or a tree's blocks from the worker caches.
    Free {
        path: String,
        /// The whole tree under a directory, not only the files directly in it.
        #[arg(short, long)]
        recursive: bool,
        /// A line every few seconds instead of a progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a file's bytes to stdout.
    Cat { path: String },
    /// Load metadata from the UFS (recursively by default).
    LoadMetadata {
        path: String,
        /// Only this directory, not its subtree.
        #[arg(long)]
        no_recursive: bool,
        /// List directories again even if loaded, picking up changes made in the UFS
        /// behind Granary's back.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Every shard's members (role, commit, applied, lag), leader and term, mounts,
    /// workers and cache hit ratio.
    Report {
        /// As one JSON document (for scripts and monitoring).
        #[arg(long)]
        json: bool,
    },
    /// The routing table: which shard owns which paths.
    Shards {
        #[command(subcommand)]
        cmd: ShardsCommand,
    },
    /// The master group: show it or change it (joint consensus, no restarts).
    Quorum {
        #[command(subcommand)]
        cmd: QuorumCommand,
    },
}

#[derive(Subcommand)]
enum ShardsCommand {
    /// The table: shards with their masters, pinned prefixes, version.
    List,
    /// Add a shard (start its masters first, with `shard_id` and `routing` set): paths
    /// whose first component now hashes to it move there.
    Add {
        id: u32,
        /// Its masters, `host:port,host:port,...` (named apart from the global
        /// `--master`, which says where to send the change).
        #[arg(
            value_name = "MASTERS",
            value_delimiter = ',',
            num_args = 1,
            required = true
        )]
        shard_masters: Vec<String>,
    },
    /// Send a path prefix (and everything below it) to a shard, e.g. /datasets/imagenet 3.
    Pin { prefix: String, shard: u32 },
}

#[derive(Subcommand)]
enum QuorumCommand {
    /// Members, roles, leader, term and replication progress.
    Info,
    /// Add a master (start it first with this id, `join = true`, the group's `shard_id`
    /// and `routing`, and the current members in its config).
    Add {
        /// The new master's `id`.
        id: u64,
        /// The address it serves on (host:port), as the other members reach it.
        addr: String,
    },
    /// Remove a master (the leader hands off leadership first if it is the one removed).
    Remove {
        /// The master's `id` (see `quorum info`).
        id: u64,
    },
    /// Make another voter the leader.
    TransferLeader {
        /// The voter's `id` (see `quorum info`).
        id: u64,
    },
}

/// `local`, `master`, `worker` and `router` run servers whose settings come from their own
/// flags or `--config`: the flags that point commands at a running cluster would be
/// silently ignored there.
fn refuse_cluster_flags(matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let (name, why) = match matches.subcommand() {
        Some(("local", m)) => (
            ("local", m),
            "it runs its own master (on --master-listen) and mount",
        ),
        Some((name @ ("master" | "worker" | "router"), m)) => {
            ((name, m), "its settings come from --config")
        }
        _ => return Ok(()),
    };
    let (name, sub) = name;
    let given: Vec<&str> = [
        ("masters", "--master"),
        ("cluster_token", "--cluster-token"),
        ("read_consistency", "--read-consistency"),
        ("tls_ca", "--tls-ca"),
        ("tls_server_name", "--tls-server-name"),
    ]
    .into_iter()
    .filter(|(id, _)| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    .map(|(_, flag)| flag)
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "granary {name} takes no {}: {why}; those flags point `granary fs`, `admin` and \
         `mount` at a running cluster",
        given.join(", ")
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A command whose output is cut short (`granary fs ls / | head`) ends quietly, as other
/// Unix tools do. (SIGPIPE keeps Rust's "ignore": tokio writes sockets with write(2), and
/// a client must report a server that hung up, not die of it.)
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
    granary_common::exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A one-shot command prints its answer; its clients' routine narration (a routing
    // table fetched, a leader followed) would only clutter it.
    granary_common::telemetry::init_logging(match cli.command {
        Command::Fs { .. } | Command::Admin { .. } => "warn",
        _ => "info",
    });
    refuse_cluster_flags(&matches)?;
    match cli.command {
        Command::Local {
            ufs,
            mountpoint,
            demo,
            state_dir,
            cache,
            cache_capacity,
            master_listen,
            metrics_listen,
            shards,
            config,
        } => {
            let demo_root = PathBuf::from("/tmp/granary-demo");
            let ufs = ufs.unwrap_or_else(|| demo_root.join("ufs").display().to_string());
            let mountpoint = mountpoint.unwrap_or_else(|| demo_root.join("mnt"));
            if demo {
                let dir = PathBuf::from(&ufs);
                if !dir.join("README.txt").exists() {
                    eprintln!("generating the demo dataset in {ufs} ...");
                    dataset::write_demo(&dir).context("cannot write the demo dataset")?;
                }
                std::fs::create_dir_all(&mountpoint)?;
            }
            let state_dir = state_dir.unwrap_or_else(|| local::default_state_dir(&ufs));
            let local::LocalConfig { mount, s3, master } = match &config {
                Some(p) => local::load_config(p)?,
                None => Default::default(),
            };
            let args = local::LocalArgs {
                cache_dir: cache.unwrap_or_else(|| state_dir.join("cache")),
                state_dir,
                ufs,
                mountpoint,
                master_listen,
                capacity: cache_capacity,
                metrics_listen,
                shards,
                s3,
                mount,
                master,
            };
            runtime()?.block_on(async {
                if let Some(addr) = args.metrics_listen.or(args.mount.metrics_listen) {
                    use granary_common::telemetry::{CLIENT_COUNTERS, MASTER_COUNTERS, WORKER_COUNTERS};
                    let counters = [MASTER_COUNTERS, WORKER_COUNTERS, CLIENT_COUNTERS];
                    granary_common::telemetry::serve_metrics(addr, &counters)
                        .map_err(anyhow::Error::msg)?;
                }
                let cluster = local::start(&args).await?;
                eprintln!(
                    "Granary is serving {} at {} (master {}). Press Ctrl-C (or unmount it) to stop.",
                    args.ufs,
                    args.mountpoint.display(),
                    cluster.master.addr
                );
                cluster.mount.until_stopped().await;
                eprintln!("unmounting {} ...", args.mountpoint.display());
                cluster.stop().await
            })
        }
        Command::Master { config } => {
            let cfg = granary_common::config::load_toml(&config)?;
            Ok(runtime()?.block_on(granary_master::run(cfg))?)
        }
        Command::Worker { config } => {
            let cfg = granary_common::config::load_toml(&config)?;
            Ok(runtime()?.block_on(granary_worker::run(cfg))?)
        }
        Command::Router { config } => {
            let cfg = granary_common::config::load_toml(&config)?;
            Ok(runtime()?.block_on(granary_shard_router::router::run(cfg))?)
        }
        Command::Mount { mount } => {
            let cfg = mount.config(&cli.cluster)?;
            Ok(granary_fuse_client::run_mount(&cfg, &mount.mountpoint)?)
        }
        Command::Fs { cmd } => {
            let target = &cli.cluster;
            target.install_tls()?;
            let t = target.token();
            match cmd {
                FsCommand::Ls { path } => fs_cmd::ls(target, &path),
                FsCommand::Stat { path } => fs_cmd::stat(target, &path),
                FsCommand::Cat { path } => fs_cmd::cat(target, &path),
                FsCommand::Load {
                    path,
                    recursive,
                    parallel,
                    quiet,
                    local,
                } => {
                    let o = warmup_cmd::Options {
                        recursive,
                        parallel: parallel as usize,
                        quiet,
                        local,
                    };
                    warmup_cmd::load(target, &path, &o)
                }
                FsCommand::Free {
                    path,
                    recursive,
                    quiet,
                } => {
                    let o = warmup_cmd::Options {
                        recursive,
                        parallel: 1,
                        quiet,
                        local: false,
                    };
                    warmup_cmd::free(target, &path, &o)
                }
                FsCommand::LoadMetadata {
                    path,
                    no_recursive,
                    force,
                } => runtime()?.block_on(async {
                    let m = admin::answering(&target.masters, t).await;
                    fs_cmd::load_metadata(m, t, &path, !no_recursive, force).await
                }),
            }
        }
        Command::Admin { cmd } => {
            cli.cluster.install_tls()?;
            let t = cli.cluster.token();
            let m = runtime()?.block_on(admin::answering(&cli.cluster.masters, t));
            match cmd {
                AdminCommand::Report { json } => {
                    let r = runtime()?.block_on(report::collect(m, t))?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        report::print(&r);
                    }
                    Ok(())
                }
                AdminCommand::Shards { cmd } => runtime()?.block_on(async {
                    match cmd {
                        ShardsCommand::List => shards_cmd::list(m, t).await,
                        ShardsCommand::Add { id, shard_masters } => {
                            let change = shards_cmd::TableChange::AddShard {
                                id,
                                masters: shard_masters,
                            };
                            shards_cmd::change(m, t, change).await
                        }
                        ShardsCommand::Pin { prefix, shard } => {
                            let change = shards_cmd::TableChange::Pin { prefix, shard };
                            shards_cmd::change(m, t, change).await
                        }
                    }
                }),
                AdminCommand::Quorum { cmd } => runtime()?.block_on(async {
                    match cmd {
                        QuorumCommand::Info => admin::quorum_info(m, t).await,
                        QuorumCommand::Add { id, addr } => {
                            admin::quorum_change(m, t, admin::QuorumChange::Add { id, addr }).await
                        }
                        QuorumCommand::Remove { id } => {
                            admin::quorum_change(m, t, admin::QuorumChange::Remove { id }).await
                        }
                        QuorumCommand::TransferLeader { id } => {
                            admin::quorum_change(m, t, admin::QuorumChange::TransferLeader { id })
                                .await
                        }
                    }
                }),
            }
        }
        Command::Bench { args } => bench::exec(cli.cluster.read_consistency, args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_arguments_are_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn cluster_flags_follow_any_subcommand() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "granary", "admin", "shards", "add", "1", "a:1,b:2", "--master", "m:1",
        ])
        .unwrap();
        assert_eq!(cli.cluster.masters, ["m:1"]);
        let super::Command::Admin {
            cmd:
                super::AdminCommand::Shards {
                    cmd: super::ShardsCommand::Add { shard_masters, .. },
                },
        } = cli.command
        else {
            panic!("parsed as another command");
        };
        assert_eq!(shard_masters, ["a:1", "b:2"]);
    }
}
