//! The Ready loop: one thread owns the `RawNode`, takes mail (proposals, peer messages,
//! membership changes, the apply thread's progress), ticks, and handles each Ready in the
//! order raft-rs requires: send the leader's messages, install a snapshot, hand committed
//! entries to the apply thread ([`super::apply`]), persist new entries and the HardState
//! in one transaction, and only then send the messages that depend on them.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::v1::{Command, MasterSet, Member, PeerProgress, QuorumInfoReply};
use prost::Message as _;
use protobuf::Message as PbMessage;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType, MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole, CAMPAIGN_TRANSFER};
use tokio::sync::oneshot;

use super::apply::{Applier, Committed, Waiter};
use super::log_store::{snapshot_ref, RaftLogStore};
use super::transport::PeerNetwork;
use super::{Mail, MemberChange, RaftStatus};
use crate::snapshots::StagedSnapshot;
use crate::state_machine::{EntryOp, LogEntry};
use crate::store::{NamespaceStore, StoreError};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log once this many applied entries are in it.
    pub snapshot_threshold: u64,
    /// Members known from config (id, address): the bootstrap configuration.
    pub initial_members: Vec<(u64, String)>,
    /// This member's address when it listens on a port picked at startup: it overrides
    /// the address stored for it.
    pub ephemeral_addr: Option<String>,
}

/// Applied entries kept in the log after a compaction, so a briefly lagging follower
/// catches up from the log instead of a snapshot.
const COMPACT_KEEP: u64 = 64;

pub struct RaftNode {
    cfg: NodeConfig,
    raw: RawNode<RaftLogStore>,
    namespace: Arc<NamespaceStore>,
    transport: Arc<dyn PeerNetwork>,
    mailbox: Receiver<Mail>,
    /// The mailbox's own sender, for work done beside the Raft thread to report back.
    reports: Sender<Mail>,
    snapshot_pull: SnapshotPull,
    status: Arc<RwLock<RaftStatus>>,
    /// Member addresses: config, then every applied membership change.
    book: HashMap<u64, String>,
    conf_index: u64,
    pending: HashMap<u64, oneshot::Sender<FsResult<()>>>,
    next_seq: u64,
    was_leader: bool,
    reads: ReadIndexBatcher,
    /// Answered ReadIndex rounds not yet applied here: when each was first sent and the
    /// index it answered. Once that index is applied, every write acknowledged before
    /// that instant is too (a quorum confirmed the leader after the round was sent).
    confirmed: VecDeque<(Instant, u64)>,
    /// The newest such instant whose index is applied.
    fresh_as_of: Option<Instant>,
    /// When the latest round this member sent as leader and answered as leader, in that
    /// term, was first sent, and the term: a quorum followed it then, so no other member
    /// can lead until an election timeout later (check-quorum).
    led_at: Option<(Instant, u64)>,
    /// No lease from rounds sent before this: a leadership transfer lets its target win
    /// an election inside the lease (its campaign overrides the followers' own lease), so
    /// this stays an election timeout ahead while one is under way, for a late
    /// MsgTimeoutNow.
    lease_floor: Option<Instant>,
    /// When this process started: it does not vote for an election timeout after (it
    /// cannot know whether it had just heard from a leader whose lease it would break).
    started: Instant,
    applied_tx: tokio::sync::watch::Sender<u64>,
    applier: Applier,
    /// Applied and synced to disk: the log may be compacted up to here.
    synced: u64,
    /// Since when this member knows no leader, and when it last said so.
    leaderless: Option<(Instant, Option<Instant>)>,
}

/// How long a member knows no leader before it warns (and it warns again every twice that).
const LEADERLESS_WARN: Duration = Duration::from_secs(30);

/// A snapshot the leader sent: pulled beside the Raft thread and stepped into raft only
/// once it is complete and checked, so a holder that dies mid-pull costs a resend, never
/// a stalled member.
enum SnapshotPull {
    Idle,
    Pulling,
    Staged(StagedSnapshot),
}

