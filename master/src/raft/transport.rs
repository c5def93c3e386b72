//! Raft messages between masters: each peer gets a sender task that batches whatever is
//! queued and writes the batches, in order, into one long-lived gRPC stream (waiting for
//! an acknowledgement per batch made every hop of a ReadIndex round cost up to two round
//! trips). Snapshots go as single calls, whose acknowledgement raft needs to hear of; the
//! records they stand for are pulled from the member holding them (`PullSnapshot`).
//! Incoming batches are decoded and handed to the Ready loop. Failures are reported to
//! raft (unreachable peer, failed snapshot) rather than retried here: raft resends what
//! matters.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::Duration;

use granary_protos::raft::raft_transport_client::RaftTransportClient;
use granary_protos::raft::raft_transport_server::RaftTransport;
use granary_protos::raft::{NamespaceSnapshot, RaftAck, RaftBatch, SnapshotRef};
use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::Mail;
use crate::store::{NamespaceStore, StoreError};
use granary_common::auth::AttachToken;

/// Largest raft batch (snapshots included) accepted or sent.
pub const MAX_RAFT_MESSAGE: usize = 1 << 30;
const MAX_BATCH: usize = 256;
/// How long a peer without the message stream gets single calls before the stream is
/// tried again.
const STREAM_RETRY: Duration = Duration::from_secs(60);
/// A stream up this long means the peer is reachable again.
const STREAM_HEALTHY: Duration = Duration::from_secs(2);

struct Peer {
    addr: String,
    tx: mpsc::UnboundedSender<Message>,
}

/// Chunks of a snapshot's records, as they are pulled; `None` after the last.
pub type SnapshotChunks<'a> =
    Box<dyn FnMut() -> Result<Option<NamespaceSnapshot>, StoreError> + 'a>;

/// Carries raft messages to peers. The gRPC implementation is [`GrpcTransport`]; tests
/// use an in-memory network that can drop messages and partition members.
pub trait PeerNetwork: Send + Sync {
    /// Queues messages for their peers; `book` maps member ids to addresses.
    fn send(&self, msgs: Vec<Message>, book: &HashMap<u64, String>);

    /// The group is now the members in `book`: links to any other member go.
    fn members_changed(&self, _book: &HashMap<u64, String>) {}

    /// Starts pulling the records of snapshot `r` from the member holding it.
    fn pull_snapshot<'a>(
        &'a self,
        r: &SnapshotRef,
        book: &HashMap<u64, String>,
    ) -> Result<SnapshotChunks<'a>, StoreError>;
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
        let (tx, rx) = mpsc::unbounded_channel::<Message>();
        let sender = PeerSender {
            id,
            addr: addr.clone(),
            mailbox: self.mailbox.clone(),
            token: self.token.clone(),
        };
        self.runtime.spawn(sender.run(rx));
        Peer { addr, tx }
    }
}

type Client = RaftTransportClient<InterceptedService<Channel, AttachToken>>;

/// Feeds one peer's messages to it.
struct PeerSender {
    id: u64,
    addr: String,
    mailbox: Sender<Mail>,
    token: AttachToken,
}

