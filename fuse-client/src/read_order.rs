//! The READs of each file in flight, so that an empty answer (a READ wholly past the
//! file's end, which the kernel sends only when it believes the file longer: it shrank in
//! the UFS) goes out after every READ of a lower offset. The kernel takes the end of a
//! short answer as the file's new size only if the file's attributes did not change since
//! it asked, and taking one is such a change: an empty answer first would set a size past
//! the real end and leave the READ holding the real end padded with zeros up to it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an empty answer waits for the lower READs (they may wait on a worker).
const WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct InFlightReads {
    state: Mutex<State>,
    answered: Condvar,
    serial: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct State {
    /// By inode: (offset, serial) of each READ in flight.
    reads: HashMap<u64, BTreeSet<(u64, u64)>>,
    /// Answers waiting (rare): only then does an answered READ wake them.
    waiting: usize,
}

/// A READ in flight, until dropped.
pub struct InFlight {
    of: Arc<InFlightReads>,
    ino: u64,
    key: (u64, u64),
}

impl InFlightReads {
    /// Records a READ as the kernel sent it (call in the order READs arrive).
    pub fn begin(self: &Arc<Self>, ino: u64, offset: u64) -> InFlight {
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = (offset, serial);
        self.state
            .lock()
            .expect("reads lock")
            .reads
            .entry(ino)
            .or_default()
            .insert(key);
        InFlight {
            of: self.clone(),
            ino,
            key,
        }
    }
}

impl InFlight {
    /// Waits until no READ of this file at a lower offset is in flight (or [`WAIT`]).
    pub fn wait_for_lower(&self) {
        let deadline = Instant::now() + WAIT;
        let mut state = self.of.state.lock().expect("reads lock");
        loop {
            let lower = state
                .reads
                .get(&self.ino)
                .is_some_and(|r| r.range(..(self.key.0, 0)).next().is_some());
            let left = deadline.saturating_duration_since(Instant::now());
            if !lower || left.is_zero() {
                return;
            }
            state.waiting += 1;
            state = self
                .of
                .answered
                .wait_timeout(state, left)
                .expect("reads lock")
                .0;
            state.waiting -= 1;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.of.state.lock().expect("reads lock");
        if let Some(r) = state.reads.get_mut(&self.ino) {
            r.remove(&self.key);
            if r.is_empty() {
                state.reads.remove(&self.ino);
            }
        }
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.of.answered.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_waits_for_the_lower_reads_of_its_file_only() {
        let reads = Arc::new(InFlightReads::default());
        let low = reads.begin(1, 0);
        let other_file = reads.begin(2, 0);
        let high = reads.begin(1, 4096);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            high.wait_for_lower();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "waits while the lower read is in flight"
        );
        drop(low);
        rx.recv_timeout(Duration::from_secs(1))
            .expect("goes once it is answered, whatever other files do");
        waiter.join().unwrap();
        drop(other_file);
        assert!(reads.state.lock().unwrap().reads.is_empty());
        // Nothing lower: no wait.
        reads.begin(1, 0).wait_for_lower();
    }
}
