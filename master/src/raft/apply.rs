//! The apply thread: committed entries reach the namespace store here, in log order and
//! off the Ready thread, so a command that does much work (a directory rename rewrites
//! every descendant, a big listing inserts every entry) stalls neither ticks nor
//! heartbeats and costs no election. It publishes the applied index, answers this
//! member's proposers, keeps the store synced at most a second behind, and tells the
//! Ready loop how far it got (raft-rs's applied index, and how far the log may be
//! compacted).

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use tokio::sync::oneshot;

use super::Mail;
use crate::state_machine::{self, LogEntry};
use crate::store::{NamespaceStore, StoreError};

/// Longest time applied state stays unsynced on disk.
pub(super) const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A batch that takes longer than this to apply is logged.
const SLOW_APPLY: Duration = Duration::from_secs(1);

/// A proposal of this member waiting for its entry to be applied.
pub(super) struct Waiter {
    /// Its entry's position in the handover.
    pub position: usize,
    pub done: oneshot::Sender<FsResult<()>>,
    /// The answer when it is not the state machine's (a membership change raft-rs
    /// rejected).
    pub answer: Option<FsError>,
}

/// Committed entries, in log order, handed over by the Ready loop.
pub(super) struct Committed {
    pub entries: Vec<LogEntry>,
    pub waiters: Vec<Waiter>,
}

enum Task {
    Apply(Committed),
    /// Answered once every entry handed over before is applied.
    Drain(SyncSender<()>),
}

pub(super) struct Applier {
    tasks: Option<Sender<Task>>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
}

impl Applier {
    /// Starts the thread; it reports to the Ready loop through `mailbox`.
    pub fn start(
        namespace: Arc<NamespaceStore>,
        applied_tx: tokio::sync::watch::Sender<u64>,
        mailbox: Sender<Mail>,
    ) -> std::io::Result<Self> {
        let (tasks, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("granary-apply".into())
            .spawn(move || {
                let r = run(&namespace, &rx, &applied_tx, &mailbox);
                if let Err(e) = &r {
                    let _ = mailbox.send(Mail::ApplyFailed(e.to_string()));
                }
                r
            })?;
        Ok(Applier {
            tasks: Some(tasks),
            thread: Some(thread),
        })
    }

    /// Hands committed entries over. A stopped thread has reported why already.
    pub fn apply(&self, committed: Committed) {
        if committed.entries.is_empty() {
            return;
        }
        if let Some(tasks) = &self.tasks {
            let _ = tasks.send(Task::Apply(committed));
        }
    }

    /// Waits until every entry handed over is applied (before a snapshot replaces the
    /// state they apply to).
    pub fn drain(&self) -> Result<(), StoreError> {
        let (done, drained) = sync_channel(1);
        let stopped = || StoreError::Corrupt("the apply thread stopped".into());
        self.tasks
            .as_ref()
            .ok_or_else(stopped)?
            .send(Task::Drain(done))
            .map_err(|_| stopped())?;
        drained.recv().map_err(|_| stopped())
    }

    /// Applies what is left, syncs the store and stops the thread.
    pub fn stop(&mut self) -> Result<(), StoreError> {
        self.tasks = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(StoreError::Corrupt("the apply thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn run(
    namespace: &NamespaceStore,
    tasks: &Receiver<Task>,
    applied_tx: &tokio::sync::watch::Sender<u64>,
    mailbox: &Sender<Mail>,
) -> Result<(), StoreError> {
    // What a crashed process left applied may not be on disk yet: the log keeps it until
    // this sync.
    namespace.sync()?;
    let mut applied = namespace.applied()?.0;
    let mut synced = applied;
    let mut synced_at = Instant::now();
    let mut reported = (applied, synced);
    loop {
        match tasks.recv_timeout(SYNC_INTERVAL) {
            Ok(Task::Apply(committed)) => applied = apply(namespace, committed, applied_tx)?,
            Ok(Task::Drain(done)) => {
                let _ = done.send(());
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return namespace.sync(),
        }
        // Applied batches are not synced one by one (the log replays them); the log is
        // compacted only up to what is synced.
        if synced < applied && synced_at.elapsed() >= SYNC_INTERVAL {
            namespace.sync()?;
            synced = applied;
            synced_at = Instant::now();
        }
        if (applied, synced) != reported {
            reported = (applied, synced);
            let _ = mailbox.send(Mail::Applied { applied, synced });
        }
    }
}

/// Applies one handover; returns the index applied.
fn apply(
    namespace: &NamespaceStore,
    committed: Committed,
    applied_tx: &tokio::sync::watch::Sender<u64>,
) -> Result<u64, StoreError> {
    let started = Instant::now();
    let Committed { entries, waiters } = committed;
    let results = state_machine::apply_batch(namespace, &entries)?;
    let last = entries.last().map_or(0, |e| e.index);
    let took = started.elapsed();
    if took >= SLOW_APPLY {
        tracing::warn!(entries = entries.len(), last, took = ?took, "slow apply");
    }
    metrics::histogram!("granary_master_apply_seconds").record(took.as_secs_f64());
    // Published before any proposer hears back, so a read index taken after an
    // acknowledged write always covers it.
    applied_tx.send_if_modified(|v| {
        let newer = last > *v;
        *v = (*v).max(last);
        newer
    });
    for w in waiters {
        let result = match w.answer {
            Some(err) => Err(err),
            None => results[w.position].clone(),
        };
        let _ = w.done.send(result);
    }
    Ok(last)
}
