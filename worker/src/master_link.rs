//! Registration with every master and periodic heartbeats carrying capacity and block
//! deltas. Each master gets its own link and its own queue of deltas, so a slow or dead
//! master never delays the others; a master that lost track of us (restart) gets a full
//! re-registration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_protos::v1::master_client::MasterClient;
use granary_protos::v1::{BlockKey, RegisterWorkerRequest, WorkerHeartbeatRequest, WorkerInfo};
use tonic::transport::{Channel, Endpoint};

use crate::block_store::{BlockId, BlockStore};
use crate::mounts::MountRegistry;

#[derive(Default)]
struct Pending {
    added: Vec<BlockId>,
    removed: Vec<BlockId>,
}

fn keys(ids: &[BlockId]) -> Vec<BlockKey> {
    ids.iter()
        .map(|&(file_id, index)| BlockKey { file_id, index })
        .collect()
}

pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Starts one link per master plus the task that fans block deltas out to them.
pub fn start(
    masters: &[String],
    info: WorkerInfo,
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
) -> Result<(), tonic::transport::Error> {
    let mut queues = Vec::new();
    for addr in masters {
        let pending = Arc::new(Mutex::new(Pending::default()));
        queues.push(pending.clone());
        let link = Link {
            addr: addr.clone(),
            client: MasterClient::new(channel(addr)?)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            info: info.clone(),
            store: store.clone(),
            mounts: mounts.clone(),
            pending,
        };
        tokio::spawn(link.run());
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let (added, removed) = store.take_deltas();
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            for q in &queues {
                let mut q = q.lock().expect("pending lock");
                q.added.extend_from_slice(&added);
                q.removed.extend_from_slice(&removed);
            }
        }
    });
    Ok(())
}

struct Link {
    addr: String,
    client: MasterClient<Channel>,
    info: WorkerInfo,
    store: Arc<BlockStore>,
    mounts: Arc<MountRegistry>,
    pending: Arc<Mutex<Pending>>,
}

impl Link {
    async fn run(mut self) {
        let mut registered = false;
        let mut interval = Duration::from_secs(1);
        let mut failures = 0u32;
        loop {
            if !registered {
                match self.register().await {
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
                        tokio::time::sleep(Duration::from_millis(500).min(interval)).await;
                        continue;
                    }
                }
            }
            tokio::time::sleep(interval).await;
            let (added, removed) = {
                let mut p = self.pending.lock().expect("pending lock");
                (std::mem::take(&mut p.added), std::mem::take(&mut p.removed))
            };
            let req = WorkerHeartbeatRequest {
                worker_id: self.info.worker_id.clone(),
                capacity_bytes: self.store.capacity(),
                used_bytes: self.store.used(),
                added: keys(&added),
                removed: keys(&removed),
            };
            match self.client.worker_heartbeat(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.reregister {
                        tracing::info!(master = %self.addr, "master asked for a full re-registration");
                        registered = false;
                    } else if let Some(m) = r.mounts {
                        self.mounts.update(&m);
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

    async fn register(&mut self) -> Result<Duration, tonic::Status> {
        // Deltas queued before the snapshot are contained in it.
        *self.pending.lock().expect("pending lock") = Pending::default();
        let blocks = keys(&self.store.snapshot());
        let mut info = self.info.clone();
        info.capacity_bytes = self.store.capacity();
        info.used_bytes = self.store.used();
        let reply = self
            .client
            .register_worker(RegisterWorkerRequest {
                worker: Some(info),
                blocks,
            })
            .await?
            .into_inner();
        if let Some(m) = &reply.mounts {
            self.mounts.update(m);
        }
        tracing::info!(master = %self.addr, blocks = self.store.len(), "registered with master");
        Ok(Duration::from_millis(reply.heartbeat_interval_ms.max(100)))
    }
}
