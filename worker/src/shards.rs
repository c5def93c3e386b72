//! A worker serves blocks for every metadata shard and registers with every master of
//! each: it follows the routing table (from routers or shard 0's masters), keeps one set
//! of master links per shard, and hands each shard's masters the deltas of its own
//! blocks (a block's file id carries its shard).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_common::ids::shard_of;
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{GetRoutingTableRequest, RoutingTable, WorkerInfo};

use crate::block_store::{BlockId, BlockStore};
use crate::master_link::MasterLinks;
use crate::mounts::MountRegistry;

/// How often the routing table is fetched again.
const TABLE_REFRESH: Duration = Duration::from_secs(3);
/// How soon a worker that has no table yet asks again.
const FIRST_TABLE_RETRY: Duration = Duration::from_millis(300);
/// How often block deltas go out to the masters' queues.
const DELTA_FANOUT: Duration = Duration::from_millis(200);
/// How often a worker that has no routing table yet says so.
const WARN_EVERY: Duration = Duration::from_secs(30);

pub struct ShardRegistrations {
    info: WorkerInfo,
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    token: AttachToken,
    /// Only these shards (a separate cluster's workers); empty: every shard.
    only: Vec<u16>,
    links: Mutex<Links>,
}

#[derive(Default)]
struct Links {
    version: Option<u64>,
    by_shard: HashMap<u16, Arc<MasterLinks>>,
    /// Shard 0's masters by the last table: asked when the sources (routers) are gone.
    shard0: Vec<String>,
}

impl ShardRegistrations {
    /// Starts following the table served at `sources` (routers or shard 0's masters).
    pub fn start(
        sources: Vec<String>,
        only: Vec<u16>,
        info: WorkerInfo,
        store: Arc<BlockStore>,
        mounts: Arc<MountRegistry>,
        token: AttachToken,
    ) -> Arc<Self> {
        let me = Arc::new(ShardRegistrations {
            info,
            store,
            mounts,
            token,
            only,
            links: Mutex::default(),
        });
        tokio::spawn(follow_table(Arc::downgrade(&me), sources));
        tokio::spawn(fan_out(Arc::downgrade(&me)));
        me
    }

    fn serves(&self, shard: u16) -> bool {
        self.only.is_empty() || self.only.contains(&shard)
    }

    fn link(&self, shard: u16, masters: &[String]) {
        let mut links = self.links.lock().expect("links lock");
        links.by_shard.entry(shard).or_insert_with(|| {
            tracing::info!(shard, masters = ?masters, "registering with the shard's masters");
            MasterLinks::start(
                shard,
                masters,
                self.info.clone(),
                self.store.clone(),
                self.mounts.clone(),
                self.token.clone(),
            )
        });
    }

    /// Adopts a newer table: links to shards it adds, none to shards it dropped.
    fn adopt(&self, table: &RoutingTable) {
        {
            let mut links = self.links.lock().expect("links lock");
            if links.version.is_some_and(|v| v >= table.version) {
                return;
            }
            links.version = Some(table.version);
            if let Some(s0) = table.shards.iter().find(|s| s.id == 0) {
                links.shard0 = s0.masters.clone();
            }
            links.by_shard.retain(|id, l| {
                let kept = table.shards.iter().any(|s| s.id == *id as u32);
                if !kept {
                    l.stop();
                }
                kept
            });
        }
        for s in &table.shards {
            let Ok(id) = u16::try_from(s.id) else {
                continue;
            };
            if self.serves(id) {
                self.link(id, &s.masters);
            }
        }
    }

    /// Master addresses of every shard this worker is registered with.
    pub fn masters(&self) -> Vec<(u16, Vec<String>)> {
        let links = self.links.lock().expect("links lock");
        let mut all: Vec<(u16, Vec<String>)> = links
            .by_shard
            .iter()
            .map(|(id, l)| (*id, l.masters()))
            .collect();
        all.sort();
        all
    }
}

async fn follow_table(me: std::sync::Weak<ShardRegistrations>, sources: Vec<String>) {
    let mut next = 0usize;
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let Some(owner) = me.upgrade() else { return };
        // The sources and shard 0's masters (which keep the table) are asked in turn, so
        // the table keeps coming when the sources (routers) are gone.
        let shard0 = owner.links.lock().expect("links lock").shard0.clone();
        let candidates: Vec<&String> = sources.iter().chain(shard0.iter()).collect();
        let addr = candidates[next % candidates.len()].clone();
        next += 1;
        let addr = &addr;
        let fetched = async {
            let channel = granary_common::net::lazy_channel(
                addr,
                Duration::from_secs(1),
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
            RoutingClient::with_interceptor(channel, owner.token.clone())
                .get_routing_table(GetRoutingTableRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.message().to_string())
        }
        .await;
        let known = owner.links.lock().expect("links lock").version.is_some();
        match fetched {
            Ok(table) => owner.adopt(&table),
            // Registration waits on a first table: without one this worker serves no
            // shard, which its operator must hear about (a wrong token, no master up).
            Err(e) if !known && warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) => {
                warned = Some(std::time::Instant::now());
                tracing::warn!(source = %addr, error = %e, "cannot fetch the routing table, so this worker has registered with no master yet; retrying");
            }
            Err(e) => tracing::debug!(source = %addr, error = %e, "cannot fetch the routing table"),
        }
        // Until a first table came, ask again soon: registration waits on it.
        let known = owner.links.lock().expect("links lock").version.is_some();
        drop(owner);
        tokio::time::sleep(if known {
            TABLE_REFRESH
        } else {
            FIRST_TABLE_RETRY
        })
        .await;
    }
}

/// Moves the store's block deltas into the queues of the shards they belong to.
async fn fan_out(me: std::sync::Weak<ShardRegistrations>) {
    let mut tick = tokio::time::interval(DELTA_FANOUT);
    loop {
        tick.tick().await;
        let Some(owner) = me.upgrade() else { return };
        let (added, removed) = owner.store.take_deltas();
        if added.is_empty() && removed.is_empty() {
            continue;
        }
        let mut by_shard: HashMap<u16, (Vec<BlockId>, Vec<BlockId>)> = HashMap::new();
        for id in added {
            by_shard.entry(shard_of(id.0)).or_default().0.push(id);
        }
        for id in removed {
            by_shard.entry(shard_of(id.0)).or_default().1.push(id);
        }
        let links = owner.links.lock().expect("links lock");
        for (shard, (added, removed)) in by_shard {
            if let Some(l) = links.by_shard.get(&shard) {
                l.queue(&added, &removed);
            }
        }
    }
}
