//! The state behind a master's gRPC services (see [`crate::api`]) and what they share:
//! leader checks, read barriers at the asked consistency, and directories loaded from the
//! UFS on first touch.

use std::sync::Arc;
use std::time::Duration;

use granary_common::consistency::ReadConsistency;
use granary_common::error::ROUTING_VERSION_METADATA_KEY;
use granary_common::path::{components, validate_name};
use granary_common::FsError;
use granary_protos::v1::*;
use granary_protos::LEADER_METADATA_KEY;
use granary_shard_router::child_path;
use tonic::{Request, Status};

use crate::block_locations::BlockLocations;
use crate::deleted_files::DeletedFiles;
use crate::leader_clients::{LeaderClients, PeerClient};
use crate::lease_reads::LeaseIndex;
use crate::loader::MetadataLoader;
use crate::raft::RaftLog;
use crate::store::NamespaceStore;
use crate::workers::WorkerRegistry;

pub struct MasterService {
    pub(crate) store: Arc<NamespaceStore>,
    pub(crate) raft: RaftLog,
    pub(crate) loader: Arc<MetadataLoader<RaftLog>>,
    pub(crate) workers: Arc<WorkerRegistry>,
    pub(crate) locations: Arc<BlockLocations>,
    /// Files deleted here (as leader), for the workers to drop from their caches.
    pub(crate) deleted: Arc<DeletedFiles>,
    pub(crate) heartbeat_interval_ms: u64,
    /// Clients to the leader, for followers serving reads (read index, loads).
    pub(crate) leader_clients: Arc<LeaderClients>,
    /// Shared calls for followers' `lease` read indexes.
    pub(crate) lease_index: LeaseIndex,
    /// The root inode exists (set once; it is never removed).
    pub(crate) initialised: std::sync::atomic::AtomicBool,
    /// Adopts shard 0's newer routing tables (a shard other than 0).
    pub(crate) routing_follower: crate::table_follower::TableFollower,
    /// Changes to the routing table (shard 0) one at a time: each starts from the last.
    pub(crate) routing_changes: tokio::sync::Mutex<()>,
}

