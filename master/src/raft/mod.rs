//! Raft replication of the namespace: one `RawNode` per master, driven by a single Ready
//! loop ([`node`]), with the log in redb ([`log_store`]) and messages over gRPC
//! ([`transport`]). [`RaftLog`] is the `CommandLog` the rest of the master proposes to.

mod apply;
mod log_file;
pub mod log_store;
pub mod node;
pub mod transport;

use std::future::Future;
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use granary_common::{FsError, FsResult};
use granary_protos::v1::{Command, MasterSet, QuorumInfoReply};
use tokio::sync::oneshot;

use crate::command_log::CommandLog;

/// How long a proposal may wait to be applied before the caller gets a retryable error.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for its read index (and for it to be applied) before the client
/// is told to try another member.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// A membership change asked of the leader.
#[derive(Debug, Clone)]
pub enum MemberChange {
    AddLearner { id: u64, addr: String },
    Promote { id: u64 },
    Remove { id: u64 },
}

pub enum Mail {
    Propose(Command, oneshot::Sender<FsResult<()>>),
    Step(Vec<raft::eraftpb::Message>),
    Change(MemberChange, oneshot::Sender<FsResult<()>>),
    TransferLeader(u64),
    Unreachable(u64),
    SnapshotSent(u64, bool),
    /// A linearizable read point: answered with the commit index confirmed by the leader
    /// (raft-rs ReadIndex). Concurrent requests share one round.
    ReadIndex(oneshot::Sender<FsResult<u64>>),
    /// The apply thread's progress: applied, and applied and synced to disk.
    Applied {
        applied: u64,
        synced: u64,
    },
    /// The apply thread stopped on a storage failure; this member stops too.
    ApplyFailed(String),
    /// A snapshot message whose records were pulled beside the Raft thread (or why they
    /// could not be).
    SnapshotPulled(
        Box<raft::eraftpb::Message>,
        Result<crate::snapshots::StagedSnapshot, String>,
    ),
    /// Ends the Ready loop (the master is stopping).
    Shutdown,
}

/// What the Ready loop last published about this member; read by the RPC handlers.
#[derive(Debug, Clone, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub is_leader: bool,
    pub info: QuorumInfoReply,
    pub masters: MasterSet,
    /// Every write acknowledged before this instant is applied here: the start of the
    /// latest ReadIndex round answered whose index is applied (not a heartbeat's arrival,
    /// which a paused member or a deposed leader would take for news).
    pub fresh_as_of: Option<std::time::Instant>,
    /// Leader, and it has applied an entry of its own term (so everything committed
    /// before: a restarted master replays its log first).
    pub leader_caught_up: bool,
    /// Until when this leader may answer from its own state (`lease` reads): an election
    /// timeout, less a tick, after a quorum last followed it.
    pub lease_until: Option<std::time::Instant>,
    /// A caught-up leader that is the group's only voter: no other member can lead (or
    /// commit) without a membership change this member applies first, so its applied
    /// state is linearizable.
    pub sole_voter_leader: bool,
}

impl RaftStatus {
    pub fn leader_addr(&self) -> Option<String> {
        self.masters
            .members
            .iter()
            .find(|m| m.id == self.leader_id && self.leader_id != 0)
            .map(|m| m.addr.clone())
    }

    /// This leader holds its lease: it may answer from its own state now.
    pub fn lease_holds(&self) -> bool {
        self.lease_until
            .is_some_and(|until| std::time::Instant::now() < until)
    }
}

/// Handle to the Ready loop.
#[derive(Clone)]
pub struct RaftLog {
    mailbox: Sender<Mail>,
    status: Arc<RwLock<RaftStatus>>,
    applied: tokio::sync::watch::Receiver<u64>,
}

impl RaftLog {
    pub fn new(
        mailbox: Sender<Mail>,
        status: Arc<RwLock<RaftStatus>>,
        applied: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        RaftLog {
            mailbox,
            status,
            applied,
        }
    }

    /// A read index confirmed by the leader (one ReadIndex round shared by concurrent callers).
    pub async fn read_index(&self) -> FsResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.send(Mail::ReadIndex(tx))?;
        match tokio::time::timeout(READ_INDEX_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(FsError::Unavailable("raft loop dropped the read".into())),
            Err(_) => Err(FsError::Unavailable(
                "no read index from the leader in time".into(),
            )),
        }
    }

    /// The last index applied to this member's state machine.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until this member has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> FsResult<()> {
        let mut rx = self.applied.clone();
        let waited = tokio::time::timeout(READ_INDEX_TIMEOUT, rx.wait_for(|&a| a >= index))
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(FsError::Unavailable("raft loop stopped".into())),
            Err(_) => Err(FsError::Unavailable(format!(
                "index {index} not applied in time"
            ))),
        }
    }

    pub fn status(&self) -> RaftStatus {
        self.status.read().expect("status lock").clone()
    }

    /// See [`RaftStatus::leader_caught_up`] (without copying the whole status).
    pub fn leader_caught_up(&self) -> bool {
        self.status.read().expect("status lock").leader_caught_up
    }

    /// See [`RaftStatus::sole_voter_leader`] (without copying the whole status).
    pub fn sole_voter_leader(&self) -> bool {
        self.status.read().expect("status lock").sole_voter_leader
    }

    pub fn send(&self, mail: Mail) -> FsResult<()> {
        self.mailbox
            .send(mail)
            .map_err(|_| FsError::Unavailable("raft loop stopped".into()))
    }

    /// Sends a request that the loop answers through `rx`, bounded by the proposal timeout.
    async fn ask(&self, mail: Mail, rx: oneshot::Receiver<FsResult<()>>) -> FsResult<()> {
        self.send(mail)?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(FsError::Unavailable("raft loop dropped the request".into())),
            Err(_) => Err(FsError::TimedOut(
                "not applied in time (leader change?)".into(),
            )),
        }
    }

    pub async fn change_members(&self, change: MemberChange) -> FsResult<()> {
        let (tx, rx) = oneshot::channel();
        self.ask(Mail::Change(change, tx), rx).await
    }
}

impl CommandLog for RaftLog {
    fn propose(&self, cmd: Command) -> impl Future<Output = FsResult<()>> + Send {
        let (tx, rx) = oneshot::channel();
        let me = self.clone();
        async move { me.ask(Mail::Propose(cmd, tx), rx).await }
    }
}
#[cfg(test)]
mod tests;
