//! A follower's `lease` reads need the leader's applied index. Every read waiting when a
//! call to the leader starts shares its answer, with up to `MAX_CALLS` calls in flight, so
//! a busy follower costs the leader one call per batch instead of one per read.

use std::sync::Arc;

use granary_protos::v1::ReadIndexRequest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tonic::Status;

use crate::leader_clients::LeaderClients;
use crate::raft::RaftLog;

const MAX_CALLS: usize = 4;
/// The leader answers a lease read index from memory; longer means it is gone.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

type Waiter = oneshot::Sender<Result<u64, Status>>;

pub struct LeaseIndex {
    waiters: mpsc::UnboundedSender<Waiter>,
}

impl LeaseIndex {
    /// Starts the batching task on the current runtime.
    pub fn start(raft: RaftLog, clients: Arc<LeaderClients>) -> Self {
        let (waiters, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch(rx, raft, clients));
        LeaseIndex { waiters }
    }

    /// The leader's applied index, asked after this call began.
    pub async fn get(&self) -> Result<u64, Status> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Status::unavailable("the lease read-index batcher stopped");
        self.waiters.send(tx).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn batch(
    mut rx: mpsc::UnboundedReceiver<Waiter>,
    raft: RaftLog,
    clients: Arc<LeaderClients>,
) {
    let mut calls = JoinSet::new();
    let mut queued = Vec::new();
    loop {
        tokio::select! {
            w = rx.recv() => match w {
                Some(w) => queued.push(w),
                None => return,
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
        while let Ok(w) = rx.try_recv() {
            queued.push(w);
        }
        if queued.is_empty() || calls.len() >= MAX_CALLS {
            continue;
        }
        let batch = std::mem::take(&mut queued);
        let leader = clients.leader(&raft);
        calls.spawn(async move {
            let index = match leader {
                Ok(mut c) => {
                    // Short: calls stuck on a leader that died hold the slots that reads
                    // to its successor need.
                    let mut req = tonic::Request::new(ReadIndexRequest { lease: true });
                    req.set_timeout(CALL_TIMEOUT);
                    c.read_index(req).await.map(|r| r.into_inner().index)
                }
                Err(e) => Err(e),
            };
            for w in batch {
                let _ = w.send(index.clone());
            }
        });
    }
}
