//! `granary bench meta`: metadata read throughput of a 3-master group, all reads sent to
//! the leader versus spread over every member (follower reads), side by side in one run.
//! Clients issue getattr (50%), lookup (40%) and readdir pages (10%) over a loaded
//! namespace, each request carrying the chosen read consistency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use granary_integration_tests::{Cluster, MasterSpec};
use granary_protos::v1::{GetAttrRequest, LoadMetadataRequest, LookupRequest, ReadDirRequest};
use rand::{Rng, SeedableRng};

use super::report::{machine, ticks_to_seconds, write_section};

pub struct MetaBench {
    pub entries: u64,
    pub threads: usize,
    pub seconds: u64,
    pub consistency: granary_common::consistency::ReadConsistency,
    /// Each master on its own cores, the benchmark's clients on the rest.
    pub cores_per_master: Option<usize>,
    pub write_docs: Option<PathBuf>,
}

/// Concurrent requests per simulated client node; each node holds one connection to
/// every master it uses and sends each read to the member with the fewest of its
/// requests in flight, as a mount does.
const REQUESTS_PER_NODE: usize = 8;

const PER_DIR: u64 = 1000;

struct Target {
    dir: u64,
    name: Vec<u8>,
    file: u64,
}

struct ModeResult {
    ops_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    /// Cores each process kept busy during the mode.
    cpu: String,
}

/// CPU time (user + system, seconds) of a process so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks_to_seconds(ticks)
}

/// Measures how many cores each named process keeps busy between `new` and `report`.
struct CpuMeter {
    procs: Vec<(String, String, f64)>,
    start: Instant,
}

impl CpuMeter {
    /// `procs`: (label, pid) pairs.
    fn new(procs: Vec<(String, String)>) -> Self {
        CpuMeter {
            procs: procs
                .into_iter()
                .map(|(label, pid)| {
                    let cpu = cpu_seconds(&pid);
                    (label, pid, cpu)
                })
                .collect(),
            start: Instant::now(),
        }
    }

