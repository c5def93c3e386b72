//! A shard other than 0 follows shard 0's routing table: its leader asks the routers (or
//! shard 0's masters) for the table every couple of seconds, or at once when a caller
//! routed by a newer one, and proposes a newer table to this shard's own log, so every
//! member adopts it at the same index.

use std::sync::Arc;
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{command, Command, GetRoutingTableRequest, SetRoutingTable};
use granary_shard_router::RoutingTable;
use tokio::sync::Notify;

use crate::command_log::CommandLog;
use crate::raft::RaftLog;
use crate::store::NamespaceStore;

const POLL: Duration = Duration::from_secs(2);

pub struct TableFollower {
    wake: Option<Arc<Notify>>,
}

impl TableFollower {
    /// Shard 0 keeps the table itself: nothing to follow.
    pub fn none() -> Self {
        TableFollower { wake: None }
    }

    /// Follows the table served at `sources` (routers or shard 0's masters).
    pub fn start(
        sources: Vec<String>,
        token: AttachToken,
        store: Arc<NamespaceStore>,
        raft: RaftLog,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        tokio::spawn(follow(sources, token, store, raft, wake.clone()));
        TableFollower { wake: Some(wake) }
    }

    /// Asks for the table now.
    pub fn kick(&self) {
        if let Some(w) = &self.wake {
            w.notify_one();
        }
    }
}

async fn follow(
    sources: Vec<String>,
    token: AttachToken,
    store: Arc<NamespaceStore>,
    raft: RaftLog,
    wake: Arc<Notify>,
) {
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = wake.notified() => {}
        }
        if !raft.status().is_leader {
            continue;
        }
        let addr = &sources[next % sources.len()];
        next += 1;
        let fetched = async {
            let channel = granary_common::net::lazy_channel(
                addr,
                Duration::from_secs(1),
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
            RoutingClient::with_interceptor(channel, token.clone())
                .get_routing_table(GetRoutingTableRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.message().to_string())
        }
        .await;
        let proto = match fetched {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(source = %addr, error = %e, "cannot fetch the routing table");
                continue;
            }
        };
        if proto.version <= store.routing_version() {
            continue;
        }
        if let Err(e) = RoutingTable::new(proto.clone()) {
            tracing::warn!(source = %addr, error = %e, "ignoring an invalid routing table");
            continue;
        }
        let version = proto.version;
        let cmd = Command {
            op: Some(command::Op::SetRoutingTable(SetRoutingTable {
                table: Some(proto),
            })),
        };
        match raft.propose(cmd).await {
            Ok(()) => tracing::info!(shard = store.shard(), version, "adopted routing table"),
            Err(e) => tracing::warn!(version, error = %e, "could not adopt routing table"),
        }
    }
}
