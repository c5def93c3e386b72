//! Lazy metadata loading: the first lookup or readdir of a directory lists it in the UFS
//! and proposes the listing as a `LoadDirectory` command. Concurrent requests for the same
//! directory share one listing, and those that come soon after it failed share its error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_common::time::now_ns;
use granary_common::ufs::{ObjectKind, Ufs, UfsObject};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{command, Command, FileKind, Inode, LoadDirectory, UfsEntry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use granary_shard_router::{child_path, Placement};

use crate::command_log::CommandLog;
use crate::list_ahead::{Scans, AHEAD, LOOK_THROUGH};
use crate::mutation_locks::MutationLocks;
use crate::store::NamespaceStore;
use crate::unsettled::Unsettled;

/// Directories listed at once by a recursive load.
const LOAD_CONCURRENCY: usize = 8;
/// Entries per `LoadDirectory` command: a bigger listing is proposed in parts, so no
/// command (and no Raft message, no apply) grows with the directory.
const ENTRIES_PER_COMMAND: usize = 8192;
/// How long a call waits for a directory's listing before it answers that the listing is
/// still running: a directory of millions of entries takes longer to list than a client
/// waits for one call, so the client is told to ask again instead of timing out.
pub(crate) const LOADING_REPORT_AFTER: Duration = Duration::from_secs(1);
/// How long a failed listing's error answers the calls for its directory: a client told
/// that a listing was still running asks again, and gets the error instead of a new
/// listing that may fail the same way as long.
const FAILURE_REPORTED_FOR: Duration = Duration::from_secs(5);

/// Removes a directory's listing from those in flight when dropped.
struct InFlight<'a, L>(&'a MetadataLoader<L>, u64);

impl<L> Drop for InFlight<'_, L> {
    fn drop(&mut self) {
        self.0
            .inflight
            .lock()
            .expect("inflight lock")
            .remove(&self.1);
    }
}

/// A listing in flight: when it started, whether it lists even a fresh directory, and
/// its outcome once it ends.
struct Listing {
    started: Instant,
    forced: bool,
    outcome: watch::Receiver<Option<FsResult<Inode>>>,
}

pub struct MetadataLoader<L> {
    store: Arc<NamespaceStore>,
    log: Arc<L>,
    ufs: HashMap<u32, Arc<dyn Ufs>>,
    inflight: Mutex<HashMap<u64, Listing>>,
    /// By directory: when its last listing failed, and how.
    failed: Mutex<HashMap<u64, (Instant, FsError)>>,
    /// Re-list a loaded directory once its listing is older than this.
    sync_interval: Option<Duration>,
    /// Orders namespace mutations and re-listings on the leader.
    pub(crate) mutations: MutationLocks,
    /// Directories to list again: a mutation there stopped between its UFS change and
    /// its commit.
    pub(crate) unsettled: Unsettled,
    scans: Scans,
    /// Listings ahead of scans in flight, all parents together.
    ahead: Arc<tokio::sync::Semaphore>,
}

/// Counts reported while a tree loads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub directories: u64,
    pub files: u64,
}

pub fn kind_of(k: ObjectKind) -> FileKind {
    match k {
        ObjectKind::File => FileKind::File,
        ObjectKind::Directory => FileKind::Directory,
        ObjectKind::Symlink => FileKind::Symlink,
    }
}

fn entry_of(o: UfsObject) -> UfsEntry {
    UfsEntry {
        kind: kind_of(o.kind) as i32,
        name: o.name,
        size: o.size,
        mtime_ns: o.mtime_ns,
        mode: o.mode,
        symlink_target: o.symlink_target,
        referral: None,
        uid: o.owner.map(|o| o.0),
        gid: o.owner.map(|o| o.1),
    }
}

impl<L: CommandLog> MetadataLoader<L> {
    pub fn new(
        store: Arc<NamespaceStore>,
        log: Arc<L>,
        ufs: HashMap<u32, Arc<dyn Ufs>>,
        sync_interval: Option<Duration>,
    ) -> Self {
        MetadataLoader {
            store,
            log,
            ufs,
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            sync_interval,
            mutations: MutationLocks::default(),
            unsettled: Unsettled::default(),
            scans: Scans::default(),
            ahead: Arc::new(tokio::sync::Semaphore::new(AHEAD)),
        }
    }

