//! The Raft log on disk (its own append-only file, see `log_file`): entries, the
//! HardState's term and vote, and the last compaction point. Implements raft-rs
//! `Storage`. The configuration and the snapshot data come from the namespace store,
//! which keeps them as of its applied index, so the log never disagrees with the state
//! machine it feeds.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use granary_protos::raft::SnapshotRef;
use prost::Message as _;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{ReadableDatabase, TableDefinition};

use granary_protos::v1::{MasterSet, Member};

use super::log_file::LogFile;
use crate::snapshots::StagedSnapshot;
use crate::state_machine::{self, EntryOp, LogEntry};
use crate::store::{redb_err, NamespaceStore, StoreError};

pub struct RaftLogStore {
    /// This member's id: snapshots it holds name it.
    member: u64,
    file: Mutex<LogFile>,
    namespace: Arc<NamespaceStore>,
    hard_state: RwLock<HardState>,
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn pb_err(e: protobuf::ProtobufError) -> StoreError {
    StoreError::Corrupt(format!("raft record: {e}"))
}

impl RaftLogStore {
    /// Opens the log at `path` (moving a log kept by an older version in `raft.redb`
    /// beside it over first). On the very first start of an initial member, `bootstrap`
    /// (the initial members) becomes a snapshot at index 1: every initial member writes
    /// the same one, and a member added later (empty log) is sent a snapshot that carries
    /// the configuration, instead of replaying a log that never mentioned the first
    /// members.
    pub fn open(
        path: &Path,
        member: u64,
        namespace: Arc<NamespaceStore>,
        bootstrap: &[(u64, String)],
    ) -> Result<Self, StoreError> {
        let legacy = path.with_file_name("raft.redb");
        if legacy.exists() {
            if path.exists() {
                // Moved, then stopped before removing it.
                std::fs::remove_file(&legacy)
                    .map_err(|e| StoreError::Io(format!("removing {}", legacy.display()), e))?;
            } else {
                move_legacy(&legacy, path)?;
            }
        }
        let file = LogFile::open(path)?;
        let (term, vote) = file.vote();
        let hard_state = HardState {
            term,
            vote,
            ..Default::default()
        };
        let fresh = file.last() == 0
            && hard_state == HardState::default()
            && namespace.conf_state()?.is_none();
        let store = RaftLogStore {
            member,
            file: Mutex::new(file),
            namespace,
            hard_state: RwLock::new(hard_state),
        };
        let (applied, applied_term) = store.namespace.applied()?;
        if fresh && !bootstrap.is_empty() {
            if applied > 0 {
                return Err(StoreError::Corrupt(format!(
                    "{} holds a namespace without a Raft configuration (an older format); \
                     move the data_dir away to start fresh",
                    path.display()
                )));
            }
            store.bootstrap(bootstrap)?;
        }
        // The state machine is ahead of the log (the log file was lost): the applied state
        // is the snapshot the log continues from.
        if applied > store.log().last() {
            tracing::warn!(
                applied,
                "raft log is behind the namespace; continuing from the applied state"
            );
            store.set_truncated(applied, applied_term)?;
        }
        // Applied entries were committed, even if the commit index was not persisted.
        let applied = store.namespace.applied()?.0;
        let mut hs = store.hard_state.write().expect("hard state lock");
        hs.commit = hs.commit.max(applied);
        drop(hs);
        Ok(store)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, LogFile> {
        self.file.lock().expect("raft log lock")
    }

    /// Drops every entry and records (index, term) as the log's starting point; the
    /// HardState's term is raised to match.
    fn set_truncated(&self, index: u64, term: u64) -> Result<(), StoreError> {
        let mut log = self.log();
        let mut hs = self.hard_state.write().expect("hard state lock");
        hs.term = hs.term.max(term);
        hs.commit = hs.commit.max(index);
        log.reset(index, term, (hs.term, hs.vote))
    }

    fn bootstrap(&self, members: &[(u64, String)]) -> Result<(), StoreError> {
        const INDEX: u64 = 1;
        const TERM: u64 = 1;
        let cs = ConfState {
            voters: members.iter().map(|(id, _)| *id).collect(),
            ..Default::default()
        };
        let masters = MasterSet {
            members: members
                .iter()
                .map(|(id, addr)| Member {
                    id: *id,
                    addr: addr.clone(),
                    learner: false,
                })
                .collect(),
            leader_id: 0,
            term: TERM,
            conf_index: INDEX,
        };
        state_machine::apply_batch(
            &self.namespace,
            &[LogEntry {
                index: INDEX,
                term: TERM,
                op: EntryOp::ConfChange {
                    conf_state: cs.write_to_bytes().map_err(pb_err)?,
                    masters,
                },
            }],
        )?;
        self.set_truncated(INDEX, TERM)?;
        tracing::info!(members = ?members, "bootstrapped a new Raft group");
        Ok(())
    }

    pub fn namespace(&self) -> &Arc<NamespaceStore> {
        &self.namespace
    }

    /// The configuration as of the state machine's applied index (empty for a member
    /// that has not yet received the group's snapshot).
    pub fn conf_state(&self) -> Result<ConfState, StoreError> {
        match self.namespace.conf_state()? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(pb_err),
            None => Ok(ConfState::default()),
        }
    }

