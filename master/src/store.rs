//! The namespace store: redb tables for inodes, directory entries and state-machine
//! metadata. Reads are served straight from committed state; writes happen in
//! [`NamespaceStore::write`] transactions, which only the state machine opens (it
//! applies a run of log entries and records the last applied index in the same one).

use std::path::Path;

use granary_common::ids::{inode_id, root_inode, shard_of};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{Inode, MasterSet, MountTable};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};

use crate::tables::{ChildView, InodeView, MetaView, View};

pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
/// Key: parent id (big-endian) followed by the child's name; value: child id.
pub(crate) const CHILDREN: TableDefinition<&[u8], u64> = TableDefinition::new("children");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const META_APPLIED_INDEX: &str = "applied_index";
pub(crate) const META_NEXT_LOCAL_ID: &str = "next_local_id";
pub(crate) const META_INODE_COUNT: &str = "inode_count";
pub(crate) const META_MOUNTS: &str = "mount_table";
pub(crate) const META_SHARD: &str = "shard_id";
pub(crate) const META_APPLIED_TERM: &str = "applied_term";
/// raft-rs `ConfState` as of the applied index (opaque bytes here).
pub(crate) const META_CONF_STATE: &str = "conf_state";
/// The master set (ids and addresses) as of the applied index.
pub(crate) const META_MASTERS: &str = "masters";
/// Set once directories' subdirectory counts are kept (stores made before hard links
/// and link counts have none: they are counted once, at open or at a snapshot's install).
const META_SUBDIRS_COUNTED: &str = "subdirs_counted";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Redb(#[from] redb::Error),
    #[error("metadata store belongs to shard {found}, config says shard {configured}")]
    ShardMismatch { found: u16, configured: u16 },
    #[error("corrupt metadata store: {0}")]
    Corrupt(String),
    #[error("{0} is in use by another running master (one data_dir per master process)")]
    InUse(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// The page cache a store file gets unless configured: redb keeps what does not fit on
/// disk, so memory does not grow with the namespace.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// Opens (or creates) a redb file with a page cache of `cache_bytes`, naming the file when
/// another process holds it.
pub(crate) fn open_db(path: &Path, cache_bytes: u64) -> Result<Database, StoreError> {
    redb::Builder::new()
        .set_cache_size(cache_bytes as usize)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::InUse(path.display().to_string())
            }
            other => StoreError::Redb(other.into()),
        })
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        FsError::io_from(e.to_string(), e)
    }
}

macro_rules! redb_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Redb(e.into()))
    };
}
pub(crate) use redb_err;

/// `inode` as the entry (`parent`, `name`) shows it: a hard link answers with its own
/// name (the stored record carries the primary one).
fn as_named(mut inode: Inode, parent: u64, name: &[u8]) -> Inode {
    if inode.parent != parent || inode.name != name {
        inode.parent = parent;
        inode.name = name.to_vec();
    }
    inode
}

pub(crate) fn child_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

pub(crate) fn meta_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, StoreError> {
    match redb_err!(table.get(key))? {
        Some(v) => decode_u64(key, v.value()),
        None => Ok(0),
    }
}

/// A counter's stored bytes.
pub(crate) fn decode_u64(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("meta key {key}")))
}

/// The tables as one state-machine pass sees them (see [`crate::tables`]): what the
/// state machine changes.
pub(crate) struct Tables<'t> {
    pub inodes: InodeView<'t>,
    pub children: ChildView<'t>,
    pub meta: MetaView<'t>,
    pub shard: u16,
    /// The changes will be dropped: work that cannot change the answer (rewriting
    /// descendants' paths) may be skipped.
    pub dry_run: bool,
}

impl Tables<'_> {
    pub(crate) fn get(&self, id: u64) -> Result<Option<Inode>, StoreError> {
        self.inodes.get(id)
    }

    pub(crate) fn put(&mut self, inode: &Inode) -> Result<(), StoreError> {
        self.inodes.insert(inode.id, &inode.encode_to_vec())
    }

    pub(crate) fn set_u64(&mut self, key: &str, v: u64) -> Result<(), StoreError> {
        self.meta.insert(key, &v.to_be_bytes())
    }
}

pub struct NamespaceStore {
    db: Database,
    /// The store's file: a snapshot being pulled is staged beside it.
    path: std::path::PathBuf,
    shard: u16,
    /// The applied routing table's version (0: none), for checks on every request.
    routing_version: std::sync::atomic::AtomicU64,
    /// Views held for members pulling a snapshot.
    held: crate::snapshots::HeldSnapshots,
}

impl std::fmt::Debug for NamespaceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceStore")
            .field("shard", &self.shard)
            .finish()
    }
}

