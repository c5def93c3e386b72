//! Metadata access for the filesystem. [`MetadataService`] is what the filesystem needs;
//! [`GrpcMetadataClient`] implements it against a shard's masters with bounded retries:
//! an unreachable master is retried (across every member) until the deadline, then the
//! call fails with EIO and a log line naming the shard.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::v1::master_client::MasterClient;
use granary_protos::v1::*;
use tonic::transport::{Channel, Endpoint};

/// Read-only metadata operations the filesystem needs.
pub trait MetadataService: Send + Sync {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode>;
    fn getattr(&self, id: u64) -> FsResult<Inode>;
    /// One page of a directory, after `start_after`; the flag says whether more remain.
    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)>;
    fn workers(&self) -> FsResult<Vec<WorkerInfo>>;
    fn block_locations(&self, file_id: u64) -> FsResult<BlockLocationsReply>;
    fn statfs(&self) -> FsResult<StatFsReply>;
}

pub struct GrpcMetadataClient {
    shard: u16,
    addrs: Vec<String>,
    clients: Vec<MasterClient<Channel>>,
    /// Member that answered last; tried first next time.
    preferred: AtomicUsize,
    deadline: Duration,
    rt: tokio::runtime::Runtime,
}

impl GrpcMetadataClient {
    pub fn connect(
        shard: u16,
        masters: &[String],
        rpc_timeout: Duration,
        deadline: Duration,
    ) -> FsResult<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("granary-meta")
            .enable_all()
            .build()
            .map_err(|e| FsError::Io(format!("metadata runtime: {e}")))?;
        let _guard = rt.enter();
        let mut clients = Vec::new();
        for addr in masters {
            let ep = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| FsError::InvalidPath(format!("master address `{addr}`: {e}")))?
                .connect_timeout(rpc_timeout.min(Duration::from_secs(2)))
                .timeout(rpc_timeout)
                .tcp_nodelay(true);
            clients.push(
                MasterClient::new(ep.connect_lazy())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            );
        }
        drop(_guard);
        Ok(GrpcMetadataClient {
            shard,
            addrs: masters.to_vec(),
            clients,
            preferred: AtomicUsize::new(0),
            deadline,
            rt,
        })
    }

    /// Runs `call` against the masters until one answers or the deadline passes.
    fn call<T, F, Fut>(&self, what: &str, call: F) -> FsResult<T>
    where
        F: Fn(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0usize;
        loop {
            let idx = (self.preferred.load(Ordering::Relaxed) + attempt) % self.clients.len();
            let result = self.rt.block_on(call(self.clients[idx].clone()));
            let err = match result {
                Ok(r) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(status) => FsError::from(status),
            };
            if !err.is_retryable() {
                return Err(err);
            }
            attempt += 1;
            if start.elapsed() >= self.deadline {
                metrics::counter!("granary_client_metadata_failures_total").increment(1);
                tracing::error!(
                    shard = self.shard,
                    masters = ?self.addrs,
                    op = what,
                    attempts = attempt,
                    "shard {} unreachable for {:?}: {err}; failing with EIO",
                    self.shard,
                    start.elapsed()
                );
                return Err(FsError::Io(format!(
                    "shard {} unavailable: {err}",
                    self.shard
                )));
            }
            if attempt == 1 {
                tracing::warn!(shard = self.shard, master = %self.addrs[idx], op = what, "metadata call failed, retrying: {err}");
            }
            std::thread::sleep(backoff.min(self.deadline.saturating_sub(start.elapsed())));
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn inode(r: InodeReply) -> FsResult<Inode> {
    r.inode
        .ok_or_else(|| FsError::Io("master answered without an inode".into()))
}

impl MetadataService for GrpcMetadataClient {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        inode(self.call("lookup", |mut c| {
            let req = LookupRequest {
                parent,
                name: name.to_vec(),
            };
            async move { c.lookup(req).await }
        })?)
    }

    fn getattr(&self, id: u64) -> FsResult<Inode> {
        inode(self.call("getattr", |mut c| async move {
            c.get_attr(GetAttrRequest { id }).await
        })?)
    }

    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let r = self.call("readdir", |mut c| {
            let req = ReadDirRequest {
                id,
                start_after: start_after.to_vec(),
                limit,
            };
            async move { c.read_dir(req).await }
        })?;
        Ok((r.entries, r.has_more))
    }

    fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
        Ok(self
            .call("list_workers", |mut c| async move {
                c.list_workers(ListWorkersRequest {}).await
            })?
            .workers)
    }

    fn block_locations(&self, file_id: u64) -> FsResult<BlockLocationsReply> {
        self.call("block_locations", |mut c| async move {
            c.get_block_locations(BlockLocationsRequest { file_id })
                .await
        })
    }

    fn statfs(&self) -> FsResult<StatFsReply> {
        self.call("statfs", |mut c| async move {
            c.stat_fs(StatFsRequest {}).await
        })
    }
}