    /// Persists new entries (replacing any conflicting suffix) and the HardState in one
    /// transaction: one fsync before the messages that depend on them are sent. A
    /// HardState whose term and vote are unchanged is only kept in memory: the commit
    /// index is volatile in Raft (a restart starts from the applied index and learns the
    /// rest again), and writing it cost a table's pages in every round and a
    /// transaction of its own (an fsync) in rounds without new entries.
    pub fn append(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        let vote = hs.filter(|hs| {
            let known = self.hard_state.read().expect("hard state lock");
            (hs.term, hs.vote) != (known.term, known.vote)
        });
        if entries.is_empty() && vote.is_none() {
            if let Some(hs) = hs {
                self.set_commit(hs.commit);
            }
            return Ok(());
        }
        self.log()
            .append(entries, vote.map(|hs| (hs.term, hs.vote)))?;
        if let Some(hs) = hs {
            *self.hard_state.write().expect("hard state lock") = hs.clone();
        }
        Ok(())
    }

    /// Records the commit index learned from a light ready (kept in memory; on restart
    /// the commit index is at least the applied index).
    pub fn set_commit(&self, commit: u64) {
        let mut hs = self.hard_state.write().expect("hard state lock");
        hs.commit = hs.commit.max(commit);
    }

    /// Installs a snapshot received from the leader, its records already pulled and
    /// staged: the state machine is replaced and the log restarts after its index.
    pub fn apply_snapshot(
        &self,
        snap: &Snapshot,
        staged: &StagedSnapshot,
    ) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        if (staged.index, staged.term) != (meta.index, meta.term) {
            return Err(StoreError::Corrupt(format!(
                "staged snapshot {} {} is not the one raft installs ({} {})",
                staged.index, staged.term, meta.index, meta.term
            )));
        }
        self.namespace.install_staged(staged)?;
        self.set_truncated(meta.index, meta.term)
    }

    /// Drops entries up to and including `upto` (which must be applied).
    pub fn compact(&self, upto: u64) -> Result<(), StoreError> {
        let mut log = self.log();
        if upto <= log.start().0 || upto > log.last() {
            return Ok(());
        }
        log.compact(upto)
    }

    pub fn first_index_now(&self) -> u64 {
        self.log().start().0 + 1
    }
}

impl Storage for RaftLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let conf_state = self.conf_state().map_err(store_err)?;
        Ok(RaftState::new(
            self.hard_state.read().expect("hard state lock").clone(),
            conf_state,
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let log = self.log();
        if low <= log.start().0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > log.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        log.read(low, high, max_size.into().unwrap_or(u64::MAX))
            .map_err(store_err)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let log = self.log();
        if idx < log.start().0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        log.term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_now())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log().last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The records and the position they stand for come from one view, held for the
        // member that needs it to pull.
        let held = self.namespace.hold_snapshot().map_err(store_err)?;
        if held.index < request_index {
            self.namespace.release_snapshot(held.id);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let cs = match &held.conf_state {
            Some(b) => ConfState::parse_from_bytes(b)
                .map_err(pb_err)
                .map_err(store_err)?,
            None => self.conf_state().map_err(store_err)?,
        };
        let mut snap = Snapshot::default();
        let data = SnapshotRef {
            holder: self.member,
            id: held.id,
        };
        snap.set_data(data.encode_to_vec().into());
        let meta = snap.mut_metadata();
        meta.index = held.index;
        meta.term = held.term;
        meta.set_conf_state(cs);
        Ok(snap)
    }
}

