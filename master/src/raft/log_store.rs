//! The Raft log on disk (redb, its own file): entries keyed by index, the HardState and
//! the last compaction point. Implements raft-rs `Storage`. The configuration and the
//! snapshot data come from the namespace store, which keeps them as of its applied index,
//! so the log never disagrees with the state machine it feeds.

use std::sync::{Arc, RwLock};

use granary_protos::raft::SnapshotRef;
use prost::Message as _;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use granary_protos::v1::{MasterSet, Member};

use crate::snapshots::StagedSnapshot;
use crate::state_machine::{self, EntryOp, LogEntry};
use crate::store::{redb_err, NamespaceStore, StoreError};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const HARD_STATE: &str = "hard_state";
/// Index and term of the last entry removed by compaction or replaced by a snapshot.
const TRUNCATED: &str = "truncated";

#[derive(Debug, Clone, Copy, Default)]
struct Bounds {
    truncated_index: u64,
    truncated_term: u64,
    last: u64,
}

pub struct RaftLogStore {
    /// This member's id: snapshots it holds name it.
    member: u64,
    db: Database,
    namespace: Arc<NamespaceStore>,
    hard_state: RwLock<HardState>,
    bounds: RwLock<Bounds>,
}

/// The truncation point as stored: index then term, big-endian.
fn truncated_record(index: u64, term: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&index.to_be_bytes());
    t[8..].copy_from_slice(&term.to_be_bytes());
    t
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn pb_err(e: protobuf::ProtobufError) -> StoreError {
    StoreError::Corrupt(format!("raft record: {e}"))
}

