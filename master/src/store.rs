//! The namespace store: redb tables for inodes, directory entries and state-machine
//! metadata. Reads are served straight from committed state; writes only happen through
//! [`NamespaceStore::apply_batch`], which applies a run of log entries and records the
//! last applied index in the same transaction.

use std::path::Path;

use granary_common::ids::{inode_id, root_inode, shard_of};
use granary_common::{FsError, FsResult};
use granary_protos::raft::{KeyValue, NamespaceSnapshot};
use granary_protos::v1::{Command, Inode, MasterSet, MountTable};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::state_machine;

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
}

/// Opens (or creates) a redb file, naming it when another process holds it.
pub(crate) fn open_db(path: &Path) -> Result<Database, StoreError> {
    Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.display().to_string()),
        other => StoreError::Redb(other.into()),
    })
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        FsError::Io(e.to_string())
    }
}

macro_rules! redb_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Redb(e.into()))
    };
}
pub(crate) use redb_err;

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
        Some(v) => {
            let b: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("meta key {key}")))?;
            Ok(u64::from_be_bytes(b))
        }
        None => Ok(0),
    }
}

/// One committed log entry as the state machine sees it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub index: u64,
    pub term: u64,
    pub op: EntryOp,
}

#[derive(Debug, Clone)]
pub enum EntryOp {
    Command(Command),
    /// An entry with no command (a new leader's first entry).
    Noop,
    /// A membership change, already applied to raft: the resulting configuration.
    ConfChange {
        conf_state: Vec<u8>,
        masters: MasterSet,
    },
}

impl LogEntry {
    pub fn command(index: u64, term: u64, cmd: Command) -> Self {
        LogEntry {
            index,
            term,
            op: EntryOp::Command(cmd),
        }
    }
}

pub struct NamespaceStore {
    db: Database,
    shard: u16,
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
        let db = open_db(path)?;
        let txn = redb_err!(db.begin_write())?;
        {
            let mut meta = redb_err!(txn.open_table(META))?;
            redb_err!(txn.open_table(INODES))?;
            redb_err!(txn.open_table(CHILDREN))?;
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
        Ok(NamespaceStore { db, shard })
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    pub fn root_id(&self) -> u64 {
        root_inode(self.shard)
    }

    /// Applies log entries in one transaction and records the last one's index and term as
    /// applied. Entries at or below the applied index are skipped (replay after restart).
    /// Each entry gets its own result; a command that fails still consumes its index, so
    /// every replica agrees.
    ///
    /// The transaction is not synced: the Raft log is durable and replaying it is
    /// idempotent, so the applied state may lag on disk by what [`NamespaceStore::sync`]
    /// has not flushed yet (the log is never compacted past a synced index).
    pub fn apply_batch(&self, entries: &[LogEntry]) -> Result<Vec<FsResult<()>>, StoreError> {
        let mut txn = redb_err!(self.db.begin_write())?;
        redb_err!(txn.set_durability(redb::Durability::None))?;
        let mut results = Vec::with_capacity(entries.len());
        {
            let mut tables = state_machine::Tables {
                inodes: redb_err!(txn.open_table(INODES))?,
                children: redb_err!(txn.open_table(CHILDREN))?,
                meta: redb_err!(txn.open_table(META))?,
                shard: self.shard,
            };
            let mut applied = meta_u64(&tables.meta, META_APPLIED_INDEX)?;
            let mut applied_term = meta_u64(&tables.meta, META_APPLIED_TERM)?;
            for e in entries {
                if e.index <= applied {
                    results.push(Ok(()));
                    continue;
                }
                results.push(match &e.op {
                    EntryOp::Command(cmd) => state_machine::apply(&mut tables, cmd)?,
                    EntryOp::Noop => Ok(()),
                    EntryOp::ConfChange {
                        conf_state,
                        masters,
                    } => {
                        redb_err!(tables.meta.insert(META_CONF_STATE, conf_state.as_slice()))?;
                        redb_err!(tables
                            .meta
                            .insert(META_MASTERS, masters.encode_to_vec().as_slice()))?;
                        Ok(())
                    }
                });
                applied = e.index;
                applied_term = e.term;
            }
            redb_err!(tables
                .meta
                .insert(META_APPLIED_INDEX, &applied.to_be_bytes()[..]))?;
            redb_err!(tables
                .meta
                .insert(META_APPLIED_TERM, &applied_term.to_be_bytes()[..]))?;
        }
        redb_err!(txn.commit())?;
        Ok(results)
    }

    /// Makes every applied batch durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let txn = redb_err!(self.db.begin_write())?;
        redb_err!(txn.commit())?;
        Ok(())
    }

