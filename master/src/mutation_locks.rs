//! Which namespace mutations may run at once on the leader. A mutation holds its turn
//! from its dry run through its UFS change to its commit, so nothing it checked changes
//! meanwhile and no listing falls between its UFS change and its proposal. Mutations in
//! different directories run side by side (and share Raft rounds); those whose UFS paths
//! span more than their directories (directory renames move a subtree, hard-linked
//! files have names elsewhere) and re-listings of loaded directories run alone. File
//! creations share their directory with each other (the state machine settles two of one
//! name), not with the other mutations there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{
    OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

#[derive(Default)]
pub struct MutationLocks {
    /// Shared by mutations that name their directories, exclusive for the others.
    tree: RwLock<()>,
    /// A lock per directory while someone holds or waits for it.
    dirs: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

/// A directory held by a turn: alone, or shared with file creations.
enum DirGuard {
    Shared { _held: OwnedRwLockReadGuard<()> },
    Exclusive { _held: OwnedRwLockWriteGuard<()> },
}

/// A mutation's turn; it ends when dropped.
pub struct Turn<'a> {
    locks: &'a MutationLocks,
    dirs: Vec<(u64, DirGuard)>,
    _shared: Option<RwLockReadGuard<'a, ()>>,
    alone: Option<RwLockWriteGuard<'a, ()>>,
}

impl Turn<'_> {
    /// Whether no other mutation runs meanwhile.
    pub fn alone(&self) -> bool {
        self.alone.is_some()
    }
}

impl MutationLocks {
    /// A turn with no other mutation running.
    pub async fn alone(&self) -> Turn<'_> {
        Turn {
            locks: self,
            dirs: Vec::new(),
            _shared: None,
            alone: Some(self.tree.write().await),
        }
    }

    /// A turn over the directories `ids`: no other mutation in any of them meanwhile.
    pub async fn dirs(&self, ids: &[u64]) -> Turn<'_> {
        let shared = self.tree.read().await;
        let mut ids = ids.to_vec();
        // One order for everyone, so two turns never wait for each other.
        ids.sort_unstable();
        ids.dedup();
        let mut dirs = Vec::with_capacity(ids.len());
        for id in ids {
            dirs.push((
                id,
                DirGuard::Exclusive {
                    _held: self.dir(id).write_owned().await,
                },
            ));
        }
        Turn {
            locks: self,
            dirs,
            _shared: Some(shared),
            alone: None,
        }
    }

    /// A turn to create a file in directory `id`: other file creations there run
    /// meanwhile, nothing else does.
    pub async fn creation_in(&self, id: u64) -> Turn<'_> {
        let shared = self.tree.read().await;
        let guard = DirGuard::Shared {
            _held: self.dir(id).read_owned().await,
        };
        Turn {
            locks: self,
            dirs: vec![(id, guard)],
            _shared: Some(shared),
            alone: None,
        }
    }

    /// A turn that only waits for turns alone. For a change to one inode's content or
    /// attributes, which no other mutation's check reads (a re-listing must not record
    /// what it listed over such a change made meanwhile), and for a directory's first
    /// listing (no directory rename may move its UFS path while it is listed).
    pub async fn shared(&self) -> Turn<'_> {
        Turn {
            locks: self,
            dirs: Vec::new(),
            _shared: Some(self.tree.read().await),
            alone: None,
        }
    }

    fn dir(&self, id: u64) -> Arc<RwLock<()>> {
        self.dirs
            .lock()
            .expect("directory locks")
            .entry(id)
            .or_default()
            .clone()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut locks = self.locks.dirs.lock().expect("directory locks");
        for (id, guard) in self.dirs.drain(..) {
            drop(guard);
            // Only the table holds it now: nobody holds or waits for this directory.
            if locks.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
                locks.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn waits<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn turns_in_different_directories_overlap_and_in_one_do_not() {
        let locks = MutationLocks::default();
        let a = locks.dirs(&[1, 2]).await;
        assert!(!a.alone());
        let b = locks.dirs(&[3]).await;
        assert!(waits(locks.dirs(&[2, 4])).await);
        assert!(waits(locks.alone()).await);
        drop(a);
        let c = locks.dirs(&[4, 2]).await;
        drop((b, c));
        let created = locks.creation_in(5).await;
        let beside = locks.creation_in(5).await;
        assert!(waits(locks.dirs(&[5])).await);
        locks.creation_in(6).await;
        drop((created, beside));
        let exclusive = locks.dirs(&[5]).await;
        assert!(waits(locks.creation_in(5)).await);
        drop(exclusive);
        let alone = locks.alone().await;
        assert!(alone.alone());
        assert!(waits(locks.dirs(&[9])).await);
        drop(alone);
        locks.dirs(&[9]).await;
        assert!(
            locks.dirs.lock().unwrap().is_empty(),
            "unused locks are dropped"
        );
    }

    #[tokio::test]
    async fn shared_turns_wait_only_for_turns_alone() {
        let locks = MutationLocks::default();
        let dir = locks.dirs(&[1]).await;
        let creation = locks.creation_in(2).await;
        let change = locks.shared().await;
        let other = locks.shared().await;
        assert!(waits(locks.alone()).await, "a re-listing waits for them");
        drop((dir, creation, change, other));
        let listing = locks.alone().await;
        assert!(waits(locks.shared()).await);
        drop(listing);
        locks.shared().await;
    }
}
