//! Masters as a Raft group, with real processes: leader and follower kills, a full
//! restart, an isolated (SIGSTOPped) leader, a wiped member rejoining by snapshot, a
//! worker that starts after a failover, master migration under load, and cluster auth.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_integration_tests::{Cluster, MasterSpec};

fn ufs_with_files(n: usize) -> tempfile::TempDir {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::create_dir(ufs.path().join("data")).unwrap();
    for i in 0..n {
        std::fs::write(
            ufs.path().join(format!("data/f{i:03}")),
            vec![i as u8; 1000 + i],
        )
        .unwrap();
    }
    ufs
}

fn group(ufs: &std::path::Path, masters: u64) -> Cluster {
    Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        masters,
        snapshot_threshold: 64,
        ..Default::default()
    })
    .unwrap()
}

/// Reads the dataset through the mount in a loop until stopped; returns (reads, errors).
fn readers<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    mnt: &'s std::path::Path,
    n: usize,
    stop: &'s AtomicBool,
    reads: &'s AtomicUsize,
    errors: &'s AtomicUsize,
) {
    for t in 0..4 {
        scope.spawn(move || {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let name = mnt.join(format!("data/f{:03}", i % n));
                match std::fs::read(&name) {
                    Ok(d) if d.len() == 1000 + i % n && d.iter().all(|&b| b == (i % n) as u8) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!(
                            "read {} failed: {:?}",
                            name.display(),
                            other.map(|d| d.len())
                        );
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 7;
            }
        });
    }
}

#[test]
fn leader_and_follower_kills_lose_no_acknowledged_write_and_no_cached_read() {
    let ufs = ufs_with_files(50);
    let mut c = group(ufs.path(), 3);
    let m = c.mount("mnt", "").unwrap();
    for i in 0..50 {
        std::fs::read(m.path.join(format!("data/f{i:03}"))).unwrap();
    }
    let (stop, reads, errors) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let mut acked = Vec::new();
    std::thread::scope(|s| {
        readers(s, &m.path, 50, &stop, &reads, &errors);
        for i in 0..10 {
            c.create(&format!("before-{i}")).unwrap();
            acked.push(format!("before-{i}"));
        }
        let leader = c.leader(Duration::from_secs(10)).unwrap();
        c.kill_master(leader);
        let killed = Instant::now();
        c.create("after-leader-kill").unwrap();
        let failover = killed.elapsed();
        acked.push("after-leader-kill".into());
        assert!(
            failover < Duration::from_secs(10),
            "failover took {failover:?}"
        );
        c.start_master(leader).unwrap();

        let leader = c.leader(Duration::from_secs(10)).unwrap();
        let follower = *c.masters.keys().find(|&&id| id != leader).unwrap();
        c.kill_master(follower);
        for i in 0..10 {
            c.create(&format!("follower-down-{i}")).unwrap();
            acked.push(format!("follower-down-{i}"));
        }
        c.start_master(follower).unwrap();
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "cached reads failed during failover"
    );
    assert!(reads.load(Ordering::Relaxed) > 0);
    for name in &acked {
        assert!(
            c.exists(name).unwrap(),
            "acknowledged create {name} is missing"
        );
    }
    // The restarted follower catches up to the same applied index.
    let target = c
        .quorum_info(c.leader(Duration::from_secs(5)).unwrap())
        .unwrap()
        .commit;
    granary_integration_tests::wait_until("all members caught up", Duration::from_secs(20), || {
        c.masters.keys().all(|&id| {
            c.quorum_info(id)
                .map(|q| q.applied >= target)
                .unwrap_or(false)
        })
    })
    .unwrap();
}

#[test]
fn all_masters_killed_and_restarted_keep_every_acknowledged_write() {
    let ufs = ufs_with_files(1);
    let mut c = group(ufs.path(), 3);
    for i in 0..100 {
        c.create(&format!("f{i}")).unwrap();
    }
    for id in [1, 2, 3] {
        c.kill_master(id);
    }
    for id in [1, 2, 3] {
        c.start_master(id).unwrap();
    }
    for i in 0..100 {
        assert!(c.exists(&format!("f{i}")).unwrap(), "f{i} lost");
    }
    assert!(!c.exists("never-created").unwrap());
}

#[test]
fn cached_files_stay_readable_while_every_master_is_down() {
    let ufs = ufs_with_files(20);
    let mut c = group(ufs.path(), 1);
    // No kernel page cache across opens: every read below reaches the mount, which must
    // find its worker while the masters it would ask are gone. Their calls would retry
    // for ten minutes.
    let m = c
        .mount("mnt", "keep_cache = false\nretry_deadline_ms = 600000")
        .unwrap();
    let expected = |i: usize| vec![i as u8; 1000 + i];
    for i in 0..20 {
        assert_eq!(
            std::fs::read(m.path.join(format!("data/f{i:03}"))).unwrap(),
            expected(i)
        );
    }
    c.kill_master(1);
    // Past the worker list's lifetime (3 s): the next reads find it stale.
    std::thread::sleep(Duration::from_secs(4));
    let (done, finished) = std::sync::mpsc::channel();
    for t in 0..4 {
        let (path, done) = (m.path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut good = 0;
            for n in 0..100 {
                let i = (t * 7 + n) % 20;
                if std::fs::read(path.join(format!("data/f{i:03}"))).ok() == Some(expected(i)) {
                    good += 1;
                }
            }
            let _ = done.send(good);
        });
    }
    for _ in 0..4 {
        let good = finished
            .recv_timeout(Duration::from_secs(120))
            .expect("reads of cached files waited on the dead masters");
        assert_eq!(good, 100, "every read of a cached file succeeds");
    }
}

