//! The mount's metadata caches: bounded concurrent maps whose entries may expire a
//! fixed time after they were stored. Every open looks up two of them, so a lookup must
//! cost little next to a FUSE round trip: a lock-sharded hash table with S3-FIFO
//! eviction (quick_cache) takes ~0.2 µs where moka's took 0.4–2 µs and ~15% of the mount's
//! CPU in a warm small-file epoch (see ARCHITECTURE.md).

use std::hash::Hash;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::Equivalent;

pub struct MetaCache<K, V> {
    map: Cache<K, (V, Instant)>,
    /// How long an entry answers after it was stored; `None`: until evicted.
    ttl: Option<Duration>,
}

impl<K: Eq + Hash + Clone, V: Clone> MetaCache<K, V> {
    pub fn new(capacity: u64, ttl: Option<Duration>) -> Self {
        MetaCache {
            // At least one entry: quick_cache sizes its shards from the capacity.
            map: Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX).max(1)),
            ttl,
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let (value, stored) = self.map.get(key)?;
        if self.expired(stored) {
            // Only that entry: one stored since is fresh.
            self.map.remove_if(key, |(_, at)| *at == stored);
            return None;
        }
        Some(value)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.map
            .get(key)
            .is_some_and(|(_, stored)| !self.expired(stored))
    }

    pub fn insert(&self, key: K, value: V) {
        if self.ttl != Some(Duration::ZERO) {
            self.map.insert(key, (value, Instant::now()));
        }
    }

    pub fn invalidate<Q>(&self, key: &Q)
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.map.remove(key);
    }

    /// The entries that still answer and match `keep`.
    pub fn matching(&self, keep: impl Fn(&K, &V) -> bool) -> Vec<(K, V)> {
        self.map
            .iter()
            .filter(|(k, (v, stored))| !self.expired(*stored) && keep(k, v))
            .map(|(k, (v, _))| (k, v))
            .collect()
    }

    fn expired(&self, stored: Instant) -> bool {
        self.ttl.is_some_and(|ttl| stored.elapsed() >= ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_their_ttl_and_a_fresh_one_answers_again() {
        let c = MetaCache::new(100, Some(Duration::from_millis(50)));
        c.insert(1u64, "a");
        assert_eq!(c.get(&1), Some("a"));
        assert!(c.contains_key(&1));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.contains_key(&1));
        assert_eq!(c.get(&1), None);
        c.insert(1, "b");
        assert_eq!(c.get(&1), Some("b"));
        c.invalidate(&1);
        assert_eq!(c.get(&1), None);
    }

    #[test]
    fn a_zero_ttl_caches_nothing_and_no_ttl_keeps_entries() {
        let none = MetaCache::new(100, Some(Duration::ZERO));
        none.insert(1u64, 1u64);
        assert_eq!(none.get(&1), None);
        let forever = MetaCache::new(100, None);
        forever.insert(1u64, 1u64);
        assert_eq!(forever.get(&1), Some(1));
    }

    #[test]
    fn the_capacity_bounds_the_entries_kept() {
        let c = MetaCache::new(1_000, None);
        for i in 0..100_000u64 {
            c.insert(i, i);
        }
        let kept = (0..100_000u64).filter(|i| c.contains_key(i)).count();
        assert!(kept <= 1_100, "{kept} entries kept");
        assert!(kept > 0);
    }
}
