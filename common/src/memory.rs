//! One memory budget for transient buffers, shown by a gauge: a mount's readahead data
//! and small files staged until their close (`buffer_memory`; past it, a read fetches
//! only what it was asked for and a written file is staged in a file instead), and an S3
//! UFS's parts fetched ahead of their reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct MemoryLimiter {
    limit: u64,
    used: AtomicU64,
    /// The gauge that shows `used`.
    gauge: &'static str,
}

impl MemoryLimiter {
    pub fn new(limit: u64, gauge: &'static str) -> Arc<Self> {
        // Shown from the start, not from the first reservation.
        metrics::gauge!(gauge).set(0.0);
        Arc::new(MemoryLimiter {
            limit,
            used: AtomicU64::new(0),
            gauge,
        })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `want` bytes, or only `need` once that would pass the limit: `need` is
    /// always granted (a read must go on).
    pub fn reserve(self: &Arc<Self>, want: u64, need: u64) -> Reservation {
        let mut r = self.empty();
        if !r.grow_to(want) {
            self.add(need);
            r.bytes = need;
        }
        r
    }

    /// Reserves `bytes` if they fit under the limit.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut r = self.empty();
        r.grow_to(bytes).then_some(r)
    }

    fn empty(self: &Arc<Self>) -> Reservation {
        Reservation {
            limiter: self.clone(),
            bytes: 0,
        }
    }

    fn add(&self, bytes: u64) {
        let now = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        metrics::gauge!(self.gauge).set(now as f64);
    }

    fn sub(&self, bytes: u64) {
        let now = self.used.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        metrics::gauge!(self.gauge).set(now as f64);
    }
}

/// Bytes held against the limit; given back when dropped.
pub struct Reservation {
    limiter: Arc<MemoryLimiter>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `bytes` in all, if the growth fits under the limit; false leaves it as it was.
    pub fn grow_to(&mut self, bytes: u64) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        let more = bytes - self.bytes;
        let fits = self
            .limiter
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + more <= self.limiter.limit).then_some(used + more)
            })
            .is_ok();
        if fits {
            self.bytes = bytes;
            metrics::gauge!(self.limiter.gauge).set(self.limiter.used() as f64);
        }
        fits
    }

    /// Gives back all but `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.limiter.sub(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_limit_and_give_it_back() {
        let m = MemoryLimiter::new(100, "test_bytes");
        let mut a = m.try_reserve(60).unwrap();
        assert!(m.try_reserve(50).is_none());
        assert!(!a.grow_to(101));
        assert_eq!(a.bytes(), 60);
        // A read past the limit still gets what it needs, not what it wants.
        let b = m.reserve(80, 10);
        assert_eq!((b.bytes(), m.used()), (10, 70));
        assert!(a.grow_to(90));
        drop(b);
        a.shrink_to(30);
        assert_eq!(m.used(), 30);
        drop(a);
        assert_eq!(m.used(), 0);
    }
}
