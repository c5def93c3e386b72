//! [`GrpcMetadataClient`]: the [`MetadataService`] of one shard's Raft group. It follows
//! the leader hints non-leaders return, rotates across members when one is down, adopts a
//! newer master set (master migration) without a restart, and gives up after a bounded
//! deadline with EIO and a log line naming the shard.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use granary_common::auth::AttachToken;
use granary_common::consistency::ReadConsistency;
use granary_common::in_process::GrpcChannel;
use granary_common::{FsError, FsResult};
use granary_protos::v1::namespace_client::NamespaceClient;
use granary_protos::v1::*;
use granary_protos::LEADER_METADATA_KEY;
use tonic::service::interceptor::InterceptedService;

use crate::MetadataService;

pub type Client = NamespaceClient<InterceptedService<GrpcChannel, AttachToken>>;

#[derive(Clone)]
struct Member {
    addr: String,
    /// Calls to this member in flight from this client.
    outstanding: Arc<AtomicUsize>,
    /// Until when it is passed over while another member is there (ms since `EPOCH`),
    /// after a call to it failed. A member that fails fast has no calls in flight and
    /// would otherwise be picked first every time.
    passed_over_until: Arc<AtomicU64>,
    /// Until when it counts as silent (ms since `EPOCH`): its last failure was a call it
    /// took and answered nothing in time.
    silent_until: Arc<AtomicU64>,
    /// When its last failure was logged (ms since `EPOCH`; 0: never): a member down
    /// fails the first try of every call, which would otherwise log once per call.
    warned_at: Arc<AtomicU64>,
}

/// How long a member that failed is passed over while another one is there.
const FAILED_PASS_OVER: Duration = Duration::from_secs(1);
/// The same after it took a call and answered nothing in time (a stopped or wedged
/// process): each such try costs the caller `rpc_timeout`.
const SILENT_PASS_OVER: Duration = Duration::from_secs(30);
/// How often one member's failures are logged at most.
const WARN_EVERY_MS: u64 = 30_000;
/// How long after a call found no master answering the next calls try each member once
/// instead of retrying for the whole deadline.
const DOWN_REMEMBERED: Duration = Duration::from_secs(10);
/// Longest a call waits for a master's listing: one that never ends (a UFS that lists
/// forever) would otherwise be waited for forever.
const LOADING_WAIT_MAX: Duration = Duration::from_secs(600);
/// How often a call waiting for a master's listing says so.
const LOADING_TELL_EVERY: Duration = Duration::from_secs(10);

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

impl Member {
    fn failed_recently(&self) -> bool {
        now_ms() < self.passed_over_until.load(Ordering::Relaxed)
    }

    /// Passed over for answering nothing in time.
    fn silent(&self) -> bool {
        now_ms() < self.silent_until.load(Ordering::Relaxed)
    }

    /// Passes it over after a failed call: for longer if it answered nothing in time.
    fn pass_over(&self, now: u64, silent: bool) {
        let (pass_over, silent_until) = match silent {
            true => (SILENT_PASS_OVER, now + SILENT_PASS_OVER.as_millis() as u64),
            false => (FAILED_PASS_OVER, 0),
        };
        self.passed_over_until
            .store(now + pass_over.as_millis() as u64, Ordering::Relaxed);
        self.silent_until.store(silent_until, Ordering::Relaxed);
    }
}

/// Counts a call in flight to a member for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Members {
    list: Vec<Member>,
    /// (conf_index, term) of the master set the list came from.
    version: (u64, u64),
}

/// How a client talks to a shard's masters.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub cluster_token: String,
    pub read_consistency: ReadConsistency,
    /// Spread reads over every member instead of sending them all to the leader.
    pub follower_reads: bool,
    pub rpc_timeout: Duration,
    pub retry_deadline: Duration,
    /// The routing table version calls are routed by, sent along with each (sharded
    /// namespaces); `None` for a client that does not route.
    pub routing_version: Option<Arc<AtomicU64>>,
}