    fn report(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        self.procs
            .iter()
            .map(|(label, pid, before)| {
                format!("{label} {:.1}", (cpu_seconds(pid) - before) / secs)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// (label, pid) of every master: the leader first.
fn master_procs(c: &Cluster, leader: u64) -> Vec<(String, String)> {
    let mut procs: Vec<(String, String)> = c
        .masters
        .iter()
        .filter_map(|(&id, m)| {
            let label = if id == leader { "leader" } else { "follower" };
            m.proc
                .as_ref()
                .map(|p| (label.to_string(), p.pid().to_string()))
        })
        .collect();
    procs.sort_by_key(|(label, _)| label != "leader");
    procs
}

impl ModeResult {
    /// Throughput and percentiles of the successful operations' latencies (µs).
    fn from_latencies(mut lat: Vec<u64>, errors: u64, secs: f64, cpu: String) -> Self {
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        ModeResult {
            ops_per_s: lat.len() as f64 / secs,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            errors,
            cpu,
        }
    }
}

pub(crate) fn populate(ufs: &std::path::Path, entries: u64) -> anyhow::Result<()> {
    let marker = ufs.join(".entries");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&entries.to_string()) {
        return Ok(());
    }
    let pb = granary::dataset::progress(entries, "namespace");
    for i in 0..entries {
        let dir = ufs.join(format!("d{:05}", i / PER_DIR));
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::File::create(dir.join(format!("f{:06}", i % PER_DIR)))?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    std::fs::write(marker, entries.to_string())?;
    Ok(())
}

/// Splits the cores this process may use: `n` for each master, the rest for the
/// benchmark (and the worker and mounts it starts), which is pinned there. Returns the
/// masters' cores and a description of the placement.
fn place(cores_per_master: Option<usize>) -> anyhow::Result<(Vec<Vec<usize>>, String)> {
    let Some(n) = cores_per_master else {
        return Ok((
            Vec::new(),
            "3 masters and the clients share all cores".into(),
        ));
    };
    let allowed = granary_integration_tests::allowed_cores()?;
    anyhow::ensure!(
        n > 0 && 3 * n < allowed.len(),
        "--cores-per-master {n}: 3 masters need {} cores and the clients at least one more; this process may use {}",
        3 * n,
        allowed.len()
    );
    let masters: Vec<Vec<usize>> = allowed[..3 * n].chunks(n).map(<[usize]>::to_vec).collect();
    granary_integration_tests::pin_to_cores(&allowed[3 * n..])?;
    Ok((
        masters,
        format!(
            "each master pinned to its own {n} cores (standing in for 3 master machines), the clients on the other {}",
            allowed.len() - 3 * n
        ),
    ))
}

pub fn run(b: MetaBench) -> anyhow::Result<()> {
    let machine = machine();
    let (master_cores, placement) = place(b.cores_per_master)?;
    let work = PathBuf::from("/var/tmp/granary-bench-meta");
    let ufs = work.join("ufs");
    std::fs::create_dir_all(&ufs)?;
    populate(&ufs, b.entries)?;
    eprintln!("starting 3 masters ({placement}) ...");
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.clone(),
        masters: 3,
        master_cores,
        ..Default::default()
    })?;
    let leader = c.leader(Duration::from_secs(20))?;
    eprintln!("loading {} entries through the leader ...", b.entries);
    let mut lc = c.client(&c.addr_of(leader))?;
    c.block_on(async {
        let mut s = lc
            .load_metadata(LoadMetadataRequest {
                force: false,
                path: b"/".to_vec(),
                recursive: true,
            })
            .await?
            .into_inner();
        while let Some(m) = s.message().await? {
            if m.done {
                eprintln!("loaded {} directories, {} files", m.directories, m.files);
            }
        }
        anyhow::Ok(())
    })?;
    // Every member must hold the whole namespace before measuring.
    let commit = c.quorum_info(leader)?.commit;
    granary_integration_tests::wait_until(
        "followers to apply the load",
        Duration::from_secs(300),
        || {
            c.masters.keys().all(|&id| {
                c.quorum_info(id)
                    .map(|q| q.applied >= commit)
                    .unwrap_or(false)
            })
        },
    )?;

    let targets = Arc::new(collect_targets(&c, leader, b.entries)?);
    let leader_addr = c.addr_of(leader);
    let all = c.master_addrs();
    let mut rows = Vec::new();
    for (label, addrs) in [
        ("leader only", vec![leader_addr.clone()]),
        ("follower reads (all 3 members)", all.clone()),
    ] {
        let mut procs = master_procs(&c, leader);
        procs.push(("client".into(), "self".into()));
        let r = measure(&c, &addrs, &targets, &b, procs)?;
        eprintln!("{label}: {:.0} ops/s", r.ops_per_s);
        rows.push((label, r));
    }
    let ratio = rows[1].1.ops_per_s / rows[0].1.ops_per_s.max(1.0);
    // The same through FUSE: a stat() storm with every kernel and client cache disabled,
    // so each stat is a lookup (and getattr) RPC.
    let no_cache = format!(
        "entry_ttl_ms = 0\nattr_ttl_ms = 0\nmeta_cache_ttl_ms = 0\nread_consistency = \"{}\"\n",
        b.consistency
    );
    let leader_mount = c.mount("mnt-leader", &format!("{no_cache}follower_reads = false"))?;
    let spread_mount = c.mount("mnt-followers", &format!("{no_cache}follower_reads = true"))?;
    for (label, mnt, mount_pid) in [
        (
            "FUSE stat(), leader only",
            &leader_mount.path,
            leader_mount.proc.pid(),
        ),
        (
            "FUSE stat(), follower reads",
            &spread_mount.path,
            spread_mount.proc.pid(),
        ),
    ] {
        let mut procs = master_procs(&c, leader);
        procs.push(("mount".into(), mount_pid.to_string()));
        let r = stat_storm(mnt, b.entries, b.threads.min(32), b.seconds, procs)?;
        eprintln!("{label}: {:.0} stats/s", r.ops_per_s);
        rows.push((label, r));
    }
    let fuse_ratio = rows[3].1.ops_per_s / rows[2].1.ops_per_s.max(1.0);
    let mut table = String::from(
        "| mode | ops/s | p50 | p99 | errors | cores busy |\n|---|---:|---:|---:|---:|---|\n",
    );
    for (label, r) in &rows {
        table.push_str(&format!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {} | {} |\n",
            r.ops_per_s,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            r.cpu
        ));
    }
    table.push_str(&format!(
        "\nfollower reads / leader only: **{ratio:.2}x** over gRPC, **{fuse_ratio:.2}x** through FUSE\n"
    ));
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {machine}. 3 masters on this machine: {placement}. {} namespace entries ({} per directory), {} concurrent client requests ({} per simulated client node, each with one connection per master), read consistency `{}`, {} s per mode. Mix: getattr 50%, lookup 40%, readdir page of 100 10%.\n\nCommand: `granary bench meta --entries {} --threads {} --seconds {} --read-consistency {}{}`\n\n{table}",
            b.entries,
            PER_DIR,
            b.threads,
            REQUESTS_PER_NODE,
            b.consistency,
            b.seconds,
            b.entries,
            b.threads,
            b.seconds,
            b.consistency,
            b.cores_per_master
                .map(|n| format!(" --cores-per-master {n}"))
                .unwrap_or_default()
        );
        write_section(path, "bench-meta", &body)?;
    }
    Ok(())
}

