//! Raft messages between masters: each peer gets a sender task that batches whatever is
//! queued into one gRPC call; incoming batches are decoded and handed to the Ready loop.
//! Failures are reported to raft (unreachable peer, failed snapshot) rather than retried
//! here: raft resends what matters.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::Duration;

use granary_protos::raft::raft_transport_client::RaftTransportClient;
use granary_protos::raft::raft_transport_server::RaftTransport;
use granary_protos::raft::{RaftAck, RaftBatch};
use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::Mail;
use granary_common::auth::AttachToken;

/// Largest raft batch (snapshots included) accepted or sent.
pub const MAX_RAFT_MESSAGE: usize = 1 << 30;
const MAX_BATCH: usize = 256;

struct Peer {
    addr: String,
    tx: mpsc::UnboundedSender<Message>,
}

/// Carries raft messages to peers. The gRPC implementation is [`GrpcTransport`]; tests
/// use an in-memory network that can drop messages and partition members.
pub trait PeerNetwork: Send {
    /// Queues messages for their peers; `book` maps member ids to addresses.
    fn send(&self, msgs: Vec<Message>, book: &HashMap<u64, String>);
}

pub struct GrpcTransport {
    mailbox: Sender<Mail>,
    runtime: tokio::runtime::Handle,
    token: AttachToken,
    peers: Mutex<HashMap<u64, Peer>>,
}

impl GrpcTransport {
    pub fn new(mailbox: Sender<Mail>, runtime: tokio::runtime::Handle, token: AttachToken) -> Self {
        GrpcTransport {
            mailbox,
            runtime,
            token,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn peer_for(&self, peers: &mut HashMap<u64, Peer>, to: u64, addr: &str) {
        let stale = peers
            .get(&to)
            .is_none_or(|p| p.addr != addr || p.tx.is_closed());
        if stale {
            peers.insert(to, self.spawn_peer(to, addr.to_string()));
        }
    }

    fn spawn_peer(&self, id: u64, addr: String) -> Peer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let mailbox = self.mailbox.clone();
        let token = self.token.clone();
        let peer_addr = addr.clone();
        self.runtime.spawn(async move {
            // A channel spawns its connection task, so it is made inside the runtime.
            let channel =
                granary_common::net::lazy_channel(&peer_addr, Duration::from_secs(1), Duration::from_secs(30));
            let Ok(channel) = channel else {
                tracing::error!(peer = id, addr = %peer_addr, "invalid raft peer address");
                return;
            };
            let mut client = RaftTransportClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE);
            let mut failures = 0u32;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let has_snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
                let encoded: Vec<Vec<u8>> = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
                let sent = client.send(RaftBatch { messages: encoded }).await;
                match sent {
                    Ok(_) => {
                        failures = 0;
                        if has_snapshot {
                            let _ = mailbox.send(Mail::SnapshotSent(id, true));
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(50) {
                            tracing::warn!(peer = id, addr = %peer_addr, error = %e.message(), "raft peer unreachable");
                        }
                        if has_snapshot {
                            let _ = mailbox.send(Mail::SnapshotSent(id, false));
                        }
                        let _ = mailbox.send(Mail::Unreachable(id));
                        // Don't spin on a dead peer; raft keeps resending what it needs.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Peer { addr, tx }
    }
}

impl PeerNetwork for GrpcTransport {
    fn send(&self, msgs: Vec<Message>, book: &HashMap<u64, String>) {
        let mut peers = self.peers.lock().expect("peers lock");
        for m in msgs {
            let to = m.to;
            let Some(addr) = book.get(&to) else {
                tracing::debug!(to, "no address for raft peer; dropping message");
                continue;
            };
            self.peer_for(&mut peers, to, addr);
            let _ = peers[&to].tx.send(m);
        }
    }
}

/// The gRPC side: decodes batches into the Ready loop's mailbox.
pub struct RaftService {
    pub id: u64,
    pub mailbox: Sender<Mail>,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let mut msgs = Vec::new();
        for bytes in req.into_inner().messages {
            let m = Message::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if m.to != self.id {
                return Err(Status::invalid_argument(format!(
                    "raft message for member {} reached member {}",
                    m.to, self.id
                )));
            }
            msgs.push(m);
        }
        self.mailbox
            .send(Mail::Step(msgs))
            .map_err(|_| Status::unavailable("raft loop stopped"))?;
        Ok(Response::new(RaftAck {}))
    }
}
