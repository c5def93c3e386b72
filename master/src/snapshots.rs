//! Raft snapshots that stream. A member asked for a snapshot holds a consistent view of
//! its namespace store (a redb read transaction) under an id, and the Raft snapshot
//! carries only that id; the member that needs it pulls the view from the holder in
//! chunks and writes them into one transaction as they come. Neither side keeps the
//! namespace in memory, and no message grows with it.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_protos::raft::{KeyValue, NamespaceSnapshot};
use prost::Message;
use redb::{ReadTransaction, ReadableDatabase, ReadableTable};

use crate::store::{
    meta_u64, redb_err, NamespaceStore, StoreError, CHILDREN, INODES, META, META_APPLIED_INDEX,
    META_APPLIED_TERM, META_CONF_STATE, META_SHARD,
};

/// Bytes of records per chunk.
const CHUNK_BYTES: usize = 4 << 20;
/// Views kept at once (more only while each is being pulled), and how long one is kept
/// unused: a held view keeps redb from reusing the pages it sees.
const MAX_HELD: usize = 4;
const HELD_FOR: Duration = Duration::from_secs(1800);

struct Held {
    id: u64,
    view: Arc<ReadTransaction>,
    taken: Instant,
}

/// The views a member holds for others to pull.
pub struct HeldSnapshots {
    held: Mutex<VecDeque<Held>>,
    /// Starts from the clock, so a restarted holder never reuses an id a puller may
    /// still ask for.
    next_id: AtomicU64,
}

impl Default for HeldSnapshots {
    fn default() -> Self {
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        HeldSnapshots {
            held: Default::default(),
            next_id: AtomicU64::new(base),
        }
    }
}

/// A snapshot pulled into a file beside the store and checked, ready to install.
#[derive(Debug)]
pub struct StagedSnapshot {
    path: PathBuf,
    pub index: u64,
    pub term: u64,
}

impl Drop for StagedSnapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A held view: its id and the Raft position and configuration it stands for.
pub struct HeldView {
    pub id: u64,
    pub index: u64,
    pub term: u64,
    pub conf_state: Option<Vec<u8>>,
}

impl NamespaceStore {
    /// Holds the current applied state for others to pull.
    pub fn hold_snapshot(&self) -> Result<HeldView, StoreError> {
        let view = redb_err!(self.db().begin_read())?;
        let (index, term, conf_state) = {
            let meta = redb_err!(view.open_table(META))?;
            let conf = redb_err!(meta.get(META_CONF_STATE))?.map(|v| v.value().to_vec());
            (
                meta_u64(&meta, META_APPLIED_INDEX)?,
                meta_u64(&meta, META_APPLIED_TERM)?,
                conf,
            )
        };
        let shelf = self.held_snapshots();
        let id = shelf.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut held = shelf.held.lock().expect("held snapshots lock");
        held.retain(|h| h.taken.elapsed() < HELD_FOR);
        // The oldest view nobody is pulling makes room; one being pulled stays.
        while held.len() >= MAX_HELD {
            match held.iter().position(|h| Arc::strong_count(&h.view) == 1) {
                Some(i) => {
                    held.remove(i);
                }
                None => break,
            }
        }
        held.push_back(Held {
            id,
            view: Arc::new(view),
            taken: Instant::now(),
        });
        Ok(HeldView {
            id,
            index,
            term,
            conf_state,
        })
    }

    /// Lets a view go that will not be offered after all.
    pub fn release_snapshot(&self, id: u64) {
        self.held_snapshots()
            .held
            .lock()
            .expect("held snapshots lock")
            .retain(|h| h.id != id);
    }

