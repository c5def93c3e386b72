//! One namespace over many shards: [`ShardedMetadata`] is a [`MetadataService`] that
//! sends each call to the shard that owns it, by a cached routing table. Inode ids carry
//! their shard, so calls about an inode go straight there; only names at the root (and
//! the root's listing, merged from every shard) need the table. An entry that is a
//! referral to another shard's pinned prefix is replaced by that shard's directory.
//! The table is fetched again every few seconds, and at once when a master says a call
//! was routed by an older version.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use granary_common::auth::AttachToken;
use granary_common::ids::{root_inode, shard_of};
use granary_common::{FsError, FsResult};
use granary_meta_client::{ClientOptions, GrpcMetadataClient, MetadataService};
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{
    BlockLocationsReply, CommitContent, CreateRequest, GetRoutingTableRequest, Inode, LinkRequest,
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
const REROUTES: usize = 6;

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
    root_pages: RootPages,
}

/// A page's entries, and whether the root has more.
type Page = (Vec<Inode>, bool);

/// Shards' roots as they were last listed, so that a shard that is down leaves its
/// top-level entries in the root listing (calls under them fail, not `ls /`). Kept by
/// name, not by page: the merged listing asks each shard from wherever the other shards'
/// names took it, which moves whenever the root changes.
#[derive(Default)]
struct RootPages {
    names: Mutex<HashMap<u16, BTreeMap<Vec<u8>, Inode>>>,
    /// When each shard last failed a root listing: for a while after, its remembered
    /// names are used without asking it (each try waits out the retry deadline).
    failed: Mutex<HashMap<u16, Instant>>,
}

/// Remembered top-level names of one shard at most.
const ROOT_NAMES_KEPT: usize = 200_000;
/// How long a shard that failed a root listing is not asked for one again.
const ROOT_FAILURE_REMEMBERED: Duration = Duration::from_secs(30);

impl RootPages {
    /// `page` of `shard`'s root, listed from after `after`: the names it covers are
    /// those from `after` to its last (to the end, if the root has no more).
    fn remember(&self, shard: u16, after: &[u8], page: &Page) {
        self.failed
            .lock()
            .expect("root failures lock")
            .remove(&shard);
        let mut names = self.names.lock().expect("root pages lock");
        let known = names.entry(shard).or_default();
        let covered_to = match page {
            (entries, true) => match entries.last() {
                Some(last) => Bound::Included(last.name.as_slice()),
                None => return,
            },
            (_, false) => Bound::Unbounded,
        };
        let gone: Vec<Vec<u8>> = known
            .range::<[u8], _>((Bound::Excluded(after), covered_to))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            known.remove(&name);
        }
        if known.len() + page.0.len() > ROOT_NAMES_KEPT {
            tracing::warn!(shard, "shard {shard}'s root has more than {ROOT_NAMES_KEPT} names: while it is down, the root lists only those listed since");
            known.clear();
        }
        known.extend(page.0.iter().map(|e| (e.name.clone(), e.clone())));
    }

    /// Up to `limit` names of `shard`'s root after `after` as last listed; `None` if it
    /// was never listed.
    fn remembered(&self, shard: u16, after: &[u8], limit: u32) -> Option<Page> {
        let names = self.names.lock().expect("root pages lock");
        let mut from = names
            .get(&shard)?
            .range::<[u8], _>((Bound::Excluded(after), Bound::Unbounded))
            .map(|(_, e)| e.clone());
        let page: Vec<Inode> = from.by_ref().take(limit as usize).collect();
        Some((page, from.next().is_some()))
    }

    /// Whether `shard` failed a root listing lately.
    fn down(&self, shard: u16) -> bool {
        self.failed
            .lock()
            .expect("root failures lock")
            .get(&shard)
            .is_some_and(|at| at.elapsed() < ROOT_FAILURE_REMEMBERED)
    }

    fn failed(&self, shard: u16) {
        self.failed
            .lock()
            .expect("root failures lock")
            .insert(shard, Instant::now());
    }
}

impl Drop for ShardedMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Fetches the table from the first of `sources` that answers.
pub fn fetch_table(sources: &[String], token: &str) -> FsResult<RoutingTable> {
    fetch_table_at_least(sources, token, 0)
}

