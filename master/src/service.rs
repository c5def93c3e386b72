//! The master's gRPC API: namespace reads (loading from the UFS on first touch), worker
//! registration and heartbeats, block locations, and cluster reports.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use granary_common::auth::CONSISTENCY_METADATA_KEY;
use granary_common::blocks::block_count;
use granary_common::consistency::ReadConsistency;
use granary_common::path::{components, validate_name};
use granary_common::FsError;
use granary_protos::v1::master_server::Master;
use granary_protos::v1::*;
use granary_protos::LEADER_METADATA_KEY;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::block_locations::BlockLocations;
use crate::leader_clients::{LeaderClients, PeerClient};
use crate::lease_reads::LeaseIndex;
use crate::loader::{LoadProgress, MetadataLoader};
use crate::raft::{Mail, MemberChange, RaftLog};
use crate::store::NamespaceStore;
use crate::workers::WorkerRegistry;

const DEFAULT_READDIR_LIMIT: u32 = 1024;
const MAX_READDIR_LIMIT: u32 = 16_384;

pub struct MasterService {
    pub(crate) store: Arc<NamespaceStore>,
    pub(crate) raft: RaftLog,
    pub(crate) loader: Arc<MetadataLoader<RaftLog>>,
    pub(crate) workers: Arc<WorkerRegistry>,
    pub(crate) locations: Arc<BlockLocations>,
    pub(crate) heartbeat_interval_ms: u64,
    /// Clients to the leader, for followers serving reads (read index, loads).
    pub(crate) leader_clients: Arc<LeaderClients>,
    /// Shared calls for followers' `lease` read indexes.
    pub(crate) lease_index: LeaseIndex,
    /// The root inode exists (set once; it is never removed).
    pub(crate) initialised: std::sync::atomic::AtomicBool,
}

/// The consistency a read asked for (metadata `x-granary-consistency`).
fn consistency_of<T>(req: &Request<T>) -> Result<ReadConsistency, Status> {
    match req.metadata().get(CONSISTENCY_METADATA_KEY) {
        None => Ok(ReadConsistency::default()),
        Some(v) => v
            .to_str()
            .map_err(|_| Status::invalid_argument("x-granary-consistency is not ASCII"))?
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("read_consistency: {e}"))),
    }
}

fn count(method: &'static str) {
    metrics::counter!("granary_master_rpc_total", "method" => method).increment(1);
}

impl MasterService {
    /// Namespace reads and writes are served by the leader; others point to it.
    fn leader_only(&self) -> Result<(), Status> {
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

    fn masters(&self) -> MasterSet {
        self.raft.status().masters
    }

    /// Waits (bounded) until `cond` holds for the published raft status.
    async fn wait_status(
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

    fn quorum(&self) -> QuorumChangeReply {
        QuorumChangeReply {
            info: Some(self.raft.status().info),
        }
    }

    fn leader_client(&self) -> Result<PeerClient, Status> {
        self.leader_clients.leader(&self.raft)
    }

    /// Makes a read on this member see every write acknowledged before it started (or,
    /// for bounded staleness, at most that old).
    async fn read_barrier(&self, mode: ReadConsistency) -> Result<(), Status> {
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

    async fn barrier(&self, mode: ReadConsistency) -> Result<(), Status> {
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
    async fn loaded(&self, dir: Inode) -> Result<Inode, Status> {
        if !self.loader.needs_listing(&dir) {
            return Ok(dir);
        }
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(String::from_utf8_lossy(&dir.name).into_owned()).into());
        }
        if self.raft.status().is_leader {
            return Ok(self.loader.ensure_loaded(&dir).await?);
        }
        let index = self
            .leader_client()?
            .ensure_loaded(EnsureLoadedRequest {
                dir_id: dir.id,
                force: false,
            })
            .await?
            .into_inner()
            .index;
        self.raft.wait_applied(index).await?;
        Ok(self.store.get(dir.id)?)
    }

    async fn lookup_child(&self, parent: u64, name: &[u8]) -> Result<Inode, Status> {
        validate_name(name)?;
        let dir = self.store.get(parent)?;
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(String::from_utf8_lossy(&dir.name).into_owned()).into());
        }
        let dir = self.loaded(dir).await?;
        self.store
            .lookup(dir.id, name)?
            .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()).into())
    }

    async fn resolve(&self, path: &[u8]) -> Result<Inode, Status> {
        let mut node = self.store.get(self.store.root_id())?;
        for part in components(path)? {
            node = self.lookup_child(node.id, part).await?;
        }
        Ok(node)
    }

    fn mounts(&self) -> Result<MountTable, Status> {
        self.store
            .mount_table()
            .map_err(|e| FsError::from(e).into())
    }
}