    /// Whether `dir` must be listed before it is served: never listed, or listed longer
    /// ago than the sync interval.
    pub fn needs_listing(&self, dir: &Inode) -> bool {
        // Another shard's subtree is never listed here.
        if dir.referral.is_some() {
            return false;
        }
        if !dir.children_loaded {
            return true;
        }
        self.sync_interval
            .is_some_and(|i| now_ns().saturating_sub(dir.listed_at_ns) > i.as_nanos() as i64)
    }

    /// Lists `dir` again even if loaded, picking up changes made in the UFS.
    pub async fn refresh(self: &Arc<Self>, dir: &Inode) -> FsResult<Inode> {
        self.load(dir, true).await
    }

    pub fn store(&self) -> &Arc<NamespaceStore> {
        &self.store
    }

    /// The UFS behind a mount.
    pub fn ufs(&self, mount_id: u32) -> FsResult<Arc<dyn Ufs>> {
        self.ufs
            .get(&mount_id)
            .cloned()
            .ok_or_else(|| FsError::io(format!("no UFS for mount {mount_id}")))
    }

    /// Makes sure `dir`'s children are in the namespace; returns the directory as stored.
    pub async fn ensure_loaded(self: &Arc<Self>, dir: &Inode) -> FsResult<Inode> {
        self.load(dir, false).await
    }

    /// [`Self::ensure_loaded`] for a call a client waits on, which waits for a listing
    /// [`LOADING_REPORT_AFTER`] at most: then a directory listed before is answered as it
    /// was listed, and one never listed with [`FsError::Loading`]. The listing goes on
    /// either way. A `reader`'s first listing that continues a scan of its parent's
    /// subdirectories starts listing the next ones in the background (see
    /// [`crate::list_ahead`]).
    pub async fn loaded_for_call(self: &Arc<Self>, dir: &Inode, reader: bool) -> FsResult<Inode> {
        if !self.needs_listing(dir) {
            return Ok(dir.clone());
        }
        if reader
            && !dir.children_loaded
            && dir.referral.is_none()
            && dir.id != self.store.root_id()
        {
            if let Some(before) = self.scans.continues(dir.parent, &dir.name) {
                let (me, parent, name) = (self.clone(), dir.parent, dir.name.clone());
                tokio::spawn(async move { me.list_ahead(parent, before, name) });
            }
        }
        match tokio::time::timeout(LOADING_REPORT_AFTER, self.load(dir, false)).await {
            Ok(loaded) => loaded,
            Err(_) if dir.children_loaded => self.store.get(dir.id),
            Err(_) => Err(FsError::Loading(format!(
                "listing {} in the under-storage",
                String::from_utf8_lossy(&self.store.path_of(dir.id)?)
            ))),
        }
    }

