//! Listing ahead of a directory scan. A dataset reader (ImageFolder, `os.walk`, `find`)
//! lists a parent's subdirectories one after another in name order, and each one's first
//! listing costs a UFS listing and a Raft round while the reader waits, the cores partly
//! idle. Once two never-listed subdirectories of one parent are listed for readers in name
//! order, with none passed over between them, the next never-listed ones are listed in
//! the background, `AHEAD` at a time over all parents, so the reader finds them loaded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Listings ahead of scans in flight at once (and entries read per page looking for them).
pub(crate) const AHEAD: usize = 8;
/// Entries of the parent looked through for them at each listing that continues a scan.
pub(crate) const LOOK_THROUGH: usize = 1024;
/// On-demand listings further apart than this make no scan (a reader slow through the
/// directories listed ahead of it keeps its scan).
const SCAN_GAP: Duration = Duration::from_secs(60);
/// Parents followed at once (stale ones make room, else the one followed longest ago).
const MAX_SCANS: usize = 256;

/// The last subdirectory listed on demand in each parent, and when.
#[derive(Default)]
pub(crate) struct Scans {
    last: Mutex<HashMap<u64, (Vec<u8>, Instant)>>,
}

impl Scans {
    /// Records an on-demand listing of `name` in `parent`. If it continues a scan there
    /// (the one before came earlier in name order, and recently), the name listed before.
    pub fn continues(&self, parent: u64, name: &[u8]) -> Option<Vec<u8>> {
        self.continues_at(parent, name, Instant::now())
    }

    fn continues_at(&self, parent: u64, name: &[u8], now: Instant) -> Option<Vec<u8>> {
        let recent = |at: &Instant| now.saturating_duration_since(*at) <= SCAN_GAP;
        let mut last = self.last.lock().expect("scans lock");
        let continued = last
            .get(&parent)
            .filter(|(before, at)| before.as_slice() < name && recent(at))
            .map(|(before, _)| before.clone());
        if !last.contains_key(&parent) && last.len() >= MAX_SCANS {
            last.retain(|_, (_, at)| recent(at));
            // A walk over many parents leaves each recent when it moves on: the one
            // followed longest ago makes room.
            if last.len() >= MAX_SCANS {
                let oldest = last.iter().min_by_key(|(_, (_, at))| *at).map(|(p, _)| *p);
                if let Some(p) = oldest {
                    last.remove(&p);
                }
            }
        }
        last.insert(parent, (name.to_vec(), now));
        continued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_is_two_listings_of_one_parent_in_name_order_close_together() {
        let scans = Scans::default();
        let t0 = Instant::now();
        let scan = |parent, name: &[u8], at| scans.continues_at(parent, name, at);
        assert_eq!(scan(1, b"c000", t0), None, "a first listing");
        assert_eq!(scan(1, b"c001", t0).as_deref(), Some(&b"c000"[..]));
        assert_eq!(scan(2, b"c002", t0), None, "another parent's first");
        assert_eq!(scan(1, b"b", t0), None, "backwards");
        assert_eq!(scan(1, b"c", t0).as_deref(), Some(&b"b"[..]));
        let late = t0 + SCAN_GAP + Duration::from_millis(1);
        assert_eq!(scan(1, b"d", late), None, "too long after");
        assert_eq!(scan(1, b"e", late).as_deref(), Some(&b"d"[..]));
    }

    #[test]
    fn a_walk_over_more_parents_than_followed_keeps_its_scans() {
        let scans = Scans::default();
        let t0 = Instant::now();
        let at = |i: u64| t0 + Duration::from_millis(i);
        for p in 0..2 * MAX_SCANS as u64 {
            assert!(scans.continues_at(p, b"a", at(p)).is_none());
            assert!(scans.continues_at(p, b"b", at(p)).is_some(), "parent {p}");
        }
        assert_eq!(scans.last.lock().unwrap().len(), MAX_SCANS);
        let now = at(2 * MAX_SCANS as u64);
        assert!(
            scans.continues_at(0, b"c", now).is_none(),
            "the first parent made room"
        );
        let later = now + SCAN_GAP + Duration::from_secs(1);
        assert!(scans.continues_at(5000, b"a", later).is_none());
        assert_eq!(scans.last.lock().unwrap().len(), 1, "stale ones go first");
    }
}