type LoadStream = Pin<Box<dyn Stream<Item = Result<LoadMetadataReply, Status>> + Send>>;

#[tonic::async_trait]
impl Master for MasterService {
    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<InodeReply>, Status> {
        count("lookup");
        self.read_barrier(consistency_of(&req)?).await?;
        let r = req.into_inner();
        let inode = self.lookup_child(r.parent, &r.name).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn create(&self, req: Request<CreateRequest>) -> Result<Response<InodeReply>, Status> {
        count("create");
        self.leader_only()?;
        let inode = self.create_entry(req.into_inner()).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveReply>, Status> {
        count("remove");
        self.leader_only()?;
        self.remove_entry(req.into_inner()).await?;
        Ok(Response::new(RemoveReply {}))
    }

    async fn rename(&self, req: Request<RenameRequest>) -> Result<Response<InodeReply>, Status> {
        count("rename");
        self.leader_only()?;
        let inode = self.rename_entry(req.into_inner()).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn set_attr(&self, req: Request<SetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("set_attr");
        self.leader_only()?;
        let a = req
            .into_inner()
            .attributes
            .ok_or_else(|| Status::invalid_argument("set_attr without attributes"))?;
        let inode = self.set_attributes(a).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<InodeReply>, Status> {
        count("commit");
        self.leader_only()?;
        let c = req
            .into_inner()
            .content
            .ok_or_else(|| Status::invalid_argument("commit without content"))?;
        let inode = self.commit_content(c).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn get_attr(&self, req: Request<GetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("get_attr");
        self.read_barrier(consistency_of(&req)?).await?;
        let inode = self.store.get(req.into_inner().id)?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn resolve_path(
        &self,
        req: Request<ResolvePathRequest>,
    ) -> Result<Response<InodeReply>, Status> {
        count("resolve_path");
        self.read_barrier(consistency_of(&req)?).await?;
        let inode = self.resolve(&req.into_inner().path).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn read_dir(
        &self,
        req: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirReply>, Status> {
        count("read_dir");
        self.read_barrier(consistency_of(&req)?).await?;
        let r = req.into_inner();
        let dir = self.loaded(self.store.get(r.id)?).await?;
        let limit = match r.limit {
            0 => DEFAULT_READDIR_LIMIT,
            n => n.min(MAX_READDIR_LIMIT),
        };
        let (entries, has_more) = self.store.list(dir.id, &r.start_after, limit as usize)?;
        Ok(Response::new(ReadDirReply { entries, has_more }))
    }

    type LoadMetadataStream = LoadStream;

    async fn load_metadata(
        &self,
        req: Request<LoadMetadataRequest>,
    ) -> Result<Response<LoadStream>, Status> {
        count("load_metadata");
        self.leader_only()?;
        let r = req.into_inner();
        let root = self.resolve(&r.path).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let loader = self.loader.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = tokio::sync::mpsc::channel::<LoadProgress>(1);
            let run = async {
                if r.recursive {
                    loader.load_tree(root, r.force, ptx).await
                } else {
                    let dir = if r.force && root.kind != FileKind::Directory as i32 {
                        // A file is refreshed by listing its directory again.
                        let parent = loader.store().get(root.parent)?;
                        loader.refresh(&parent).await?;
                        root.clone()
                    } else if r.force {
                        loader.refresh(&root).await?
                    } else {
                        loader.ensure_loaded(&root).await?
                    };
                    drop(ptx);
                    Ok(LoadProgress {
                        directories: u64::from(dir.kind == FileKind::Directory as i32),
                        files: u64::from(dir.kind != FileKind::Directory as i32),
                    })
                }
            };
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(p) = prx.recv().await {
                        let msg = LoadMetadataReply {
                            directories: p.directories,
                            files: p.files,
                            done: false,
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                    }
                }
            };
            let (result, ()) = tokio::join!(run, forward);
            let last = result
                .map(|p| LoadMetadataReply {
                    directories: p.directories,
                    files: p.files,
                    done: true,
                })
                .map_err(Status::from);
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_block_locations(
        &self,
        req: Request<BlockLocationsRequest>,
    ) -> Result<Response<BlockLocationsReply>, Status> {
        count("get_block_locations");
        self.read_barrier(consistency_of(&req)?).await?;
        let inode = self.store.get(req.into_inner().file_id)?;
        let blocks = block_count(inode.size, inode.block_size.max(1)) as u32;
        let blocks: Vec<BlockLocation> = self
            .locations
            .of_file(inode.id, blocks)
            .into_iter()
            .map(|(index, worker_ids)| BlockLocation { index, worker_ids })
            .collect();
        Ok(Response::new(BlockLocationsReply {
            blocks,
            workers: self.workers.list(),
        }))
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersReply>, Status> {
        count("list_workers");
        Ok(Response::new(ListWorkersReply {
            workers: self.workers.list(),
        }))
    }

    async fn get_mount_table(
        &self,
        _: Request<GetMountTableRequest>,
    ) -> Result<Response<MountTable>, Status> {
        count("get_mount_table");
        Ok(Response::new(self.mounts()?))
    }

    async fn stat_fs(&self, _: Request<StatFsRequest>) -> Result<Response<StatFsReply>, Status> {
        count("stat_fs");
        let workers = self.workers.list();
        Ok(Response::new(StatFsReply {
            capacity_bytes: workers.iter().map(|w| w.capacity_bytes).sum(),
            used_bytes: workers.iter().map(|w| w.used_bytes).sum(),
            inodes: self.store.inode_count().map_err(FsError::from)?,
            block_size: 4096,
        }))
    }

    async fn register_worker(
        &self,
        req: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerReply>, Status> {
        count("register_worker");
        let r = req.into_inner();
        let mut info = r
            .worker
            .ok_or_else(|| Status::invalid_argument("registration without worker info"))?;
        if info.worker_id.is_empty() {
            return Err(Status::invalid_argument("registration without a worker id"));
        }
        info.blocks = r.blocks.len() as u64;
        tracing::info!(worker = %info.worker_id, host = %info.host, port = info.data_port, blocks = r.blocks.len(), "worker registered");
        self.locations.reset_worker(&info.worker_id, &r.blocks);
        self.workers.register(info);
        Ok(Response::new(RegisterWorkerReply {
            mounts: Some(self.mounts()?),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            masters: Some(self.masters()),
        }))
    }

    async fn worker_heartbeat(
        &self,
        req: Request<WorkerHeartbeatRequest>,
    ) -> Result<Response<WorkerHeartbeatReply>, Status> {
        count("worker_heartbeat");
        let r = req.into_inner();
        let delta = r.added.len() as i64 - r.removed.len() as i64;
        if !self
            .workers
            .heartbeat(&r.worker_id, r.capacity_bytes, r.used_bytes, delta)
        {
            return Ok(Response::new(WorkerHeartbeatReply {
                reregister: true,
                mounts: None,
                masters: Some(self.masters()),
            }));
        }
        self.locations
            .apply_delta(&r.worker_id, &r.added, &r.removed);
        Ok(Response::new(WorkerHeartbeatReply {
            reregister: false,
            mounts: Some(self.mounts()?),
            masters: Some(self.masters()),
        }))
    }

    async fn report(&self, _: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        count("report");
        let err = |e: crate::store::StoreError| Status::from(FsError::from(e));
        let st = self.raft.status();
        Ok(Response::new(ReportReply {
            master_id: st.id,
            leader_id: st.leader_id,
            term: st.term,
            shard_id: self.store.shard() as u32,
            applied_index: self.store.applied().map_err(err)?.0,
            inodes: self.store.inode_count().map_err(err)?,
            mounts: Some(self.mounts()?),
            workers: self.workers.list(),
            cached_blocks: self.locations.block_count(),
        }))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        count("read_index");
        self.leader_only()?;
        let index = if req.into_inner().lease && self.raft.status().lease_holds() {
            // The leader has applied every write it acknowledged, and, caught up, every
            // one its predecessors did; in its lease no other member can lead.
            self.raft.applied_index()
        } else {
            self.raft.read_index().await?
        };
        Ok(Response::new(ReadIndexReply { index }))
    }

    async fn ensure_loaded(
        &self,
        req: Request<EnsureLoadedRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        count("ensure_loaded");
        self.leader_only()?;
        let r = req.into_inner();
        let dir = self.store.get(r.dir_id)?;
        if r.force {
            self.loader.refresh(&dir).await?;
        } else {
            self.loader.ensure_loaded(&dir).await?;
        }
        Ok(Response::new(ReadIndexReply {
            index: self.raft.applied_index(),
        }))
    }

    async fn get_masters(
        &self,
        _: Request<GetMastersRequest>,
    ) -> Result<Response<MasterSet>, Status> {
        count("get_masters");
        Ok(Response::new(self.masters()))
    }

    async fn quorum_info(
        &self,
        _: Request<QuorumInfoRequest>,
    ) -> Result<Response<QuorumInfoReply>, Status> {
        count("quorum_info");
        Ok(Response::new(self.raft.status().info))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("add_member");
        self.leader_only()?;
        let r = req.into_inner();
        if r.id == 0 || !r.addr.contains(':') {
            return Err(Status::invalid_argument(
                "add needs a non-zero id and a host:port address",
            ));
        }
        // Join as a learner first, catch up, then become a voter through joint consensus.
        self.raft
            .change_members(MemberChange::AddLearner {
                id: r.id,
                addr: r.addr.clone(),
            })
            .await?;
        let target = self.raft.status().info.commit;
        self.wait_status(
            "the new member to catch up",
            Duration::from_secs(60),
            |st| {
                st.info
                    .peers
                    .iter()
                    .any(|p| p.id == r.id && p.progress_known && p.matched >= target)
            },
        )
        .await?;
        self.raft
            .change_members(MemberChange::Promote { id: r.id })
            .await?;
        self.wait_status(
            "the new voter's joint configuration to be left",
            Duration::from_secs(10),
            |st| {
                st.info.outgoing_voters.is_empty()
                    && st.info.peers.iter().any(|p| p.id == r.id && !p.learner)
            },
        )
        .await?;
        tracing::info!(id = r.id, addr = %r.addr, "master added");
        Ok(Response::new(self.quorum()))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("remove_member");
        self.leader_only()?;
        let id = req.into_inner().id;
        let st = self.raft.status();
        if id == st.id {
            // Hand leadership to the most caught-up voter; the caller retries there.
            let next = st
                .info
                .peers
                .iter()
                .filter(|p| p.id != id && !p.learner)
                .max_by_key(|p| p.matched)
                .map(|p| p.id)
                .ok_or_else(|| Status::failed_precondition("cannot remove the only voter"))?;
            self.raft.send(Mail::TransferLeader(next))?;
            self.wait_status("leadership transfer", Duration::from_secs(10), |s| {
                s.leader_id == next
            })
            .await?;
            return Err(self.leader_only().expect_err("leadership moved"));
        }
        self.raft
            .change_members(MemberChange::Remove { id })
            .await?;
        self.wait_status(
            "the removal's joint configuration to be left",
            Duration::from_secs(10),
            |st| st.info.outgoing_voters.is_empty() && !st.info.peers.iter().any(|p| p.id == id),
        )
        .await?;
        tracing::info!(id, "master removed");
        Ok(Response::new(self.quorum()))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("transfer_leader");
        self.leader_only()?;
        let id = req.into_inner().id;
        if !self
            .raft
            .status()
            .info
            .peers
            .iter()
            .any(|p| p.id == id && !p.learner)
        {
            return Err(Status::not_found(format!("master {id} is not a voter")));
        }
        self.raft.send(Mail::TransferLeader(id))?;
        self.wait_status("leadership transfer", Duration::from_secs(10), |s| {
            s.leader_id == id
        })
        .await?;
        Ok(Response::new(self.quorum()))
    }
}
