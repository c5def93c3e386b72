//! One namespace over many shards: [`ShardedMetadata`] is a [`MetadataService`] that
//! sends each call to the shard that owns it, by a cached routing table. Inode ids carry
//! their shard, so calls about an inode go straight there; only names at the root (and
//! the root's listing, merged from every shard) need the table. An entry that is a
//! referral to another shard's pinned prefix is replaced by that shard's directory.
//! The table is fetched again every few seconds, and at once when a master says a call
//! was routed by an older version.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_common::ids::{root_inode, shard_of};
use granary_common::{FsError, FsResult};
use granary_meta_client::{ClientOptions, GrpcMetadataClient, MetadataService};
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{
    BlockLocationsReply, CommitContent, CreateRequest, GetRoutingTableRequest, Inode,
    RenameRequest, RoutingTable as TableProto, SetAttributes, StatFsReply, WorkerInfo,
};

use crate::{child_path, RoutingTable};

/// The FUSE root: every shard's root, merged.
pub const ROOT: u64 = 1;
/// How often the table is fetched again.
const TABLE_REFRESH: Duration = Duration::from_secs(3);
/// Referrals followed for one entry (a pin below a pin).
const MAX_REFERRALS: usize = 8;
/// Times a call is routed again after a master said the table changed.
const REROUTES: usize = 3;

struct Routes {
    table: RoutingTable,
    shards: HashMap<u16, Arc<GrpcMetadataClient>>,
}

pub struct ShardedMetadata {
    /// Where the table comes from: routers or shard 0's masters.
    sources: Vec<String>,
    opts: ClientOptions,
    routes: RwLock<Routes>,
    /// The version calls are routed by; every shard client sends it along.
    version: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for ShardedMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Fetches the table from the first of `sources` that answers.
pub fn fetch_table(sources: &[String], token: &str) -> FsResult<RoutingTable> {
    let token = AttachToken::new(token).map_err(FsError::InvalidArgument)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FsError::Io(format!("routing runtime: {e}")))?;
    let mut last = FsError::Unavailable("no routing table source configured".into());
    for addr in sources {
        let fetched: FsResult<TableProto> = rt.block_on(async {
            let channel = granary_common::net::lazy_channel(
                addr,
                Duration::from_secs(1),
                Duration::from_secs(5),
            )
            .map_err(|e| FsError::InvalidArgument(format!("routing source `{addr}`: {e}")))?;
            Ok(RoutingClient::with_interceptor(channel, token.clone())
                .get_routing_table(GetRoutingTableRequest {})
                .await?
                .into_inner())
        });
        match fetched.and_then(|p| {
            RoutingTable::new(p).map_err(|e| FsError::Io(format!("routing table from {addr}: {e}")))
        }) {
            Ok(t) => return Ok(t),
            Err(e) => {
                tracing::debug!(source = %addr, error = %e, "cannot fetch the routing table");
                last = e;
            }
        }
    }
    Err(last)
}

impl ShardedMetadata {
    /// Fetches the table from `sources` and connects to every shard it lists.
    pub fn connect(sources: &[String], opts: &ClientOptions) -> FsResult<Arc<Self>> {
        let table = fetch_table(sources, &opts.cluster_token)?;
        let version = Arc::new(AtomicU64::new(0));
        let opts = ClientOptions {
            routing_version: Some(version.clone()),
            ..opts.clone()
        };
        let me = Arc::new(ShardedMetadata {
            sources: sources.to_vec(),
            opts,
            routes: RwLock::new(Routes {
                table: RoutingTable::single(sources.to_vec()),
                shards: HashMap::new(),
            }),
            version,
            stop: Arc::new(AtomicBool::new(false)),
        });
        me.install(table)?;
        me.start_refresher();
        Ok(me)
    }

    /// The table calls are routed by.
    pub fn table(&self) -> RoutingTable {
        self.routes.read().expect("routes lock").table.clone()
    }

