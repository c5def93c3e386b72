//! `granary bench failover`: 3 masters, 1 worker, 1 mount as real processes on
//! 127.0.0.1. Readers loop over a cached dataset through the mount while one thread
//! creates entries through the leader; the leader is `kill -9`ed and restarted, round
//! after round. Reported: time from kill to the next acknowledged create, reader errors,
//! and acknowledged creates missing at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use granary_integration_tests::{wait_until, Cluster, MasterSpec};

use super::report::{machine, write_section};

pub struct FailoverBench {
    pub rounds: usize,
    pub readers: usize,
    pub write_docs: Option<PathBuf>,
}

const FILES: usize = 64;
const FILE_SIZE: usize = 256 << 10;

pub fn run(b: FailoverBench) -> anyhow::Result<()> {
    let ufs = tempfile::tempdir()?;
    std::fs::create_dir(ufs.path().join("data"))?;
    for i in 0..FILES {
        std::fs::write(
            ufs.path().join(format!("data/f{i:03}")),
            vec![i as u8; FILE_SIZE],
        )?;
    }
    eprintln!("starting 3 masters, a worker and a mount ...");
    let mut c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        masters: 3,
        ..Default::default()
    })?;
    let m = c.mount("mnt", "")?;
    for i in 0..FILES {
        std::fs::read(m.path.join(format!("data/f{i:03}")))?;
    }

    let stop = AtomicBool::new(false);
    let (reads, read_errors) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let acked: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());
    let mut failovers = Vec::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        for t in 0..b.readers {
            let (stop, reads, read_errors, mnt) = (&stop, &reads, &read_errors, &m.path);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let f = i % FILES;
                    match std::fs::read(mnt.join(format!("data/f{f:03}"))) {
                        Ok(d) if d.len() == FILE_SIZE && d.iter().all(|&x| x == f as u8) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            read_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        let (stop_ref, acked_ref, writer) = (&stop, &acked, c.writer());
        s.spawn(move || {
            let mut n = 0u64;
            while !stop_ref.load(Ordering::Relaxed) {
                let name = format!("create-{n:06}");
                if writer.create(&name, Duration::from_secs(5)).is_err() {
                    continue;
                }
                acked_ref
                    .lock()
                    .expect("acked")
                    .push((name, Instant::now()));
                n += 1;
            }
        });

        for round in 0..b.rounds {
            std::thread::sleep(Duration::from_secs(1));
            let leader = c.leader(Duration::from_secs(30))?;
            c.kill_master(leader);
            let killed = Instant::now();
            let mut took = None;
            wait_until(
                "an acknowledged create after the kill",
                Duration::from_secs(60),
                || {
                    took = acked
                        .lock()
                        .expect("acked")
                        .last()
                        .filter(|(_, t)| *t > killed)
                        .map(|(_, t)| *t - killed);
                    took.is_some()
                },
            )?;
            let took = took.expect("found");
            eprintln!(
                "round {}: killed leader {leader}, next acknowledged write after {took:?}",
                round + 1
            );
            failovers.push(took);
            c.start_master(leader)?;
            let now_leader = c.leader(Duration::from_secs(30))?;
            let commit = c.quorum_info(now_leader)?.commit;
            wait_until(
                "the restarted master to catch up",
                Duration::from_secs(60),
                || {
                    c.quorum_info(leader)
                        .map(|q| q.applied >= commit)
                        .unwrap_or(false)
                },
            )?;
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;

    let acked = acked.into_inner().expect("acked");
    let mut missing = 0;
    for (name, _) in &acked {
        if !c.exists(name).with_context(|| format!("checking {name}"))? {
            missing += 1;
        }
    }
    failovers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(failovers[failovers.len() / 2]);
    let max = ms(*failovers.last().expect("rounds > 0"));
    let table = format!(
        "| rounds | kill → next acknowledged write, median | max | reads | reader errors | creates acknowledged | acknowledged creates missing |\n|---:|---:|---:|---:|---:|---:|---:|\n| {} | {:.0} ms | {:.0} ms | {} | {} | {} | {} |\n",
        failovers.len(),
        median,
        max,
        reads.load(Ordering::Relaxed),
        read_errors.load(Ordering::Relaxed),
        acked.len(),
        missing
    );
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. 3 masters (raft tick 100 ms, election after 10–20 ticks), 1 worker, 1 mount, {} readers over {FILES} cached files of {} KiB, 1 thread creating entries through the leader.\n\nCommand: `granary bench failover --rounds {} --readers {}`\n\nEach round: `kill -9` the leader, time until the next acknowledged create, restart it and wait until it has caught up.\n\n{table}",
            machine(),
            b.readers,
            FILE_SIZE >> 10,
            b.rounds,
            b.readers
        );
        write_section(path, "bench-failover", &body)?;
    }
    drop(m);
    anyhow::ensure!(missing == 0, "{missing} acknowledged creates are missing");
    Ok(())
}
