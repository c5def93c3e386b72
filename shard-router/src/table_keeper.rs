//! Changes to the routing table go to shard 0's leader, which keeps it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::RoutingTable;
use granary_protos::LEADER_METADATA_KEY;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Response, Status};

pub type TableClient = RoutingClient<InterceptedService<Channel, AttachToken>>;
pub type TableAnswer = Pin<Box<dyn Future<Output = Result<Response<RoutingTable>, Status>> + Send>>;

/// Hints to the leader followed for one change.
const HINTS: usize = 5;

/// Makes a change through `call` on shard 0's leader: tries `targets` (shard 0's masters,
/// or routers, which pass it on) in turn, following leader hints.
pub async fn change_on_keeper(
    mut targets: Vec<String>,
    token: &AttachToken,
    call: impl Fn(TableClient) -> TableAnswer,
) -> Result<Response<RoutingTable>, Status> {
    let mut last = Status::unavailable("shard 0 lists no masters");
    let mut hints = 0;
    while !targets.is_empty() {
        let addr = targets.remove(0);
        let channel = granary_common::net::lazy_channel(
            &addr,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .map_err(|e| Status::internal(format!("master `{addr}`: {e}")))?;
        match call(RoutingClient::with_interceptor(channel, token.clone())).await {
            Ok(table) => return Ok(table),
            Err(status) => {
                let hint = status
                    .metadata()
                    .get(LEADER_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some(leader) = hint.filter(|_| hints < HINTS) {
                    hints += 1;
                    targets.insert(0, leader);
                } else if status.code() != tonic::Code::Unavailable {
                    return Err(status);
                }
                last = status;
            }
        }
    }
    Err(last)
}
