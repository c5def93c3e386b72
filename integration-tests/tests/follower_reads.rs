//! Follower reads: a history check that linearizable reads served by any member (leader or
//! follower) see every write acknowledged before they started, across a leader kill; and
//! that bounded-staleness reads are never older than their bound, across a paused leader
//! and a paused follower.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use granary_integration_tests::{Cluster, MasterSpec};
use granary_protos::v1::LookupRequest;

struct Read {
    start: Instant,
    name: i64,
    found: bool,
}

/// Writes h0, h1, ... through the leader while readers pinned to every member look up the
/// newest acknowledged name with `consistency`. Returns (reads, ack times, members read).
fn run_history(
    c: &mut Cluster,
    consistency: &str,
    disturb: impl FnOnce(&mut Cluster),
) -> (Vec<Read>, Vec<Instant>) {
    let writer = c.writer();
    let stop = AtomicBool::new(false);
    let acked_upto = AtomicI64::new(-1);
    let acks = Mutex::new(Vec::<Instant>::new());
    let reads = Mutex::new(Vec::<Read>::new());
    let addrs = c.master_addrs();
    let clients: Vec<_> = addrs.iter().map(|a| c.client(a).unwrap()).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                if writer
                    .create(&format!("h{n}"), Duration::from_secs(10))
                    .is_ok()
                {
                    acks.lock().unwrap().push(Instant::now());
                    acked_upto.store(n, Ordering::SeqCst);
                    n += 1;
                }
            }
        });
        for client in &clients {
            let (stop, acked_upto, reads) = (&stop, &acked_upto, &reads);
            let mut client = client.clone();
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let name = acked_upto.load(Ordering::SeqCst);
                    if name < 0 {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let mut req = tonic::Request::new(LookupRequest {
                        parent: 1,
                        name: format!("h{name}").into_bytes(),
                    });
                    req.metadata_mut()
                        .insert("x-granary-consistency", consistency.parse().unwrap());
                    match rt.block_on(client.lookup(req)) {
                        Ok(_) => reads.lock().unwrap().push(Read {
                            start,
                            name,
                            found: true,
                        }),
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            reads.lock().unwrap().push(Read {
                                start,
                                name,
                                found: false,
                            })
                        }
                        // Unavailable during elections: the client would retry elsewhere.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        disturb(c);
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });
    (reads.into_inner().unwrap(), acks.into_inner().unwrap())
}

/// Stops the leader for longer than an election timeout, then lets it run again.
fn pause_leader(c: &mut Cluster) {
    let leader = c.leader(Duration::from_secs(5)).unwrap();
    c.signal_master(leader, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    c.signal_master(leader, libc::SIGCONT);
}

fn group() -> (tempfile::TempDir, Cluster) {
    let ufs = tempfile::tempdir().unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        masters: 3,
        ..Default::default()
    })
    .unwrap();
    (ufs, c)
}

#[test]
fn linearizable_follower_reads_see_every_acknowledged_write_across_a_leader_kill() {
    let (_ufs, mut c) = group();
    let (reads, acks) = run_history(&mut c, "linearizable", |c| {
        let leader = c.leader(Duration::from_secs(5)).unwrap();
        c.kill_master(leader);
        std::thread::sleep(Duration::from_millis(1500));
        c.start_master(leader).unwrap();
    });
    assert!(acks.len() > 20, "only {} writes acknowledged", acks.len());
    assert!(reads.len() > 50, "only {} reads completed", reads.len());
    // Every read looked up a name acknowledged before it started: it must be found.
    let stale: Vec<_> = reads.iter().filter(|r| !r.found).map(|r| r.name).collect();
    assert!(
        stale.is_empty(),
        "{} of {} linearizable reads missed acknowledged writes: {stale:?}",
        stale.len(),
        reads.len()
    );
}

#[test]
fn lease_reads_see_every_acknowledged_write() {
    let (_ufs, mut c) = group();
    // A leader paused past its lease wakes up still leading in its own eyes while another
    // member leads: it must not answer from its state.
    let (reads, _) = run_history(&mut c, "lease", pause_leader);
    assert!(reads.len() > 50);
    assert!(
        reads.iter().all(|r| r.found),
        "a lease read missed an acknowledged write"
    );
}

#[test]
fn bounded_staleness_reads_are_never_older_than_the_bound() {
    const BOUND: Duration = Duration::from_millis(300);
    let (_ufs, mut c) = group();
    let (reads, acks) = run_history(&mut c, "bounded-staleness:300", |c| {
        // A paused member wakes up to messages sent before or during its pause: neither
        // a deposed leader nor a lagging follower may take them for news.
        pause_leader(c);
        let leader = c.leader(Duration::from_secs(5)).unwrap();
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        c.signal_master(follower, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1500));
        c.signal_master(follower, libc::SIGCONT);
    });
    assert!(reads.len() > 50);
    let too_old: Vec<_> = reads
        .iter()
        .filter(|r| !r.found && r.start > acks[r.name as usize] + BOUND)
        .map(|r| r.name)
        .collect();
    assert!(
        too_old.is_empty(),
        "reads older than the bound: {too_old:?}"
    );
}
