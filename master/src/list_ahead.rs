//! Listing ahead of a directory scan. A dataset reader (ImageFolder, `os.walk`, `find`)
//! lists a parent's subdirectories one after another in name order, and each one's first
//! listing costs a UFS listing and a Raft round while the reader waits, the cores partly
//! idle. Once two never-listed subdirectories of one parent are listed for readers in name
//! order, the next never-listed ones are listed in the background, `AHEAD` at a time over
//! all parents, so the reader finds them loaded.

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
/// Parents followed at once (stale ones make room).
const MAX_SCANS: usize = 256;

/// The last subdirectory listed on demand in each parent, and when.
#[derive(Default)]
pub(crate) struct Scans {
    last: Mutex<HashMap<u64, (Vec<u8>, Instant)>>,
}

impl Scans {
    /// Records an on-demand listing of `name` in `parent`: whether it continues a scan
    /// there (the one before came earlier in name order, and recently).
    pub fn continues(&self, parent: u64, name: &[u8]) -> bool {
        self.continues_at(parent, name, Instant::now())
    }

    fn continues_at(&self, parent: u64, name: &[u8], now: Instant) -> bool {
        let recent = |at: &Instant| now.saturating_duration_since(*at) <= SCAN_GAP;
        let mut last = self.last.lock().expect("scans lock");
        let continued = last
            .get(&parent)
            .is_some_and(|(before, at)| before.as_slice() < name && recent(at));
        if !last.contains_key(&parent) && last.len() >= MAX_SCANS {
            last.retain(|_, (_, at)| recent(at));
            if last.len() >= MAX_SCANS {
                return false;
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
        assert!(!scans.continues_at(1, b"c000", t0), "a first listing");
        assert!(scans.continues_at(1, b"c001", t0));
        assert!(
            !scans.continues_at(2, b"c002", t0),
            "another parent's first"
        );
        assert!(!scans.continues_at(1, b"b", t0), "backwards");
        assert!(scans.continues_at(1, b"c", t0));
        let late = t0 + SCAN_GAP + Duration::from_millis(1);
        assert!(!scans.continues_at(1, b"d", late), "too long after");
        assert!(scans.continues_at(1, b"e", late));
    }

    #[test]
    fn stale_parents_make_room_and_fresh_ones_are_kept() {
        let scans = Scans::default();
        let t0 = Instant::now();
        for p in 0..MAX_SCANS as u64 {
            scans.continues_at(p, b"a", t0);
        }
        assert!(!scans.continues_at(1000, b"a", t0));
        assert!(
            !scans.continues_at(1000, b"b", t0),
            "no room while all are fresh"
        );
        assert!(scans.continues_at(0, b"b", t0), "the followed ones go on");
        let later = t0 + SCAN_GAP + Duration::from_secs(1);
        assert!(!scans.continues_at(1000, b"a", later));
        assert!(
            scans.continues_at(1000, b"b", later),
            "followed once room was made"
        );
    }
}