impl MasterService {
    /// Refuses a call routed by a routing table older than this shard's (the caller
    /// fetches the new one and routes again), and one routed by a newer table than this
    /// shard has adopted yet (retryable: it is on its way).
    pub(crate) fn check_routing<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(theirs) = req
            .metadata()
            .get(ROUTING_VERSION_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Ok(());
        };
        let ours = self.store.routing_version();
        if theirs < ours {
            return Err(FsError::StaleRouting(ours).into());
        }
        if theirs > ours {
            self.routing_follower.kick();
            return Err(Status::unavailable(format!(
                "shard {} works by routing table version {ours}, older than the caller's {theirs}; adopting the new one",
                self.store.shard()
            )));
        }
        Ok(())
    }

    /// Namespace reads and writes are served by the leader; others point to it.
    pub(crate) fn leader_only(&self) -> Result<(), Status> {
        let st = self.raft.status();
        if st.is_leader {
            return Ok(());
        }
        let mut status = Status::unavailable(match st.leader_addr() {
            Some(addr) => format!(
                "master {} is not the leader; leader is {} at {addr}",
                st.id, st.leader_id
            ),
            None => format!(
                "master {} is not the leader and knows no leader (election in progress)",
                st.id
            ),
        });
        if let Some(addr) = st.leader_addr() {
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_METADATA_KEY, v);
            }
        }
        Err(status)
    }

    /// Namespace changes: the leader, once it has applied everything committed before
    /// its term. A new leader's dry runs and UFS changes would otherwise judge a state
    /// that lacks its predecessor's last changes (a client's retry of one of them).
    pub(crate) async fn leader_ready(&self) -> Result<(), Status> {
        if self.raft.leader_caught_up() {
            return Ok(());
        }
        self.leader_only()?;
        let index = self.raft.read_index().await?;
        self.raft.wait_applied(index).await?;
        Ok(())
    }

    pub(crate) fn masters(&self) -> MasterSet {
        self.raft.status().masters
    }

    /// Waits (bounded) until `cond` holds for the published raft status.
    pub(crate) async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&crate::raft::RaftStatus) -> bool,
    ) -> Result<(), Status> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if cond(&self.raft.status()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Status::deadline_exceeded(format!(
            "timed out after {timeout:?} waiting for {what}"
        )))
    }

    pub(crate) fn quorum(&self) -> QuorumChangeReply {
        QuorumChangeReply {
            info: Some(self.raft.status().info),
        }
    }

    pub(crate) fn leader_client(&self) -> Result<PeerClient, Status> {
        self.leader_clients.leader(&self.raft)
    }

    /// Makes a read on this member see every write acknowledged before it started (or,
    /// for bounded staleness, at most that old).
    pub(crate) async fn read_barrier(&self, mode: ReadConsistency) -> Result<(), Status> {
        self.barrier(mode).await?;
        // A fresh group records its root mount just after electing a leader; until then
        // a read is retryable, not ENOENT.
        if !self.initialised.load(std::sync::atomic::Ordering::Relaxed) {
            if self.store.get(self.store.root_id()).is_err() {
                return Err(Status::unavailable(
                    "the namespace is not initialised yet (root mount pending)",
                ));
            }
            self.initialised
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    pub(crate) async fn barrier(&self, mode: ReadConsistency) -> Result<(), Status> {
        // Every acknowledged write is applied here already (writes are acknowledged
        // after their apply), and no other member can have committed one.
        if self.raft.sole_voter_leader() {
            return Ok(());
        }
        let st = self.raft.status();
        let index = match mode {
            ReadConsistency::Lease if st.lease_holds() => return Ok(()),
            // A leader in its lease is as fresh as now.
            ReadConsistency::BoundedStaleness(bound)
                if st.lease_holds() || st.fresh_as_of.is_some_and(|t| t.elapsed() <= bound) =>
            {
                metrics::counter!("granary_master_stale_reads_total").increment(1);
                return Ok(());
            }
            ReadConsistency::Lease if !st.is_leader => self.lease_index.get().await?,
            _ => self.raft.read_index().await?,
        };
        self.raft.wait_applied(index).await?;
        Ok(())
    }

    /// A directory with its children loaded. Only the leader lists the UFS and proposes;
    /// a follower asks it to, then waits until the listing is applied here too.
    pub(crate) async fn loaded(&self, dir: Inode) -> Result<Inode, Status> {
        if !self.loader.needs_listing(&dir) {
            return Ok(dir);
        }
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(String::from_utf8_lossy(&dir.name).into_owned()).into());
        }
        if self.raft.status().is_leader {
            return Ok(self.loader.loaded_for_call(&dir, true).await?);
        }
        // The leader's answer goes on to the client as an error of this member's own (a
        // listing still running, say), not with the leader's response headers.
        let index = self
            .leader_client()?
            .ensure_loaded(EnsureLoadedRequest {
                dir_id: dir.id,
                relist: false,
            })
            .await
            .map_err(|s| Status::from(FsError::from(s)))?
            .into_inner()
            .index;
        self.raft.wait_applied(index).await?;
        Ok(self.store.get(dir.id)?)
    }

    pub(crate) async fn lookup_child(&self, parent: u64, name: &[u8]) -> Result<Inode, Status> {
        validate_name(name)?;
        let dir = self.store.get(parent)?;
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(String::from_utf8_lossy(&dir.name).into_owned()).into());
        }
        let dir = self.loaded(dir).await?;
        match self.store.lookup(dir.id, name)? {
            Some(found) => Ok(found),
            None => Err(self.missing(&dir, name).into()),
        }
    }

    /// The error for `name` missing from `dir`: ESTALE where the name belongs to another
    /// shard by the routing table (a client walking a path through this shard's copy of
    /// a directory that moved: the kernel walks the path again, from fresh lookups),
    /// ENOENT otherwise.
    fn missing(&self, dir: &Inode, name: &[u8]) -> FsError {
        let shown = String::from_utf8_lossy(name).into_owned();
        let moved = self.store.routing_table().ok().flatten().and_then(|table| {
            let path = child_path(&self.store.path_of(dir.id).ok()?, name);
            let owner = table.owner(&path);
            (owner != self.store.shard()).then_some(owner)
        });
        match moved {
            Some(owner) => FsError::Stale(format!("{shown} is served by shard {owner} now")),
            None => FsError::NotFound(shown),
        }
    }

    pub(crate) async fn resolve(&self, path: &[u8]) -> Result<Inode, Status> {
        let mut node = self.store.get(self.store.root_id())?;
        for part in components(path)? {
            node = self.lookup_child(node.id, part).await?;
        }
        Ok(node)
    }

    pub(crate) fn mounts(&self) -> Result<MountTable, Status> {
        self.store
            .mount_table()
            .map_err(|e| FsError::from(e).into())
    }
}