    /// Pulls a snapshot's records into a file beside the store, checking that they stand
    /// for Raft position (`index`, `term`). Runs beside the Raft thread: only a complete,
    /// checked snapshot is handed to Raft, and installing it reads a local file.
    pub fn stage_snapshot(
        &self,
        index: u64,
        term: u64,
        mut next: impl FnMut() -> Result<Option<NamespaceSnapshot>, StoreError>,
    ) -> Result<StagedSnapshot, StoreError> {
        let staged = StagedSnapshot {
            path: self.staging_path(),
            index,
            term,
        };
        let io = |e: std::io::Error| StoreError::Corrupt(format!("staging a snapshot: {e}"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&staged.path).map_err(io)?);
        let (mut seen_index, mut seen_term) = (None, None);
        while let Some(chunk) = next()? {
            for kv in &chunk.meta {
                let value = || kv.value.as_slice().try_into().ok().map(u64::from_be_bytes);
                if kv.key == META_APPLIED_INDEX.as_bytes() {
                    seen_index = value();
                } else if kv.key == META_APPLIED_TERM.as_bytes() {
                    seen_term = value();
                }
            }
            let bytes = chunk.encode_to_vec();
            out.write_all(&(bytes.len() as u32).to_le_bytes())
                .and_then(|_| out.write_all(&bytes))
                .map_err(io)?;
        }
        out.flush().map_err(io)?;
        if (seen_index, seen_term) != (Some(index), Some(term)) {
            return Err(StoreError::Corrupt(format!(
                "the pulled snapshot stands for index {seen_index:?} term {seen_term:?}, not {index} {term}"
            )));
        }
        Ok(staged)
    }

    /// Installs a staged snapshot (see [`NamespaceStore::restore_from`]).
    pub fn install_staged(&self, staged: &StagedSnapshot) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Corrupt(format!("reading a staged snapshot: {e}"));
        let mut input = std::io::BufReader::new(std::fs::File::open(&staged.path).map_err(io)?);
        self.restore_from(|| {
            let mut len = [0u8; 4];
            match input.read_exact(&mut len) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                r => r.map_err(io)?,
            }
            let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
            input.read_exact(&mut bytes).map_err(io)?;
            NamespaceSnapshot::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("staged snapshot chunk: {e}")))
        })
    }

    /// Streams held view `id` to `sink` in chunks.
    pub fn stream_held(
        &self,
        id: u64,
        mut sink: impl FnMut(NamespaceSnapshot) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let view = {
            let mut held = self
                .held_snapshots()
                .held
                .lock()
                .expect("held snapshots lock");
            let h = held.iter_mut().find(|h| h.id == id).ok_or_else(|| {
                StoreError::Corrupt(format!("snapshot {id} is no longer held here"))
            })?;
            h.taken = Instant::now();
            h.view.clone()
        };
        let mut chunk = Chunk::default();
        for item in redb_err!(redb_err!(view.open_table(INODES))?.iter())? {
            let (k, v) = redb_err!(item)?;
            chunk.add(
                &mut sink,
                |c| &mut c.inodes,
                k.value().to_be_bytes().to_vec(),
                v.value().to_vec(),
            )?;
        }
        for item in redb_err!(redb_err!(view.open_table(CHILDREN))?.iter())? {
            let (k, v) = redb_err!(item)?;
            chunk.add(
                &mut sink,
                |c| &mut c.children,
                k.value().to_vec(),
                v.value().to_be_bytes().to_vec(),
            )?;
        }
        for item in redb_err!(redb_err!(view.open_table(META))?.iter())? {
            let (k, v) = redb_err!(item)?;
            chunk.add(
                &mut sink,
                |c| &mut c.meta,
                k.value().as_bytes().to_vec(),
                v.value().to_vec(),
            )?;
        }
        if chunk.bytes > 0 {
            sink(chunk.records)?;
        }
        Ok(())
    }

    /// Replaces the whole state machine with the chunks `next` yields, in one
    /// transaction: a failure midway changes nothing.
    pub fn restore_from(
        &self,
        mut next: impl FnMut() -> Result<Option<NamespaceSnapshot>, StoreError>,
    ) -> Result<(), StoreError> {
        let bad = |what: &str| StoreError::Corrupt(format!("snapshot {what} record"));
        let txn = redb_err!(self.db().begin_write())?;
        redb_err!(txn.delete_table(INODES))?;
        redb_err!(txn.delete_table(CHILDREN))?;
        redb_err!(txn.delete_table(META))?;
        {
            let mut inodes = redb_err!(txn.open_table(INODES))?;
            let mut children = redb_err!(txn.open_table(CHILDREN))?;
            let mut meta = redb_err!(txn.open_table(META))?;
            while let Some(chunk) = next()? {
                for kv in &chunk.inodes {
                    let k =
                        u64::from_be_bytes(kv.key.as_slice().try_into().map_err(|_| bad("inode"))?);
                    redb_err!(inodes.insert(k, kv.value.as_slice()))?;
                }
                for kv in &chunk.children {
                    let v = u64::from_be_bytes(
                        kv.value.as_slice().try_into().map_err(|_| bad("child"))?,
                    );
                    redb_err!(children.insert(kv.key.as_slice(), v))?;
                }
                for kv in &chunk.meta {
                    let k = std::str::from_utf8(&kv.key).map_err(|_| bad("meta"))?;
                    redb_err!(meta.insert(k, kv.value.as_slice()))?;
                }
            }
            // The snapshot's shard must be ours.
            let shard = redb_err!(meta.get(META_SHARD))?.map(|v| v.value().to_vec());
            if shard.as_deref() != Some(&self.shard().to_be_bytes()[..]) {
                return Err(StoreError::Corrupt("snapshot from another shard".into()));
            }
            crate::store::count_subdirs_once(&mut inodes, &children, &mut meta)?;
        }
        redb_err!(txn.commit())?;
        self.reload_routing_version()?;
        Ok(())
    }
}

