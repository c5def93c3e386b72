//! Filesystem semantics independent of the kernel interface: lookups and attributes
//! through a metadata cache, directory streams, open handles, reads, and writes staged
//! per inode then stored in the UFS through a worker and committed through the leader on
//! flush, fsync or the last close (close-to-open consistency). The FUSE adapter only
//! translates types; tests drive this type directly.
//!
//! `namespace` holds the operations on names and attributes, `read` opening and reading,
//! `write` creating, writing and committing; this file the state they share.

mod meta_cache;
mod namespace;
mod read;
mod unopened;
pub use read::changes_file;
mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use granary_common::{FsError, FsResult};
use granary_protos::v1::{FileKind, Inode, StatFsReply, UfsFingerprint};

use crate::block_reader::{BlockRead, ReadState};
use crate::content_store::ContentStore;
use crate::staging::{SharedStaged, StagingArea};
use granary_meta_client::MetadataService;
use meta_cache::MetaCache;

#[derive(Debug, Clone)]
pub struct FsOptions {
    pub meta_cache_ttl: Duration,
    pub meta_cache_entries: u64,
    /// Refuse every change (EROFS).
    pub read_only: bool,
}

struct OpenFile {
    ino: u64,
    /// The mount's commit count when this handle last checked its version.
    seen_commits: AtomicU64,
    /// The committed version reads go to, with the read state that belongs to it.
    read: Mutex<(Inode, ReadState)>,
    /// Open for writing: the inode's shared staged file.
    staged: Option<SharedStaged>,
}

/// Attribute changes asked for by setattr; `None` leaves a field alone.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

struct DirStream {
    dir: Inode,
    /// Entries listed so far, and whether their attributes were known (see
    /// [`DirEntry::attrs_current`]).
    entries: Vec<(Inode, bool)>,
    complete: bool,
}

/// The metadata cache's key of entry `name` in directory `parent`. Every shard has a
/// root, and a top-level entry's inode names its own shard's as its parent; the kernel
/// knows one root (shard 0's, the FUSE root).
fn entry_key(parent: u64, name: &[u8]) -> (u64, Vec<u8>) {
    let parent = match granary_common::ids::local_of(parent) {
        granary_common::ids::ROOT_LOCAL_ID => granary_common::ids::root_inode(0),
        _ => parent,
    };
    (parent, name.to_vec())
}

/// One entry of a directory stream. `offset` is what the kernel passes back to continue
/// after this entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub inode: Inode,
    pub name: Vec<u8>,
    pub offset: u64,
    /// False for a file whose commit was in progress when it was listed: its attributes
    /// are as committed before, and the kernel must not keep them (the listing does not
    /// wait for a commit, which waits on the UFS).
    pub attrs_current: bool,
}

pub struct GranaryFs {
    meta: Arc<dyn MetadataService>,
    reader: Arc<dyn BlockRead>,
    store: Arc<dyn ContentStore>,
    attrs: MetaCache<u64, Inode>,
    entries: MetaCache<(u64, Vec<u8>), u64>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_handle: AtomicU64,
    staging: StagingArea,
    read_only: bool,
    /// The content version of each inode when it was last opened here: the kernel may
    /// keep its page cache across opens only while that has not changed.
    opened_versions: MetaCache<u64, UfsFingerprint>,
    /// Each directory's times, listing time and subdirectory count when it was last
    /// opened here: the kernel may keep its cached listing only while they have not moved.
    listed_versions: MetaCache<u64, (i64, i64, i64, u64)>,
    /// Content commits made through this mount; an open handle looks for a newer version
    /// of its file only when this moved.
    commits: AtomicU64,
    unopened: unopened::UnopenedReads,
    /// The pins last seen, and moved prefixes whose entries are still to drop
    /// ([`Self::moved_prefixes`]).
    pins: Mutex<(granary_meta_client::Pins, Vec<Vec<u8>>)>,
}

/// What a read found of its file's UFS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundChanged {
    Unchanged,
    /// Changed, and at least as long as before.
    Changed,
    /// Changed, and shorter than before.
    Shrunk,
}

thread_local! {
    /// Set by a read that found its file changed in the UFS, for the thread that replies
    /// to that read ([`GranaryFs::take_changed`]).
    static FOUND_CHANGED: std::cell::Cell<FoundChanged> =
        const { std::cell::Cell::new(FoundChanged::Unchanged) };
}

