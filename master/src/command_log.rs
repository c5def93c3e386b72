//! Where state-machine commands go to be ordered and applied. In a single-member shard,
//! [`LocalLog`] is the whole log: one applier thread group-commits whatever proposals are
//! waiting into one store transaction (one fsync for many commands). The Raft log
//! implements the same trait.

use std::future::Future;
use std::sync::Arc;

use granary_common::{FsError, FsResult};
use granary_protos::v1::Command;
use tokio::sync::{mpsc, oneshot};

use crate::store::NamespaceStore;

/// Orders commands and applies them to the namespace store.
pub trait CommandLog: Send + Sync + 'static {
    /// Resolves once the command is applied, with the command's own result.
    fn propose(&self, cmd: Command) -> impl Future<Output = FsResult<()>> + Send;
}

type Proposal = (Command, oneshot::Sender<FsResult<()>>);

/// Largest group commit; bounds one transaction's size.
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct LocalLog {
    tx: mpsc::UnboundedSender<Proposal>,
}

impl LocalLog {
    pub fn start(store: Arc<NamespaceStore>) -> Result<Self, crate::store::StoreError> {
        let mut next_index = store.applied_index()? + 1;
        let (tx, mut rx) = mpsc::unbounded_channel::<Proposal>();
        std::thread::Builder::new()
            .name("granary-apply".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    let (cmds, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let entries: Vec<(u64, Command)> = cmds
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| (next_index + i as u64, c))
                        .collect();
                    match store.apply_batch(&entries) {
                        Ok(results) => {
                            next_index += entries.len() as u64;
                            for (w, r) in waiters.into_iter().zip(results) {
                                let _ = w.send(r);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "applying {} commands failed", entries.len());
                            for w in waiters {
                                let _ = w.send(Err(FsError::Io(e.to_string())));
                            }
                        }
                    }
                    metrics::counter!("granary_master_applied_commands_total").increment(entries.len() as u64);
                }
            })
            .map_err(|e| crate::store::StoreError::Corrupt(format!("cannot start applier thread: {e}")))?;
        Ok(LocalLog { tx })
    }
}

impl CommandLog for LocalLog {
    fn propose(&self, cmd: Command) -> impl Future<Output = FsResult<()>> + Send {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send((cmd, done));
        async move {
            sent.map_err(|_| FsError::Unavailable("metadata applier stopped".into()))?;
            wait.await
                .map_err(|_| FsError::Unavailable("metadata applier stopped".into()))?
        }
    }
}
