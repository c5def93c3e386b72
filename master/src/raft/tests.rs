//! The Raft wiring (Ready loop, log store, apply, membership) over an in-memory network
//! that drops messages at a seeded rate and partitions members, with real redb stores.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use granary_protos::v1::{command, Command, CreateInode, FileKind, MountPoint, SetMount};
use raft::eraftpb::Message;

use super::log_store::RaftLogStore;
use super::node::{NodeConfig, RaftNode};
use super::transport::{PeerNetwork, SnapshotChunks};
use super::{Mail, RaftLog, RaftStatus};
use crate::command_log::CommandLog;
use crate::store::{NamespaceStore, StoreError};
use granary_protos::raft::SnapshotRef;

#[derive(Default)]
struct Network {
    mailboxes: Mutex<HashMap<u64, Sender<Mail>>>,
    isolated: Mutex<HashSet<u64>>,
    /// Percent of messages dropped, decided by a seeded xorshift.
    drop_percent: Mutex<(u64, u64)>,
    /// Every member's store, where snapshots are pulled from.
    stores: Mutex<HashMap<u64, Arc<NamespaceStore>>>,
    /// This many snapshot pulls to come break off midway (a holder that dies).
    broken_pulls: std::sync::atomic::AtomicU32,
}

impl Network {
    fn deliver(&self, from: u64, m: Message) {
        let isolated = self.isolated.lock().unwrap();
        if isolated.contains(&from) || isolated.contains(&m.to) {
            return;
        }
        drop(isolated);
        {
            let mut d = self.drop_percent.lock().unwrap();
            d.1 ^= d.1 << 13;
            d.1 ^= d.1 >> 7;
            d.1 ^= d.1 << 17;
            if d.1 % 100 < d.0 {
                return;
            }
        }
        if let Some(mb) = self.mailboxes.lock().unwrap().get(&m.to) {
            let _ = mb.send(Mail::Step(vec![m]));
        }
    }
}

struct MemTransport {
    from: u64,
    net: Arc<Network>,
}

impl PeerNetwork for MemTransport {
    fn send(&self, msgs: Vec<Message>, _book: &HashMap<u64, String>) {
        for m in msgs {
            let snapshot_to =
                (m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot).then_some(m.to);
            self.net.deliver(self.from, m);
            // As the gRPC transport does: handed over counts as sent.
            if let Some(to) = snapshot_to {
                if let Some(mb) = self.net.mailboxes.lock().unwrap().get(&self.from) {
                    let _ = mb.send(Mail::SnapshotSent(to, true));
                }
            }
        }
    }

    fn pull_snapshot<'a>(
        &'a self,
        r: &SnapshotRef,
        _book: &HashMap<u64, String>,
    ) -> Result<SnapshotChunks<'a>, StoreError> {
        let holder = self.net.stores.lock().unwrap()[&r.holder].clone();
        let mut chunks = Vec::new();
        holder.stream_held(r.id, |c| {
            chunks.push(c);
            Ok(())
        })?;
        let broken = self
            .net
            .broken_pulls
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        let mut chunks = chunks.into_iter();
        let mut given = 0;
        Ok(Box::new(move || {
            given += 1;
            if broken && given > 1 {
                return Err(StoreError::Corrupt("the holder went away".into()));
            }
            Ok(chunks.next())
        }))
    }
}

struct Member {
    store: Arc<NamespaceStore>,
    log: RaftLog,
    thread: Option<std::thread::JoinHandle<Result<(), crate::raft::node::NodeError>>>,
}

struct Group {
    _dir: tempfile::TempDir,
    net: Arc<Network>,
    members: HashMap<u64, Member>,
}