    /// Adopts `table` if it is newer (or the first): clients for shards it adds.
    fn install(&self, table: RoutingTable) -> FsResult<()> {
        let mut routes = self.routes.write().expect("routes lock");
        if !routes.shards.is_empty() && table.version() <= routes.table.version() {
            return Ok(());
        }
        for info in table.shards() {
            let id = info.id as u16;
            if let std::collections::hash_map::Entry::Vacant(slot) = routes.shards.entry(id) {
                slot.insert(GrpcMetadataClient::connect(id, &info.masters, &self.opts)?);
            }
        }
        if routes.table.version() != table.version() {
            tracing::info!(
                version = table.version(),
                shards = table.shards().len(),
                "routing by a new table"
            );
        }
        self.version.store(table.version(), Ordering::Relaxed);
        routes.table = table;
        Ok(())
    }

    /// Fetches the table now and adopts it if newer. When the configured sources (routers)
    /// do not answer, shard 0's masters, which keep the table, are asked.
    pub fn refresh_table(&self) -> FsResult<()> {
        let table = match fetch_table(&self.sources, &self.opts.cluster_token) {
            Ok(t) => t,
            Err(e) => {
                let shard0 = self.table().masters(0).unwrap_or_default().to_vec();
                fetch_table(&shard0, &self.opts.cluster_token).map_err(|_| e)?
            }
        };
        self.install(table)
    }

    fn start_refresher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("granary-routing".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TABLE_REFRESH);
                    let Some(me) = weak.upgrade() else { return };
                    if let Err(e) = me.refresh_table() {
                        tracing::debug!(error = %e, "routing table refresh failed");
                    }
                }
            })
            .expect("spawn the routing table refresher");
    }

    fn shard(&self, id: u16) -> FsResult<Arc<GrpcMetadataClient>> {
        self.routes
            .read()
            .expect("routes lock")
            .shards
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::Unavailable(format!("shard {id} is not in the routing table")))
    }

    /// The shard and its own id for directory `parent`: the root's entries belong to
    /// the shard their path routes to, found there under that shard's root.
    fn place(&self, parent: u64, name: &[u8]) -> (u16, u64) {
        if parent == ROOT {
            let shard = self.table().owner(&child_path(b"/", name));
            (shard, root_inode(shard))
        } else {
            (shard_of(parent), parent)
        }
    }

    /// Runs `op`, routing it again (with a fresh table) when a master says it was routed
    /// by an older one.
    fn routed<T>(&self, mut op: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        let mut tries = 0;
        loop {
            match op() {
                Err(FsError::StaleRouting(version)) if tries < REROUTES => {
                    tries += 1;
                    tracing::info!(version, "routing table changed; fetching it");
                    self.refresh_table()?;
                }
                other => return other,
            }
        }
    }

    /// `inode`, or where it refers to when it is a referral.
    fn followed(&self, mut inode: Inode) -> FsResult<Inode> {
        for _ in 0..MAX_REFERRALS {
            let Some(r) = inode.referral.take() else {
                return Ok(inode);
            };
            let shard = u16::try_from(r.shard)
                .map_err(|_| FsError::Io(format!("referral to shard {}", r.shard)))?;
            inode = self.shard(shard)?.resolve_path(&r.path)?;
        }
        Err(FsError::Io(format!(
            "{}: more than {MAX_REFERRALS} referrals",
            String::from_utf8_lossy(&inode.name)
        )))
    }

    /// The root's listing: every shard's root, each entry taken from the shard that owns
    /// it (a shard also keeps the directories above prefixes pinned to it).
    fn root_page(&self, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let table = self.table();
        let mut merged = BTreeMap::new();
        let mut more = false;
        for &shard in table.shard_ids() {
            let (page, has_more) =
                self.shard(shard)?
                    .readdir(root_inode(shard), start_after, limit)?;
            more |= has_more;
            for e in page {
                if table.owner(&child_path(b"/", &e.name)) == shard {
                    merged.insert(e.name.clone(), e);
                }
            }
        }
        more |= merged.len() > limit as usize;
        Ok((merged.into_values().take(limit as usize).collect(), more))
    }
}