/// How a stream ended.
enum StreamEnd {
    /// Our side of the transport is gone: stop.
    Closed,
    /// The peer is unreachable, or the stream broke: open another after a pause.
    Broken(Status),
    /// The peer predates streams: send single calls from now on.
    Unsupported,
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Message>) {
        // Channels spawn their connection tasks, so they are made inside the runtime.
        // A stream lives indefinitely, so its channel has no request timeout; keepalive
        // pings end it when the peer stops answering.
        let channels = granary_common::net::lazy_channel(
            &self.addr,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .and_then(|calls| {
            let stream = granary_common::net::endpoint(&self.addr, Duration::from_secs(1))?
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
                .connect_lazy();
            Ok((calls, stream))
        });
        let Ok((calls, stream)) = channels else {
            tracing::error!(peer = self.id, addr = %self.addr, "invalid raft peer address");
            return;
        };
        let mut calls = self.client(calls);
        let mut stream = self.client(stream);
        let mut failures = 0u32;
        // When a peer without the stream (an older master) is asked again: it may have
        // been upgraded meanwhile.
        let mut unary_until: Option<tokio::time::Instant> = None;
        loop {
            let streaming = unary_until.is_none_or(|t| tokio::time::Instant::now() >= t);
            let end = if streaming {
                self.stream(&mut stream, &mut calls, &mut rx, &mut failures)
                    .await
            } else {
                match self.next_batch(&mut rx).await {
                    Some(batch) => match self.call(&mut calls, batch, &mut failures).await {
                        Ok(()) => continue,
                        Err(e) => StreamEnd::Broken(e),
                    },
                    None => StreamEnd::Closed,
                }
            };
            match end {
                StreamEnd::Closed => return,
                StreamEnd::Unsupported => {
                    tracing::info!(
                        peer = self.id,
                        "raft peer has no message stream; sending single calls"
                    );
                    unary_until = Some(tokio::time::Instant::now() + STREAM_RETRY);
                }
                StreamEnd::Broken(e) => {
                    self.unreachable(&e, &mut failures);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn client(&self, channel: Channel) -> Client {
        RaftTransportClient::with_interceptor(channel, self.token.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE)
    }

    /// Waits for the next message and takes whatever else is queued behind it.
    async fn next_batch(&self, rx: &mut mpsc::UnboundedReceiver<Message>) -> Option<Vec<Message>> {
        let mut batch = vec![rx.recv().await?];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Writes batches into one stream until it breaks. Snapshots go as single calls.
    async fn stream(
        &self,
        stream: &mut Client,
        calls: &mut Client,
        rx: &mut mpsc::UnboundedReceiver<Message>,
        failures: &mut u32,
    ) -> StreamEnd {
        let (batches, body) = mpsc::channel::<RaftBatch>(16);
        let call = stream.stream(tokio_stream::wrappers::ReceiverStream::new(body));
        tokio::pin!(call);
        // Writing into the stream says nothing of the peer receiving it: only a stream that
        // stayed up a while counts as the peer being back (else a dead peer, reconnected
        // every 50 ms, would log a new warning each time).
        let opened = tokio::time::Instant::now();
        loop {
            let batch = tokio::select! {
                ended = &mut call => return stream_ended(ended),
                batch = self.next_batch(rx) => match batch {
                    Some(batch) => batch,
                    None => return StreamEnd::Closed,
                },
            };
            if batch
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            {
                if let Err(e) = self.call(calls, batch, failures).await {
                    self.unreachable(&e, failures);
                }
                continue;
            }
            tokio::select! {
                ended = &mut call => return stream_ended(ended),
                sent = batches.send(encode(&batch)) => {
                    if sent.is_err() {
                        return StreamEnd::Broken(Status::unavailable("raft stream closed"));
                    }
                    if opened.elapsed() >= STREAM_HEALTHY {
                        *failures = 0;
                    }
                }
            }
        }
    }

    /// Sends one batch as a single call, reporting a snapshot's fate to raft.
    async fn call(
        &self,
        calls: &mut Client,
        batch: Vec<Message>,
        failures: &mut u32,
    ) -> Result<(), Status> {
        let has_snapshot = batch
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let sent = calls.send(encode(&batch)).await;
        if has_snapshot {
            let _ = self.mailbox.send(Mail::SnapshotSent(self.id, sent.is_ok()));
        }
        sent?;
        *failures = 0;
        Ok(())
    }

    fn unreachable(&self, e: &Status, failures: &mut u32) {
        *failures += 1;
        if *failures == 1 || failures.is_multiple_of(50) {
            tracing::warn!(peer = self.id, addr = %self.addr, error = %e.message(), "raft peer unreachable");
        }
        let _ = self.mailbox.send(Mail::Unreachable(self.id));
    }
}

fn encode(batch: &[Message]) -> RaftBatch {
    RaftBatch {
        messages: batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect(),
    }
}

fn stream_ended(ended: Result<Response<RaftAck>, Status>) -> StreamEnd {
    match ended {
        Err(e) if e.code() == tonic::Code::Unimplemented => StreamEnd::Unsupported,
        Err(e) => StreamEnd::Broken(e),
        Ok(_) => StreamEnd::Broken(Status::unavailable("raft peer ended the stream")),
    }
}

impl PeerNetwork for GrpcTransport {
    fn members_changed(&self, book: &HashMap<u64, String>) {
        // Dropping a removed member's queue stops its sender, which would otherwise
        // dial it (and warn) until this process stops.
        self.peers
            .lock()
            .expect("peers lock")
            .retain(|id, _| book.contains_key(id));
    }

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

    fn pull_snapshot<'a>(
        &'a self,
        r: &SnapshotRef,
        book: &HashMap<u64, String>,
    ) -> Result<SnapshotChunks<'a>, StoreError> {
        let addr = book.get(&r.holder).ok_or_else(|| {
            StoreError::Corrupt(format!("no address for snapshot holder {}", r.holder))
        })?;
        let gone = |e: String| StoreError::Corrupt(format!("pulling snapshot from {addr}: {e}"));
        let channel = {
            let _in_runtime = self.runtime.enter();
            granary_common::net::lazy_channel(
                addr,
                Duration::from_secs(2),
                Duration::from_secs(3600),
            )
            .map_err(|e| gone(e.to_string()))?
        };
        let mut client = RaftTransportClient::with_interceptor(channel, self.token.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE);
        let mut stream = self
            .runtime
            .block_on(client.pull_snapshot(*r))
            .map_err(|e| gone(e.message().to_string()))?
            .into_inner();
        let addr = addr.clone();
        Ok(Box::new(move || {
            self.runtime.block_on(stream.message()).map_err(|e| {
                StoreError::Corrupt(format!("pulling snapshot from {addr}: {}", e.message()))
            })
        }))
    }
}

/// The gRPC side: decodes batches into the Ready loop's mailbox, and streams held
/// snapshots.
pub struct RaftService {
    pub id: u64,
    pub mailbox: Sender<Mail>,
    pub namespace: std::sync::Arc<NamespaceStore>,
}

type SnapshotStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<NamespaceSnapshot, Status>> + Send>>;

impl RaftService {
    /// Decodes a batch addressed to this member and queues it for the raft loop.
    fn deliver(&self, batch: RaftBatch) -> Result<(), Status> {
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for bytes in batch.messages {
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
            .map_err(|_| Status::unavailable("raft loop stopped"))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.deliver(req.into_inner())?;
        Ok(Response::new(RaftAck {}))
    }

    async fn stream(
        &self,
        req: Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut batches = req.into_inner();
        while let Some(batch) = batches.message().await? {
            self.deliver(batch)?;
        }
        Ok(Response::new(RaftAck {}))
    }

    type PullSnapshotStream = SnapshotStream;

    async fn pull_snapshot(
        &self,
        req: Request<SnapshotRef>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let r = req.into_inner();
        if r.holder != self.id {
            return Err(Status::not_found(format!(
                "snapshot held by member {}, asked of member {}",
                r.holder, self.id
            )));
        }
        let namespace = self.namespace.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let streamed = namespace.stream_held(r.id, |chunk| {
                tx.blocking_send(Ok(chunk))
                    .map_err(|_| StoreError::Corrupt("the puller went away".into()))
            });
            if let Err(e) = streamed {
                let _ = tx.blocking_send(Err(Status::unavailable(e.to_string())));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
