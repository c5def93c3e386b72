//! The `Peer` service: calls between members of one master group. A follower asks the
//! leader for a read index (lease reads) or to list a directory from the UFS; a leader
//! asks a master it is told to add which shard and id it has.

use granary_protos::v1::peer_server::Peer;
use granary_protos::v1::*;
use tonic::{Request, Response, Status};

use super::count;
use crate::service::MasterService;

#[tonic::async_trait]
impl Peer for MasterService {
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
        self.leader_ready().await?;
        let r = req.into_inner();
        let dir = self.store.get(r.dir_id)?;
        match r.relist {
            true => self.loader.refresh(&dir).await?,
            // A follower's reader.
            false => self.loader.loaded_for_call(&dir, true).await?,
        };
        Ok(Response::new(ReadIndexReply {
            index: self.raft.applied_index(),
        }))
    }

    async fn identify(
        &self,
        _: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyReply>, Status> {
        count("identify");
        Ok(Response::new(IdentifyReply {
            shard_id: u32::from(self.store.shard()),
            master_id: self.raft.status().id,
        }))
    }
}