pub struct GrpcMetadataClient {
    shard: u16,
    /// What it calls, in messages: "shard N", or the routers a proxied mount calls.
    called: String,
    members: RwLock<Members>,
    /// Member that answered last (the leader, normally); tried first.
    preferred: AtomicUsize,
    /// Where the search for the least busy member starts (follower reads).
    next_read: AtomicUsize,
    follower_reads: bool,
    rpc_timeout: Duration,
    deadline: Duration,
    /// When a call last failed for want of any master (ms since `EPOCH`; 0: not since
    /// one answered): calls made soon after get one round over the members, not the
    /// whole deadline, so a shard that is down fails each call at once instead of
    /// stalling every one for `retry_deadline_ms`.
    down_at: AtomicU64,
    token: AttachToken,
    stop: Arc<AtomicBool>,
    /// Tells this client's connections apart in [`THREAD_CLIENTS`].
    id: u64,
}

/// One calling thread's connections to masters, by client and address.
struct ThreadClients {
    rt: tokio::runtime::Runtime,
    clients: HashMap<(u64, String), Client>,
}

thread_local! {
    static THREAD_CLIENTS: RefCell<Option<ThreadClients>> = const { RefCell::new(None) };
}

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(0);

impl Drop for GrpcMetadataClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl GrpcMetadataClient {
    pub fn connect(shard: u16, masters: &[String], opts: &ClientOptions) -> FsResult<Arc<Self>> {
        Self::connect_as(shard, format!("shard {shard}"), masters, opts)
    }

    /// A client of routers in proxy mode: they answer for every shard.
    pub fn connect_proxy(routers: &[String], opts: &ClientOptions) -> FsResult<Arc<Self>> {
        Self::connect_as(0, format!("the routers {routers:?}"), routers, opts)
    }

    fn connect_as(
        shard: u16,
        called: String,
        masters: &[String],
        opts: &ClientOptions,
    ) -> FsResult<Arc<Self>> {
        let mut token = AttachToken::new(&opts.cluster_token)
            .map_err(FsError::InvalidArgument)?
            .with_consistency(opts.read_consistency);
        if let Some(version) = &opts.routing_version {
            token = token.with_routing(version.clone());
        }
        let client = Arc::new(GrpcMetadataClient {
            shard,
            called,
            members: RwLock::new(Members {
                list: Vec::new(),
                version: (0, 0),
            }),
            preferred: AtomicUsize::new(0),
            next_read: AtomicUsize::new(0),
            follower_reads: opts.follower_reads,
            rpc_timeout: opts.rpc_timeout,
            deadline: opts.retry_deadline,
            down_at: AtomicU64::new(0),
            token,
            stop: Arc::new(AtomicBool::new(false)),
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
        });
        let list = masters
            .iter()
            .map(|a| client.member(a))
            .collect::<FsResult<Vec<_>>>()?;
        client.members.write().expect("members lock").list = list;
        client.start_refresher();
        Ok(client)
    }

    fn member(&self, addr: &str) -> FsResult<Member> {
        granary_common::net::endpoint(addr, Duration::from_secs(1))
            .map_err(|e| FsError::InvalidArgument(format!("master address `{addr}`: {e}")))?;
        Ok(Member {
            addr: addr.to_string(),
            outstanding: Arc::new(AtomicUsize::new(0)),
            passed_over_until: Arc::new(AtomicU64::new(0)),
            silent_until: Arc::new(AtomicU64::new(0)),
            warned_at: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A client of the master at `addr`, its connection driven by the runtime this is
    /// called in (or a direct one, for a master in this process).
    fn client(&self, addr: &str) -> FsResult<Client> {
        let channel = granary_common::in_process::channel(
            addr,
            self.rpc_timeout.min(Duration::from_secs(2)),
            self.rpc_timeout,
        )
        .map_err(|e| FsError::InvalidArgument(format!("master address `{addr}`: {e}")))?;
        Ok(
            NamespaceClient::with_interceptor(channel, self.token.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    /// Runs `call` against the master at `addr` on this thread's own connection to it,
    /// driven right here: a call through the shared runtime wakes its threads and is
    /// woken back (~0.7 ms per call on two busy cores); FUSE threads make one call
    /// after another, so each keeps its own connections.
    fn on_this_thread<T, F, Fut>(&self, addr: &str, call: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        THREAD_CLIENTS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| tonic::Status::internal(format!("metadata runtime: {e}")))?;
                *slot = Some(ThreadClients {
                    rt,
                    clients: HashMap::new(),
                });
            }
            let tc = slot.as_mut().expect("made above");
            let key = (self.id, addr.to_string());
            let client = match tc.clients.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let _guard = tc.rt.enter();
                    let c = self
                        .client(addr)
                        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                    tc.clients.insert(key, c.clone());
                    c
                }
            };
            tc.rt.block_on(call(client))
        })
    }

