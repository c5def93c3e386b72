//! Read states for files the kernel opened by itself (zero-message opens): their READs
//! carry no handle, so each inode keeps a few states between reads, one per concurrent
//! reader, and a sequential reader keeps its readahead window and open cache file. A
//! state unused for a second is dropped (by a sweeper thread), so an idle mount holds no
//! cache file open (which would keep an evicted one's disk space) and no buffer memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use granary_protos::v1::UfsFingerprint;

use crate::block_reader::ReadState;

/// How long an unused state is kept.
const IDLE: Duration = Duration::from_secs(1);
/// States kept in all, and per inode (as many as readers of one file at once).
const MAX_STATES: usize = 256;
const PER_INODE: usize = 8;

pub struct UnopenedReads {
    pool: Arc<Mutex<Pool>>,
    sweeper: Once,
}

impl Default for UnopenedReads {
    fn default() -> Self {
        UnopenedReads {
            pool: Default::default(),
            sweeper: Once::new(),
        }
    }
}

#[derive(Default)]
struct Pool {
    by_inode: HashMap<u64, Vec<Kept>>,
    states: usize,
}

struct Kept {
    version: UfsFingerprint,
    state: ReadState,
    since: Instant,
}

impl Pool {
    /// Removes the states unused for `IDLE`; returns them, to be dropped unlocked.
    fn expire(&mut self, now: Instant) -> Vec<Kept> {
        let mut expired = Vec::new();
        self.by_inode.retain(|_, kept| {
            let (old, fresh): (Vec<Kept>, Vec<Kept>) =
                kept.drain(..).partition(|k| now - k.since >= IDLE);
            expired.extend(old);
            *kept = fresh;
            !kept.is_empty()
        });
        self.states -= expired.len();
        expired
    }
}

impl UnopenedReads {
    /// A state for reading `version` of `ino` at `offset`: the one whose last read
    /// ended there (a sequential reader's, with its readahead), else a fresh one (taking
    /// another would spoil that reader's readahead). States of other versions are dropped.
    pub fn take(&self, ino: u64, version: UfsFingerprint, offset: u64) -> ReadState {
        let mut stale = Vec::new();
        let found = {
            let mut pool = self.pool.lock().expect("read states lock");
            let mut found = None;
            if let Some(kept) = pool.by_inode.get_mut(&ino) {
                // In order (the oldest first, for `put`), without allocating on every
                // read: states of another version are rare.
                let mut i = 0;
                while i < kept.len() {
                    match kept[i].version == version {
                        true => i += 1,
                        false => stale.push(kept.remove(i)),
                    }
                }
                let pick = kept.iter().rposition(|k| k.state.continues_at(offset));
                found = pick.map(|i| kept.remove(i).state);
                if kept.is_empty() {
                    pool.by_inode.remove(&ino);
                }
            }
            pool.states -= stale.len() + usize::from(found.is_some());
            found
        };
        drop(stale);
        found.unwrap_or_default()
    }

    /// Keeps `state` for the next read of `ino`, trimmed to what a next read can use; an
    /// inode's oldest state makes room for it.
    pub fn put(&self, ino: u64, version: UfsFingerprint, mut state: ReadState) {
        self.sweeper
            .call_once(|| spawn_sweeper(Arc::downgrade(&self.pool)));
        state.trim();
        let mut pool = self.pool.lock().expect("read states lock");
        let evicted = {
            let kept = pool.by_inode.entry(ino).or_default();
            (kept.len() >= PER_INODE).then(|| kept.remove(0))
        };
        if evicted.is_none() && pool.states >= MAX_STATES {
            if pool.by_inode.get(&ino).is_some_and(Vec::is_empty) {
                pool.by_inode.remove(&ino);
            }
            return;
        }
        pool.by_inode.entry(ino).or_default().push(Kept {
            version,
            state,
            since: Instant::now(),
        });
        if evicted.is_none() {
            pool.states += 1;
        }
        drop(pool);
        drop(evicted);
    }
}

fn spawn_sweeper(pool: Weak<Mutex<Pool>>) {
    let sweep = move || loop {
        std::thread::sleep(IDLE);
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let expired = pool
            .lock()
            .expect("read states lock")
            .expire(Instant::now());
        drop(expired);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("granary-read-states".into())
        .spawn(sweep)
    {
        tracing::warn!(error = %e, "cannot start the read-state sweeper; idle states stay until reused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: UfsFingerprint = UfsFingerprint {
        size: 10,
        mtime_ns: 1,
    };

    fn kept(pool: &UnopenedReads) -> usize {
        pool.pool.lock().unwrap().states
    }

    #[test]
    fn states_come_back_per_inode_and_version_bounded_and_expire() {
        let pool = UnopenedReads::default();
        pool.put(1, V1, ReadState::default());
        pool.put(1, V1, ReadState::default());
        assert_eq!(kept(&pool), 2);
        pool.take(1, V1, 0);
        assert_eq!(kept(&pool), 1);
        let newer = UfsFingerprint {
            size: 10,
            mtime_ns: 2,
        };
        pool.take(1, newer, 0);
        assert_eq!(kept(&pool), 0, "a state of another version is dropped");
        for _ in 0..2 * PER_INODE {
            pool.put(2, V1, ReadState::default());
        }
        assert_eq!(kept(&pool), PER_INODE);
        for ino in 0..2 * MAX_STATES as u64 {
            pool.put(100 + ino, V1, ReadState::default());
        }
        assert_eq!(kept(&pool), MAX_STATES);
        let later = Instant::now() + IDLE;
        let expired = pool.pool.lock().unwrap().expire(later);
        assert_eq!(expired.len(), MAX_STATES);
        assert_eq!(kept(&pool), 0);
        assert!(pool.pool.lock().unwrap().by_inode.is_empty());
    }

    #[test]
    fn a_sequential_reader_gets_its_own_state_back() {
        let pool = UnopenedReads::default();
        pool.put(1, V1, ReadState::ended_at(100));
        pool.put(1, V1, ReadState::ended_at(500));
        assert!(pool.take(1, V1, 100).continues_at(100));
        assert!(pool.take(1, V1, 100).continues_at(0), "else a fresh one");
        assert_eq!(kept(&pool), 1, "the other reader's stays");
        assert!(pool.take(1, V1, 500).continues_at(500));
        for end in 1..=PER_INODE as u64 + 1 {
            pool.put(1, V1, ReadState::ended_at(end));
        }
        assert_eq!(kept(&pool), PER_INODE);
        assert!(
            !pool.take(1, V1, 1).continues_at(1),
            "the oldest made room for the newest"
        );
        assert!(pool
            .take(1, V1, PER_INODE as u64 + 1)
            .continues_at(PER_INODE as u64 + 1));
    }
}