    /// What applying `cmd` now would answer, without changing anything: the transaction
    /// is dropped. The leader checks a mutation this way before touching the UFS, so the
    /// rules live only in the state machine.
    pub fn dry_run(&self, cmd: &Command) -> Result<FsResult<()>, StoreError> {
        let txn = redb_err!(self.db.begin_write())?;
        let result = {
            let mut tables = state_machine::Tables {
                inodes: redb_err!(txn.open_table(INODES))?,
                children: redb_err!(txn.open_table(CHILDREN))?,
                meta: redb_err!(txn.open_table(META))?,
                shard: self.shard,
            };
            state_machine::apply(&mut tables, cmd)?
        };
        redb_err!(txn.abort())?;
        Ok(result)
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

    fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
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

    /// A full copy of the state machine (Raft snapshot data).
    pub fn dump(&self) -> Result<NamespaceSnapshot, StoreError> {
        let txn = redb_err!(self.db.begin_read())?;
        let mut snap = NamespaceSnapshot::default();
        for item in redb_err!(redb_err!(txn.open_table(INODES))?.iter())? {
            let (k, v) = redb_err!(item)?;
            snap.inodes.push(KeyValue {
                key: k.value().to_be_bytes().to_vec(),
                value: v.value().to_vec(),
            });
        }
        for item in redb_err!(redb_err!(txn.open_table(CHILDREN))?.iter())? {
            let (k, v) = redb_err!(item)?;
            snap.children.push(KeyValue {
                key: k.value().to_vec(),
                value: v.value().to_be_bytes().to_vec(),
            });
        }
        for item in redb_err!(redb_err!(txn.open_table(META))?.iter())? {
            let (k, v) = redb_err!(item)?;
            snap.meta.push(KeyValue {
                key: k.value().as_bytes().to_vec(),
                value: v.value().to_vec(),
            });
        }
        Ok(snap)
    }

    /// Replaces the whole state machine with a snapshot, in one transaction.
    pub fn restore(&self, snap: &NamespaceSnapshot) -> Result<(), StoreError> {
        let bad = |what: &str| StoreError::Corrupt(format!("snapshot {what} record"));
        let txn = redb_err!(self.db.begin_write())?;
        redb_err!(txn.delete_table(INODES))?;
        redb_err!(txn.delete_table(CHILDREN))?;
        redb_err!(txn.delete_table(META))?;
        {
            let mut inodes = redb_err!(txn.open_table(INODES))?;
            for kv in &snap.inodes {
                let k = u64::from_be_bytes(kv.key.as_slice().try_into().map_err(|_| bad("inode"))?);
                redb_err!(inodes.insert(k, kv.value.as_slice()))?;
            }
            let mut children = redb_err!(txn.open_table(CHILDREN))?;
            for kv in &snap.children {
                let v =
                    u64::from_be_bytes(kv.value.as_slice().try_into().map_err(|_| bad("child"))?);
                redb_err!(children.insert(kv.key.as_slice(), v))?;
            }
            let mut meta = redb_err!(txn.open_table(META))?;
            for kv in &snap.meta {
                let k = std::str::from_utf8(&kv.key).map_err(|_| bad("meta"))?;
                redb_err!(meta.insert(k, kv.value.as_slice()))?;
            }
            // The snapshot's shard must be ours.
            let shard = redb_err!(meta.get(META_SHARD))?.map(|v| v.value().to_vec());
            if shard.as_deref() != Some(&self.shard.to_be_bytes()[..]) {
                return Err(StoreError::Corrupt("snapshot from another shard".into()));
            }
        }
        redb_err!(txn.commit())?;
        Ok(())
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
            Some(v) => Ok(Some(decode_inode(v.value())?)),
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
            let (_, id) = redb_err!(item)?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let found = redb_err!(inodes.get(id.value()))?;
            let v = found.ok_or_else(|| {
                StoreError::Corrupt(format!("dangling entry to {:#x}", id.value()))
            })?;
            out.push(decode_inode(v.value())?);
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

pub(crate) fn decode_inode(bytes: &[u8]) -> Result<Inode, StoreError> {
    Inode::decode(bytes).map_err(|e| StoreError::Corrupt(format!("inode record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_protos::v1::{command, FileKind, LoadDirectory, MountPoint, SetMount, UfsEntry};

    fn mount() -> Command {
        Command {
            op: Some(command::Op::SetMount(SetMount {
                mount: Some(MountPoint {
                    mount_id: 1,
                    path: b"/".to_vec(),
                    ufs_uri: "file:///data".into(),
                }),
                block_size: 1024,
                ..Default::default()
            })),
        }
    }

    fn entry(name: &str, kind: FileKind, size: u64) -> UfsEntry {
        UfsEntry {
            name: name.as_bytes().to_vec(),
            kind: kind as i32,
            size,
            mtime_ns: 7,
            mode: 0o644,
            ..Default::default()
        }
    }

    fn load(dir: u64, entries: Vec<UfsEntry>) -> Command {
        Command {
            op: Some(command::Op::LoadDirectory(LoadDirectory {
                dir_id: dir,
                entries,
                listed_at_ns: 1,
            })),
        }
    }

    fn names(store: &NamespaceStore, dir: u64) -> Vec<(String, u64)> {
        store
            .list(dir, b"", 100)
            .unwrap()
            .0
            .into_iter()
            .map(|i| (String::from_utf8(i.name).unwrap(), i.id))
            .collect()
    }

    #[test]
    fn replicas_applying_the_same_log_agree_and_restarts_keep_state() {
        let tmp = tempfile::tempdir().unwrap();
        let log = vec![
            LogEntry::command(1, 1, mount()),
            LogEntry::command(
                2,
                1,
                load(
                    1,
                    vec![
                        entry("b", FileKind::Directory, 0),
                        entry("a.bin", FileKind::File, 3000),
                    ],
                ),
            ),
        ];
        let a = NamespaceStore::open(&tmp.path().join("a.redb"), 0).unwrap();
        let b = NamespaceStore::open(&tmp.path().join("b.redb"), 0).unwrap();
        a.apply_batch(&log).unwrap();
        for e in &log {
            b.apply_batch(std::slice::from_ref(e)).unwrap();
        }
        assert_eq!(names(&a, 1), names(&b, 1));
        assert_eq!(names(&a, 1), vec![("a.bin".into(), 3), ("b".into(), 2)]);
        let file = a.lookup(1, b"a.bin").unwrap().unwrap();
        assert_eq!(
            (file.size, file.block_size, file.ufs_path.as_slice()),
            (3000, 1024, &b"a.bin"[..])
        );
        assert!(a.get(1).unwrap().children_loaded);

        // Replaying old entries is a no-op; the applied index is durable.
        a.apply_batch(&log).unwrap();
        assert_eq!(a.inode_count().unwrap(), 3);
        drop(a);
        let a = NamespaceStore::open(&tmp.path().join("a.redb"), 0).unwrap();
        assert_eq!(a.applied().unwrap().0, 2);
        assert_eq!(names(&a, 1), names(&b, 1));
        drop(b);
        assert!(matches!(
            NamespaceStore::open(&tmp.path().join("b.redb"), 3),
            Err(StoreError::ShardMismatch {
                found: 0,
                configured: 3
            })
        ));
    }

    #[test]
    fn relisting_keeps_ids_and_drops_vanished_subtrees() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 2).unwrap();
        let root = s.root_id();
        s.apply_batch(&[LogEntry::command(1, 1, mount())]).unwrap();
        s.apply_batch(&[LogEntry::command(
            2,
            1,
            load(
                root,
                vec![
                    entry("d", FileKind::Directory, 0),
                    entry("f", FileKind::File, 1),
                ],
            ),
        )])
        .unwrap();
        let d = s.lookup(root, b"d").unwrap().unwrap();
        assert_eq!(granary_common::ids::shard_of(d.id), 2);
        s.apply_batch(&[LogEntry::command(
            3,
            1,
            load(d.id, vec![entry("x", FileKind::File, 5)]),
        )])
        .unwrap();
        assert_eq!(s.inode_count().unwrap(), 4);

        // `f` grew, `d` vanished (with its child), `g` appeared.
        let f_before = s.lookup(root, b"f").unwrap().unwrap();
        s.apply_batch(&[LogEntry::command(
            4,
            1,
            load(
                root,
                vec![entry("f", FileKind::File, 9), entry("g", FileKind::File, 0)],
            ),
        )])
        .unwrap();
        let f_after = s.lookup(root, b"f").unwrap().unwrap();
        assert_eq!(f_after.id, f_before.id);
        assert_eq!(f_after.fingerprint.unwrap().size, 9);
        assert!(s.lookup(root, b"d").unwrap().is_none());
        assert!(s.get(d.id).is_err());
        assert_eq!(s.inode_count().unwrap(), 3);

        // A failing command still consumes its index.
        let r = s
            .apply_batch(&[LogEntry::command(5, 1, load(12345, vec![]))])
            .unwrap();
        assert_eq!(r[0].as_ref().unwrap_err().errno(), libc::ENOENT);
        assert_eq!(s.applied().unwrap().0, 5);
    }

    #[test]
    fn listing_pages_resume_after_a_name() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        s.apply_batch(&[LogEntry::command(1, 1, mount())]).unwrap();
        let entries = (0..10)
            .map(|i| entry(&format!("f{i}"), FileKind::File, i))
            .collect();
        s.apply_batch(&[LogEntry::command(2, 1, load(1, entries))])
            .unwrap();
        let (page, more) = s.list(1, b"", 4).unwrap();
        assert!(more);
        let (rest, more) = s.list(1, &page.last().unwrap().name, 100).unwrap();
        assert!(!more);
        assert_eq!(page.len() + rest.len(), 10);
        assert_eq!(rest[0].name, b"f4");
    }
}
