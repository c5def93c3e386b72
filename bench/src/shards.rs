//! `granary bench meta --shards 1,2,4`: metadata throughput of one namespace spread over
//! 1, 2, 4, … shards (one master each), side by side in one run: getattr and lookup
//! through a routing client, and file creates (a UFS create and a Raft commit each).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use granary_common::auth::AttachToken;
use granary_common::consistency::ReadConsistency;
use granary_integration_tests::{Cluster, MasterSpec};
use granary_meta_client::{ClientOptions, MetadataService};
use granary_protos::v1::{CreateRequest, FileKind, Inode};
use granary_shard_router::{RoutingTable, ShardedMetadata, ROOT};
use rand::{Rng, SeedableRng};

use super::meta::populate;
use super::report::{machine, write_section};

pub struct ShardsBench {
    pub entries: u64,
    pub shards: Vec<u16>,
    pub threads: usize,
    pub seconds: u64,
    pub consistency: ReadConsistency,
    pub write_docs: Option<PathBuf>,
}

struct Row {
    shards: u16,
    reads: f64,
    creates: f64,
    errors: u64,
    spread: String,
}

pub fn run(b: ShardsBench) -> anyhow::Result<()> {
    let work = PathBuf::from("/var/tmp/granary-bench-meta");
    let ufs = work.join("ufs");
    std::fs::create_dir_all(&ufs)?;
    populate(&ufs, b.entries)?;
    let mut rows = Vec::new();
    for &n in &b.shards {
        eprintln!("{n} shard(s): starting, loading {} entries ...", b.entries);
        let row = one(&b, &ufs, n.max(1))?;
        eprintln!(
            "{n} shard(s): {:.0} reads/s, {:.0} creates/s, {} errors",
            row.reads, row.creates, row.errors
        );
        rows.push(row);
    }
    let base = rows
        .first()
        .map(|r| (r.reads, r.creates))
        .unwrap_or((1.0, 1.0));
    let mut table = String::from(
        "| shards | getattr+lookup ops/s | × 1 shard | creates/s | × 1 shard | errors | top-level directories per shard |\n|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.0} | {:.2}x | {:.0} | {:.2}x | {} | {} |\n",
            r.shards,
            r.reads,
            r.reads / base.0.max(1.0),
            r.creates,
            r.creates / base.1.max(1.0),
            r.errors,
            r.spread
        ));
    }
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let list: Vec<String> = b.shards.iter().map(u16::to_string).collect();
        let body = format!(
            "Machine: {}. One master per shard, all on this machine. {} namespace entries (1000 per directory), {} client threads through one routing client (a mount's `ShardedMetadata`), read consistency `{}`, {} s per phase. Reads: getattr 55%, lookup 45% of random files; creates: empty files in random directories (a UFS create and a Raft commit each).\n\nCommand: `granary bench meta --shards {} --entries {} --threads {} --seconds {}`\n\n{table}",
            machine(),
            b.entries,
            b.threads,
            b.consistency,
            b.seconds,
            list.join(","),
            b.entries,
            b.threads,
            b.seconds,
        );
        write_section(path, "bench-shards", &body)?;
    }
    Ok(())
}

