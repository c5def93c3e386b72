//! Registration with every master of one shard and periodic heartbeats carrying capacity
//! and the deltas of the shard's blocks. Each master gets its own link and its own queue
//! of deltas, so a slow or dead master never delays the others; a master that lost track
//! of this worker (restart) gets a full re-registration. Replies carry the shard's
//! current master set: a newer one is adopted on the fly, starting links to new masters
//! and stopping links to removed ones (master migration without a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_common::ids::shard_of;
use granary_protos::v1::workers_client::WorkersClient;
use granary_protos::v1::{
    BlockKey, MasterSet, RegisterWorkerRequest, WorkerHeartbeatRequest, WorkerInfo,
};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::block_store::{split_changes, BlockId, BlockStore};
use crate::mounts::MountRegistry;

type Client = WorkersClient<InterceptedService<Channel, AttachToken>>;

/// Block changes for a master's next heartbeat: each block's last change only, since
/// the master applies a heartbeat's removals before its additions.
#[derive(Default)]
struct Pending {
    cached: HashMap<BlockId, bool>,
}

impl Pending {
    fn take(&mut self) -> (Vec<BlockId>, Vec<BlockId>) {
        split_changes(self.cached.drain())
    }
}

fn keys(ids: &[BlockId]) -> Vec<BlockKey> {
    ids.iter()
        .map(|&(file_id, index)| BlockKey { file_id, index })
        .collect()
}

struct LinkHandle {
    pending: Arc<Mutex<Pending>>,
    task: JoinHandle<()>,
}

struct Links {
    by_addr: HashMap<String, LinkHandle>,
    /// (conf_index, term) of the adopted master set.
    version: (u64, u64),
}

/// Keeps one link per current master of a shard.
pub struct MasterLinks {
    shard: u16,
    info: WorkerInfo,
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    token: AttachToken,
    links: Mutex<Links>,
}

impl MasterLinks {
    /// Starts links to shard `shard`'s `masters`.
    pub fn start(
        shard: u16,
        masters: &[String],
        info: WorkerInfo,
        store: Arc<BlockStore>,
        mounts: Arc<MountRegistry>,
        token: AttachToken,
    ) -> Arc<Self> {
        let me = Arc::new(MasterLinks {
            shard,
            info,
            store: store.clone(),
            mounts,
            token,
            links: Mutex::new(Links {
                by_addr: HashMap::new(),
                version: (0, 0),
            }),
        });
        for addr in masters {
            me.add_link(addr);
        }
        me
    }

    /// Queues block deltas (of this shard's files) for every master's next heartbeat.
    pub fn queue(&self, added: &[BlockId], removed: &[BlockId]) {
        for link in self.links.lock().expect("links lock").by_addr.values() {
            let mut q = link.pending.lock().expect("pending lock");
            q.cached.extend(removed.iter().map(|&id| (id, false)));
            q.cached.extend(added.iter().map(|&id| (id, true)));
        }
    }

    /// Stops every link (the shard left the routing table).
    pub fn stop(&self) {
        for (_, l) in self.links.lock().expect("links lock").by_addr.drain() {
            l.task.abort();
        }
    }