/// Records gathered until they make a chunk.
#[derive(Default)]
struct Chunk {
    records: NamespaceSnapshot,
    bytes: usize,
}

impl Chunk {
    fn add(
        &mut self,
        sink: &mut impl FnMut(NamespaceSnapshot) -> Result<(), StoreError>,
        table: impl Fn(&mut NamespaceSnapshot) -> &mut Vec<KeyValue>,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.bytes += key.len() + value.len();
        table(&mut self.records).push(KeyValue { key, value });
        if self.bytes >= CHUNK_BYTES {
            self.bytes = 0;
            sink(std::mem::take(&mut self.records))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{apply_batch, LogEntry};
    use granary_protos::v1::{command, Command, FileKind, LoadDirectory, UfsEntry};

    #[test]
    fn a_held_view_streams_in_chunks_and_restores_whole_and_unchanged_by_later_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let leader = NamespaceStore::open(&tmp.path().join("a.redb"), 0).unwrap();
        let mount = crate::state_machine::tests::mount();
        let load = |entries: Vec<UfsEntry>| Command {
            op: Some(command::Op::LoadDirectory(LoadDirectory {
                dir_id: 1,
                entries,
                listed_at_ns: 1,
                ..Default::default()
            })),
        };
        let files: Vec<UfsEntry> = (0..60_000)
            .map(|i| UfsEntry {
                name: format!("a-rather-long-file-name-{i:08}").into_bytes(),
                kind: FileKind::File as i32,
                size: i,
                ..Default::default()
            })
            .collect();
        apply_batch(
            &leader,
            &[
                LogEntry::command(1, 1, mount),
                LogEntry::command(2, 1, load(files)),
            ],
        )
        .unwrap();
        let held = leader.hold_snapshot().unwrap();
        assert_eq!((held.index, held.term), (2, 1));
        // Written after the view was taken: not in it.
        apply_batch(&leader, &[LogEntry::command(3, 2, load(Vec::new()))]).unwrap();
        assert_eq!(leader.inode_count().unwrap(), 1);

        let mut chunks = Vec::new();
        leader
            .stream_held(held.id, |c| {
                chunks.push(c);
                Ok(())
            })
            .unwrap();
        assert!(chunks.len() >= 2, "{} chunk(s)", chunks.len());
        let follower = NamespaceStore::open(&tmp.path().join("b.redb"), 0).unwrap();
        // Records that stand for another position than the one offered are refused.
        let mut again = chunks.clone().into_iter();
        assert!(follower.stage_snapshot(3, 1, || Ok(again.next())).is_err());
        let mut chunks = chunks.into_iter();
        let staged = follower.stage_snapshot(2, 1, || Ok(chunks.next())).unwrap();
        follower.install_staged(&staged).unwrap();
        drop(staged);
        assert!(!follower.staging_path().exists());
        assert_eq!(follower.applied().unwrap(), (2, 1));
        assert_eq!(follower.inode_count().unwrap(), 60_001);
        assert!(follower
            .lookup(1, b"a-rather-long-file-name-00012345")
            .unwrap()
            .is_some());
        assert!(leader.stream_held(held.id + 7, |_| Ok(())).is_err());

        // A pull that fails midway leaves the store as it was.
        let other = NamespaceStore::open(&tmp.path().join("c.redb"), 3).unwrap();
        let mut n = 0;
        let failed = other.restore_from(|| {
            n += 1;
            match n {
                1 => Ok(Some(NamespaceSnapshot::default())),
                _ => Err(StoreError::Corrupt("connection lost".into())),
            }
        });
        assert!(failed.is_err());
        assert_eq!(other.shard(), 3);
        assert_eq!(other.inode_count().unwrap(), 0);
    }
}