impl NamespaceStore {
    pub fn open(path: &Path, shard: u16) -> Result<Self, StoreError> {
        Self::open_with_cache(path, shard, DEFAULT_CACHE_BYTES)
    }

    /// [`NamespaceStore::open`] with a page cache of `cache_bytes` (`store_cache`).
    pub fn open_with_cache(path: &Path, shard: u16, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_db(path, cache_bytes)?;
        let txn = redb_err!(db.begin_write())?;
        {
            let mut meta = redb_err!(txn.open_table(META))?;
            let mut inodes = redb_err!(txn.open_table(INODES))?;
            let children = redb_err!(txn.open_table(CHILDREN))?;
            count_subdirs_once(&mut inodes, &children, &mut meta)?;
            let existing = redb_err!(meta.get(META_SHARD))?.map(|v| v.value().to_vec());
            match existing {
                Some(v) => {
                    let found = u16::from_be_bytes(
                        v.try_into()
                            .map_err(|_| StoreError::Corrupt("shard id".into()))?,
                    );
                    if found != shard {
                        return Err(StoreError::ShardMismatch {
                            found,
                            configured: shard,
                        });
                    }
                }
                None => {
                    redb_err!(meta.insert(META_SHARD, &shard.to_be_bytes()[..]))?;
                }
            }
        }
        redb_err!(txn.commit())?;
        let store = NamespaceStore {
            db,
            path: path.to_path_buf(),
            shard,
            routing_version: Default::default(),
            held: Default::default(),
        };
        store.reload_routing_version()?;
        Ok(store)
    }

    /// Where a snapshot being pulled is written until it is installed.
    pub(crate) fn staging_path(&self) -> std::path::PathBuf {
        self.path.with_extension("snapshot-pull")
    }

    /// The version of the routing table this shard works by (0: none yet).
    pub fn routing_version(&self) -> u64 {
        self.routing_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the applied routing table's version again (after applying or restoring one).
    pub(crate) fn reload_routing_version(&self) -> Result<(), StoreError> {
        let version = self.routing_table()?.map_or(0, |t| t.version());
        self.routing_version
            .store(version, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    pub(crate) fn held_snapshots(&self) -> &crate::snapshots::HeldSnapshots {
        &self.held
    }

    pub fn root_id(&self) -> u64 {
        root_inode(self.shard)
    }

    /// Makes every applied batch durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let txn = redb_err!(self.db.begin_write())?;
        redb_err!(txn.commit())?;
        Ok(())
    }

    /// Runs `f` in a write transaction committed without an fsync (the Raft log is
    /// durable and replays it; see [`NamespaceStore::sync`]).
    pub(crate) fn write<R>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut txn = redb_err!(self.db.begin_write())?;
        redb_err!(txn.set_durability(redb::Durability::None))?;
        let out = {
            let mut tables = Tables {
                inodes: View::Write(redb_err!(txn.open_table(INODES))?),
                children: View::Write(redb_err!(txn.open_table(CHILDREN))?),
                meta: View::Write(redb_err!(txn.open_table(META))?),
                shard: self.shard,
                dry_run: false,
            };
            f(&mut tables)?
        };
        redb_err!(txn.commit())?;
        Ok(out)
    }

    /// Runs `f` over the committed state, its changes kept in memory and dropped.
    pub(crate) fn dry_run<R>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        let mut tables = Tables {
            inodes: View::Dry(redb_err!(txn.open_table(INODES))?, Default::default()),
            children: View::Dry(redb_err!(txn.open_table(CHILDREN))?, Default::default()),
            meta: View::Dry(redb_err!(txn.open_table(META))?, Default::default()),
            shard: self.shard,
            dry_run: true,
        };
        f(&mut tables)
    }