    /// Master addresses as currently known.
    pub fn masters(&self) -> Vec<String> {
        self.members
            .read()
            .expect("members lock")
            .list
            .iter()
            .map(|m| m.addr.clone())
            .collect()
    }

    /// Adopts `set` if it is newer than what the client has (master migration).
    fn adopt(&self, set: &MasterSet) {
        let version = (set.conf_index, set.term);
        if set.members.is_empty() || version <= self.members.read().expect("members lock").version {
            return;
        }
        let addrs: Vec<&str> = set
            .members
            .iter()
            .filter(|m| !m.addr.is_empty())
            .map(|m| m.addr.as_str())
            .collect();
        let mut members = self.members.write().expect("members lock");
        if version <= members.version {
            return;
        }
        let old = std::mem::take(&mut members.list);
        let mut list = Vec::new();
        for addr in &addrs {
            match old.iter().find(|m| m.addr == *addr) {
                Some(m) => list.push(m.clone()),
                None => match self.member(addr) {
                    Ok(m) => list.push(m),
                    Err(e) => {
                        tracing::warn!(addr, error = %e, "ignoring master with a bad address")
                    }
                },
            }
        }
        if list.is_empty() {
            members.list = old;
            return;
        }
        let leader = set
            .members
            .iter()
            .find(|m| m.id == set.leader_id)
            .map(|m| m.addr.clone());
        let preferred = leader
            .and_then(|l| list.iter().position(|m| m.addr == l))
            .unwrap_or(0);
        if old.iter().map(|m| &m.addr).ne(list.iter().map(|m| &m.addr)) {
            tracing::info!(shard = self.shard, masters = ?addrs, conf_index = set.conf_index, "adopted a new master set");
        }
        members.list = list;
        members.version = version;
        self.preferred.store(preferred, Ordering::Relaxed);
    }