    fn add_link(self: &Arc<Self>, addr: &str) {
        let mut links = self.links.lock().expect("links lock");
        if links.by_addr.contains_key(addr) {
            return;
        }
        let channel = match granary_common::net::lazy_channel(
            addr,
            Duration::from_secs(2),
            Duration::from_secs(10),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(master = addr, error = %e, "invalid master address");
                return;
            }
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let link = Link {
            addr: addr.to_string(),
            client: WorkersClient::with_interceptor(channel, self.token.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            owner: Arc::downgrade(self),
            pending: pending.clone(),
        };
        let task = tokio::spawn(link.run());
        links
            .by_addr
            .insert(addr.to_string(), LinkHandle { pending, task });
    }

    /// Adopts a master set newer than the current one.
    fn adopt(self: &Arc<Self>, set: &MasterSet) {
        let version = (set.conf_index, set.term);
        let addrs: Vec<String> = set
            .members
            .iter()
            .filter(|m| !m.addr.is_empty())
            .map(|m| m.addr.clone())
            .collect();
        let removed: Vec<String> = {
            let mut links = self.links.lock().expect("links lock");
            if addrs.is_empty() || version <= links.version {
                return;
            }
            links.version = version;
            let gone: Vec<String> = links
                .by_addr
                .keys()
                .filter(|a| !addrs.contains(a))
                .cloned()
                .collect();
            for a in &gone {
                if let Some(l) = links.by_addr.remove(a) {
                    l.task.abort();
                }
            }
            gone
        };
        for a in &addrs {
            self.add_link(a);
        }
        if !removed.is_empty()
            || addrs.len() != self.links.lock().expect("links lock").by_addr.len()
        {
            tracing::info!(shard = self.shard, masters = ?addrs, removed = ?removed, conf_index = set.conf_index, "adopted a new master set");
        }
    }

    pub fn masters(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .links
            .lock()
            .expect("links lock")
            .by_addr
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

struct Link {
    addr: String,
    client: Client,
    owner: std::sync::Weak<MasterLinks>,
    pending: Arc<Mutex<Pending>>,
}

impl Link {
    async fn run(mut self) {
        let mut registered = false;
        let mut interval = Duration::from_secs(1);
        let mut failures = 0u32;
        loop {
            let Some(owner) = self.owner.upgrade() else {
                return;
            };
            if !registered {
                match self.register(&owner).await {
                    Ok(hb) => {
                        registered = true;
                        failures = 0;
                        interval = hb;
                    }
                    Err(e) => {
                        failures += 1;
                        // Log the first failure and then every 30th, not every retry.
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!(master = %self.addr, error = %e.message(), "cannot register with master; retrying");
                        }
                        drop(owner);
                        tokio::time::sleep(Duration::from_millis(500).min(interval)).await;
                        continue;
                    }
                }
            }
            drop(owner);
            tokio::time::sleep(interval).await;
            let Some(owner) = self.owner.upgrade() else {
                return;
            };
            let (added, removed) = self.pending.lock().expect("pending lock").take();
            let (cache_hits, cache_misses) = owner.store.lookups();
            let req = WorkerHeartbeatRequest {
                worker_id: owner.info.worker_id.clone(),
                capacity_bytes: owner.store.capacity(),
                used_bytes: owner.store.used(),
                added: keys(&added),
                removed: keys(&removed),
                cache_hits,
                cache_misses,
            };
            match self.client.worker_heartbeat(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if let Some(m) = &r.masters {
                        owner.adopt(m);
                    }
                    if r.reregister {
                        tracing::info!(master = %self.addr, "master asked for a full re-registration");
                        registered = false;
                    } else if let Some(m) = r.mounts {
                        owner.mounts.update(owner.shard, &m);
                    }
                    if !r.deleted.is_empty() {
                        let files: std::collections::HashSet<u64> =
                            r.deleted.iter().map(|f| f.file_id).collect();
                        let store = owner.store.clone();
                        let (blocks, bytes) =
                            tokio::task::spawn_blocking(move || store.evict_files(&files))
                                .await
                                .unwrap_or_default();
                        tracing::debug!(blocks, bytes, "dropped the blocks of deleted files");
                    }
                }
                Err(e) => {
                    // The deltas are lost with the call; a full registration resends all.
                    tracing::warn!(master = %self.addr, error = %e.message(), "heartbeat failed; will re-register");
                    registered = false;
                }
            }
        }
    }

    async fn register(&mut self, owner: &Arc<MasterLinks>) -> Result<Duration, tonic::Status> {
        // Deltas queued before the snapshot are contained in it.
        *self.pending.lock().expect("pending lock") = Pending::default();
        let shard = owner.shard;
        let mine: Vec<BlockId> = owner
            .store
            .snapshot()
            .into_iter()
            .filter(|(file_id, _)| shard_of(*file_id) == shard)
            .collect();
        let blocks = keys(&mine);
        let mut info = owner.info.clone();
        info.capacity_bytes = owner.store.capacity();
        info.used_bytes = owner.store.used();
        (info.cache_hits, info.cache_misses) = owner.store.lookups();
        let reply = self
            .client
            .register_worker(RegisterWorkerRequest {
                worker: Some(info),
                blocks,
            })
            .await?
            .into_inner();
        if let Some(m) = &reply.mounts {
            owner.mounts.update(shard, m);
        }
        if let Some(m) = &reply.masters {
            owner.adopt(m);
        }
        tracing::info!(shard, master = %self.addr, blocks = mine.len(), "registered with master");
        Ok(Duration::from_millis(reply.heartbeat_interval_ms.max(100)))
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn a_heartbeat_names_each_block_once_by_its_last_change() {
        let mut p = Pending::default();
        // Queued by two fan-out ticks within one heartbeat: cached, then dropped.
        p.cached.extend([((1, 0), true), ((2, 0), true)]);
        p.cached.extend([((1, 0), false)]);
        let (mut added, removed) = p.take();
        added.sort();
        assert_eq!((added, removed), (vec![(2, 0)], vec![(1, 0)]));
        assert_eq!(p.take(), (vec![], vec![]));
    }
}
