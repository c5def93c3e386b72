//! What a router serves: the routing table (`Routing`: read from its cache, changes
//! passed on to shard 0's leader) and, in proxy mode, the `Namespace` service for
//! clients that cannot route, each call answered by the [`ShardedMetadata`] it keeps
//! (reads to any member, writes to the leader, as that client does). It keeps no state of
//! its own: any number of routers are interchangeable, and killing one loses nothing.

use std::pin::Pin;
use std::sync::Arc;

use granary_common::auth::AttachToken;
use granary_common::FsResult;
use granary_meta_client::MetadataService;
use granary_protos::v1::namespace_server::Namespace;
use granary_protos::v1::routing_server::Routing;
use granary_protos::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::leader::{change_on_keeper, TableAnswer, TableClient};
use crate::ShardedMetadata;

pub struct RouterService {
    pub(crate) meta: Arc<ShardedMetadata>,
    pub(crate) token: AttachToken,
    /// This router's address, given to proxied clients as their one "master".
    pub(crate) advertised: String,
}

fn count(method: &'static str) {
    metrics::counter!("granary_router_rpc_total", "method" => method).increment(1);
}

/// Runs a blocking metadata call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> Result<Response<T>, Status> {
    let r = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("router task: {e}")))?;
    r.map(Response::new).map_err(Status::from)
}

fn inode(r: FsResult<Inode>) -> FsResult<InodeReply> {
    r.map(|i| InodeReply { inode: Some(i) })
}

impl RouterService {
    /// Passes a table change to shard 0's leader (following its hints), then routes by
    /// the new table at once.
    async fn change_table(
        &self,
        call: impl Fn(TableClient) -> TableAnswer,
    ) -> Result<Response<RoutingTable>, Status> {
        let targets = self.meta.table().masters(0).unwrap_or_default().to_vec();
        let table = change_on_keeper(targets, &self.token, call).await?;
        let meta = self.meta.clone();
        let _ = tokio::task::spawn_blocking(move || meta.refresh_table()).await;
        Ok(table)
    }
}

#[tonic::async_trait]
impl Routing for RouterService {
    async fn get_routing_table(
        &self,
        _: Request<GetRoutingTableRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        count("get_routing_table");
        Ok(Response::new(self.meta.table().proto().clone()))
    }

    async fn add_shard(
        &self,
        req: Request<AddShardRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        count("add_shard");
        let r = req.into_inner();
        self.change_table(move |mut c| {
            let r = r.clone();
            Box::pin(async move { c.add_shard(r).await })
        })
        .await
    }

    async fn pin_prefix(
        &self,
        req: Request<PinPrefixRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        count("pin_prefix");
        let r = req.into_inner();
        self.change_table(move |mut c| {
            let r = r.clone();
            Box::pin(async move { c.pin_prefix(r).await })
        })
        .await
    }

    async fn set_shard_masters(
        &self,
        req: Request<SetShardMastersRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        count("set_shard_masters");
        let r = req.into_inner();
        self.change_table(move |mut c| {
            let r = r.clone();
            Box::pin(async move { c.set_shard_masters(r).await })
        })
        .await
    }
}

type LoadStream = Pin<Box<dyn Stream<Item = Result<LoadMetadataReply, Status>> + Send>>;

#[tonic::async_trait]
impl Namespace for RouterService {
    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<InodeReply>, Status> {
        count("lookup");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.lookup(r.parent, &r.name))).await
    }

    async fn create(&self, req: Request<CreateRequest>) -> Result<Response<InodeReply>, Status> {
        count("create");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.create(r))).await
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveReply>, Status> {
        count("remove");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || {
            meta.remove(r.parent, &r.name, r.directory)
                .map(|()| RemoveReply {})
        })
        .await
    }

    async fn rename(&self, req: Request<RenameRequest>) -> Result<Response<InodeReply>, Status> {
        count("rename");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.rename(r))).await
    }

    async fn link(&self, req: Request<LinkRequest>) -> Result<Response<InodeReply>, Status> {
        count("link");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.link(r))).await
    }

    async fn set_attr(&self, req: Request<SetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("set_attr");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        let attrs = r
            .attributes
            .ok_or_else(|| Status::invalid_argument("set_attr without attributes"))?;
        blocking(move || inode(meta.set_attr(attrs))).await
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<InodeReply>, Status> {
        count("commit");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        let content = r
            .content
            .ok_or_else(|| Status::invalid_argument("commit without content"))?;
        blocking(move || inode(meta.commit(content))).await
    }

    async fn get_attr(&self, req: Request<GetAttrRequest>) -> Result<Response<InodeReply>, Status> {
        count("get_attr");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.getattr(r.id))).await
    }

    async fn resolve_path(
        &self,
        req: Request<ResolvePathRequest>,
    ) -> Result<Response<InodeReply>, Status> {
        count("resolve_path");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || inode(meta.resolve_path(&r.path))).await
    }

    async fn read_dir(
        &self,
        req: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirReply>, Status> {
        count("read_dir");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || {
            meta.readdir(r.id, &r.start_after, r.limit.max(1))
                .map(|(entries, has_more)| ReadDirReply { entries, has_more })
        })
        .await
    }

    type LoadMetadataStream = LoadStream;

    async fn load_metadata(
        &self,
        req: Request<LoadMetadataRequest>,
    ) -> Result<Response<LoadStream>, Status> {
        count("load_metadata");
        let r = req.into_inner();
        let table = self.meta.table();
        let token = self.token.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let progress = tx.clone();
            let done = crate::load_tree(&table, &r.path, r.recursive, r.force, &token, |p| {
                let _ = progress.try_send(Ok(*p));
            })
            .await;
            let _ = tx.send(done.map_err(Status::from)).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn refresh_directory(
        &self,
        req: Request<RefreshDirectoryRequest>,
    ) -> Result<Response<RefreshDirectoryReply>, Status> {
        count("refresh_directory");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || meta.refresh(r.dir_id).map(|()| RefreshDirectoryReply {})).await
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        count("sync");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || meta.sync(r.id).map(|()| SyncReply {})).await
    }

    async fn get_block_locations(
        &self,
        req: Request<BlockLocationsRequest>,
    ) -> Result<Response<BlockLocationsReply>, Status> {
        count("get_block_locations");
        let (meta, r) = (self.meta.clone(), req.into_inner());
        blocking(move || meta.block_locations(r.file_id)).await
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersReply>, Status> {
        count("list_workers");
        let meta = self.meta.clone();
        blocking(move || meta.workers().map(|workers| ListWorkersReply { workers })).await
    }

    async fn stat_fs(&self, _: Request<StatFsRequest>) -> Result<Response<StatFsReply>, Status> {
        count("stat_fs");
        let meta = self.meta.clone();
        blocking(move || meta.statfs()).await
    }

    /// A proxied client's "master set" is this router: it never adopts another.
    async fn get_masters(
        &self,
        _: Request<GetMastersRequest>,
    ) -> Result<Response<MasterSet>, Status> {
        count("get_masters");
        Ok(Response::new(MasterSet {
            members: vec![Member {
                id: 0,
                addr: self.advertised.clone(),
                learner: false,
            }],
            ..Default::default()
        }))
    }
}