#[test]
fn an_isolated_leader_is_replaced_and_steps_down_when_it_returns() {
    let ufs = ufs_with_files(1);
    let c = group(ufs.path(), 3);
    let old = c.leader(Duration::from_secs(10)).unwrap();
    c.signal_master(old, libc::SIGSTOP);
    let stopped = Instant::now();
    let new = loop {
        let q = c.masters.keys().filter(|&&id| id != old).find_map(|&id| {
            c.quorum_info(id)
                .ok()
                .filter(|q| q.role == "leader")
                .map(|_| id)
        });
        if let Some(id) = q {
            break id;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "no new leader while {old} is stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(new, old);
    c.create("while-isolated").unwrap();
    c.signal_master(old, libc::SIGCONT);
    granary_integration_tests::wait_until(
        "the old leader to step down",
        Duration::from_secs(15),
        || {
            c.quorum_info(old)
                .map(|q| q.role == "follower" && q.leader_id == new)
                .unwrap_or(false)
        },
    )
    .unwrap();
    // Each member answers from its own view, a moment apart: look until they agree.
    granary_integration_tests::wait_until("exactly one leader", Duration::from_secs(15), || {
        let leaders = c.masters.keys().filter(|&&id| {
            c.quorum_info(id)
                .map(|q| q.role == "leader")
                .unwrap_or(false)
        });
        leaders.count() == 1
    })
    .unwrap();
    assert!(c.exists("while-isolated").unwrap());
}

#[test]
fn a_wiped_member_rejoins_through_a_snapshot() {
    let ufs = ufs_with_files(1);
    let mut c = group(ufs.path(), 3);
    let leader = c.leader(Duration::from_secs(10)).unwrap();
    let victim = *c.masters.keys().find(|&&id| id != leader).unwrap();
    c.wipe_master(victim).unwrap();
    let addr = c.addr_of(victim);
    let leader_addr = c.addr_of(leader);
    let mut admin = c.admin_client(&leader_addr).unwrap();
    c.block_on(admin.remove_member(granary_protos::v1::RemoveMemberRequest { id: victim }))
        .unwrap();
    // Far more entries than the snapshot threshold: the log is compacted past them.
    for i in 0..300 {
        c.create(&format!("g{i}")).unwrap();
    }
    c.start_master(victim).unwrap();
    c.block_on(admin.add_member(granary_protos::v1::AddMemberRequest { id: victim, addr }))
        .unwrap();
    let target = c.quorum_info(leader).unwrap().commit;
    granary_integration_tests::wait_until(
        "the wiped member to catch up",
        Duration::from_secs(20),
        || {
            c.quorum_info(victim)
                .map(|q| q.applied >= target)
                .unwrap_or(false)
        },
    )
    .unwrap();
    let log = c.masters[&victim].proc.as_ref().unwrap().log_text();
    assert!(
        log.contains("installing snapshot"),
        "expected a snapshot install:\n{log}"
    );
    // It serves the full namespace once it leads.
    let mut admin = c.admin_client(&c.addr_of(leader)).unwrap();
    c.block_on(admin.transfer_leader(granary_protos::v1::TransferLeaderRequest { id: victim }))
        .unwrap();
    assert_eq!(c.leader(Duration::from_secs(10)).unwrap(), victim);
    assert!(c.exists("g299").unwrap());
}

#[test]
fn a_worker_started_after_failover_registers_with_the_new_leader() {
    let ufs = ufs_with_files(5);
    let mut c = group(ufs.path(), 3);
    let old = c.leader(Duration::from_secs(10)).unwrap();
    c.kill_master(old);
    let new = c.leader(Duration::from_secs(10)).unwrap();
    assert_ne!(new, old);
    // The worker's config still lists the dead master first.
    c.start_worker("1GiB").unwrap();
    let m = c.mount("mnt", "").unwrap();
    assert_eq!(
        std::fs::read(m.path.join("data/f003")).unwrap(),
        vec![3u8; 1003]
    );
}

#[test]
fn master_migration_under_load_needs_no_restart() {
    let ufs = ufs_with_files(20);
    let mut c = group(ufs.path(), 3);
    let m = c
        .mount(
            "mnt",
            "entry_ttl_ms = 0\nattr_ttl_ms = 0\nmeta_cache_ttl_ms = 0",
        )
        .unwrap();
    let (stop, reads, errors) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|s| {
        readers(s, &m.path, 20, &stop, &reads, &errors);
        for id in [4u64, 5] {
            c.add_master(id).unwrap();
            c.create(&format!("after-add-{id}")).unwrap();
        }
        for id in [1u64, 2] {
            c.admin_on_leader(|mut cl| async move {
                cl.remove_member(granary_protos::v1::RemoveMemberRequest { id })
                    .await
            })
            .unwrap();
            c.create(&format!("after-remove-{id}")).unwrap();
        }
        // The removed masters are gone for good; mount and worker must have moved on.
        c.kill_master(1);
        c.kill_master(2);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "mount log:\n{}",
        m.proc.log_text()
    );
    for name in [
        "after-add-4",
        "after-add-5",
        "after-remove-1",
        "after-remove-2",
    ] {
        assert!(c.exists(name).unwrap(), "{name} missing");
    }
    // Fresh metadata reads through the mount reach the new masters.
    assert!(std::fs::metadata(m.path.join("after-remove-2")).is_ok());
    let log = m.proc.log_text();
    assert!(
        log.contains("adopted a new master set"),
        "mount log:\n{log}"
    );
    let ids = c.worker_ids_on_leader().unwrap();
    assert_eq!(ids.len(), 1, "the worker registered with the new leader");
    // Nobody dials the removed masters once they are gone.
    for id in [3u64, 4, 5] {
        let log = c.masters[&id].proc.as_ref().unwrap().log_text();
        for gone in [1, 2] {
            assert!(
                !log.contains(&format!("raft peer unreachable peer={gone}")),
                "master {id} still dials removed master {gone}:\n{log}"
            );
        }
    }
}

#[test]
fn cluster_rpcs_without_the_token_are_refused() {
    let ufs = ufs_with_files(2);
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        cluster_token: "s3cret-token".into(),
        peer_token: "masters-only".into(),
        masters: 3,
        ..Default::default()
    })
    .unwrap();
    // The members reach each other with the peer token: a leader is elected and every
    // member answers reads (a follower's lease read asks the leader for its index).
    c.leader(Duration::from_secs(20)).unwrap();
    for addr in c.master_addrs() {
        let mut client = c.client(&addr).unwrap();
        let mut req = tonic::Request::new(granary_protos::v1::GetAttrRequest { id: 1 });
        req.metadata_mut()
            .insert("x-granary-consistency", "lease".parse().unwrap());
        c.block_on(client.get_attr(req)).unwrap();
    }
    // A client that knows only the cluster token cannot make the masters' own calls.
    let leader = c.addr_of(c.leader(Duration::from_secs(10)).unwrap());
    let ch = c
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{leader}"))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let mut intruder = granary_protos::v1::peer_client::PeerClient::with_interceptor(
        ch,
        granary_integration_tests::TokenHeader("s3cret-token".into()),
    );
    let err = c
        .block_on(intruder.read_index(granary_protos::v1::ReadIndexRequest { lease: true }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let m = c.mount("mnt", "").unwrap();
    assert_eq!(
        std::fs::read(m.path.join("data/f001")).unwrap(),
        vec![1u8; 1001]
    );

    let ch = c
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{}", c.master_addr()))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let mut anon = granary_protos::v1::namespace_client::NamespaceClient::new(ch);
    let err = c
        .block_on(anon.get_attr(granary_protos::v1::GetAttrRequest { id: 1 }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("cluster token"), "{}", err.message());

    // The data port refuses a handshake without the token.
    let worker_port = {
        let ws = c
            .on_leader(Duration::from_secs(5), |mut cl| async move {
                cl.list_workers(granary_protos::v1::ListWorkersRequest {})
                    .await
            })
            .unwrap();
        ws.workers[0].data_port as u16
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", worker_port)).unwrap();
    use std::io::Write;
    s.write_all(&granary_protos::frame::encode_header(
        &granary_protos::data::Hello {
            version: granary_protos::DATA_PROTOCOL_VERSION,
            cluster_token: String::new(),
        },
    ))
    .unwrap();
    let reply: granary_protos::data::HelloReply =
        granary_protos::frame::read_header(&mut s).unwrap();
    assert!(!reply.ok && reply.error.contains("token"), "{reply:?}");
}