/// Starts `n` one-master shards over `ufs`, loads it, and measures.
fn one(b: &ShardsBench, ufs: &std::path::Path, n: u16) -> anyhow::Result<Row> {
    let s0 = Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        worker: false,
        ..Default::default()
    })?;
    let shard0 = s0.master_addrs();
    let mut others = Vec::new();
    for id in 1..n {
        let g = Cluster::start(&MasterSpec {
            ufs: ufs.to_path_buf(),
            shard_id: id,
            routing: shard0.clone(),
            worker: false,
            ..Default::default()
        })?;
        let version = s0.add_shard(id as u32, g.master_addrs())?;
        g.wait_for_table(version)?;
        others.push(g);
    }
    let opts = ClientOptions {
        cluster_token: String::new(),
        read_consistency: b.consistency,
        follower_reads: true,
        rpc_timeout: Duration::from_secs(10),
        retry_deadline: Duration::from_secs(60),
        routing_version: None,
    };
    let meta = ShardedMetadata::connect(&shard0, &opts)?;
    let table = meta.table();
    anyhow::ensure!(
        table.shard_ids().len() == n as usize,
        "the routing table lists {} shards, not {n}",
        table.shard_ids().len()
    );
    load(&table)?;
    let (dirs, files) = targets(&meta)?;
    let spread = spread(&table, &dirs);
    let reads = measure(b, &meta, &files, |meta, rng, files| {
        let f = &files[rng.random_range(0..files.len())];
        if rng.random_range(0..100) < 55 {
            meta.getattr(f.id).map(|_| ())
        } else {
            meta.lookup(f.parent, &f.name).map(|_| ())
        }
    })?;
    let creates = measure(b, &meta, &dirs, {
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        move |meta, rng, dirs| {
            let d = &dirs[rng.random_range(0..dirs.len())];
            let i = next.fetch_add(1, Ordering::Relaxed);
            meta.create(CreateRequest {
                parent: d.id,
                name: format!("bench-{i}").into_bytes(),
                kind: FileKind::File as i32,
                mode: 0o644,
                ..Default::default()
            })
            .map(|_| ())
        }
    })?;
    drop(others);
    remove_created(ufs)?;
    Ok(Row {
        shards: n,
        reads: reads.0,
        creates: creates.0,
        errors: reads.1 + creates.1,
        spread,
    })
}

/// Removes the files the create phase left in the UFS, so every shard count starts from
/// the same namespace.
fn remove_created(ufs: &std::path::Path) -> anyhow::Result<()> {
    for dir in std::fs::read_dir(ufs)? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir)? {
            let f = f?;
            if f.file_name().to_string_lossy().starts_with("bench-") {
                std::fs::remove_file(f.path())?;
            }
        }
    }
    Ok(())
}

/// Loads the whole namespace into every shard.
fn load(table: &RoutingTable) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = rt
        .block_on(granary_shard_router::load_tree(
            table,
            b"/",
            true,
            false,
            &AttachToken::default(),
            |_| {},
        ))
        .context("loading the namespace")?;
    eprintln!(
        "loaded {} directories, {} files",
        done.directories, done.files
    );
    Ok(())
}

/// Benchmark directories and a sample of their files.
fn targets(meta: &ShardedMetadata) -> anyhow::Result<(Vec<Inode>, Vec<Inode>)> {
    let mut dirs = Vec::new();
    let mut after = Vec::new();
    loop {
        let (page, more) = meta.readdir(ROOT, &after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.name.clone();
        dirs.extend(
            page.into_iter()
                .filter(|i| i.kind == FileKind::Directory as i32 && i.name.starts_with(b"d")),
        );
        if !more {
            break;
        }
    }
    let mut files = Vec::new();
    for d in dirs.iter().take(200) {
        let (page, _) = meta.readdir(d.id, b"", 1000)?;
        files.extend(page.into_iter().step_by(10));
    }
    anyhow::ensure!(!files.is_empty(), "the namespace holds no benchmark files");
    Ok((dirs, files))
}

/// How many of the benchmark's top-level directories each shard owns.
fn spread(table: &RoutingTable, dirs: &[Inode]) -> String {
    table
        .shard_ids()
        .iter()
        .map(|&s| {
            let n = dirs
                .iter()
                .filter(|d| granary_common::ids::shard_of(d.id) == s)
                .count();
            format!("{s}: {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `op` from `b.threads` threads for `b.seconds`; returns (ops/s, errors).
fn measure<T: Sync>(
    b: &ShardsBench,
    meta: &Arc<ShardedMetadata>,
    items: &[T],
    op: impl Fn(&ShardedMetadata, &mut rand::rngs::StdRng, &[T]) -> granary_common::FsResult<()> + Sync,
) -> anyhow::Result<(f64, u64)> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let counts: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..b.threads)
            .map(|t| {
                let (stop, op, meta) = (&stop, &op, meta.clone());
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let (mut ok, mut failed) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        match op(&meta, &mut rng, items) {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                if failed == 0 {
                                    eprintln!("benchmark call failed: {e}");
                                }
                                failed += 1;
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(b.seconds));
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread"))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let ok: u64 = counts.iter().map(|c| c.0).sum();
    let failed = counts.iter().map(|c| c.1).sum();
    Ok((ok as f64 / secs, failed))
}
