//! Calls that must reach a group's leader (table changes go to shard 0's, which keeps
//! the routing table): tried on the given addresses in turn, going to the leader a
//! member names as soon as it names one.

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

/// Hints to the leader followed for one call.
const HINTS: usize = 5;

/// Runs `call` on each of `targets` in turn (the leader a refusal names first) until
/// one answers. Stops early at an error that is neither "unavailable" nor a redirect.
pub async fn on_leader<T, Fut>(
    mut targets: Vec<String>,
    mut call: impl FnMut(String) -> Fut,
) -> Result<T, Status>
where
    Fut: Future<Output = Result<T, Status>>,
{
    let mut last = Status::unavailable("no master to ask");
    let mut hints = 0;
    while !targets.is_empty() {
        let addr = targets.remove(0);
        match call(addr).await {
            Ok(answer) => return Ok(answer),
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

/// A tonic channel to `addr`, or the status saying why there is none.
pub fn channel_to(addr: &str, timeout: Duration) -> Result<Channel, Status> {
    granary_common::net::lazy_channel(addr, Duration::from_secs(2), timeout)
        .map_err(|e| Status::internal(format!("master `{addr}`: {e}")))
}

/// Makes a table change through `call` on shard 0's leader, from `targets` (shard 0's
/// masters, or routers, which pass it on).
pub async fn change_on_keeper(
    targets: Vec<String>,
    token: &AttachToken,
    call: impl Fn(TableClient) -> TableAnswer,
) -> Result<Response<RoutingTable>, Status> {
    on_leader(targets, |addr| {
        let client = channel_to(&addr, Duration::from_secs(30))
            .map(|c| RoutingClient::with_interceptor(c, token.clone()));
        let call = &call;
        async move { call(client?).await }
    })
    .await
}