/// The tables of the log an older version kept in redb.
const LEGACY_ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const LEGACY_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// Moves the log an older version kept in redb (`raft.redb`: entries by index, the
/// HardState, the truncation point) into a log file at `to`, then removes it.
fn move_legacy(from: &Path, to: &Path) -> Result<(), StoreError> {
    let db = crate::store::open_db(from, 64 << 20)?;
    let txn = redb_err!(db.begin_read())?;
    let state = redb_err!(txn.open_table(LEGACY_STATE))?;
    let hs = match redb_err!(state.get("hard_state"))? {
        Some(v) => HardState::parse_from_bytes(v.value()).map_err(pb_err)?,
        None => HardState::default(),
    };
    let start = match redb_err!(state.get("truncated"))? {
        Some(v) => {
            let b = v.value();
            let word = |r: std::ops::Range<usize>| {
                b.get(r)
                    .and_then(|w| w.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt("raft truncation record".into()))
            };
            (word(0..8)?, word(8..16)?)
        }
        None => (0, 0),
    };
    let mut entries = Vec::new();
    for item in redb_err!(redb_err!(txn.open_table(LEGACY_ENTRIES))?.range(start.0 + 1..))? {
        let (_, v) = redb_err!(item)?;
        entries.push(Entry::parse_from_bytes(v.value()).map_err(pb_err)?);
    }
    drop((state, txn, db));
    LogFile::create(to, start, (hs.term, hs.vote), &entries)?;
    std::fs::remove_file(from)
        .map_err(|e| StoreError::Io(format!("removing {}", from.display()), e))?;
    tracing::info!(from = %from.display(), to = %to.display(), entries = entries.len(), "moved the raft log to its own file");
    Ok(())
}

/// Where a snapshot's records are to be pulled from.
pub fn snapshot_ref(snap: &Snapshot) -> Result<SnapshotRef, StoreError> {
    SnapshotRef::decode(snap.get_data())
        .map_err(|e| StoreError::Corrupt(format!("snapshot data: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_vote_and_entries_survive_a_restart_whatever_the_commit_index_did() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Arc::new(NamespaceStore::open(&dir.path().join("ns.redb"), 0).unwrap());
        let path = dir.path().join("raft.log");
        let boot = [(1, "mem-1".to_string())];
        let hs = |term, vote, commit| HardState {
            term,
            vote,
            commit,
            ..Default::default()
        };
        let entry = |index| Entry {
            index,
            term: 3,
            ..Default::default()
        };
        {
            let log = RaftLogStore::open(&path, 1, ns.clone(), &boot).unwrap();
            log.append(&[entry(2), entry(3)], Some(&hs(3, 1, 1)))
                .unwrap();
            // Only the commit index moved: nothing to write, and no error.
            log.append(&[], Some(&hs(3, 1, 3))).unwrap();
            assert_eq!(log.initial_state().unwrap().hard_state.commit, 3);
        }
        let log = RaftLogStore::open(&path, 1, ns, &boot).unwrap();
        let state = log.initial_state().unwrap().hard_state;
        assert_eq!((state.term, state.vote), (3, 1));
        assert!(state.commit >= 1, "never below what was written");
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.term(3).unwrap(), 3);
    }

    #[test]
    fn a_log_kept_in_redb_by_an_older_version_is_moved_into_the_log_file() {
        use redb::ReadableTableMetadata;
        let dir = tempfile::tempdir().unwrap();
        let ns = Arc::new(NamespaceStore::open(&dir.path().join("ns.redb"), 0).unwrap());
        let legacy = dir.path().join("raft.redb");
        {
            let db = crate::store::open_db(&legacy, 1 << 20).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut entries = txn.open_table(LEGACY_ENTRIES).unwrap();
                for index in 5..=8 {
                    let e = Entry {
                        index,
                        term: 2,
                        ..Default::default()
                    };
                    entries
                        .insert(index, e.write_to_bytes().unwrap().as_slice())
                        .unwrap();
                }
                assert_eq!(entries.len().unwrap(), 4);
                let mut state = txn.open_table(LEGACY_STATE).unwrap();
                let hs = HardState {
                    term: 2,
                    vote: 3,
                    commit: 6,
                    ..Default::default()
                };
                state
                    .insert("hard_state", hs.write_to_bytes().unwrap().as_slice())
                    .unwrap();
                let mut t = [0u8; 16];
                t[..8].copy_from_slice(&5u64.to_be_bytes());
                t[8..].copy_from_slice(&1u64.to_be_bytes());
                state.insert("truncated", &t[..]).unwrap();
            }
            txn.commit().unwrap();
        }
        let log = RaftLogStore::open(&dir.path().join("raft.log"), 1, ns, &[]).unwrap();
        assert!(!legacy.exists());
        let hs = log.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote), (2, 3));
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (6, 8)
        );
        assert_eq!((log.term(5).unwrap(), log.term(8).unwrap()), (1, 2));
        let got = log
            .entries(6, 9, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [6, 7, 8]);
    }
}