    /// Polls the master set every couple of seconds so membership changes reach this
    /// client even when it is idle.
    fn start_refresher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("granary-masters".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(2));
                    let Some(me) = weak.upgrade() else { return };
                    let list = me.members.read().expect("members lock").list.clone();
                    let start = me.preferred.load(Ordering::Relaxed);
                    for i in 0..list.len() {
                        let addr = &list[(start + i) % list.len()].addr;
                        let asked = me.on_this_thread(addr, |mut c| async move {
                            c.get_masters(GetMastersRequest {}).await
                        });
                        if let Ok(r) = asked {
                            me.adopt(&r.into_inner());
                            break;
                        }
                    }
                }
            })
            .expect("spawn master-set refresher");
    }

    fn leader_hint(status: &tonic::Status) -> Option<String> {
        status
            .metadata()
            .get(LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The member with the fewest calls in flight from this client, ties taken in turn,
    /// passing over members that failed in the last second. A busy member answers slower
    /// and so gets fewer reads: the leader, which also runs every ReadIndex round, is not
    /// sent a full third of them.
    fn least_outstanding(&self) -> usize {
        let members = self.members.read().expect("members lock");
        let n = members.list.len().max(1);
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| {
                members.list.get(i).map_or((false, 0), |m| {
                    (m.failed_recently(), m.outstanding.load(Ordering::Relaxed))
                })
            })
            .unwrap_or(0)
    }

    /// Runs `call` until a master answers or the deadline passes. Reads start at the
    /// least busy member (any member serves them); writes start at the leader.
    fn call<T, F, Fut>(&self, what: &str, read: bool, call: F) -> FsResult<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut start = Instant::now();
        let down_at = self.down_at.load(Ordering::Relaxed);
        let mut known_down =
            down_at != 0 && now_ms().saturating_sub(down_at) < DOWN_REMEMBERED.as_millis() as u64;
        let mut deadline = match known_down {
            true => Duration::ZERO,
            false => self.deadline,
        };
        // A shard known down tries each member once, but not again one that answered
        // nothing in time lately (each such try waits out `rpc_timeout`): at least one.
        // Those are passed over while another is there.
        let tries_while_down = match known_down {
            true => {
                let members = self.members.read().expect("members lock");
                members.list.iter().filter(|m| !m.silent()).count().max(1)
            }
            false => usize::MAX,
        };
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0usize;
        let mut loading_since: Option<Instant> = None;
        let mut tell_after = LOADING_TELL_EVERY;
        let mut cursor = if read && self.follower_reads {
            Some(self.least_outstanding())
        } else {
            None
        };
        loop {
            let (idx, member, count) = {
                let members = self.members.read().expect("members lock");
                let n = members.list.len().max(1);
                let mut idx = cursor.unwrap_or_else(|| self.preferred.load(Ordering::Relaxed)) % n;
                if known_down {
                    let answering = (0..n)
                        .map(|k| (idx + k) % n)
                        .find(|&i| members.list.get(i).is_some_and(|m| !m.silent()));
                    idx = answering.unwrap_or(idx);
                }
                (idx, members.list[idx].clone(), n)
            };
            let answer = {
                let _in_flight = InFlight::start(&member.outstanding);
                self.on_this_thread(&member.addr, &call)
            };
            let status = match answer {
                Ok(r) => {
                    self.down_at.store(0, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(status) => status,
            };
            let hint = Self::leader_hint(&status);
            if hint.is_some() && known_down {
                // A member answered: the shard is up, and the call gets its whole deadline.
                self.down_at.store(0, Ordering::Relaxed);
                known_down = false;
                deadline = self.deadline;
                start = Instant::now();
            }
            let err = FsError::from(status);
            if let FsError::Loading(listing) = &err {
                // The master answers so every second while it lists a big directory for
                // the call: wait as long as the listing takes, the deadline counting from
                // its last answer.
                let since = *loading_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LOADING_WAIT_MAX {
                    tracing::error!(
                        shard = self.shard,
                        op = what,
                        "{} still listing after {:?}: {listing}; failing with EIO",
                        self.called,
                        since.elapsed()
                    );
                    return Err(FsError::io(format!(
                        "{} still listing: {listing}",
                        self.called
                    )));
                }
                if since.elapsed() >= tell_after {
                    tell_after += LOADING_TELL_EVERY;
                    tracing::info!(shard = self.shard, master = %member.addr, op = what, waited = ?since.elapsed(), "waiting for the master: {listing}");
                }
                start = Instant::now();
                continue;
            }
            if let Some(leader) = hint.clone() {
                // A follower named the leader: go there at once.
                let members = self.members.read().expect("members lock");
                let pos = members.list.iter().position(|m| m.addr == leader);
                drop(members);
                let pos = match pos {
                    Some(p) => Some(p),
                    None => self.member(&leader).ok().map(|m| {
                        let mut members = self.members.write().expect("members lock");
                        members.list.push(m);
                        members.list.len() - 1
                    }),
                };
                if let Some(p) = pos {
                    self.preferred.store(p, Ordering::Relaxed);
                    cursor = None;
                }
            } else if let Some(c) = cursor.as_mut() {
                *c = idx + 1;
            } else {
                self.preferred.store((idx + 1) % count, Ordering::Relaxed);
            }
            if !err.is_retryable() {
                return Err(err);
            }
            let mut news = false;
            if hint.is_none() {
                // Not a redirect to the leader: this member could not serve the call.
                let now = now_ms();
                member.pass_over(now, answered_nothing_in_time(&err));
                let warned = member.warned_at.load(Ordering::Relaxed);
                news = (warned == 0 || now.saturating_sub(warned) >= WARN_EVERY_MS)
                    && member
                        .warned_at
                        .compare_exchange(warned, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok();
            }
            attempt += 1;
            if start.elapsed() >= deadline
                && (!known_down || attempt >= count.min(tries_while_down))
            {
                metrics::counter!("granary_client_metadata_failures_total").increment(1);
                self.down_at.store(now_ms(), Ordering::Relaxed);
                if known_down {
                    tracing::debug!(
                        shard = self.shard,
                        op = what,
                        "{} still unavailable: {err}; failing with EIO",
                        self.called
                    );
                    return Err(FsError::io(format!("{} unavailable: {err}", self.called)));
                }
                // A master that took the call and never answered it (a leader waiting on
                // a stalled UFS) is not one out of reach.
                let state = match answered_nothing_in_time(&err) {
                    true => "answered no call in time",
                    false => "unreachable",
                };
                tracing::error!(
                    shard = self.shard,
                    masters = ?self.masters(),
                    op = what,
                    attempts = attempt,
                    "{} {state} for {:?}: {err}; failing with EIO",
                    self.called,
                    start.elapsed()
                );
                return Err(FsError::io(format!("{} unavailable: {err}", self.called)));
            }
            if news {
                tracing::warn!(shard = self.shard, master = %member.addr, op = what, "metadata call failed, retrying: {err}");
            }
            // Every member tried once: back off before the next round.
            if attempt.is_multiple_of(count) {
                std::thread::sleep(backoff.min(deadline.saturating_sub(start.elapsed())));
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Whether a master took the call and did not answer it in time: tonic's own timeout,
/// which says "Timeout expired". Not a master's answer that something timed out there
/// (`DeadlineExceeded`: a proposal not applied in time, a UFS call): that master answers.
fn answered_nothing_in_time(err: &FsError) -> bool {
    !matches!(err, FsError::TimedOut(_)) && err.to_string().contains("Timeout expired")
}

fn inode(r: InodeReply) -> FsResult<Inode> {
    r.inode
        .ok_or_else(|| FsError::io("master answered without an inode"))
}

impl MetadataService for GrpcMetadataClient {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        inode(self.call("lookup", true, |mut c| {
            let req = LookupRequest {
                parent,
                name: name.to_vec(),
            };
            async move { c.lookup(req).await }
        })?)
    }

    fn getattr(&self, id: u64) -> FsResult<Inode> {
        inode(self.call("getattr", true, |mut c| async move {
            c.get_attr(GetAttrRequest { id }).await
        })?)
    }

    fn getattr_latest(&self, id: u64) -> FsResult<Inode> {
        inode(self.call("getattr", true, |mut c| async move {
            let mut req = tonic::Request::new(GetAttrRequest { id });
            req.metadata_mut().insert(
                granary_common::auth::CONSISTENCY_METADATA_KEY,
                ReadConsistency::Linearizable
                    .to_string()
                    .parse()
                    .expect("an ASCII name"),
            );
            c.get_attr(req).await
        })?)
    }

    fn resolve_path(&self, path: &[u8]) -> FsResult<Inode> {
        inode(self.call("resolve_path", true, |mut c| {
            let req = ResolvePathRequest {
                path: path.to_vec(),
            };
            async move { c.resolve_path(req).await }
        })?)
    }

    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let r = self.call("readdir", true, |mut c| {
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
            .call("list_workers", true, |mut c| async move {
                c.list_workers(ListWorkersRequest {}).await
            })?
            .workers)
    }

    fn block_locations(&self, file_id: u64) -> FsResult<BlockLocationsReply> {
        self.call("block_locations", true, |mut c| async move {
            c.get_block_locations(BlockLocationsRequest { file_id })
                .await
        })
    }

    fn statfs(&self) -> FsResult<StatFsReply> {
        self.call("statfs", true, |mut c| async move {
            c.stat_fs(StatFsRequest {}).await
        })
    }

    fn create(&self, req: CreateRequest) -> FsResult<Inode> {
        let (r, retried) = self.mutate("create", |mut c| {
            let req = req.clone();
            async move { c.create(req).await }
        });
        match r {
            // An earlier try went through before its answer was lost.
            Err(FsError::Exists(_)) if retried => self.lookup(req.parent, &req.name),
            r => inode(r?),
        }
    }

    fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        let (r, retried) = self.mutate("remove", |mut c| {
            let req = RemoveRequest {
                parent,
                name: name.to_vec(),
                directory,
            };
            async move { c.remove(req).await }
        });
        match r {
            Err(FsError::NotFound(_)) if retried => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn rename(&self, req: RenameRequest) -> FsResult<Inode> {
        let (r, retried) = self.mutate("rename", |mut c| {
            let req = req.clone();
            async move { c.rename(req).await }
        });
        match r {
            Err(FsError::NotFound(_)) if retried => self.lookup(req.new_parent, &req.new_name),
            r => inode(r?),
        }
    }

    fn link(&self, req: LinkRequest) -> FsResult<Inode> {
        let (r, retried) = self.mutate("link", |mut c| {
            let req = req.clone();
            async move { c.link(req).await }
        });
        match r {
            // A retry of a link that went through: the name is there.
            Err(FsError::Exists(_)) if retried => {
                let found = self.lookup(req.new_parent, &req.new_name)?;
                match found.id == req.id {
                    true => Ok(found),
                    false => Err(FsError::Exists(
                        String::from_utf8_lossy(&req.new_name).into_owned(),
                    )),
                }
            }
            r => inode(r?),
        }
    }

    fn set_attr(&self, attrs: SetAttributes) -> FsResult<Inode> {
        inode(
            self.mutate("set_attr", |mut c| {
                let req = SetAttrRequest {
                    attributes: Some(attrs),
                };
                async move { c.set_attr(req).await }
            })
            .0?,
        )
    }

    fn refresh(&self, dir: u64) -> FsResult<()> {
        self.call("refresh", false, |mut c| async move {
            c.refresh_directory(RefreshDirectoryRequest { dir_id: dir })
                .await
        })
        .map(|_| ())
    }

    fn sync(&self, id: u64) -> FsResult<()> {
        self.call("sync", false, |mut c| async move {
            c.sync(SyncRequest { id }).await
        })
        .map(|_| ())
    }

    fn commit(&self, content: CommitContent) -> FsResult<Inode> {
        inode(
            self.mutate("commit", |mut c| {
                let req = CommitRequest {
                    content: Some(content),
                };
                async move { c.commit(req).await }
            })
            .0?,
        )
    }
}

impl GrpcMetadataClient {
    /// A write through the leader; the flag says whether it was sent more than once (an
    /// earlier try may have been applied before its answer was lost).
    fn mutate<T, F, Fut>(&self, what: &str, call: F) -> (FsResult<T>, bool)
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let r = self.call(what, false, |c| {
            tries.fetch_add(1, Ordering::Relaxed);
            call(c)
        });
        (r, tries.load(Ordering::Relaxed) > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options with a 100 ms call timeout.
    fn test_options(follower_reads: bool, retry_deadline: Duration) -> ClientOptions {
        ClientOptions {
            cluster_token: String::new(),
            read_consistency: ReadConsistency::Linearizable,
            follower_reads,
            rpc_timeout: Duration::from_millis(100),
            retry_deadline,
            routing_version: None,
        }
    }

    #[test]
    fn reads_go_to_the_member_with_the_fewest_calls_in_flight() {
        let opts = test_options(true, Duration::from_millis(100));
        let addrs: Vec<String> = (1..=3).map(|p| format!("127.0.0.1:{p}")).collect();
        let client = GrpcMetadataClient::connect(0, &addrs, &opts).unwrap();
        let busy = |counts: [usize; 3]| {
            let members = client.members.read().unwrap();
            for (m, n) in members.list.iter().zip(counts) {
                m.outstanding.store(n, Ordering::Relaxed);
            }
        };
        busy([5, 0, 3]);
        assert!((0..6).all(|_| client.least_outstanding() == 1));
        busy([5, 2, 2]);
        let picks: std::collections::HashSet<usize> =
            (0..6).map(|_| client.least_outstanding()).collect();
        assert_eq!(picks, [1, 2].into(), "ties are taken in turn");
        // A member that just failed is passed over, however idle it looks.
        busy([5, 0, 3]);
        client.members.read().unwrap().list[1]
            .passed_over_until
            .store(now_ms() + 1000, Ordering::Relaxed);
        assert!((0..6).all(|_| client.least_outstanding() == 2));
    }

    #[test]
    fn a_member_that_answered_nothing_in_time_is_passed_over_for_longer_than_one_refusing() {
        let opts = test_options(true, Duration::from_secs(5));
        let addrs: Vec<String> = (1..=2).map(|p| format!("127.0.0.1:{p}")).collect();
        let client = GrpcMetadataClient::connect(0, &addrs, &opts).unwrap();
        let passed_over = || -> Vec<u64> {
            let now = now_ms();
            let members = client.members.read().unwrap();
            let until = |m: &Member| m.passed_over_until.load(Ordering::Relaxed);
            members
                .list
                .iter()
                .map(|m| until(m).saturating_sub(now))
                .collect()
        };
        let failing_once = |status: fn() -> tonic::Status| {
            let tries = AtomicUsize::new(0);
            client
                .call("lookup", true, |_| {
                    let first = tries.fetch_add(1, Ordering::Relaxed) == 0;
                    async move {
                        match first {
                            true => Err(status()),
                            false => Ok(tonic::Response::new(())),
                        }
                    }
                })
                .unwrap();
        };
        failing_once(|| tonic::Status::unavailable("connection refused"));
        let refused = passed_over();
        assert!(refused.iter().all(|&ms| ms <= 1000), "{refused:?}");
        assert!(refused.iter().any(|&ms| ms > 0), "{refused:?}");
        // The master's own answer that a proposal timed out there is an answer.
        failing_once(|| tonic::Status::deadline_exceeded("not applied in time"));
        let answered = passed_over();
        assert!(answered.iter().all(|&ms| ms <= 1000), "{answered:?}");
        // What tonic reports when its call timed out.
        failing_once(|| tonic::Status::cancelled("Timeout expired"));
        let silent = passed_over();
        assert!(silent.iter().any(|&ms| ms > 20_000), "{silent:?}");
        let quiet = silent.iter().position(|&ms| ms > 20_000).unwrap();
        // Once the other's refusal is a second old, only the silent one is passed over.
        std::thread::sleep(FAILED_PASS_OVER);
        assert!((0..6).all(|_| client.least_outstanding() != quiet));
    }

    #[test]
    fn after_a_call_found_the_shard_down_the_next_ones_try_once_until_a_master_answers() {
        let opts = test_options(false, Duration::from_millis(300));
        let client = GrpcMetadataClient::connect(0, &["127.0.0.1:1".to_string()], &opts).unwrap();
        let tries_of = |up: bool| {
            let tries = AtomicUsize::new(0);
            let r = client.call("getattr", true, |_| {
                tries.fetch_add(1, Ordering::Relaxed);
                async move {
                    match up {
                        true => Ok(tonic::Response::new(())),
                        false => Err(tonic::Status::unavailable("connection refused")),
                    }
                }
            });
            assert_eq!(r.is_ok(), up);
            tries.into_inner()
        };
        assert!(tries_of(false) > 1, "retried until the deadline");
        assert_eq!(tries_of(false), 1, "the shard is known down: one try");
        assert_eq!(tries_of(true), 1);
        assert!(
            tries_of(false) > 1,
            "back up, then down again: retried again"
        );
    }

    #[test]
    fn a_shard_known_down_does_not_try_again_masters_that_answered_nothing_in_time() {
        let opts = test_options(false, Duration::from_millis(300));
        let addrs: Vec<String> = (1..=3).map(|p| format!("127.0.0.1:{p}")).collect();
        let client = GrpcMetadataClient::connect(0, &addrs, &opts).unwrap();
        let tries_of = |status: fn() -> tonic::Status| {
            let tries = AtomicUsize::new(0);
            let r = client.call("getattr", true, |_| {
                tries.fetch_add(1, Ordering::Relaxed);
                async move { Err::<tonic::Response<()>, _>(status()) }
            });
            assert!(r.is_err());
            tries.into_inner()
        };
        // Every master stopped: each try waits out the call's timeout.
        let stopped = || tonic::Status::cancelled("Timeout expired");
        assert!(tries_of(stopped) >= 3, "each tried until the deadline");
        assert_eq!(tries_of(stopped), 1, "known down and all silent: one try");
        // Refusing masters (fast to fail) are each tried once.
        let refused = || tonic::Status::unavailable("connection refused");
        client.down_at.store(0, Ordering::Relaxed);
        for m in &client.members.read().unwrap().list {
            m.passed_over_until.store(0, Ordering::Relaxed);
            m.silent_until.store(0, Ordering::Relaxed);
        }
        assert!(tries_of(refused) >= 3);
        assert_eq!(tries_of(refused), 3, "known down: each once");
        // One silent, two refusing: the silent one is passed over.
        let silent = |i: usize| client.members.read().unwrap().list[i].silent();
        client.members.read().unwrap().list[0].pass_over(now_ms(), true);
        client.preferred.store(0, Ordering::Relaxed);
        assert_eq!(tries_of(refused), 2);
        assert!(silent(0), "not tried again");
        // A member that names the leader shows the shard up: the leader is asked, even
        // when every member had stayed silent.
        for m in &client.members.read().unwrap().list {
            m.pass_over(now_ms(), true);
        }
        let tries = AtomicUsize::new(0);
        let r = client.call("getattr", false, |_| {
            let first = tries.fetch_add(1, Ordering::Relaxed) == 0;
            async move {
                match first {
                    true => {
                        let mut s = tonic::Status::unavailable("not the leader");
                        s.metadata_mut()
                            .insert(LEADER_METADATA_KEY, "127.0.0.1:2".parse().unwrap());
                        Err(s)
                    }
                    false => Ok(tonic::Response::new(())),
                }
            }
        });
        assert!(r.is_ok());
        assert_eq!(client.down_at.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_call_waits_past_its_deadline_while_the_master_says_it_is_still_listing() {
        let opts = test_options(false, Duration::from_millis(100));
        let client = GrpcMetadataClient::connect(0, &["127.0.0.1:1".to_string()], &opts).unwrap();
        let answers = AtomicUsize::new(0);
        let started = Instant::now();
        let r = client.call("readdir", true, |_| {
            let n = answers.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match n {
                    0..6 => {
                        Err(FsError::Loading("listing /big in the under-storage".into()).into())
                    }
                    _ => Ok(tonic::Response::new(7u32)),
                }
            }
        });
        assert_eq!(r.unwrap(), 7);
        assert!(started.elapsed() > opts.retry_deadline * 2);
        // A master that is down for as long fails the call at the deadline.
        let r = client.call("readdir", true, |_| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<tonic::Response<u32>, _>(tonic::Status::unavailable("down"))
        });
        assert!(matches!(r, Err(FsError::Io(_))), "{r:?}");
    }
}