impl RaftLogStore {
    /// Opens the log. On the very first start of an initial member, `bootstrap` (the
    /// initial members) becomes a snapshot at index 1: every initial member writes the same
    /// one, and a member added later (empty log) is sent a snapshot that carries the
    /// configuration, instead of replaying a log that never mentioned the first members.
    pub fn open(
        path: &std::path::Path,
        member: u64,
        namespace: Arc<NamespaceStore>,
        bootstrap: &[(u64, String)],
    ) -> Result<Self, StoreError> {
        // The log is read near its end: a small cache does.
        let db = crate::store::open_db(path, 64 << 20)?;
        let txn = redb_err!(db.begin_write())?;
        redb_err!(txn.open_table(ENTRIES))?;
        redb_err!(txn.open_table(STATE))?;
        redb_err!(txn.commit())?;

        let txn = redb_err!(db.begin_read())?;
        let state = redb_err!(txn.open_table(STATE))?;
        let hard_state = match redb_err!(state.get(HARD_STATE))? {
            Some(v) => HardState::parse_from_bytes(v.value()).map_err(pb_err)?,
            None => HardState::default(),
        };
        let mut bounds = Bounds::default();
        if let Some(v) = redb_err!(state.get(TRUNCATED))? {
            let b = v.value();
            if b.len() != 16 {
                return Err(StoreError::Corrupt("raft truncation record".into()));
            }
            bounds.truncated_index = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
            bounds.truncated_term = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
        }
        let entries = redb_err!(txn.open_table(ENTRIES))?;
        bounds.last = match redb_err!(entries.last())? {
            Some((k, _)) => k.value(),
            None => bounds.truncated_index,
        };
        let fresh = bounds.last == 0
            && hard_state == HardState::default()
            && namespace.conf_state()?.is_none();
        drop((entries, state, txn));
        let store = RaftLogStore {
            member,
            db,
            namespace,
            hard_state: RwLock::new(hard_state),
            bounds: RwLock::new(bounds),
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
        if applied > store.bounds.read().expect("bounds lock").last {
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

    /// Drops every entry and records (index, term) as the log's starting point; the
    /// HardState's term is raised to match.
    fn set_truncated(&self, index: u64, term: u64) -> Result<(), StoreError> {
        let mut bounds = self.bounds.write().expect("bounds lock");
        let mut hs = self.hard_state.write().expect("hard state lock");
        hs.term = hs.term.max(term);
        hs.commit = hs.commit.max(index);
        let txn = redb_err!(self.db.begin_write())?;
        {
            let mut table = redb_err!(txn.open_table(ENTRIES))?;
            redb_err!(table.retain(|_, _| false))?;
            let mut state = redb_err!(txn.open_table(STATE))?;
            redb_err!(state.insert(TRUNCATED, &truncated_record(index, term)[..]))?;
            redb_err!(state.insert(HARD_STATE, hs.write_to_bytes().map_err(pb_err)?.as_slice()))?;
        }
        redb_err!(txn.commit())?;
        *bounds = Bounds {
            truncated_index: index,
            truncated_term: term,
            last: index,
        };
        Ok(())
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
        let mut bounds = self.bounds.write().expect("bounds lock");
        let txn = redb_err!(self.db.begin_write())?;
        {
            let mut table = redb_err!(txn.open_table(ENTRIES))?;
            if let Some(first) = entries.first() {
                if first.index <= bounds.last {
                    redb_err!(table.retain_in(first.index.., |_, _| false))?;
                }
                for e in entries {
                    redb_err!(
                        table.insert(e.index, e.write_to_bytes().map_err(pb_err)?.as_slice())
                    )?;
                }
            }
            if let Some(hs) = vote {
                let mut state = redb_err!(txn.open_table(STATE))?;
                redb_err!(
                    state.insert(HARD_STATE, hs.write_to_bytes().map_err(pb_err)?.as_slice())
                )?;
            }
        }
        redb_err!(txn.commit())?;
        if let Some(last) = entries.last() {
            bounds.last = last.index;
        }
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
        let term = self
            .term(upto)
            .map_err(|e| StoreError::Corrupt(format!("compact to {upto}: {e}")))?;
        let mut bounds = self.bounds.write().expect("bounds lock");
        if upto <= bounds.truncated_index || upto > bounds.last {
            return Ok(());
        }
        let txn = redb_err!(self.db.begin_write())?;
        {
            let mut table = redb_err!(txn.open_table(ENTRIES))?;
            redb_err!(table.retain_in(..=upto, |_, _| false))?;
            let mut state = redb_err!(txn.open_table(STATE))?;
            redb_err!(state.insert(TRUNCATED, &truncated_record(upto, term)[..]))?;
        }
        redb_err!(txn.commit())?;
        bounds.truncated_index = upto;
        bounds.truncated_term = term;
        Ok(())
    }

    pub fn first_index_now(&self) -> u64 {
        self.bounds.read().expect("bounds lock").truncated_index + 1
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
        let bounds = *self.bounds.read().expect("bounds lock");
        if low <= bounds.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > bounds.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err(StoreError::Redb(e.into())))?;
        let table = txn
            .open_table(ENTRIES)
            .map_err(|e| store_err(StoreError::Redb(e.into())))?;
        let mut out = Vec::new();
        let mut size = 0u64;
        for item in table
            .range(low..high)
            .map_err(|e| store_err(StoreError::Redb(e.into())))?
        {
            let (_, v) = item.map_err(|e| store_err(StoreError::Redb(e.into())))?;
            let bytes = v.value();
            size += bytes.len() as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(Entry::parse_from_bytes(bytes).map_err(|e| store_err(pb_err(e)))?);
        }
        if out.len() as u64 != high - low && size <= max {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let bounds = *self.bounds.read().expect("bounds lock");
        if idx == bounds.truncated_index {
            return Ok(bounds.truncated_term);
        }
        if idx < bounds.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > bounds.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err(StoreError::Redb(e.into())))?;
        let table = txn
            .open_table(ENTRIES)
            .map_err(|e| store_err(StoreError::Redb(e.into())))?;
        let found = table
            .get(idx)
            .map_err(|e| store_err(StoreError::Redb(e.into())))?;
        match found {
            Some(v) => Ok(Entry::parse_from_bytes(v.value())
                .map_err(|e| store_err(pb_err(e)))?
                .term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_now())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.bounds.read().expect("bounds lock").last)
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
        let path = dir.path().join("raft.redb");
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
}
