//! The master's gRPC API: namespace reads (loading from the UFS on first touch), worker
//! registration and heartbeats, block locations, and cluster reports.

use std::pin::Pin;
use std::sync::Arc;

use granary_common::blocks::block_count;
use granary_common::path::{components, validate_name};
use granary_common::FsError;
use granary_protos::v1::master_server::Master;
use granary_protos::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::block_locations::BlockLocations;
use crate::command_log::CommandLog;
use crate::loader::{LoadProgress, MetadataLoader};
use crate::store::NamespaceStore;
use crate::workers::WorkerRegistry;

const DEFAULT_READDIR_LIMIT: u32 = 1024;
const MAX_READDIR_LIMIT: u32 = 16_384;

pub struct MasterService<L> {
    pub(crate) store: Arc<NamespaceStore>,
    pub(crate) loader: Arc<MetadataLoader<L>>,
    pub(crate) workers: Arc<WorkerRegistry>,
    pub(crate) locations: Arc<BlockLocations>,
    pub(crate) heartbeat_interval_ms: u64,
}

fn count(method: &'static str) {
    metrics::counter!("granary_master_rpc_total", "method" => method).increment(1);
}

impl<L: CommandLog> MasterService<L> {
    async fn lookup_child(&self, parent: u64, name: &[u8]) -> Result<Inode, FsError> {
        validate_name(name)?;
        let dir = self.store.get(parent)?;
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        let dir = self.loader.ensure_loaded(&dir).await?;
        self.store
            .lookup(dir.id, name)?
            .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()))
    }

    async fn resolve(&self, path: &[u8]) -> Result<Inode, FsError> {
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
impl<L: CommandLog> Master for MasterService<L> {
    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<InodeReply>, Status> {
        count("lookup");
        let r = req.into_inner();
        let inode = self.lookup_child(r.parent, &r.name).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn get_attr(&self, req: Request<GetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("get_attr");
        let inode = self.store.get(req.into_inner().id)?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn resolve_path(
        &self,
        req: Request<ResolvePathRequest>,
    ) -> Result<Response<InodeReply>, Status> {
        count("resolve_path");
        let inode = self.resolve(&req.into_inner().path).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn read_dir(
        &self,
        req: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirReply>, Status> {
        count("read_dir");
        let r = req.into_inner();
        let dir = self.store.get(r.id)?;
        let dir = self.loader.ensure_loaded(&dir).await?;
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
        let r = req.into_inner();
        let root = self.resolve(&r.path).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let loader = self.loader.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = tokio::sync::mpsc::channel::<LoadProgress>(1);
            let run = async {
                if r.recursive {
                    loader.load_tree(root, ptx).await
                } else {
                    let dir = loader.ensure_loaded(&root).await?;
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
            }));
        }
        self.locations
            .apply_delta(&r.worker_id, &r.added, &r.removed);
        Ok(Response::new(WorkerHeartbeatReply {
            reregister: false,
            mounts: Some(self.mounts()?),
        }))
    }

    async fn report(&self, _: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        count("report");
        let err = |e: crate::store::StoreError| Status::from(FsError::from(e));
        Ok(Response::new(ReportReply {
            shard_id: self.store.shard() as u32,
            applied_index: self.store.applied_index().map_err(err)?,
            inodes: self.store.inode_count().map_err(err)?,
            mounts: Some(self.mounts()?),
            workers: self.workers.list(),
            cached_blocks: self.locations.block_count(),
        }))
    }
}
