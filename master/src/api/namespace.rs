//! The `Namespace` service: what mounts and other clients ask of a master. Reads are
//! served by any member at the consistency the call asks for; writes by the leader.

use std::pin::Pin;

use granary_common::blocks::block_count;
use granary_common::FsError;
use granary_protos::v1::namespace_server::Namespace;
use granary_protos::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{consistency_of, count};
use crate::loader::LoadProgress;
use crate::service::MasterService;

const DEFAULT_READDIR_LIMIT: u32 = 1024;
const MAX_READDIR_LIMIT: u32 = 16_384;

type LoadStream = Pin<Box<dyn Stream<Item = Result<LoadMetadataReply, Status>> + Send>>;

#[tonic::async_trait]
impl Namespace for MasterService {
    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<InodeReply>, Status> {
        count("lookup");
        self.check_routing(&req)?;
        self.read_barrier(consistency_of(&req)?).await?;
        let r = req.into_inner();
        let inode = self.lookup_child(r.parent, &r.name).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn create(&self, req: Request<CreateRequest>) -> Result<Response<InodeReply>, Status> {
        count("create");
        self.check_routing(&req)?;
        self.leader_ready().await?;
        let inode = self.create_entry(req.into_inner()).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveReply>, Status> {
        count("remove");
        self.check_routing(&req)?;
        self.leader_ready().await?;
        self.remove_entry(req.into_inner()).await?;
        Ok(Response::new(RemoveReply {}))
    }

    async fn rename(&self, req: Request<RenameRequest>) -> Result<Response<InodeReply>, Status> {
        count("rename");
        self.check_routing(&req)?;
        self.leader_ready().await?;
        let inode = self.rename_entry(req.into_inner()).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn link(&self, req: Request<LinkRequest>) -> Result<Response<InodeReply>, Status> {
        count("link");
        self.check_routing(&req)?;
        self.leader_ready().await?;
        let inode = self.link_entry(req.into_inner()).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn set_attr(&self, req: Request<SetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("set_attr");
        self.leader_ready().await?;
        let a = req
            .into_inner()
            .attributes
            .ok_or_else(|| Status::invalid_argument("set_attr without attributes"))?;
        let inode = self.set_attributes(a).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<InodeReply>, Status> {
        count("commit");
        self.leader_ready().await?;
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
        self.check_routing(&req)?;
        self.read_barrier(consistency_of(&req)?).await?;
        let inode = self.resolve(&req.into_inner().path).await?;
        Ok(Response::new(InodeReply { inode: Some(inode) }))
    }

    async fn read_dir(
        &self,
        req: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirReply>, Status> {
        count("read_dir");
        self.check_routing(&req)?;
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
        self.check_routing(&req)?;
        self.leader_ready().await?;
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
                    loader.count_listed(&dir)
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

    async fn refresh_directory(
        &self,
        req: Request<RefreshDirectoryRequest>,
    ) -> Result<Response<RefreshDirectoryReply>, Status> {
        count("refresh_directory");
        self.leader_ready().await?;
        let dir = self.store.get(req.into_inner().dir_id)?;
        self.loader.refresh(&dir).await?;
        Ok(Response::new(RefreshDirectoryReply {}))
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        count("sync");
        self.leader_ready().await?;
        self.sync_object(req.into_inner().id).await?;
        Ok(Response::new(SyncReply {}))
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

    async fn get_masters(
        &self,
        _: Request<GetMastersRequest>,
    ) -> Result<Response<MasterSet>, Status> {
        count("get_masters");
        Ok(Response::new(self.masters()))
    }
}