/// Batches ReadIndex requests: everyone waiting when a round starts shares its answer.
/// Up to `MAX_READ_ROUNDS` rounds are in flight at once, so a read arriving just after a
/// round started waits about one round, not the rest of that one and then its own. An
/// answer also serves every earlier round: their reads began before its round did.
/// raft-rs drops a ReadIndex silently when there is no leader (or it has not committed in
/// its term), so a round that stays unanswered is asked again under the same id.
struct ReadIndexBatcher {
    queued: ReadWaiters,
    inflight: std::collections::BTreeMap<u64, Round>,
    next_ctx: u64,
}

type ReadWaiters = Vec<ReadWaiter>;

struct Round {
    waiters: ReadWaiters,
    /// When it was first sent (answers to any send count).
    started: Instant,
    /// When it was last sent.
    sent: Instant,
    /// The term, if this member led when it sent the round.
    led_term: Option<u64>,
}

impl ReadIndexBatcher {
    fn new() -> Self {
        // Round ids start somewhere new on every start, so an answer to a round of a
        // previous run of this member cannot pass for one of this run.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        ReadIndexBatcher {
            queued: Vec::new(),
            inflight: Default::default(),
            next_ctx: seed,
        }
    }

    fn can_start(&self) -> bool {
        !self.queued.is_empty() && self.inflight.len() < MAX_READ_ROUNDS
    }
}

/// Who waits for a read index: a read on this member, or (on the leader) a follower's
/// ReadIndex request. The leader folds followers' requests into its own rounds instead of
/// letting raft-rs start a heartbeat round for each, which made every follower read cost
/// the whole group a round.
enum ReadWaiter {
    Local(oneshot::Sender<FsResult<u64>>),
    Remote { from: u64, ctx: bytes::Bytes },
}

/// ReadIndex rounds one member keeps in flight.
const MAX_READ_ROUNDS: usize = 4;

/// A ReadIndex round unanswered this long is sent again.
const READ_INDEX_RETRY: Duration = Duration::from_millis(300);
/// Answered rounds remembered until their index is applied; older ones are dropped
/// first (a newer one, once applied, says more).
const MAX_UNAPPLIED_ROUNDS: usize = 64;

fn slog_logger() -> slog::Logger {
    use slog::Drain;
    slog::Logger::root(slog_stdlog::StdLog.fuse(), slog::o!())
}