fn collect_targets(c: &Cluster, leader: u64, entries: u64) -> anyhow::Result<Vec<Target>> {
    let mut client = c.client(&c.addr_of(leader))?;
    let dirs = entries.div_ceil(PER_DIR);
    let mut out = Vec::new();
    for d in 0..dirs.min(200) {
        let name = format!("d{d:05}").into_bytes();
        let dir = c
            .block_on(client.lookup(LookupRequest { parent: 1, name }))
            .context("lookup of a benchmark directory")?
            .into_inner()
            .inode
            .context("no inode")?;
        let page = c
            .block_on(client.read_dir(ReadDirRequest {
                id: dir.id,
                start_after: Vec::new(),
                limit: 1000,
            }))?
            .into_inner();
        for e in page.entries.into_iter().step_by(10) {
            out.push(Target {
                dir: dir.id,
                name: e.name,
                file: e.id,
            });
        }
    }
    Ok(out)
}

fn measure(
    c: &Cluster,
    addrs: &[String],
    targets: &Arc<Vec<Target>>,
    b: &MetaBench,
    procs: Vec<(String, String)>,
) -> anyhow::Result<ModeResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // One connection per (client node, master): a single shared connection would make
    // one HTTP/2 stream's framing the bottleneck rather than the masters.
    let nodes = b.threads.div_ceil(REQUESTS_PER_NODE);
    let clients: Vec<Arc<Vec<_>>> = (0..nodes)
        .map(|_| {
            addrs
                .iter()
                .map(|a| Ok((c.client_on(a, &rt)?, AtomicUsize::new(0))))
                .collect::<anyhow::Result<Vec<_>>>()
                .map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let consistency: tonic::metadata::MetadataValue<_> = b
        .consistency
        .to_string()
        .parse()
        .context("read consistency")?;
    let start = Instant::now();
    let meter = CpuMeter::new(procs);
    let tasks: Vec<_> = (0..b.threads)
        .map(|t| {
            let node = clients[t / REQUESTS_PER_NODE].clone();
            let (stop, targets, consistency) = (stop.clone(), targets.clone(), consistency.clone());
            rt.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let tg = &targets[rng.random_range(0..targets.len())];
                    let start = rng.random_range(0..node.len());
                    let pick = (0..node.len())
                        .map(|k| (start + k) % node.len())
                        .min_by_key(|&i| node[i].1.load(Ordering::Relaxed))
                        .unwrap_or(0);
                    let (client, outstanding) = &node[pick];
                    let mut client = client.clone();
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let roll = rng.random_range(0..100);
                    let begin = Instant::now();
                    macro_rules! call {
                        ($method:ident, $req:expr) => {{
                            let mut req = tonic::Request::new($req);
                            req.metadata_mut()
                                .insert("x-granary-consistency", consistency.clone());
                            client.$method(req).await.map(|_| ())
                        }};
                    }
                    let r = if roll < 50 {
                        call!(get_attr, GetAttrRequest { id: tg.file })
                    } else if roll < 90 {
                        call!(
                            lookup,
                            LookupRequest {
                                parent: tg.dir,
                                name: tg.name.clone()
                            }
                        )
                    } else {
                        call!(
                            read_dir,
                            ReadDirRequest {
                                id: tg.dir,
                                start_after: tg.name.clone(),
                                limit: 100
                            }
                        )
                    };
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Ok(()) => lat.push(begin.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(b.seconds));
    let cpu = meter.report();
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = rt.block_on(t)?;
        lat.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(ModeResult::from_latencies(lat, errors, secs, cpu))
}

/// `threads` threads calling stat() on random files under `mnt` for `seconds`.
fn stat_storm(
    mnt: &std::path::Path,
    entries: u64,
    threads: usize,
    seconds: u64,
    procs: Vec<(String, String)>,
) -> anyhow::Result<ModeResult> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let meter = CpuMeter::new(procs);
    let (results, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + t as u64);
                    let (mut lat, mut errors) = (Vec::new(), 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let i = rng.random_range(0..entries);
                        let path = mnt.join(format!("d{:05}/f{:06}", i / PER_DIR, i % PER_DIR));
                        let begin = Instant::now();
                        match std::fs::metadata(&path) {
                            Ok(_) => lat.push(begin.elapsed().as_micros() as u64),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(seconds));
        let cpu = meter.report();
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(Vec<u64>, u64)> = handles
            .into_iter()
            .map(|h| h.join().expect("stat thread"))
            .collect();
        (results, cpu)
    });
    let secs = start.elapsed().as_secs_f64();
    let lat: Vec<u64> = results
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    let errors = results.iter().map(|(_, e)| e).sum();
    Ok(ModeResult::from_latencies(lat, errors, secs, cpu))
}
