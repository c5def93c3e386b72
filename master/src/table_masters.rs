//! A sharded group's leader keeps its shard's entry in the routing table naming the
//! group's masters as they are now. The table is where routers, mounts and the other
//! shards find a shard's masters, and a master group changes (members added, removed,
//! replaced at new addresses) without anyone editing the table.

use std::sync::Arc;
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_protos::v1::{SetShardMastersRequest, ShardInfo};
use granary_shard_router::leader::change_on_keeper;
use tokio::task::JoinHandle;

use crate::raft::{RaftLog, RaftStatus};
use crate::store::NamespaceStore;

const CHECK_EVERY: Duration = Duration::from_secs(3);

/// Starts checking, on whichever member leads; `sources` are where a shard other than 0
/// follows the table (routers, or shard 0's masters).
pub fn start(
    raft: RaftLog,
    store: Arc<NamespaceStore>,
    token: AttachToken,
    sources: Vec<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failed_for: Option<Vec<String>> = None;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if outdated(&raft.status(), &store, &sources).is_none() {
                continue;
            }
            // A leader deposed without knowing it yet would write back the masters it
            // knew: only one a quorum still follows (a read index round) sends them.
            if raft.read_index().await.is_err() {
                continue;
            }
            let Some((shard, masters, targets)) = outdated(&raft.status(), &store, &sources) else {
                continue;
            };
            let request = SetShardMastersRequest {
                shard: Some(ShardInfo {
                    id: u32::from(shard),
                    masters: masters.clone(),
                }),
            };
            let changed = change_on_keeper(targets, &token, move |mut c| {
                let r = request.clone();
                Box::pin(async move { c.set_shard_masters(r).await })
            })
            .await;
            match changed {
                Ok(t) => {
                    failed_for = None;
                    tracing::info!(
                        shard,
                        version = t.get_ref().version,
                        ?masters,
                        "the routing table names this shard's masters as they are now"
                    );
                }
                // Once per set of masters: shard 0 may be down for a while.
                Err(e) if failed_for.as_ref() != Some(&masters) => {
                    failed_for = Some(masters);
                    tracing::warn!(shard, error = %e.message(), "cannot update the routing table with this shard's masters; trying again every {CHECK_EVERY:?}");
                }
                Err(e) => tracing::debug!(shard, error = %e.message(), "routing table not updated"),
            }
        }
    })
}

/// On a leader of a sharded group whose table entry names other masters than its
/// voters: the shard, its masters (sorted), and where to ask for the change.
fn outdated(
    status: &RaftStatus,
    store: &NamespaceStore,
    sources: &[String],
) -> Option<(u16, Vec<String>, Vec<String>)> {
    if !status.is_leader || !status.leader_caught_up {
        return None;
    }
    // One shard alone has no table: its group is its entry.
    let table = store.routing_table().ok()??;
    let voters: Vec<_> = status
        .masters
        .members
        .iter()
        .filter(|m| !m.learner)
        .collect();
    // A member whose address is not known yet: wait for the whole set.
    if voters.is_empty() || voters.iter().any(|m| m.addr.is_empty()) {
        return None;
    }
    let mut masters: Vec<String> = voters.iter().map(|m| m.addr.clone()).collect();
    masters.sort();
    let shard = store.shard();
    let mut listed = table.masters(shard)?.to_vec();
    listed.sort();
    if listed == masters {
        return None;
    }
    // Shard 0 keeps the table: its leader asks itself.
    let targets = match shard {
        0 => masters.clone(),
        _ => table.masters(0)?.iter().chain(sources).cloned().collect(),
    };
    Some((shard, masters, targets))
}
