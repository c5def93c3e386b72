//! Read states for files the kernel opened by itself (zero-message opens): their READs
//! carry no handle, so each inode keeps a few states between reads, one per concurrent
//! reader, and a sequential reader keeps its readahead window and open cache files.

use std::sync::{Arc, Mutex};

use granary_protos::v1::UfsFingerprint;
use quick_cache::sync::Cache;

use crate::block_reader::ReadState;

/// Inodes whose states are kept (each state may hold open cache files).
const INODES: usize = 1024;
/// States kept per inode: as many as readers of one file at once, within reason.
const PER_INODE: usize = 16;

type States = Arc<Mutex<Vec<(UfsFingerprint, ReadState)>>>;

pub struct UnopenedReads {
    by_inode: Cache<u64, States>,
}

impl Default for UnopenedReads {
    fn default() -> Self {
        UnopenedReads {
            by_inode: Cache::new(INODES),
        }
    }
}

impl UnopenedReads {
    /// A state for reading `version` of `ino`: one a reader put back, or a fresh one.
    pub fn take(&self, ino: u64, version: UfsFingerprint) -> ReadState {
        let Some(states) = self.by_inode.get(&ino) else {
            return ReadState::default();
        };
        let mut states = states.lock().expect("read states lock");
        // States of another version are of no use any more.
        states.retain(|(v, _)| *v == version);
        states.pop().map(|(_, s)| s).unwrap_or_default()
    }

    /// Keeps `state` for the next read of `ino`.
    pub fn put(&self, ino: u64, version: UfsFingerprint, state: ReadState) {
        let states = match self.by_inode.get(&ino) {
            Some(s) => s,
            None => {
                let fresh = States::default();
                self.by_inode.insert(ino, fresh.clone());
                fresh
            }
        };
        let mut states = states.lock().expect("read states lock");
        if states.len() < PER_INODE {
            states.push((version, state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: UfsFingerprint = UfsFingerprint {
        size: 10,
        mtime_ns: 1,
    };

    fn kept(pool: &UnopenedReads, ino: u64) -> usize {
        pool.by_inode
            .get(&ino)
            .map_or(0, |s| s.lock().unwrap().len())
    }

    #[test]
    fn states_come_back_per_inode_and_version_and_stay_bounded() {
        let pool = UnopenedReads::default();
        pool.put(1, V1, ReadState::default());
        pool.put(1, V1, ReadState::default());
        assert_eq!(kept(&pool, 1), 2);
        pool.take(1, V1);
        assert_eq!(kept(&pool, 1), 1);
        let newer = UfsFingerprint {
            size: 10,
            mtime_ns: 2,
        };
        pool.take(1, newer);
        assert_eq!(kept(&pool, 1), 0, "a state of another version is dropped");
        for _ in 0..2 * PER_INODE {
            pool.put(2, V1, ReadState::default());
        }
        assert_eq!(kept(&pool, 2), PER_INODE);
        for ino in 0..4 * INODES as u64 {
            pool.put(100 + ino, V1, ReadState::default());
        }
        assert!(pool.by_inode.len() <= INODES);
    }
}
