//! Files the leader deleted, for the workers to drop their cached blocks: one bounded
//! log, and per worker how far its heartbeat replies have delivered it. Soft state,
//! best effort: what a worker misses (a leader change, a worker far behind) LRU
//! eviction reclaims. A worker is told of every deletion, not only of files the
//! masters know it caches: they hear of new blocks a heartbeat late.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use granary_protos::v1::DeletedFile;

/// Deletions kept for workers that have not heard of them yet.
const KEPT: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct DeletedFiles {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence number of `log[0]`.
    first: u64,
    log: VecDeque<DeletedFile>,
    /// Per worker, the sequence number of the first deletion it has not been told of.
    cursors: HashMap<String, u64>,
}

impl Inner {
    fn end(&self) -> u64 {
        self.first + self.log.len() as u64
    }
}

impl DeletedFiles {
    pub fn record(&self, file_id: u64, blocks: u32) {
        let mut inner = self.inner.lock().expect("deleted files lock");
        if inner.log.len() == KEPT {
            inner.log.pop_front();
            inner.first += 1;
        }
        inner.log.push_back(DeletedFile { file_id, blocks });
    }

    /// A worker registered: it is told of deletions from now on (its full block list
    /// just reached the masters; older deletions among them age out by LRU).
    pub fn start(&self, worker: &str) {
        let mut inner = self.inner.lock().expect("deleted files lock");
        let end = inner.end();
        inner.cursors.insert(worker.to_string(), end);
    }

    /// A worker is gone: nothing more is kept for it.
    pub fn forget(&self, worker: &str) {
        self.inner
            .lock()
            .expect("deleted files lock")
            .cursors
            .remove(worker);
    }

    /// The deletions `worker` has not been told of, for its heartbeat reply.
    pub fn take(&self, worker: &str) -> Vec<DeletedFile> {
        let mut inner = self.inner.lock().expect("deleted files lock");
        let (first, end) = (inner.first, inner.end());
        let Some(cursor) = inner.cursors.get_mut(worker) else {
            return Vec::new();
        };
        let from = (*cursor).max(first);
        *cursor = end;
        let skip = (from - first) as usize;
        inner.log.range(skip..).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(d: Vec<DeletedFile>) -> Vec<u64> {
        d.into_iter().map(|f| f.file_id).collect()
    }

    #[test]
    fn each_worker_hears_of_each_deletion_once_from_its_registration_on() {
        let d = DeletedFiles::default();
        d.record(1, 3);
        d.start("w1");
        d.record(2, 1);
        d.start("w2");
        d.record(3, 1);
        assert_eq!(ids(d.take("w1")), vec![2, 3]);
        assert_eq!(ids(d.take("w1")), Vec::<u64>::new());
        assert_eq!(ids(d.take("w2")), vec![3]);
        assert_eq!(ids(d.take("unknown")), Vec::<u64>::new());
        d.forget("w2");
        d.record(4, 1);
        assert_eq!(ids(d.take("w2")), Vec::<u64>::new());
        assert_eq!(ids(d.take("w1")), vec![4]);
    }

    #[test]
    fn a_worker_far_behind_gets_what_is_kept() {
        let d = DeletedFiles::default();
        d.start("w");
        for i in 0..KEPT as u64 + 10 {
            d.record(i, 1);
        }
        let got = d.take("w");
        assert_eq!(got.len(), KEPT);
        assert_eq!(got[0].file_id, 10);
    }
}
