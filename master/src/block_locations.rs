//! Which workers cache which blocks. Soft state, rebuilt from worker registrations and
//! heartbeats on every master, so it never needs to be replicated.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use granary_protos::v1::BlockKey;

type Key = (u64, u32);

#[derive(Debug, Default)]
pub struct BlockLocations {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_block: HashMap<Key, Vec<Arc<str>>>,
    by_worker: HashMap<Arc<str>, HashSet<Key>>,
}

impl Inner {
    fn add(&mut self, worker: &Arc<str>, key: Key) {
        if self
            .by_worker
            .entry(worker.clone())
            .or_default()
            .insert(key)
        {
            self.by_block.entry(key).or_default().push(worker.clone());
        }
    }

    fn remove(&mut self, worker: &str, key: Key) {
        if let Some(set) = self.by_worker.get_mut(worker) {
            set.remove(&key);
        }
        if let Some(list) = self.by_block.get_mut(&key) {
            list.retain(|w| &**w != worker);
            if list.is_empty() {
                self.by_block.remove(&key);
            }
        }
    }

    fn drop_worker(&mut self, worker: &str) {
        if let Some(keys) = self.by_worker.remove(worker) {
            for key in keys {
                if let Some(list) = self.by_block.get_mut(&key) {
                    list.retain(|w| &**w != worker);
                    if list.is_empty() {
                        self.by_block.remove(&key);
                    }
                }
            }
        }
    }
}

impl BlockLocations {
    /// Replaces everything known about `worker` with its full block list.
    pub fn reset_worker(&self, worker: &str, blocks: &[BlockKey]) {
        let mut inner = self.inner.write().expect("locations lock");
        inner.drop_worker(worker);
        let id: Arc<str> = Arc::from(worker);
        inner.by_worker.insert(id.clone(), HashSet::new());
        for b in blocks {
            inner.add(&id, (b.file_id, b.index));
        }
    }

    pub fn apply_delta(&self, worker: &str, added: &[BlockKey], removed: &[BlockKey]) {
        let mut inner = self.inner.write().expect("locations lock");
        let id = inner
            .by_worker
            .get_key_value(worker)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(worker));
        for b in removed {
            inner.remove(worker, (b.file_id, b.index));
        }
        for b in added {
            inner.add(&id, (b.file_id, b.index));
        }
    }

    pub fn drop_worker(&self, worker: &str) {
        self.inner
            .write()
            .expect("locations lock")
            .drop_worker(worker);
    }

    /// Workers caching each block of `file_id`, for the given block indices.
    pub fn of_file(&self, file_id: u64, blocks: u32) -> Vec<(u32, Vec<String>)> {
        let inner = self.inner.read().expect("locations lock");
        (0..blocks)
            .filter_map(|i| {
                inner
                    .by_block
                    .get(&(file_id, i))
                    .map(|ws| (i, ws.iter().map(|w| w.to_string()).collect()))
            })
            .collect()
    }

    pub fn block_count(&self) -> u64 {
        self.inner.read().expect("locations lock").by_block.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(f: u64, i: u32) -> BlockKey {
        BlockKey {
            file_id: f,
            index: i,
        }
    }

    #[test]
    fn registration_deltas_and_loss() {
        let loc = BlockLocations::default();
        loc.reset_worker("w1", &[k(1, 0), k(1, 1)]);
        loc.apply_delta("w2", &[k(1, 1)], &[]);
        assert_eq!(
            loc.of_file(1, 3),
            vec![(0, vec!["w1".into()]), (1, vec!["w1".into(), "w2".into()])]
        );
        loc.apply_delta("w1", &[], &[k(1, 1)]);
        assert_eq!(loc.of_file(1, 3)[1], (1, vec!["w2".to_string()]));
        loc.drop_worker("w2");
        assert_eq!(loc.of_file(1, 3), vec![(0, vec!["w1".into()])]);
        loc.reset_worker("w1", &[]);
        assert_eq!(loc.block_count(), 0);
    }
}
