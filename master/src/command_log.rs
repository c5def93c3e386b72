//! Where state-machine commands go to be ordered and applied: the seam between the
//! namespace logic and replication. The Raft log (`crate::raft::RaftLog`) implements it.

use std::future::Future;

use granary_common::FsResult;
use granary_protos::v1::Command;

/// Orders commands and applies them to the namespace store.
pub trait CommandLog: Send + Sync + 'static {
    /// Resolves once the command is applied, with the command's own result.
    fn propose(&self, cmd: Command) -> impl Future<Output = FsResult<()>> + Send;
}