/// Why a member's Raft node could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("raft config: {0}")]
    Config(#[source] raft::Error),
    #[error("raft: {0}")]
    Raft(#[source] raft::Error),
    #[error("raft storage: {0}")]
    Storage(#[from] StoreError),
    #[error("cannot start the apply thread: {0}")]
    ApplyThread(#[source] std::io::Error),
    #[error("the apply thread stopped: {0}")]
    ApplyFailed(String),
}

impl RaftNode {
    pub fn new(
        cfg: NodeConfig,
        namespace: Arc<NamespaceStore>,
        log_store: RaftLogStore,
        transport: Arc<dyn PeerNetwork>,
        (reports, mailbox): (Sender<Mail>, Receiver<Mail>),
        status: Arc<RwLock<RaftStatus>>,
        applied_tx: tokio::sync::watch::Sender<u64>,
    ) -> Result<Self, NodeError> {
        // `reports` is the mailbox's own sender: the apply thread reports there.
        let (applied, _) = namespace.applied()?;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate().map_err(NodeError::Config)?;
        let raw = RawNode::new(&raft_cfg, log_store, &slog_logger()).map_err(NodeError::Raft)?;
        let applier = Applier::start(namespace.clone(), applied_tx.clone(), reports.clone())
            .map_err(NodeError::ApplyThread)?;
        let mut node = RaftNode {
            book: cfg.initial_members.iter().cloned().collect(),
            cfg,
            raw,
            namespace,
            transport,
            mailbox,
            reports,
            snapshot_pull: SnapshotPull::Idle,
            status,
            conf_index: 0,
            pending: HashMap::new(),
            next_seq: 1,
            was_leader: false,
            reads: ReadIndexBatcher::new(),
            confirmed: VecDeque::new(),
            fresh_as_of: None,
            led_at: None,
            lease_floor: None,
            started: Instant::now(),
            applied_tx,
            applier,
            synced: applied,
            leaderless: None,
        };
        node.load_masters()?;
        // A single-member group need not wait out an election timeout.
        let cs = node.raw.raft.prs().conf().to_conf_state();
        if cs.voters == [node.cfg.id] && cs.voters_outgoing.is_empty() {
            let _ = node.raw.campaign();
        }
        node.publish();
        Ok(node)
    }

    fn load_masters(&mut self) -> Result<(), StoreError> {
        let set = self.namespace.masters()?;
        for m in &set.members {
            self.book.insert(m.id, m.addr.clone());
        }
        if let Some(addr) = &self.cfg.ephemeral_addr {
            self.book.insert(self.cfg.id, addr.clone());
        }
        self.conf_index = set.conf_index;
        Ok(())
    }

    /// Runs until shut down; an error is a storage failure after which this member stops
    /// participating rather than risk diverging.
    pub fn run(mut self) -> Result<(), NodeError> {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.cfg.tick.saturating_sub(last_tick.elapsed());
            match self.mailbox.recv_timeout(wait) {
                Ok(Mail::Shutdown) => return Ok(self.applier.stop()?),
                Ok(Mail::ApplyFailed(why)) => return Err(NodeError::ApplyFailed(why)),
                Ok(mail) => self.handle(mail),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            while let Ok(mail) = self.mailbox.try_recv() {
                match mail {
                    Mail::Shutdown => return Ok(self.applier.stop()?),
                    Mail::ApplyFailed(why) => return Err(NodeError::ApplyFailed(why)),
                    mail => self.handle(mail),
                }
            }
            if last_tick.elapsed() >= self.cfg.tick {
                self.raw.tick();
                last_tick = Instant::now();
            }
            self.start_read_round();
            self.on_ready()?;
            // Answered rounds freed slots: reads queued behind them go now, not at the
            // next mail or tick.
            if self.reads.can_start() {
                self.start_read_round();
                self.on_ready()?;
            }
            self.note_transfer();
            self.note_leaderless();
            self.advance_freshness();
            self.publish();
        }
    }

    /// Warns while this member has known no leader for long: a member started to join
    /// and not added yet knows no group and stays quiet.
    fn note_leaderless(&mut self) {
        if self.raw.raft.leader_id != 0 || self.raw.raft.prs().conf().voters().ids().is_empty() {
            self.leaderless = None;
            return;
        }
        let (since, warned) = self.leaderless.get_or_insert((Instant::now(), None));
        if since.elapsed() < LEADERLESS_WARN
            || warned.is_some_and(|w| w.elapsed() < LEADERLESS_WARN * 2)
        {
            return;
        }
        *warned = Some(Instant::now());
        tracing::warn!(
            id = self.cfg.id,
            term = self.raw.raft.term,
            "master {} has known no leader for {:?}: its group lost its quorum, it cannot reach the other members, or it was removed from the group (see `granary admin quorum info` on another member); what it answers meanwhile (the routing table, stale reads) may be out of date",
            self.cfg.id,
            since.elapsed()
        );
    }

    fn election_timeout(&self) -> Duration {
        self.cfg.tick * self.cfg.election_ticks as u32
    }

    fn note_transfer(&mut self) {
        if self.raw.raft.lead_transferee.is_some() {
            self.lease_floor = Some(Instant::now() + self.election_timeout());
        }
    }

    /// Moves `fresh_as_of` to the newest answered round whose index is applied.
    fn advance_freshness(&mut self) {
        let applied = self.raw.raft.raft_log.applied;
        while let Some(&(at, index)) = self.confirmed.front() {
            if index > applied {
                break;
            }
            self.fresh_as_of = Some(at);
            self.confirmed.pop_front();
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> FsError {
        let leader = self.raw.raft.leader_id;
        match self.book.get(&leader) {
            Some(addr) if leader != 0 => {
                FsError::Unavailable(format!("not the leader; leader is {leader}@{addr}"))
            }
            _ => FsError::Unavailable("not the leader; no leader known".into()),
        }
    }

    fn context(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut ctx = self.cfg.id.to_be_bytes().to_vec();
        ctx.extend_from_slice(&seq.to_be_bytes());
        (seq, ctx)
    }

    fn handle(&mut self, mail: Mail) {
        match mail {
            Mail::Propose(cmd, done) => {
                if !self.is_leader() {
                    let _ = done.send(Err(self.not_leader()));
                    return;
                }
                let (seq, ctx) = self.context();
                match self.raw.propose(ctx, cmd.encode_to_vec()) {
                    Ok(()) => {
                        self.pending.insert(seq, done);
                    }
                    Err(e) => {
                        let _ =
                            done.send(Err(FsError::Unavailable(format!("proposal dropped: {e}"))));
                    }
                }
            }
            Mail::Step(msgs) => {
                for mut m in msgs {
                    if m.get_msg_type() == MessageType::MsgReadIndex
                        && self.is_leader()
                        && m.from != self.cfg.id
                        && m.entries.len() == 1
                    {
                        let ctx = m.mut_entries()[0].take_data();
                        self.reads
                            .queued
                            .push(ReadWaiter::Remote { from: m.from, ctx });
                        continue;
                    }
                    if matches!(
                        m.get_msg_type(),
                        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                    ) && m.get_context() != CAMPAIGN_TRANSFER
                        && self.started.elapsed() < self.election_timeout()
                    {
                        // Just started: it may have acknowledged a leader's round moments
                        // before, and raft-rs's check-quorum lease died with the process.
                        continue;
                    }
                    if m.get_msg_type() == MessageType::MsgSnapshot && !self.admit_snapshot(&m) {
                        continue;
                    }
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "raft step");
                    }
                }
            }
            Mail::SnapshotPulled(m, pulled) => match pulled {
                Ok(staged) => {
                    tracing::info!(index = staged.index, term = staged.term, "snapshot pulled");
                    self.snapshot_pull = SnapshotPull::Staged(staged);
                    self.handle(Mail::Step(vec![*m]));
                }
                Err(why) => {
                    // The leader sends it again (maybe a newer one) and the pull restarts.
                    tracing::warn!(error = %why, "pulling a snapshot failed; waiting for the leader to send it again");
                    self.snapshot_pull = SnapshotPull::Idle;
                }
            },
            Mail::Change(change, done) => {
                let r = self.propose_change(change);
                match r {
                    Ok(seq) => {
                        self.pending.insert(seq, done);
                    }
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Mail::TransferLeader(id) => {
                self.raw.transfer_leader(id);
                // The lease ends before the Ready that may carry MsgTimeoutNow goes out.
                self.note_transfer();
                self.publish();
            }
            Mail::Unreachable(id) => self.raw.report_unreachable(id),
            Mail::Applied { applied, synced } => {
                // A report from before a snapshot was installed may come late.
                if applied > self.raw.raft.raft_log.applied {
                    self.raw.advance_apply_to(applied);
                }
                self.synced = self.synced.max(synced);
            }
            Mail::ApplyFailed(_) => {}
            Mail::ReadIndex(done) => self.reads.queued.push(ReadWaiter::Local(done)),
            Mail::Shutdown => {}
            Mail::SnapshotSent(id, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(id, status);
            }
        }
    }

    fn propose_change(&mut self, change: MemberChange) -> FsResult<u64> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let conf = self.raw.raft.prs().conf().to_conf_state();
        if self.raw.raft.has_pending_conf() || !conf.voters_outgoing.is_empty() {
            return Err(FsError::Unavailable(
                "a membership change is still in progress; retry shortly".into(),
            ));
        }
        let single = |change_type, node_id| {
            let mut s = ConfChangeSingle::default();
            s.set_change_type(change_type);
            s.node_id = node_id;
            s
        };
        let mut cc = ConfChangeV2::default();
        match &change {
            MemberChange::AddLearner { id, addr } => {
                if conf.voters.contains(id) || conf.learners.contains(id) {
                    return Err(FsError::Exists(format!("master {id} is already a member")));
                }
                cc.set_changes(vec![single(ConfChangeType::AddLearnerNode, *id)].into());
                cc.set_context(addr.clone().into_bytes().into());
            }
            MemberChange::Promote { id } => {
                if !conf.learners.contains(id) {
                    return Err(FsError::NotFound(format!("master {id} is not a learner")));
                }
                // Joint consensus (C_old,new), left automatically once applied.
                cc.set_transition(ConfChangeTransition::Implicit);
                cc.set_changes(vec![single(ConfChangeType::AddNode, *id)].into());
            }
            MemberChange::Remove { id } => {
                if !conf.voters.contains(id) && !conf.learners.contains(id) {
                    return Err(FsError::NotFound(format!("master {id} is not a member")));
                }
                if *id == self.cfg.id {
                    return Err(FsError::Unsupported(
                        "the leader cannot remove itself; transfer leadership first".into(),
                    ));
                }
                if conf.voters.len() == 1 && conf.voters.contains(id) {
                    return Err(FsError::Unsupported("cannot remove the last voter".into()));
                }
                cc.set_transition(ConfChangeTransition::Implicit);
                cc.set_changes(vec![single(ConfChangeType::RemoveNode, *id)].into());
            }
        }
        let (seq, ctx) = self.context();
        self.raw
            .propose_conf_change(ctx, cc)
            .map_err(|e| FsError::Unavailable(format!("membership change dropped: {e}")))?;
        tracing::info!(?change, "proposed membership change");
        Ok(seq)
    }

    fn send(&self, msgs: Vec<raft::eraftpb::Message>) {
        if msgs.is_empty() {
            return;
        }
        self.transport.send(msgs, &self.book);
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            self.on_role_change(ss.raft_state == StateRole::Leader, ss.leader_id);
        }
        for rs in rd.take_read_states() {
            self.finish_read_round(&rs.request_ctx, rs.index);
        }
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            tracing::info!(
                index = snap.get_metadata().index,
                term = snap.get_metadata().term,
                "installing snapshot from the leader"
            );
            // What was handed over before applies first; the snapshot replaces it.
            self.applier.drain()?;
            self.install_snapshot(&snap)?;
            self.load_masters()?;
        }
        let snapshot_index = rd.snapshot().get_metadata().index;
        self.hand_over(rd.take_committed_entries());
        self.raw.store().append(rd.entries(), rd.hs())?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance_append(rd);
        if snapshot_index > self.raw.raft.raft_log.applied {
            // Installed above, durably: applied as a whole.
            self.raw.advance_apply_to(snapshot_index);
            self.synced = self.synced.max(snapshot_index);
            self.applied_tx.send_if_modified(|v| {
                let newer = snapshot_index > *v;
                *v = (*v).max(snapshot_index);
                newer
            });
        }
        if let Some(commit) = light.commit_index() {
            self.raw.store().set_commit(commit);
        }
        self.send(light.take_messages());
        self.hand_over(light.take_committed_entries());
        self.maybe_compact()?;
        Ok(())
    }

    /// Whether a snapshot message may go to raft now: one raft would install must be
    /// staged first. Otherwise its pull starts (one at a time) and the message waits in
    /// the pull; the leader resends meanwhile, which is dropped.
    fn admit_snapshot(&mut self, m: &raft::eraftpb::Message) -> bool {
        let meta = m.get_snapshot().get_metadata();
        let (index, term) = (meta.index, meta.term);
        if index <= self.raw.raft.raft_log.committed {
            // Raft ignores one it has passed.
            return true;
        }
        match &self.snapshot_pull {
            SnapshotPull::Staged(s) if (s.index, s.term) == (index, term) => return true,
            SnapshotPull::Pulling => return false,
            _ => {}
        }
        self.snapshot_pull = SnapshotPull::Pulling;
        let transport = self.transport.clone();
        let book = self.book.clone();
        let namespace = self.namespace.clone();
        let reports = self.reports.clone();
        let m = m.clone();
        let spawned = std::thread::Builder::new()
            .name("granary-snapshot-pull".into())
            .spawn(move || {
                let staged = snapshot_ref(m.get_snapshot()).and_then(|r| {
                    tracing::info!(holder = r.holder, index, term, "pulling a snapshot");
                    let chunks = transport.pull_snapshot(&r, &book)?;
                    namespace.stage_snapshot(index, term, chunks)
                });
                let _ = reports.send(Mail::SnapshotPulled(
                    Box::new(m),
                    staged.map_err(|e| e.to_string()),
                ));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to pull a snapshot");
            self.snapshot_pull = SnapshotPull::Idle;
        }
        false
    }

    /// Installs the snapshot raft accepted from the staged copy (a local read).
    fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.snapshot_pull, SnapshotPull::Idle) {
            SnapshotPull::Staged(staged) => self.raw.store().apply_snapshot(snap, &staged),
            _ => Err(StoreError::Corrupt(
                "raft accepted a snapshot that was not pulled".into(),
            )),
        }
    }

    /// Asks again for rounds unanswered too long, under the same id (a late answer to the
    /// first request still counts), and starts a round for the queued reads if fewer than
    /// `MAX_READ_ROUNDS` are in flight.
    fn start_read_round(&mut self) {
        for (&id, round) in self.reads.inflight.iter_mut() {
            if round.sent.elapsed() >= READ_INDEX_RETRY {
                round.sent = Instant::now();
                self.raw.read_index(id.to_be_bytes().to_vec());
            }
        }
        let reads = &mut self.reads;
        if !reads.can_start() {
            return;
        }
        reads.next_ctx += 1;
        let ctx = reads.next_ctx;
        let now = Instant::now();
        let led_term = (self.raw.raft.state == StateRole::Leader).then_some(self.raw.raft.term);
        reads.inflight.insert(
            ctx,
            Round {
                waiters: std::mem::take(&mut reads.queued),
                started: now,
                sent: now,
                led_term,
            },
        );
        self.raw.read_index(ctx.to_be_bytes().to_vec());
    }

    /// Answers round `ctx` and every round started before it.
    fn finish_read_round(&mut self, ctx: &[u8], index: u64) {
        let Some(id) = ctx.try_into().ok().map(u64::from_be_bytes) else {
            return;
        };
        if !self.reads.inflight.contains_key(&id) {
            return;
        }
        let later = self.reads.inflight.split_off(&(id + 1));
        let answered = std::mem::replace(&mut self.reads.inflight, later);
        if let Some(round) = answered.get(&id) {
            self.confirmed.push_back((round.started, index));
            if self.confirmed.len() > MAX_UNAPPLIED_ROUNDS {
                self.confirmed.pop_front();
            }
            let term = self.raw.raft.term;
            if self.is_leader() && round.led_term == Some(term) {
                self.led_at = Some((round.started, term));
            }
        }
        metrics::counter!("granary_master_read_index_rounds_total").increment(1);
        // A follower may commit up to the index answered with the leader's term (raft-rs
        // answers a leader's ReadIndex only once it has committed in its term, so the
        // entry there is of this term). A member that is no longer leader answers no
        // follower: they ask again.
        let leader = self.is_leader();
        let mut replies = Vec::new();
        for w in answered.into_values().flat_map(|r| r.waiters) {
            match w {
                ReadWaiter::Local(done) => {
                    let _ = done.send(Ok(index));
                }
                ReadWaiter::Remote { from, ctx } if leader => {
                    let mut entry = Entry::default();
                    entry.set_data(ctx);
                    let mut m = raft::eraftpb::Message::default();
                    m.set_msg_type(MessageType::MsgReadIndexResp);
                    m.to = from;
                    m.from = self.cfg.id;
                    m.term = self.raw.raft.term;
                    m.index = index;
                    m.set_entries(vec![entry].into());
                    replies.push(m);
                }
                ReadWaiter::Remote { .. } => {}
            }
        }
        self.send(replies);
    }

    fn on_role_change(&mut self, leader: bool, leader_id: u64) {
        if leader && !self.was_leader {
            tracing::info!(id = self.cfg.id, term = self.raw.raft.term, "became leader");
            // A joint configuration left over from a previous leader is never left
            // automatically: leave it now.
            let conf = self.raw.raft.prs().conf().to_conf_state();
            if !conf.voters_outgoing.is_empty() && !self.raw.raft.has_pending_conf() {
                tracing::info!("leaving a joint configuration left by the previous leader");
                let (_, ctx) = self.context();
                if let Err(e) = self.raw.propose_conf_change(ctx, ConfChangeV2::default()) {
                    tracing::warn!(error = %e, "could not propose leaving the joint configuration");
                }
            }
        }
        if !leader && self.was_leader {
            tracing::info!(id = self.cfg.id, new_leader = leader_id, "lost leadership");
            for (_, done) in self.pending.drain() {
                let _ = done.send(Err(FsError::Unavailable(
                    "leadership changed before the proposal applied".into(),
                )));
            }
        }
        self.was_leader = leader;
    }

    /// Hands committed entries to the apply thread, with this member's proposers waiting
    /// on them. A membership change is applied to raft-rs here, in log order: the apply
    /// thread only records the configuration it produced.
    fn hand_over(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut batch = Vec::with_capacity(entries.len());
        let mut waiters = Vec::new();
        for (position, e) in entries.iter().enumerate() {
            let mut answer = None;
            let op = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => EntryOp::Noop,
                EntryType::EntryNormal => match Command::decode(e.get_data()) {
                    Ok(cmd) => EntryOp::Command(cmd),
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "undecodable command in the log; skipping");
                        EntryOp::Noop
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    match self.apply_conf_change(e) {
                        Ok(op) => op,
                        Err(err) => {
                            answer = Some(err);
                            EntryOp::Noop
                        }
                    }
                }
            };
            batch.push(LogEntry {
                index: e.index,
                term: e.term,
                op,
            });
            // Committed: it will be applied, whatever happens to leadership meanwhile.
            let proposer = self
                .own_proposal(e.get_context())
                .and_then(|seq| self.pending.remove(&seq));
            if let Some(done) = proposer {
                waiters.push(Waiter {
                    position,
                    done,
                    answer,
                });
            }
        }
        self.applier.apply(Committed {
            entries: batch,
            waiters,
        });
    }

    /// The sequence number if `ctx` marks a proposal made by this member.
    fn own_proposal(&self, ctx: &[u8]) -> Option<u64> {
        if ctx.len() != 16 || ctx[..8] != self.cfg.id.to_be_bytes() {
            return None;
        }
        Some(u64::from_be_bytes(ctx[8..].try_into().expect("8 bytes")))
    }

    fn apply_conf_change(&mut self, e: &Entry) -> FsResult<EntryOp> {
        // Granary only ever proposes ConfChangeV2 (raft-rs's automatic leave is one too).
        if e.get_entry_type() != EntryType::EntryConfChangeV2 {
            return Err(FsError::Unsupported(
                "legacy ConfChange entries are not used".into(),
            ));
        }
        let cc = ConfChangeV2::parse_from_bytes(e.get_data())
            .map_err(|err| FsError::io(err.to_string()))?;
        let cs = self.raw.apply_conf_change(&cc).map_err(|err| {
            FsError::InvalidArgument(format!("membership change rejected: {err}"))
        })?;
        let addr = String::from_utf8_lossy(cc.get_context()).into_owned();
        for c in cc.get_changes() {
            match c.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode if !addr.is_empty() => {
                    self.book.insert(c.node_id, addr.clone());
                }
                _ => {}
            }
        }
        // A removed member's address goes, and with it the transport's link to it.
        let me = self.cfg.id;
        self.book.retain(|id, _| {
            *id == me
                || [
                    cs.get_voters(),
                    cs.get_learners(),
                    cs.get_voters_outgoing(),
                    cs.get_learners_next(),
                ]
                .iter()
                .any(|set| set.contains(id))
        });
        self.transport.members_changed(&self.book);
        self.conf_index = e.index;
        tracing::info!(index = e.index, voters = ?cs.voters, learners = ?cs.learners, outgoing = ?cs.voters_outgoing, "membership changed");
        Ok(EntryOp::ConfChange {
            conf_state: cs
                .write_to_bytes()
                .map_err(|err| FsError::io(err.to_string()))?,
            masters: self.master_set(&cs),
        })
    }

    fn master_set(&self, cs: &ConfState) -> MasterSet {
        let mut members: Vec<Member> = Vec::new();
        let mut add = |id: u64, learner: bool| {
            if !members.iter().any(|m| m.id == id) {
                members.push(Member {
                    id,
                    addr: self.book.get(&id).cloned().unwrap_or_default(),
                    learner,
                });
            }
        };
        for &id in cs.voters.iter().chain(cs.voters_outgoing.iter()) {
            add(id, false);
        }
        for &id in cs.learners.iter().chain(cs.learners_next.iter()) {
            add(id, true);
        }
        members.sort_by_key(|m| m.id);
        MasterSet {
            members,
            leader_id: self.raw.raft.leader_id,
            term: self.raw.raft.term,
            conf_index: self.conf_index,
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let applied = self.raw.raft.raft_log.applied;
        let first = self.raw.store().first_index_now();
        if applied >= first + self.cfg.snapshot_threshold {
            // Entries leave the log only once their effect is durable (the apply thread
            // syncs at most a second behind).
            let upto = applied.saturating_sub(COMPACT_KEEP).min(self.synced);
            if upto >= first {
                self.raw.store().compact(upto)?;
                tracing::debug!(upto, "raft log compacted");
            }
        }
        Ok(())
    }

    /// Publishes this member's view for the RPC handlers.
    fn publish(&self) {
        let raft = &self.raw.raft;
        let cs = raft.prs().conf().to_conf_state();
        let masters = self.master_set(&cs);
        let leader = self.is_leader();
        let peers = masters
            .members
            .iter()
            .map(|m| {
                let progress = raft.prs().get(m.id).filter(|_| leader);
                PeerProgress {
                    id: m.id,
                    addr: m.addr.clone(),
                    learner: m.learner,
                    matched: progress.map_or(0, |p| p.matched),
                    progress_known: progress.is_some(),
                    answered: progress.is_some_and(|p| {
                        p.matched > 0 || p.recent_active || p.state == raft::ProgressState::Snapshot
                    }),
                }
            })
            .collect();
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let mut st = self.status.write().expect("status lock");
        st.id = self.cfg.id;
        st.leader_id = raft.leader_id;
        st.term = raft.term;
        st.is_leader = leader;
        st.info = QuorumInfoReply {
            id: self.cfg.id,
            leader_id: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            conf_index: self.conf_index,
            outgoing_voters: cs.voters_outgoing.clone(),
            peers,
            role: role.into(),
        };
        st.masters = masters;
        // Its own first entry applied: everything committed before it took over is too.
        st.leader_caught_up =
            leader && raft.raft_log.term(raft.raft_log.applied).ok() == Some(raft.term);
        st.sole_voter_leader =
            st.leader_caught_up && cs.voters == [self.cfg.id] && cs.voters_outgoing.is_empty();
        st.fresh_as_of = self.fresh_as_of;
        // A follower's election clock restarts when the round's heartbeat reaches it, and
        // its first tick may come at once: one tick less than the timeout is safe.
        let lease = self.election_timeout().saturating_sub(self.cfg.tick);
        st.lease_until = match self.led_at {
            Some((at, term))
                if st.leader_caught_up
                    && term == raft.term
                    && raft.lead_transferee.is_none()
                    && self.lease_floor.is_none_or(|floor| at > floor) =>
            {
                Some(at + lease)
            }
            _ => None,
        };
    }
}