    /// Starts listing the never-listed subdirectories of `parent` after `name`, in name
    /// order, while background permits last. Unless the reader passed over one since
    /// `before` (its listing there before `name`): a reader sampling some folders would
    /// have every listing ahead wasted.
    fn list_ahead(self: &Arc<Self>, parent: u64, before: Vec<u8>, name: Vec<u8>) {
        let mut after = before;
        let mut looked = 0;
        let mut started = 0;
        'pages: while looked < LOOK_THROUGH {
            let (page, more) = match self.store.list(parent, &after, AHEAD) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(parent, error = %e, "no listing ahead of a scan");
                    break;
                }
            };
            looked += page.len();
            if let Some(last) = page.last() {
                after = last.name.clone();
            }
            for d in page {
                if d.kind != FileKind::Directory as i32
                    || d.children_loaded
                    || d.referral.is_some()
                    || d.name == name
                    || self
                        .inflight
                        .lock()
                        .expect("inflight lock")
                        .contains_key(&d.id)
                {
                    continue;
                }
                if d.name < name {
                    break 'pages;
                }
                let Ok(permit) = self.ahead.clone().try_acquire_owned() else {
                    break 'pages;
                };
                started += 1;
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.load(&d, false).await {
                        tracing::debug!(dir = d.id, error = %e, "listing ahead of a scan failed");
                    }
                    drop(permit);
                });
            }
            if !more {
                break;
            }
        }
        metrics::counter!("granary_master_listings_ahead_total").increment(started);
    }

    /// Lists `dir` on a task of its own, so that a caller that goes away (a client that
    /// stopped waiting) leaves the listing to finish for the next one. A call joins the
    /// listing in flight; a forced one only a forced one that began after it came, else
    /// it waits for that one to end and lists again. Within [`FAILURE_REPORTED_FOR`] of
    /// a failed listing, an unforced call for a directory never listed gets its error (one
    /// listed before is answered as listed by [`Self::loaded_for_call`] meanwhile).
    async fn load(self: &Arc<Self>, dir: &Inode, force: bool) -> FsResult<Inode> {
        if !force && !self.needs_listing(dir) {
            return Ok(dir.clone());
        }
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        let came = Instant::now();
        loop {
            if !force && !dir.children_loaded {
                if let Some(e) = self.failed_lately(dir.id) {
                    return Err(e);
                }
            }
            let (mut outcome, joined) = {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                match inflight.get(&dir.id) {
                    Some(l) => (l.outcome.clone(), !force || l.forced && l.started >= came),
                    None => (self.start_listing(&mut inflight, dir, force), true),
                }
            };
            let ended = outcome
                .wait_for(Option::is_some)
                .await
                .map_err(|_| FsError::io("the listing task ended without an outcome"))?
                .clone()
                .expect("waited for");
            if joined {
                return ended;
            }
        }
    }

    /// Starts listing `dir` (none is in flight: `inflight` says so, and is held).
    fn start_listing(
        self: &Arc<Self>,
        inflight: &mut HashMap<u64, Listing>,
        dir: &Inode,
        force: bool,
    ) -> watch::Receiver<Option<FsResult<Inode>>> {
        let (tell, outcome) = watch::channel(None);
        inflight.insert(
            dir.id,
            Listing {
                started: Instant::now(),
                forced: force,
                outcome: outcome.clone(),
            },
        );
        let (me, dir) = (self.clone(), dir.clone());
        tokio::spawn(async move {
            // Gone before its outcome is told (a call woken by it that lists again finds
            // none in flight), and gone even if the listing panics.
            let in_flight = InFlight(&me, dir.id);
            let result = me.list_now(&dir, force).await;
            {
                let mut failed = me.failed.lock().expect("failed listings lock");
                match &result {
                    Ok(_) => {
                        failed.remove(&dir.id);
                    }
                    Err(e) => {
                        failed.retain(|_, (at, _)| at.elapsed() < FAILURE_REPORTED_FOR);
                        failed.insert(dir.id, (Instant::now(), e.clone()));
                    }
                }
            }
            drop(in_flight);
            let _ = tell.send(Some(result));
        });
        outcome
    }

    /// The error of `dir`'s last listing, if it failed within [`FAILURE_REPORTED_FOR`].
    fn failed_lately(&self, dir: u64) -> Option<FsError> {
        let failed = self.failed.lock().expect("failed listings lock");
        let (at, e) = failed.get(&dir)?;
        (at.elapsed() < FAILURE_REPORTED_FOR).then(|| e.clone())
    }

    async fn list_now(&self, dir: &Inode, force: bool) -> FsResult<Inode> {
        let current = self.store.get(dir.id)?;
        if !force && !self.needs_listing(&current) {
            return Ok(current);
        }
        // Entries of a loaded directory may be changing: list between mutations. A first
        // listing only waits for those alone: a directory rename between its UFS change
        // and its commit (on S3 a copy and delete per object) would have it list the old
        // path halfway moved, or gone, and record that for good.
        let _turn = match current.children_loaded {
            true => self.mutations.alone().await,
            false => self.mutations.shared().await,
        };
        // Moved, or listed, while waiting.
        let current = self.store.get(dir.id)?;
        if !force && !self.needs_listing(&current) {
            return Ok(current);
        }
        let mut attempts = 0;
        loop {
            match self.list_and_record(&current).await {
                // The routing table changed while listing: place the entries again.
                Err(FsError::StaleRouting(_)) if attempts < 3 => attempts += 1,
                r => break r?,
            }
        }
        self.store.get(dir.id)
    }

    /// Lists `dir` in the UFS and records the entries this shard keeps, placed by the
    /// routing table it has now.
    async fn list_and_record(&self, dir: &Inode) -> FsResult<()> {
        let ufs = self.ufs(dir.mount_id)?;
        let path = dir.ufs_path.clone();
        let listed = tokio::task::spawn_blocking(move || ufs.list(&path))
            .await
            .map_err(|e| FsError::io_from(format!("UFS listing task: {e}"), e))??;
        metrics::counter!("granary_master_ufs_listings_total").increment(1);
        let (entries, routing_version) = self.placed(dir, listed)?;
        for part in self.parts(dir, entries, routing_version)? {
            self.log
                .propose(Command {
                    op: Some(command::Op::LoadDirectory(part)),
                })
                .await?;
        }
        Ok(())
    }

    /// The commands that record a listing of `dir`: one, or for a big directory parts of
    /// `ENTRIES_PER_COMMAND` entries, the first naming what the UFS no longer lists (so
    /// that, as within one command, what goes is gone before what is listed is added: a
    /// vanished file takes its hard links along, and an object under one of their names
    /// is then added as a file of its own), the last marking the directory listed.
    fn parts(
        &self,
        dir: &Inode,
        entries: Vec<UfsEntry>,
        routing_version: u64,
    ) -> FsResult<Vec<LoadDirectory>> {
        let listed_at_ns = now_ns();
        if entries.len() <= ENTRIES_PER_COMMAND {
            return Ok(vec![LoadDirectory {
                dir_id: dir.id,
                entries,
                listed_at_ns,
                routing_version,
                ..Default::default()
            }]);
        }
        let listed: std::collections::HashSet<&[u8]> =
            entries.iter().map(|e| e.name.as_slice()).collect();
        let mut removed = Vec::new();
        let mut after = Vec::new();
        loop {
            let (page, more) = self.store.list(dir.id, &after, 4096)?;
            if let Some(last) = page.last() {
                after = last.name.clone();
            }
            removed.extend(
                page.into_iter()
                    .filter(|i| !listed.contains(i.name.as_slice()))
                    .map(|i| i.name),
            );
            if !more {
                break;
            }
        }
        let chunks: Vec<Vec<UfsEntry>> = entries
            .chunks(ENTRIES_PER_COMMAND)
            .map(<[UfsEntry]>::to_vec)
            .collect();
        let last = chunks.len() - 1;
        Ok(chunks
            .into_iter()
            .enumerate()
            .map(|(i, entries)| LoadDirectory {
                dir_id: dir.id,
                entries,
                listed_at_ns,
                partial: i < last,
                explicit_removals: true,
                removed: match i {
                    0 => std::mem::take(&mut removed),
                    _ => Vec::new(),
                },
                routing_version,
            })
            .collect())
    }

    /// The listed entries this shard keeps, by its routing table: its own, and referrals
    /// for prefixes pinned to other shards.
    /// Returns them with the version of the table that placed them.
    fn placed(&self, dir: &Inode, listed: Vec<UfsObject>) -> FsResult<(Vec<UfsEntry>, u64)> {
        let Some(table) = self.store.routing_table()? else {
            return Ok((listed.into_iter().map(entry_of).collect(), 0));
        };
        let path = self.store.path_of(dir.id)?;
        let shard = self.store.shard();
        let entries = listed
            .into_iter()
            .filter_map(|o| {
                let child = child_path(&path, &o.name);
                let placement = table.placement(shard, &child);
                if placement == Placement::Elsewhere {
                    return None;
                }
                let mut e = entry_of(o);
                e.referral = crate::routing::referral(placement, child);
                if e.referral.is_some() {
                    e.kind = FileKind::Directory as i32;
                }
                Some(e)
            })
            .collect();
        Ok((entries, table.version()))
    }

    /// Loads the whole tree under `root`, reporting progress after every directory.
    /// Counts what this shard keeps: not the referrals to other shards' pinned prefixes
    /// (their shards load and count them), nor a directory it keeps only as the way to a
    /// prefix pinned to it, nor the root unless this is shard 0 (every shard has one).
    pub async fn load_tree(
        self: &Arc<Self>,
        root: Inode,
        force: bool,
        progress: mpsc::Sender<LoadProgress>,
    ) -> FsResult<LoadProgress> {
        let mut totals = LoadProgress::default();
        if root.kind != FileKind::Directory as i32 {
            totals.files = 1;
            return Ok(totals);
        }
        let counted = self.counted()?;
        let mut pending = vec![(self.store.path_of(root.id)?, root)];
        let mut running: JoinSet<FsResult<(Vec<u8>, Vec<Inode>)>> = JoinSet::new();
        loop {
            while running.len() < LOAD_CONCURRENCY {
                let Some((path, dir)) = pending.pop() else {
                    break;
                };
                let me = self.clone();
                running.spawn(async move {
                    let dir = me.load(&dir, force).await?;
                    Ok((path, me.children(dir.id)?))
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (path, children) =
                done.map_err(|e| FsError::io_from(format!("load task: {e}"), e))??;
            totals.directories += u64::from(counted(&path));
            for c in children {
                if c.referral.is_some() {
                    continue;
                }
                if c.kind == FileKind::Directory as i32 {
                    pending.push((child_path(&path, &c.name), c));
                } else {
                    totals.files += 1;
                }
            }
            let _ = progress.try_send(totals);
        }
        Ok(totals)
    }

    /// Whether a load counts the directory at a path: this shard keeps it, and the root,
    /// which every shard has, is counted by shard 0 alone.
    fn counted(&self) -> FsResult<impl Fn(&[u8]) -> bool> {
        let table = self.store.routing_table()?;
        let shard = self.store.shard();
        Ok(move |path: &[u8]| match &table {
            None => true,
            Some(_) if path == b"/" => shard == 0,
            Some(t) => t.owner(path) == shard,
        })
    }

    /// Every entry of a loaded directory.
    fn children(&self, dir: u64) -> FsResult<Vec<Inode>> {
        let mut children = Vec::new();
        self.each_page(dir, |page| children.extend(page))?;
        Ok(children)
    }

    /// Hands `f` the entries of a loaded directory, a page at a time.
    fn each_page(&self, dir: u64, mut f: impl FnMut(Vec<Inode>)) -> FsResult<()> {
        let mut after = Vec::new();
        loop {
            let (page, more) = self.store.list(dir, &after, 4096)?;
            if let Some(last) = page.last() {
                after = last.name.clone();
            }
            f(page);
            if !more {
                return Ok(());
            }
        }
    }

    /// What loading the one directory `dir` (not its subdirectories) loaded: it, and the
    /// files in it.
    pub fn count_listed(&self, dir: &Inode) -> FsResult<LoadProgress> {
        if dir.kind != FileKind::Directory as i32 {
            return Ok(LoadProgress {
                directories: 0,
                files: 1,
            });
        }
        let mut files = 0;
        self.each_page(dir.id, |page| {
            files += page
                .iter()
                .filter(|c| c.kind != FileKind::Directory as i32)
                .count() as u64;
        })?;
        let counted = self.counted()?;
        Ok(LoadProgress {
            directories: u64::from(counted(&self.store.path_of(dir.id)?)),
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use granary_common::ufs::LocalUfs;
    use granary_protos::v1::RenameEntry;

    use super::*;
    use crate::state_machine::{apply_batch, tests::mount, LogEntry};

    /// Applies each command as it is proposed, as a one-member group does.
    struct Applied {
        store: Arc<NamespaceStore>,
        next: AtomicU64,
    }

    impl CommandLog for Applied {
        fn propose(&self, cmd: Command) -> impl std::future::Future<Output = FsResult<()>> + Send {
            let index = self.next.fetch_add(1, Ordering::SeqCst);
            let applied = apply_batch(&self.store, &[LogEntry::command(index, 1, cmd)]);
            async move { applied?.remove(0) }
        }
    }

    type Loader = Arc<MetadataLoader<Applied>>;

    /// A loader over the local directory `data`, its root listed; the log applies at once.
    async fn loader_over(data: &std::path::Path) -> (Loader, Arc<Applied>, Inode) {
        loader_syncing(data, None).await
    }

    /// [`loader_over`] with loaded directories listed again after `sync_interval`.
    async fn loader_syncing(
        data: &std::path::Path,
        sync_interval: Option<Duration>,
    ) -> (Loader, Arc<Applied>, Inode) {
        let store = Arc::new(NamespaceStore::open(&data.with_extension("redb"), 0).unwrap());
        let log = Arc::new(Applied {
            store: store.clone(),
            next: AtomicU64::new(1),
        });
        log.propose(mount()).await.unwrap();
        let ufs: Arc<dyn Ufs> =
            Arc::new(LocalUfs::open("file:///data", data.to_str().unwrap()).unwrap());
        let loader = Arc::new(MetadataLoader::new(
            store.clone(),
            log.clone(),
            HashMap::from([(1, ufs)]),
            sync_interval,
        ));
        let root = loader
            .ensure_loaded(&store.get(store.root_id()).unwrap())
            .await
            .unwrap();
        (loader, log, root)
    }

    #[tokio::test]
    async fn a_first_listing_waits_for_a_directory_rename_between_its_ufs_change_and_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("d")).unwrap();
        for f in ["f1", "f2"] {
            std::fs::write(data.join("d").join(f), b"x").unwrap();
        }
        let (loader, log, root) = loader_over(&data).await;
        let d = loader.store.lookup(root.id, b"d").unwrap().unwrap();
        assert!(!d.children_loaded);

        // A rename of `d` to `e` that made its UFS change and has not committed yet.
        let rename = loader.mutations.alone().await;
        std::fs::rename(data.join("d"), data.join("e")).unwrap();
        let listing = tokio::spawn({
            let loader = loader.clone();
            async move { loader.ensure_loaded(&d).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!listing.is_finished(), "listed in the middle of the rename");
        log.propose(Command {
            op: Some(command::Op::RenameEntry(RenameEntry {
                parent: root.id,
                name: b"d".to_vec(),
                new_parent: root.id,
                new_name: b"e".to_vec(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        drop(rename);
        let e = listing.await.unwrap().unwrap();
        let names: Vec<Vec<u8>> = loader
            .children(e.id)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, [b"f1".to_vec(), b"f2".to_vec()]);
    }

    /// Waits (10 s at most) until `dir` was listed at or after `since_ns`.
    async fn listed_since(loader: &Loader, dir: u64, since_ns: i64) {
        let listed = async {
            loop {
                let d = loader.store.get(dir).unwrap();
                if d.children_loaded && d.listed_at_ns >= since_ns {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), listed)
            .await
            .expect("the listing went on after its caller had its answer");
    }

    #[tokio::test]
    async fn a_listing_longer_than_a_call_is_reported_as_loading_and_goes_on_without_its_caller() {
        let (_tmp, data, loader, big) = loader_with_big().await;
        std::fs::write(data.join("big/f1"), b"x").unwrap();

        // A first listing waits for a directory rename between its UFS change and its
        // commit: this one holds the listing up for longer than a call waits.
        let rename = loader.mutations.alone().await;
        let since = now_ns();
        let answer = loader.loaded_for_call(&big, true).await;
        assert!(
            matches!(&answer, Err(FsError::Loading(m)) if m.contains("/big")),
            "{answer:?}"
        );
        drop(rename);
        listed_since(&loader, big.id, since).await;
        let big = loader.loaded_for_call(&big, true).await.unwrap();
        assert_eq!(loader.children(big.id).unwrap().len(), 1);
    }

    /// A loader over a UFS with one empty directory, `big`, not listed yet.
    async fn loader_with_big() -> (tempfile::TempDir, std::path::PathBuf, Loader, Inode) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("big")).unwrap();
        let (loader, _log, root) = loader_over(&data).await;
        let big = loader.store.lookup(root.id, b"big").unwrap().unwrap();
        (tmp, data, loader, big)
    }

    #[tokio::test]
    async fn calls_for_a_held_listing_share_it_and_leave_no_task_behind_them() {
        let (_tmp, _data, loader, big) = loader_with_big().await;
        // A listing held up (as by a stalled UFS) and clients that stop waiting for it.
        let rename = loader.mutations.alone().await;
        // The root's listing task ends just after its outcome is told.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tasks = tokio::runtime::Handle::current().metrics();
        let before = tasks.num_alive_tasks();
        for _ in 0..50 {
            let call = loader.ensure_loaded(&big);
            assert!(tokio::time::timeout(Duration::from_millis(5), call)
                .await
                .is_err());
        }
        assert_eq!(tasks.num_alive_tasks(), before + 1, "the one listing");
        let since = now_ns();
        drop(rename);
        listed_since(&loader, big.id, since).await;
    }

    #[tokio::test]
    async fn a_listing_that_failed_without_its_caller_answers_the_next_calls_with_its_error() {
        let (_tmp, data, loader, big) = loader_with_big().await;
        let rename = loader.mutations.alone().await;
        let answer = loader.loaded_for_call(&big, true).await;
        assert!(matches!(answer, Err(FsError::Loading(_))), "{answer:?}");
        // The UFS fails the listing once it runs.
        std::fs::remove_dir(data.join("big")).unwrap();
        drop(rename);
        let failed = async {
            while loader.failed_lately(big.id).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), failed)
            .await
            .expect("the listing failed");
        // Back in the UFS: a new listing would succeed, but the next call is told why the
        // last one failed.
        std::fs::create_dir_all(data.join("big")).unwrap();
        let answer = loader.loaded_for_call(&big, true).await;
        assert!(
            matches!(&answer, Err(e) if !matches!(e, FsError::Loading(_))),
            "{answer:?}"
        );
        // An explicit refresh lists again, and clears the failure.
        loader.refresh(&big).await.unwrap();
        assert!(loader.loaded_for_call(&big, true).await.is_ok());
    }

    #[tokio::test]
    async fn a_directory_listed_before_is_answered_as_listed_while_a_long_new_listing_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("d")).unwrap();
        std::fs::write(data.join("d/f1"), b"x").unwrap();
        let (loader, _log, root) = loader_syncing(&data, Some(Duration::from_millis(1))).await;
        let d = loader.store.lookup(root.id, b"d").unwrap().unwrap();
        let d = loader.loaded_for_call(&d, false).await.unwrap();
        std::fs::write(data.join("d/f2"), b"x").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;

        // Listing a loaded directory again waits for mutations in flight.
        let mutation = loader.mutations.shared().await;
        let since = now_ns();
        let answer = loader.loaded_for_call(&d, false).await.unwrap();
        assert_eq!(
            loader.children(answer.id).unwrap().len(),
            1,
            "as listed before"
        );
        drop(mutation);
        listed_since(&loader, d.id, since).await;
        assert_eq!(loader.children(d.id).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_reader_listing_folders_in_order_has_the_next_listed_ahead_and_one_sampling_them_not()
    {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        for d in 0..20 {
            std::fs::create_dir_all(data.join(format!("c{d:02}"))).unwrap();
        }
        let (loader, _log, root) = loader_over(&data).await;
        let folder = |d: usize| {
            let name = format!("c{d:02}");
            loader
                .store
                .lookup(root.id, name.as_bytes())
                .unwrap()
                .unwrap()
        };
        let listed = |range: std::ops::Range<usize>| range.map(|d| folder(d).children_loaded);
        for d in [0, 5] {
            loader.loaded_for_call(&folder(d), true).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(listed(6..20).all(|l| !l), "c01..=c04 were passed over");
        loader.loaded_for_call(&folder(6), true).await.unwrap();
        let ahead = async {
            while !listed(7..15).all(|l| l) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ahead)
            .await
            .expect("c07..=c14 listed ahead of c06");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(listed(15..20).all(|l| !l), "{AHEAD} ahead at most");
    }
}