fn is_dir(i: &Inode) -> bool {
    i.kind == FileKind::Directory as i32
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl GranaryFs {
    pub fn new(
        meta: Arc<dyn MetadataService>,
        reader: Arc<dyn BlockRead>,
        store: Arc<dyn ContentStore>,
        opts: FsOptions,
    ) -> Self {
        let pins = meta.pins();
        GranaryFs {
            meta,
            reader,
            store,
            attrs: MetaCache::new(opts.meta_cache_entries, Some(opts.meta_cache_ttl)),
            entries: MetaCache::new(opts.meta_cache_entries, Some(opts.meta_cache_ttl)),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            staging: StagingArea::default(),
            read_only: opts.read_only,
            opened_versions: MetaCache::new(opts.meta_cache_entries, None),
            listed_versions: MetaCache::new(opts.meta_cache_entries, None),
            commits: AtomicU64::new(0),
            unopened: Default::default(),
            pins: Mutex::new((pins, Vec::new())),
        }
    }

    /// The entries (parent inode, name) of prefixes that moved to another shard since
    /// the mount started (pinned or unpinned, or top-level names hashed elsewhere once a
    /// shard was added), dropped from this mount's caches: the kernel must drop them too,
    /// or it would go on showing the old shard's directory (emptied by the move) until its
    /// entry cache expired. A prefix whose parent cannot be looked up now is tried again
    /// at the next call.
    pub fn moved_prefixes(&self) -> Vec<(u64, Vec<u8>)> {
        let now = self.meta.pins();
        let mut moved = Vec::new();
        let todo = {
            let mut guard = self.pins.lock().expect("pins lock");
            let (seen, pending) = &mut *guard;
            if now.0 != seen.0 {
                moved = self.rehomed_top_level();
                let (old, new) = (&seen.1, &now.1);
                pending.extend(
                    new.iter()
                        .filter(|p| !old.contains(p))
                        .chain(old.iter().filter(|p| !new.iter().any(|n| n.0 == p.0)))
                        .map(|(prefix, _)| prefix.clone()),
                );
                *seen = now;
            }
            std::mem::take(pending)
        };
        let mut retry = Vec::new();
        for prefix in todo {
            let Some(cut) = prefix.iter().rposition(|&b| b == b'/') else {
                continue;
            };
            let name = prefix[cut + 1..].to_vec();
            match self.resolve(&prefix[..cut]) {
                Ok(parent) => {
                    self.forget_entry(parent, &name);
                    moved.push((parent, name));
                }
                // A master out of reach for now: tried again at the next call.
                Err(
                    FsError::Unavailable(_)
                    | FsError::TimedOut(_)
                    | FsError::Io(_)
                    | FsError::StaleRouting(_),
                ) => retry.push(prefix),
                // Its parent is gone or is no directory: nothing of it is cached.
                Err(_) => {}
            }
        }
        self.pins.lock().expect("pins lock").1.extend(retry);
        moved
    }

    /// The top-level entries this mount caches whose inode is of a shard that no longer
    /// owns the name, forgotten: a shard added (or one gone) places names anew.
    fn rehomed_top_level(&self) -> Vec<(u64, Vec<u8>)> {
        let root = granary_common::ids::root_inode(0);
        let moved = self.entries.matching(|(parent, name), &id| {
            let mut path = b"/".to_vec();
            path.extend_from_slice(name);
            *parent == root
                && self
                    .meta
                    .owner(&path)
                    .is_some_and(|owner| owner != granary_common::ids::shard_of(id))
        });
        moved
            .into_iter()
            .map(|((parent, name), _)| {
                self.forget_entry(parent, &name);
                (parent, name)
            })
            .collect()
    }

    /// The inode of a namespace path, looked up from the root component by component.
    fn resolve(&self, path: &[u8]) -> FsResult<u64> {
        let mut at = granary_common::ids::root_inode(0);
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            at = self.lookup(at, part)?.id;
        }
        Ok(at)
    }

    /// Whether the last read on this thread found its file changed in the UFS (and
    /// forgets it): the kernel must drop its attributes of that file.
    pub fn take_changed() -> FoundChanged {
        FOUND_CHANGED.with(|c| c.replace(FoundChanged::Unchanged))
    }

    fn mark_changed(found: FoundChanged) {
        FOUND_CHANGED.with(|c| c.set(found));
    }

    /// The inode as this mount sees it: a file being written here has its staged size.
    fn overlay(&self, mut inode: Inode) -> Inode {
        if let Some(st) = self.staging.get(inode.id) {
            st.lock().show(&mut inode);
        }
        inode
    }

    /// [`Self::overlay`] without waiting, and whether it is current: while a commit
    /// holds the file's staged state, the inode as this mount showed it before that
    /// commit began (its size is the one being committed, but its other attributes
    /// change when the commit lands).
    fn overlay_now(&self, mut inode: Inode) -> (Inode, bool) {
        if let Some(st) = self.staging.get(inode.id) {
            match st.try_lock() {
                Some(st) => st.show(&mut inode),
                None => {
                    st.show_last(&mut inode);
                    return (inode, false);
                }
            }
        }
        (inode, true)
    }

    /// [`Self::overlay`] of the committed inode, read under the staged file's lock: a
    /// commit that empties the staged file (its content is the UFS object now) holds that
    /// lock until it has remembered what it committed, so the size seen is never the one
    /// from before it.
    fn current(&self, ino: u64) -> FsResult<Inode> {
        let Some(st) = self.staging.get(ino) else {
            return self.committed(ino);
        };
        let st = st.lock();
        let mut inode = self.committed(ino)?;
        st.show(&mut inode);
        Ok(inode)
    }

    /// [`Self::current`] when the cache holds the inode and no commit holds its staged
    /// file: what a FUSE reader thread may answer without waiting.
    fn cached(&self, ino: u64) -> Option<Inode> {
        let st = self.staging.get(ino);
        let st = match &st {
            Some(st) => Some(st.try_lock()?),
            None => None,
        };
        let mut inode = self.attrs.get(&ino)?;
        if let Some(st) = st {
            st.show(&mut inode);
        }
        Some(inode)
    }

    fn writable(&self) -> FsResult<()> {
        if self.read_only {
            return Err(FsError::ReadOnly("this Granary mount is read-only".into()));
        }
        Ok(())
    }

    /// A directory's entries changed here: its cached mtime and ctime move to now, as
    /// the master moved them (by its clock), without asking it again — the kernel
    /// re-reads a changed directory's attributes after every create or remove.
    fn dir_changed(&self, dir: u64) {
        if let Some(mut d) = self.attrs.get(&dir) {
            let now = granary_common::time::now_ns();
            d.mtime_ns = now;
            d.ctime_ns = now;
            self.attrs.insert(dir, d);
        }
    }

    /// Directory `dir` gained (`delta` > 0) or lost subdirectories here: its cached link
    /// count follows, as the master's did.
    fn subdirs_changed(&self, dir: u64, delta: i64) {
        if let Some(mut d) = self.attrs.get(&dir) {
            d.subdirs = d.subdirs.saturating_add_signed(delta);
            self.attrs.insert(dir, d);
        }
    }

    fn forget_entry(&self, parent: u64, name: &[u8]) {
        self.dir_changed(parent);
        if let Some(id) = self.entries.get(&entry_key(parent, name)) {
            self.attrs.invalidate(&id);
        }
        self.entries.invalidate(&entry_key(parent, name));
    }

    fn remember(&self, inode: &Inode) {
        self.attrs.insert(inode.id, inode.clone());
        if inode.id != inode.parent {
            self.entries
                .insert(entry_key(inode.parent, &inode.name), inode.id);
        }
    }

    /// The inode as the namespace holds it (through the metadata cache).
    fn committed(&self, ino: u64) -> FsResult<Inode> {
        if let Some(i) = self.attrs.get(&ino) {
            return Ok(i);
        }
        let inode = self.meta.getattr(ino)?;
        self.attrs.insert(ino, inode.clone());
        Ok(inode)
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn add_handle(&self, ino: u64, inode: Inode, staged: Option<SharedStaged>) -> u64 {
        let fh = self.handle();
        let file = Arc::new(OpenFile {
            ino,
            seen_commits: AtomicU64::new(self.commits.load(Ordering::Acquire)),
            read: Mutex::new((inode, ReadState::default())),
            staged,
        });
        self.files.write().expect("files lock").insert(fh, file);
        fh
    }

    fn open_file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.files
            .read()
            .expect("files lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::BadHandle(format!("unknown file handle {fh}")))
    }

    /// A file open here whose last name is gone (the namespace no longer has it): how
    /// its descriptors see it, for fstat(2). Its link count is 0.
    pub fn open_unlinked(&self, ino: u64) -> Option<Inode> {
        Some(self.overlay(self.opened_inode(ino)?))
    }

    /// [`Self::committed`], or, for a file whose last name went while a descriptor here
    /// has it open, the inode as its descriptors know it (they still write, truncate and
    /// read it).
    fn committed_or_opened(&self, ino: u64) -> FsResult<Inode> {
        match self.committed(ino) {
            Err(FsError::NotFound(why)) => self.opened_inode(ino).ok_or(FsError::NotFound(why)),
            other => other,
        }
    }

    /// The inode as a descriptor open here knows it. Takes no staged file's lock, so a
    /// writer holding one may ask.
    fn opened_inode(&self, ino: u64) -> Option<Inode> {
        let file = self
            .files
            .read()
            .expect("files lock")
            .values()
            .find(|f| f.ino == ino)
            .cloned()?;
        let inode = file.read.lock().expect("read state lock").0.clone();
        Some(inode)
    }

    pub fn statfs(&self) -> FsResult<StatFsReply> {
        self.meta.statfs()
    }
}

#[cfg(test)]
mod doubles;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod write_tests;