impl Group {
    fn new(ids: &[u64], snapshot_threshold: u64, drop_percent: u64) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Network::default());
        *net.drop_percent.lock().unwrap() = (drop_percent, 0x2545f4914f6cdd1d);
        let boot: Vec<(u64, String)> = ids.iter().map(|&i| (i, format!("mem-{i}"))).collect();
        let mut members = HashMap::new();
        for &id in ids {
            let store = Arc::new(
                NamespaceStore::open(&dir.path().join(format!("ns-{id}.redb")), 0).unwrap(),
            );
            net.stores.lock().unwrap().insert(id, store.clone());
            let log_store = RaftLogStore::open(
                &dir.path().join(format!("raft-{id}.log")),
                id,
                store.clone(),
                &boot,
            )
            .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            net.mailboxes.lock().unwrap().insert(id, tx.clone());
            let status = Arc::new(RwLock::new(RaftStatus::default()));
            let (applied_tx, applied_rx) = tokio::sync::watch::channel(0);
            let node = RaftNode::new(
                NodeConfig {
                    id,
                    tick: Duration::from_millis(10),
                    election_ticks: 10,
                    heartbeat_ticks: 2,
                    snapshot_threshold,
                    initial_members: boot.clone(),
                    ephemeral_addr: None,
                },
                store.clone(),
                log_store,
                Arc::new(MemTransport {
                    from: id,
                    net: net.clone(),
                }),
                (tx.clone(), rx),
                status.clone(),
                applied_tx,
            )
            .unwrap();
            let thread = std::thread::spawn(move || node.run());
            members.insert(
                id,
                Member {
                    store,
                    log: RaftLog::new(tx, status, applied_rx),
                    thread: Some(thread),
                },
            );
        }
        Group {
            _dir: dir,
            net,
            members,
        }
    }

    /// Long enough for the members' applied entries to be synced and their logs
    /// compacted up to them (heartbeats keep the Raft threads going meanwhile).
    fn until_compacted(&self) {
        std::thread::sleep(2 * super::apply::SYNC_INTERVAL + Duration::from_millis(500));
    }

    fn leader(&self, timeout: Duration) -> u64 {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let isolated = self.net.isolated.lock().unwrap().clone();
            for (id, m) in &self.members {
                if m.log.status().is_leader && !isolated.contains(id) {
                    return *id;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no leader within {timeout:?}");
    }

    /// Proposes through whoever leads, retrying across leader changes.
    fn propose(&self, rt: &tokio::runtime::Runtime, cmd: Command) {
        let start = Instant::now();
        loop {
            let leader = self.leader(Duration::from_secs(10));
            match rt.block_on(self.members[&leader].log.propose(cmd.clone())) {
                Ok(()) => return,
                Err(e) if e.errno() == libc::EEXIST => return,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "proposal keeps failing: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Waits until every listed member applied the same index and holds the same inodes.
    fn converge(&self, ids: &[u64]) {
        let start = Instant::now();
        loop {
            let states: Vec<(u64, u64)> = ids
                .iter()
                .map(|id| {
                    let s = &self.members[id].store;
                    (s.applied().unwrap().0, s.inode_count().unwrap())
                })
                .collect();
            if states.windows(2).all(|w| w[0] == w[1]) {
                let lists: Vec<_> = ids
                    .iter()
                    .map(|id| self.members[id].store.list(1, b"", 10_000).unwrap().0)
                    .collect();
                assert!(
                    lists.windows(2).all(|w| w[0] == w[1]),
                    "same index, different namespaces"
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "members did not converge: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            let _ = m.log.send(Mail::Shutdown);
            if let Some(t) = m.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn mount() -> Command {
    Command {
        op: Some(command::Op::SetMount(SetMount {
            mount: Some(MountPoint {
                mount_id: 1,
                path: b"/".to_vec(),
                ufs_uri: "file:///nowhere".into(),
                ..Default::default()
            }),
            block_size: 1 << 20,
            ..Default::default()
        })),
    }
}

fn create(name: &str) -> Command {
    Command {
        op: Some(command::Op::CreateInode(CreateInode {
            parent: 1,
            name: name.as_bytes().to_vec(),
            kind: FileKind::File as i32,
            mode: 0o644,
            ..Default::default()
        })),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn lossy_network_replicates_and_survives_a_partitioned_leader() {
    let rt = rt();
    let g = Group::new(&[1, 2, 3], 10_000, 10);
    g.propose(&rt, mount());
    for i in 0..20 {
        g.propose(&rt, create(&format!("before-{i}")));
    }
    g.converge(&[1, 2, 3]);

    let old = g.leader(Duration::from_secs(10));
    g.net.isolated.lock().unwrap().insert(old);
    let new = g.leader(Duration::from_secs(10));
    assert_ne!(new, old);
    for i in 0..20 {
        g.propose(&rt, create(&format!("during-{i}")));
    }
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != old).collect();
    g.converge(&others);

    // The old leader steps down once it hears the new term, then catches up.
    g.net.isolated.lock().unwrap().clear();
    g.converge(&[1, 2, 3]);
    assert_eq!(g.members[&1].store.inode_count().unwrap(), 41);
    // Each member publishes its own view a moment apart: look until they agree.
    eventually("a single leader after healing", || {
        g.members
            .values()
            .filter(|m| m.log.status().is_leader)
            .count()
            == 1
    });
}

#[test]
fn a_member_behind_a_compacted_log_catches_up_by_snapshot() {
    let rt = rt();
    let g = Group::new(&[1, 2, 3], 16, 0);
    g.propose(&rt, mount());
    g.converge(&[1, 2, 3]);
    let leader = g.leader(Duration::from_secs(10));
    let lagging = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    g.net.isolated.lock().unwrap().insert(lagging);
    for i in 0..200 {
        g.propose(&rt, create(&format!("f{i:03}")));
    }
    g.until_compacted();
    g.net.isolated.lock().unwrap().clear();
    g.converge(&[1, 2, 3]);
    assert_eq!(g.members[&lagging].store.inode_count().unwrap(), 201);
    assert!(g.members[&lagging]
        .store
        .lookup(1, b"f199")
        .unwrap()
        .is_some());
}

#[test]
fn a_snapshot_pull_that_breaks_off_is_retried_and_the_member_keeps_running() {
    let rt = rt();
    let g = Group::new(&[1, 2, 3], 16, 0);
    g.propose(&rt, mount());
    g.converge(&[1, 2, 3]);
    let leader = g.leader(Duration::from_secs(10));
    let lagging = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    g.net.isolated.lock().unwrap().insert(lagging);
    for i in 0..200 {
        g.propose(&rt, create(&format!("f{i:03}")));
    }
    g.until_compacted();
    g.net
        .broken_pulls
        .store(2, std::sync::atomic::Ordering::SeqCst);
    g.net.isolated.lock().unwrap().clear();
    g.converge(&[1, 2, 3]);
    assert_eq!(
        g.net.broken_pulls.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(g.members[&lagging].store.inode_count().unwrap(), 201);
    assert!(!g.members[&lagging].thread.as_ref().unwrap().is_finished());
    // It still votes and follows: a write after the failed pulls reaches it.
    g.propose(&rt, create("after"));
    g.converge(&[1, 2, 3]);
    assert!(g.members[&lagging]
        .store
        .lookup(1, b"after")
        .unwrap()
        .is_some());
}

#[test]
fn follower_read_indexes_cover_every_acknowledged_write_on_a_lossy_network() {
    let rt = rt();
    let g = Group::new(&[1, 2, 3], 10_000, 10);
    g.propose(&rt, mount());
    for i in 0..15 {
        let name = format!("f{i}");
        g.propose(&rt, create(&name));
        let leader = g.leader(Duration::from_secs(10));
        // Many concurrent reads on every member share rounds; on followers they are folded
        // into the leader's rounds. Each must see the write acknowledged before it began.
        rt.block_on(async {
            let mut reads = tokio::task::JoinSet::new();
            for (&id, m) in &g.members {
                for _ in 0..8 {
                    let log = m.log.clone();
                    let store = m.store.clone();
                    let name = name.clone();
                    reads.spawn(async move {
                        let index = tokio::time::timeout(Duration::from_secs(10), log.read_index())
                            .await
                            .unwrap_or_else(|_| panic!("read index on {id} hangs"))
                            .unwrap();
                        log.wait_applied(index).await.unwrap();
                        assert!(
                            store.lookup(1, name.as_bytes()).unwrap().is_some(),
                            "member {id} (leader {leader}) misses {name} at read index {index}"
                        );
                    });
                }
            }
            while let Some(r) = reads.join_next().await {
                r.unwrap();
            }
        });
    }
}

#[test]
fn freshness_and_leases_come_from_answered_read_rounds_never_from_leading() {
    let rt = rt();
    let g = Group::new(&[1, 2, 3], 10_000, 0);
    g.propose(&rt, mount());
    g.converge(&[1, 2, 3]);
    let fresh = |id: u64| g.members[&id].log.status().fresh_as_of;
    let old = g.leader(Duration::from_secs(10));
    assert!(fresh(old).is_none(), "no round answered yet");

    let before = Instant::now();
    for m in g.members.values() {
        let index = rt.block_on(m.log.read_index()).unwrap();
        rt.block_on(m.log.wait_applied(index)).unwrap();
    }
    eventually("every member's answered round published", || {
        [1, 2, 3]
            .iter()
            .all(|&id| fresh(id).is_some_and(|t| t >= before))
    });
    eventually("a lease from the leader's round", || {
        rt.block_on(g.members[&old].log.read_index()).unwrap();
        g.members[&old].log.status().lease_holds()
    });

    // Cut off, the leader leads on until check-quorum notices: it must not take that for
    // news (a bounded-staleness read there would miss what the others commit), and its
    // lease ends within an election timeout, before another member can lead.
    g.net.isolated.lock().unwrap().insert(old);
    let cut = Instant::now();
    let lease = Duration::from_millis(10 * 9);
    let mut still_leading = 0;
    while cut.elapsed() < Duration::from_millis(500) {
        let st = g.members[&old].log.status();
        still_leading += usize::from(st.is_leader);
        assert!(
            st.fresh_as_of.is_some_and(|t| t <= cut),
            "an isolated member claims state newer than its isolation"
        );
        assert!(
            st.lease_until.is_none_or(|until| until <= cut + lease),
            "an isolated leader's lease outlives an election timeout"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        still_leading > 0,
        "the isolated leader stepped down before the first look"
    );
    g.propose(&rt, create("after-the-cut"));
    assert!(fresh(old).is_some_and(|t| t <= cut));

    let new = g.leader(Duration::from_secs(10));
    let index = rt.block_on(g.members[&new].log.read_index()).unwrap();
    rt.block_on(g.members[&new].log.wait_applied(index))
        .unwrap();
    eventually("the new leader's round to count", || {
        fresh(new).is_some_and(|t| t > cut)
    });
}

/// Waits up to 10 s for `done`; the Ready loop publishes its status on its own time.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
