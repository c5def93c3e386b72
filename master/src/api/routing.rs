//! The `Routing` service: shard 0's group keeps the routing table and changes it; every
//! master serves the version its shard works by.

use std::time::Duration;

use granary_protos::v1::routing_server::Routing;
use granary_protos::v1::*;
use granary_shard_router::RoutingTable;
use tonic::{Request, Response, Status};

use super::count;
use crate::command_log::CommandLog;
use crate::service::MasterService;

impl MasterService {
    /// The table this shard works by. Shard 0 without one has the implicit version 0:
    /// one shard, itself.
    fn current_table(&self) -> Result<RoutingTable, Status> {
        if let Some(t) = self
            .store
            .routing_table()
            .map_err(granary_common::FsError::from)?
        {
            return Ok(t);
        }
        if self.store.shard() != 0 {
            return Err(Status::unavailable(format!(
                "shard {} has no routing table yet (it follows shard 0's)",
                self.store.shard()
            )));
        }
        let masters: Vec<String> = self
            .raft
            .status()
            .masters
            .members
            .iter()
            .map(|m| m.addr.clone())
            .filter(|a| !a.is_empty())
            .collect();
        if masters.is_empty() {
            return Err(Status::unavailable(
                "this master does not know its group yet",
            ));
        }
        Ok(RoutingTable::single(masters))
    }

    /// Makes and records the next version of the table (shard 0's leader only).
    async fn change_table(
        &self,
        change: impl FnOnce(&RoutingTable) -> Result<RoutingTable, granary_shard_router::RoutingError>,
    ) -> Result<Response<RoutingTable_>, Status> {
        if self.store.shard() != 0 {
            return Err(Status::failed_precondition(
                "the routing table is kept by shard 0: ask a router or shard 0's masters",
            ));
        }
        self.leader_only()?;
        // A new leader reads the table only once it has applied everything committed
        // before it led: else it could build on an older version and lose a change.
        self.wait_status("the leader to catch up", Duration::from_secs(10), |s| {
            s.leader_caught_up
        })
        .await?;
        let _one_at_a_time = self.routing_changes.lock().await;
        let next =
            change(&self.current_table()?).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let proto = next.proto().clone();
        let recorded = self
            .raft
            .propose(Command {
                op: Some(command::Op::SetRoutingTable(SetRoutingTable {
                    table: Some(proto.clone()),
                })),
            })
            .await;
        match recorded {
            Err(granary_common::FsError::StaleRouting(now)) => {
                return Err(Status::aborted(format!(
                    "the routing table changed meanwhile (now version {now}); nothing was changed: run the command again"
                )))
            }
            r => r?,
        }
        tracing::info!(
            version = proto.version,
            shards = proto.shards.len(),
            pins = proto.pins.len(),
            "routing table changed"
        );
        Ok(Response::new(proto))
    }
}

/// The proto type, named apart from the validated table.
type RoutingTable_ = granary_protos::v1::RoutingTable;

#[tonic::async_trait]
impl Routing for MasterService {
    async fn get_routing_table(
        &self,
        _: Request<GetRoutingTableRequest>,
    ) -> Result<Response<RoutingTable_>, Status> {
        count("get_routing_table");
        Ok(Response::new(self.current_table()?.proto().clone()))
    }

    async fn add_shard(
        &self,
        req: Request<AddShardRequest>,
    ) -> Result<Response<RoutingTable_>, Status> {
        count("add_shard");
        let shard = req
            .into_inner()
            .shard
            .ok_or_else(|| Status::invalid_argument("add_shard without a shard"))?;
        self.change_table(|t| t.with_shard(shard)).await
    }

    async fn pin_prefix(
        &self,
        req: Request<PinPrefixRequest>,
    ) -> Result<Response<RoutingTable_>, Status> {
        count("pin_prefix");
        let r = req.into_inner();
        let shard = u16::try_from(r.shard).map_err(|_| {
            Status::invalid_argument(format!("shard id {} is out of range", r.shard))
        })?;
        self.change_table(|t| t.with_pin(&r.prefix, shard)).await
    }

    async fn set_shard_masters(
        &self,
        req: Request<SetShardMastersRequest>,
    ) -> Result<Response<RoutingTable_>, Status> {
        count("set_shard_masters");
        let shard = req
            .into_inner()
            .shard
            .ok_or_else(|| Status::invalid_argument("set_shard_masters without a shard"))?;
        // Asked again by a leader that has not seen the last change yet: no new version.
        // Only shard 0's leader says so (a follower's table may be behind; another
        // shard's master is refused by `change_table`).
        if self.store.shard() == 0 {
            self.leader_only()?;
            let table = self.current_table()?;
            if table.shards().contains(&shard) {
                return Ok(Response::new(table.proto().clone()));
            }
        }
        self.change_table(|t| t.with_masters(shard)).await
    }
}