impl MetadataService for ShardedMetadata {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.routed(|| {
            let (shard, parent) = self.place(parent, name);
            self.followed(self.shard(shard)?.lookup(parent, name)?)
        })
    }

    fn getattr(&self, id: u64) -> FsResult<Inode> {
        self.shard(shard_of(id))?.getattr(id)
    }

    fn resolve_path(&self, path: &[u8]) -> FsResult<Inode> {
        self.routed(|| {
            let owner = match path {
                b"/" | b"" => 0,
                p => self.table().owner(p),
            };
            self.followed(self.shard(owner)?.resolve_path(path)?)
        })
    }

    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        self.routed(|| {
            if id == ROOT && self.table().shard_ids().len() > 1 {
                return self.root_page(start_after, limit);
            }
            let (page, more) = self.shard(shard_of(id))?.readdir(id, start_after, limit)?;
            let page = page
                .into_iter()
                .map(|e| self.followed(e))
                .collect::<FsResult<Vec<_>>>()?;
            Ok((page, more))
        })
    }

    fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
        let mut all: BTreeMap<String, WorkerInfo> = BTreeMap::new();
        for &shard in self.table().shard_ids() {
            for w in self.shard(shard)?.workers()? {
                all.entry(w.worker_id.clone()).or_insert(w);
            }
        }
        Ok(all.into_values().collect())
    }

    fn workers_of(&self, shard: u16) -> FsResult<Vec<WorkerInfo>> {
        self.shard(shard)?.workers()
    }

    fn block_locations(&self, file_id: u64) -> FsResult<BlockLocationsReply> {
        self.shard(shard_of(file_id))?.block_locations(file_id)
    }

    fn statfs(&self) -> FsResult<StatFsReply> {
        let mut total = StatFsReply::default();
        for &shard in self.table().shard_ids() {
            let s = self.shard(shard)?.statfs()?;
            total.inodes += s.inodes;
            total.block_size = s.block_size;
            // Workers serve every shard: their capacity is counted once.
            if total.capacity_bytes == 0 {
                total.capacity_bytes = s.capacity_bytes;
                total.used_bytes = s.used_bytes;
            }
        }
        Ok(total)
    }

    fn create(&self, req: CreateRequest) -> FsResult<Inode> {
        self.routed(|| {
            let (shard, parent) = self.place(req.parent, &req.name);
            self.shard(shard)?.create(CreateRequest {
                parent,
                ..req.clone()
            })
        })
    }

    fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        self.routed(|| {
            let (shard, parent) = self.place(parent, name);
            self.shard(shard)?.remove(parent, name, directory)
        })
    }

    fn rename(&self, req: RenameRequest) -> FsResult<Inode> {
        self.routed(|| {
            let (from, parent) = self.place(req.parent, &req.name);
            let (to, new_parent) = self.place(req.new_parent, &req.new_name);
            if from != to {
                return Err(FsError::CrossDevice(format!(
                    "{} (shard {from}) and {} (shard {to}) are on different shards",
                    String::from_utf8_lossy(&req.name),
                    String::from_utf8_lossy(&req.new_name)
                )));
            }
            self.shard(from)?.rename(RenameRequest {
                parent,
                new_parent,
                ..req.clone()
            })
        })
    }

    fn set_attr(&self, attrs: SetAttributes) -> FsResult<Inode> {
        self.shard(shard_of(attrs.id))?.set_attr(attrs)
    }

    fn refresh(&self, dir: u64) -> FsResult<()> {
        self.shard(shard_of(dir))?.refresh(dir)
    }

    fn commit(&self, content: CommitContent) -> FsResult<Inode> {
        self.shard(shard_of(content.id))?.commit(content)
    }
}