    /// (index, term) of the last applied entry.
    pub fn applied(&self) -> Result<(u64, u64), StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        let meta = redb_err!(txn.open_table(META))?;
        Ok((
            meta_u64(&meta, META_APPLIED_INDEX)?,
            meta_u64(&meta, META_APPLIED_TERM)?,
        ))
    }

    pub(crate) fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        let meta = redb_err!(txn.open_table(META))?;
        let found = redb_err!(meta.get(key))?;
        Ok(found.map(|v| v.value().to_vec()))
    }

    /// The raft `ConfState` (encoded) as of the applied index, if any was applied.
    pub fn conf_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta_bytes(META_CONF_STATE)
    }

    /// The master set as of the applied index.
    pub fn masters(&self) -> Result<MasterSet, StoreError> {
        match self.meta_bytes(META_MASTERS)? {
            Some(b) => MasterSet::decode(b.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("master set: {e}"))),
            None => Ok(MasterSet::default()),
        }
    }

    pub fn inode_count(&self) -> Result<u64, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        meta_u64(&redb_err!(txn.open_table(META))?, META_INODE_COUNT)
    }

    pub fn mount_table(&self) -> Result<MountTable, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        let meta = redb_err!(txn.open_table(META))?;
        let found = redb_err!(meta.get(META_MOUNTS))?;
        match found {
            Some(v) => MountTable::decode(v.value())
                .map_err(|e| StoreError::Corrupt(format!("mount table: {e}"))),
            None => Ok(MountTable::default()),
        }
    }

    pub fn get(&self, id: u64) -> FsResult<Inode> {
        if shard_of(id) != self.shard {
            return Err(FsError::NotFound(format!(
                "inode {id:#x} belongs to shard {}",
                shard_of(id)
            )));
        }
        let txn = redb_err!(self.db.begin_read())?;
        let inodes = redb_err!(txn.open_table(INODES))?;
        let found = redb_err!(inodes.get(id))?;
        match found {
            Some(v) => Ok(decode_inode(v.value())?),
            None => Err(FsError::NotFound(format!("inode {id:#x}"))),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Option<Inode>> {
        let txn = redb_err!(self.db.begin_read())?;
        let children = redb_err!(txn.open_table(CHILDREN))?;
        let child = redb_err!(children.get(child_key(parent, name).as_slice()))?.map(|v| v.value());
        let Some(child) = child else { return Ok(None) };
        let inodes = redb_err!(txn.open_table(INODES))?;
        let found = redb_err!(inodes.get(child))?;
        match found {
            Some(v) => Ok(Some(as_named(decode_inode(v.value())?, parent, name))),
            None => Err(StoreError::Corrupt(format!("dangling entry to {child:#x}")).into()),
        }
    }

    /// Children of `parent` in name order, after `start_after` (exclusive), at most
    /// `limit`; the flag says whether more remain.
    pub fn list(
        &self,
        parent: u64,
        start_after: &[u8],
        limit: usize,
    ) -> FsResult<(Vec<Inode>, bool)> {
        let txn = redb_err!(self.db.begin_read())?;
        let children = redb_err!(txn.open_table(CHILDREN))?;
        let inodes = redb_err!(txn.open_table(INODES))?;
        let mut lower = child_key(parent, start_after);
        if !start_after.is_empty() {
            lower.push(0);
        }
        let upper = (parent + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in redb_err!(children.range(lower.as_slice()..&upper[..]))? {
            let (key, id) = redb_err!(item)?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let found = redb_err!(inodes.get(id.value()))?;
            let v = found.ok_or_else(|| {
                StoreError::Corrupt(format!("dangling entry to {:#x}", id.value()))
            })?;
            let name = &key.value()[8..];
            out.push(as_named(decode_inode(v.value())?, parent, name));
        }
        Ok((out, false))
    }

    /// Next inode id the state machine would assign (tests use it to check determinism).
    pub fn next_id_hint(&self) -> Result<u64, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        Ok(inode_id(
            self.shard,
            meta_u64(&redb_err!(txn.open_table(META))?, META_NEXT_LOCAL_ID)?,
        ))
    }
}

/// Counts every directory's subdirectories, once per store (see `META_SUBDIRS_COUNTED`).
/// The count is a function of the tree, so replicas that count at different points agree
/// from then on.
pub(crate) fn count_subdirs_once(
    inodes: &mut Table<'_, u64, &'static [u8]>,
    children: &Table<'_, &'static [u8], u64>,
    meta: &mut Table<'_, &'static str, &'static [u8]>,
) -> Result<(), StoreError> {
    if redb_err!(meta.get(META_SUBDIRS_COUNTED))?.is_some() {
        return Ok(());
    }
    let mut counts: std::collections::BTreeMap<u64, u64> = Default::default();
    for item in redb_err!(children.iter())? {
        let (key, id) = redb_err!(item)?;
        let Some(child) = redb_err!(inodes.get(id.value()))? else {
            continue;
        };
        if decode_inode(child.value())?.kind == granary_protos::v1::FileKind::Directory as i32 {
            let parent = u64::from_be_bytes(key.value()[..8].try_into().expect("8-byte prefix"));
            *counts.entry(parent).or_default() += 1;
        }
    }
    for (dir, n) in counts {
        let Some(record) = redb_err!(inodes.get(dir))?.map(|v| v.value().to_vec()) else {
            continue;
        };
        let mut d = decode_inode(&record)?;
        d.subdirs = n;
        redb_err!(inodes.insert(dir, d.encode_to_vec().as_slice()))?;
    }
    redb_err!(meta.insert(META_SUBDIRS_COUNTED, &[1u8][..]))?;
    Ok(())
}

pub(crate) fn decode_inode(bytes: &[u8]) -> Result<Inode, StoreError> {
    Inode::decode(bytes).map_err(|e| StoreError::Corrupt(format!("inode record: {e}")))
}
