//! The READs of each file in flight, so that an empty answer (a READ wholly past the
//! file's end, which the kernel sends through its page cache only when it believes the
//! file longer: it shrank in the UFS) goes out after every READ of a lower offset. The
//! kernel takes the end of a short answer as the file's new size only if the file's
//! attributes did not change since it asked, and taking one is such a change: an empty
//! answer first would set a size past the real end and leave the READ holding the real
//! end padded with zeros up to it. An answer that must wait is parked, not a thread.
//!
//! READs are recorded as the threads reading `/dev/fuse` take them; with several such
//! threads a higher READ may be recorded a moment before a lower one sent earlier, and
//! then not wait for it (a narrow window, left).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct InFlightReads {
    state: Mutex<State>,
    serial: std::sync::atomic::AtomicU64,
}

type Send = Box<dyn FnOnce() + std::marker::Send>;

#[derive(Default)]
struct State {
    /// By inode: (offset, serial) of each READ in flight.
    reads: HashMap<u64, BTreeSet<(u64, u64)>>,
    /// By inode: answers waiting for the READs below their offset.
    parked: HashMap<u64, Vec<(u64, Send)>>,
}

impl State {
    fn lower_in_flight(&self, ino: u64, offset: u64) -> bool {
        self.reads
            .get(&ino)
            .is_some_and(|r| r.range(..(offset, 0)).next().is_some())
    }
}

/// A READ in flight, until dropped.
pub struct InFlight {
    of: Arc<InFlightReads>,
    ino: u64,
    key: (u64, u64),
}

impl InFlightReads {
    /// Records a READ as the kernel sent it.
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

    /// Whether no READ of `ino` is in flight.
    pub fn idle(&self, ino: u64) -> bool {
        !self
            .state
            .lock()
            .expect("reads lock")
            .reads
            .contains_key(&ino)
    }
}

impl InFlight {
    /// Runs `send` (the answer) once no READ of this file at a lower offset is in
    /// flight: now, or when the last of them is answered.
    pub fn answer_after_lower(self, send: impl FnOnce() + std::marker::Send + 'static) {
        let of = self.of.clone();
        let mut state = of.state.lock().expect("reads lock");
        if !state.lower_in_flight(self.ino, self.key.0) {
            drop(state);
            send();
            return;
        }
        let offset = self.key.0;
        let ino = self.ino;
        // Recorded until sent: it is below nothing that waits, but stays in order.
        state.parked.entry(ino).or_default().push((
            offset,
            Box::new(move || {
                send();
                drop(self);
            }),
        ));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ready: Vec<Send> = {
            let mut state = self.of.state.lock().expect("reads lock");
            if let Some(r) = state.reads.get_mut(&self.ino) {
                r.remove(&self.key);
                if r.is_empty() {
                    state.reads.remove(&self.ino);
                }
            }
            let Some(mut parked) = state.parked.remove(&self.ino) else {
                return;
            };
            let (ready, waiting): (Vec<_>, Vec<_>) = parked
                .drain(..)
                .partition(|(offset, _)| !state.lower_in_flight(self.ino, *offset));
            if !waiting.is_empty() {
                state.parked.insert(self.ino, waiting);
            }
            ready.into_iter().map(|(_, send)| send).collect()
        };
        for send in ready {
            send();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn an_answer_goes_after_the_lower_reads_of_its_file_only() {
        let reads = Arc::new(InFlightReads::default());
        let low = reads.begin(1, 0);
        let other_file = reads.begin(2, 0);
        let high = reads.begin(1, 4096);
        let higher = reads.begin(1, 8192);
        let (tx, rx) = channel();
        let (tx2, tx3) = (tx.clone(), tx.clone());
        higher.answer_after_lower(move || tx.send(8192).unwrap());
        high.answer_after_lower(move || tx2.send(4096).unwrap());
        assert!(
            rx.try_recv().is_err(),
            "parked while the lower read is in flight"
        );
        drop(other_file);
        assert!(
            rx.try_recv().is_err(),
            "another file's read changes nothing"
        );
        drop(low);
        let sent: Vec<u64> = rx.try_iter().collect();
        assert_eq!(sent.len(), 2, "both go once it is answered: {sent:?}");
        assert!(reads.idle(1) && reads.idle(2));
        // Nothing lower: at once.
        reads
            .begin(1, 0)
            .answer_after_lower(move || tx3.send(0).unwrap());
        assert_eq!(rx.try_recv().unwrap(), 0);
    }
}