/// Fetches the table from the first of `sources` that has version `min` or newer, else
/// the newest any of them has.
fn fetch_table_at_least(sources: &[String], token: &str, min: u64) -> FsResult<RoutingTable> {
    let token = AttachToken::new(token).map_err(FsError::InvalidArgument)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FsError::io(format!("routing runtime: {e}")))?;
    let mut last = FsError::Unavailable("no routing table source configured".into());
    let mut newest: Option<RoutingTable> = None;
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
            RoutingTable::new(p).map_err(|e| FsError::io(format!("routing table from {addr}: {e}")))
        }) {
            Ok(t) if t.version() >= min => return Ok(t),
            Ok(t) => {
                if newest.as_ref().is_none_or(|n| n.version() < t.version()) {
                    newest = Some(t);
                }
            }
            Err(e) => {
                tracing::debug!(source = %addr, error = %e, "cannot fetch the routing table");
                last = e;
            }
        }
    }
    newest.ok_or(last)
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
            root_pages: RootPages::default(),
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
        self.refresh_table_to(0)
    }

    /// [`Self::refresh_table`], wanting version `min` at least: routers that have not
    /// caught up yet (they refresh every few seconds) are passed over for shard 0's
    /// masters, which keep the table.
    fn refresh_table_to(&self, min: u64) -> FsResult<()> {
        let token = &self.opts.cluster_token;
        let table = match fetch_table_at_least(&self.sources, token, min) {
            Ok(t) if t.version() >= min => t,
            routers => {
                let shard0 = self.table().masters(0).unwrap_or_default().to_vec();
                match (fetch_table_at_least(&shard0, token, min), routers) {
                    (Ok(a), Ok(b)) => std::cmp::max_by_key(a, b, |t| t.version()),
                    (Ok(t), Err(_)) | (Err(_), Ok(t)) => t,
                    (Err(_), Err(e)) => return Err(e),
                }
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

    /// Refuses a rename or removal of a top-level pinned prefix before it is routed
    /// (its shard would move it, or the rename would go across shards: `EXDEV`, and `mv`
    /// would copy it away); a deeper one is refused by its shard, which knows its path.
    fn check_not_pinned(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let path = child_path(b"/", name);
        if parent == ROOT && self.table().is_pinned(&path) {
            return Err(FsError::Busy(format!(
                "{} is a pinned prefix",
                String::from_utf8_lossy(&path)
            )));
        }
        Ok(())
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
    /// by an older one, or when the table changed while it ran: a call routed by the old
    /// table but sent with the new version passes the master's check and can fail as if
    /// the path were wrong.
    fn routed<T>(&self, mut op: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        let mut tries = 0;
        loop {
            let routed_by = self.version.load(Ordering::Relaxed);
            match op() {
                Err(FsError::NotFound(_) | FsError::CrossDevice(_) | FsError::Busy(_))
                    if tries < REROUTES && self.version.load(Ordering::Relaxed) != routed_by =>
                {
                    tries += 1;
                }
                Err(FsError::StaleRouting(version)) if tries < REROUTES => {
                    tracing::info!(version, "routing table changed; fetching it");
                    if tries > 0 {
                        // Nobody asked had it yet (a member applying it late).
                        std::thread::sleep(Duration::from_millis(50 << tries));
                    }
                    tries += 1;
                    self.refresh_table_to(version)?;
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
                .map_err(|_| FsError::io(format!("referral to shard {}", r.shard)))?;
            let target = self.shard(shard)?;
            inode = match target.resolve_path(&r.path) {
                // The pinned shard listed the prefix's parent before the prefix appeared
                // in the UFS: it lists it again.
                Err(FsError::NotFound(_)) => relisted(&target, &r.path)?,
                found => found?,
            };
        }
        Err(FsError::io(format!(
            "{}: more than {MAX_REFERRALS} referrals",
            String::from_utf8_lossy(&inode.name)
        )))
    }

    /// The root's listing: every shard's root, each entry taken from the shard that owns
    /// it (a shard also keeps the directories above prefixes pinned to it).
    fn root_page(&self, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let table = self.table();
        let mut after = start_after.to_vec();
        loop {
            let mut pages = Vec::new();
            for &shard in table.shard_ids() {
                let (page, more) = self.shard_root_page(shard, &after, limit)?;
                pages.push((shard, page, more));
            }
            match merge_root_pages(&table, pages, limit) {
                RootPage::Page(page, more) => return Ok((page, more)),
                RootPage::From(name) => after = name,
            }
        }
    }
}

impl ShardedMetadata {
    /// A page of `shard`'s root; as last listed if the shard cannot answer now.
    fn shard_root_page(
        &self,
        shard: u16,
        after: &[u8],
        limit: u32,
    ) -> FsResult<(Vec<Inode>, bool)> {
        if self.root_pages.down(shard) {
            if let Some(page) = self.root_pages.remembered(shard, after, limit) {
                return Ok(page);
            }
        }
        match self.shard(shard)?.readdir(root_inode(shard), after, limit) {
            Ok(page) => {
                self.root_pages.remember(shard, after, &page);
                Ok(page)
            }
            Err(e @ (FsError::Io(_) | FsError::Unavailable(_) | FsError::TimedOut(_))) => {
                self.root_pages.failed(shard);
                match self.root_pages.remembered(shard, after, limit) {
                    Some(page) => {
                        tracing::warn!(shard, error = %e, "shard {shard} is unavailable: its top-level entries are listed as last seen");
                        Ok(page)
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// One merged page of the root listing, or where to go on listing from when the shards'
/// pages held nothing the page may show.
#[derive(Debug, PartialEq)]
enum RootPage {
    Page(Vec<Inode>, bool),
    From(Vec<u8>),
}

/// Merges the shards' pages of their roots (each from the same name on): each entry from
/// the shard that owns it. A shard that has more may hold names below another shard's
/// last, so the page ends at the lowest name such a shard reached and the next page
/// misses nothing.
fn merge_root_pages(
    table: &RoutingTable,
    pages: Vec<(u16, Vec<Inode>, bool)>,
    limit: u32,
) -> RootPage {
    let mut merged = BTreeMap::new();
    let mut more = false;
    let mut reached: Option<Vec<u8>> = None;
    for (shard, page, has_more) in pages {
        if has_more {
            more = true;
            if let Some(last) = page.last() {
                if reached.as_ref().is_none_or(|r| last.name < *r) {
                    reached = Some(last.name.clone());
                }
            }
        }
        for e in page {
            if table.owner(&child_path(b"/", &e.name)) == shard {
                merged.insert(e.name.clone(), e);
            }
        }
    }
    if let Some(r) = reached {
        merged.retain(|name, _| *name <= r);
        if merged.is_empty() {
            return RootPage::From(r);
        }
    }
    more |= merged.len() > limit as usize;
    RootPage::Page(merged.into_values().take(limit as usize).collect(), more)
}

/// `path` on `shard`'s masters after they list its parent directory again.
fn relisted(shard: &GrpcMetadataClient, path: &[u8]) -> FsResult<Inode> {
    let parent = match path.iter().rposition(|&b| b == b'/') {
        Some(0) | None => b"/".as_slice(),
        Some(i) => &path[..i],
    };
    let dir = shard.resolve_path(parent)?;
    shard.refresh(dir.id)?;
    shard.resolve_path(path)
}

impl MetadataService for ShardedMetadata {
    fn pins(&self) -> granary_meta_client::Pins {
        let table = self.table();
        let pins = table
            .pins()
            .iter()
            .map(|p| (p.prefix.clone(), p.shard as u16))
            .collect();
        (table.version(), pins)
    }

    fn owner(&self, path: &[u8]) -> Option<u16> {
        Some(self.table().owner(path))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.routed(|| {
            let (shard, parent) = self.place(parent, name);
            self.followed(self.shard(shard)?.lookup(parent, name)?)
        })
    }

    fn getattr(&self, id: u64) -> FsResult<Inode> {
        self.shard(shard_of(id))?.getattr(id)
    }

    fn getattr_latest(&self, id: u64) -> FsResult<Inode> {
        self.shard(shard_of(id))?.getattr_latest(id)
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
            let mut followed = Vec::with_capacity(page.len());
            for e in page {
                match self.followed(e.clone()) {
                    Ok(i) => followed.push(i),
                    // A referral its shard cannot resolve hides that entry, not the rest.
                    Err(err @ FsError::NotFound(_)) => {
                        tracing::warn!(name = %String::from_utf8_lossy(&e.name), referral = ?e.referral, error = %err, "a pinned prefix is missing on its shard; not listed");
                    }
                    Err(err) => return Err(err),
                }
            }
            Ok((followed, more))
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
            self.check_not_pinned(parent, name)?;
            let (shard, parent) = self.place(parent, name);
            self.shard(shard)?.remove(parent, name, directory)
        })
    }

    fn rename(&self, req: RenameRequest) -> FsResult<Inode> {
        self.routed(|| {
            self.check_not_pinned(req.parent, &req.name)?;
            self.check_not_pinned(req.new_parent, &req.new_name)?;
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

    fn link(&self, req: LinkRequest) -> FsResult<Inode> {
        self.routed(|| {
            let (to, new_parent) = self.place(req.new_parent, &req.new_name);
            let from = shard_of(req.id);
            if from != to {
                return Err(FsError::CrossDevice(format!(
                    "{} is on shard {from}, the new name on shard {to}",
                    String::from_utf8_lossy(&req.new_name)
                )));
            }
            self.shard(to)?.link(LinkRequest {
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

    fn sync(&self, id: u64) -> FsResult<()> {
        self.shard(shard_of(id))?.sync(id)
    }

    fn commit(&self, content: CommitContent) -> FsResult<Inode> {
        self.shard(shard_of(content.id))?.commit(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_protos::v1::{RoutingTable as TableProto, ShardInfo};

    fn entry(name: &str) -> Inode {
        Inode {
            name: name.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn names(page: &[Inode]) -> Vec<String> {
        page.iter()
            .map(|i| String::from_utf8_lossy(&i.name).into_owned())
            .collect()
    }

    #[test]
    fn the_root_page_ends_where_a_truncated_shard_did() {
        let table = RoutingTable::new(TableProto {
            version: 1,
            shards: (0..2)
                .map(|id| ShardInfo {
                    id,
                    masters: vec![format!("m{id}:1")],
                })
                .collect(),
            pins: Vec::new(),
        })
        .unwrap();
        let owned_by = |shard: u16, n: usize| -> Vec<Inode> {
            (0..1000)
                .map(|i| format!("n{i:04}"))
                .filter(|name| table.owner(format!("/{name}").as_bytes()) == shard)
                .take(n)
                .map(|name| entry(&name))
                .collect()
        };
        // Shard 0 stopped early (it has more); shard 1 gave all it has.
        let zero = owned_by(0, 3);
        let one = owned_by(1, 50);
        let reached = zero.last().unwrap().name.clone();
        let RootPage::Page(page, more) = merge_root_pages(
            &table,
            vec![(0, zero.clone(), true), (1, one.clone(), false)],
            100,
        ) else {
            panic!("a page was expected");
        };
        assert!(more);
        assert!(page.iter().all(|e| e.name <= reached), "{:?}", names(&page));
        let want: Vec<_> = zero
            .iter()
            .chain(one.iter().filter(|e| e.name <= reached))
            .map(|e| e.name.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            page.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
            want
        );

        // A truncated page of names that all belong elsewhere: list on from its last.
        let foreign = owned_by(1, 2);
        assert_eq!(
            merge_root_pages(
                &table,
                vec![(0, foreign.clone(), true), (1, Vec::new(), false)],
                100
            ),
            RootPage::From(foreign.last().unwrap().name.clone())
        );
    }

    #[test]
    fn a_down_shards_root_is_listed_as_last_seen_from_any_name() {
        let pages = RootPages::default();
        let list = |names: &[&str]| names.iter().map(|n| entry(n)).collect::<Vec<_>>();
        assert!(pages.remembered(1, b"", 10).is_none(), "never listed");
        // Listed in two pages, from names the other shards' entries made the cursor.
        pages.remember(1, b"", &(list(&["a", "c", "e"]), true));
        pages.remember(1, b"e", &(list(&["g", "i"]), false));
        // Asked from a cursor no listing used (the root changed since).
        let (page, more) = pages.remembered(1, b"d", 2).unwrap();
        assert_eq!((names(&page), more), (vec!["e".into(), "g".into()], true));
        let (page, more) = pages.remembered(1, b"f", 10).unwrap();
        assert_eq!((names(&page), more), (vec!["g".into(), "i".into()], false));
        // Listed again: a name gone from the range a page covers is forgotten.
        pages.remember(1, b"b", &(list(&["c", "d"]), true));
        pages.remember(1, b"d", &(list(&["i"]), false));
        let (page, more) = pages.remembered(1, b"", 10).unwrap();
        assert_eq!(names(&page), ["a", "c", "d", "i"]);
        assert!(!more);
        assert!(pages.remembered(0, b"", 10).is_none(), "kept by shard");
    }
}
