//! gRPC clients to other masters of this group, made on first use and kept by address:
//! followers reach the leader through them for read indexes and forwarded loads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_protos::v1::peer_client::PeerClient as GrpcPeerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;

use crate::raft::RaftLog;

pub type PeerClient = GrpcPeerClient<InterceptedService<Channel, AttachToken>>;

/// gRPC clients to other masters by address, made on first use.
pub struct LeaderClients {
    token: AttachToken,
    clients: Mutex<HashMap<String, PeerClient>>,
}

impl LeaderClients {
    pub fn new(token: AttachToken) -> Self {
        LeaderClients {
            token,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client of the current leader, as this member knows it.
    pub fn leader(&self, raft: &RaftLog) -> Result<PeerClient, Status> {
        let st = raft.status();
        let addr = st.leader_addr().ok_or_else(|| {
            Status::unavailable(format!(
                "master {} knows no leader (election in progress)",
                st.id
            ))
        })?;
        self.get(&addr)
    }

    /// A client of the group member (or would-be member) at `addr`.
    pub fn get(&self, addr: &str) -> Result<PeerClient, Status> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let ch =
            granary_common::net::lazy_channel(addr, Duration::from_secs(1), Duration::from_secs(5))
                .map_err(|e| Status::internal(format!("leader address {addr}: {e}")))?;
        let c = GrpcPeerClient::with_interceptor(ch, self.token.clone());
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}
