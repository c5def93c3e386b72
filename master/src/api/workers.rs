//! The `Workers` service: workers register with every master and heartbeat each one;
//! the answers carry the mount table and the current master set.

use granary_protos::v1::workers_server::Workers;
use granary_protos::v1::*;
use tonic::{Request, Response, Status};

use super::count;
use crate::service::MasterService;

#[tonic::async_trait]
impl Workers for MasterService {
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
        self.deleted.start(&info.worker_id);
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
        if !self.workers.heartbeat(&r, delta) {
            return Ok(Response::new(WorkerHeartbeatReply {
                reregister: true,
                mounts: None,
                masters: Some(self.masters()),
                deleted: Vec::new(),
            }));
        }
        self.locations
            .apply_delta(&r.worker_id, &r.added, &r.removed);
        Ok(Response::new(WorkerHeartbeatReply {
            reregister: false,
            mounts: Some(self.mounts()?),
            masters: Some(self.masters()),
            deleted: self.deleted.take(&r.worker_id),
        }))
    }
}
