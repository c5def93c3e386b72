//! FUSE passthrough bookkeeping: which backing file (a co-located worker's cache file)
//! the kernel reads each inode from. The kernel wants one backing file per inode for all
//! its open handles. A backing file stays registered for a while after its last handle
//! closes, so re-opening a warm file costs no worker round trip and no registration.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::BackingId;

/// How long an open for writing waits for the RELEASE of its file's last passthrough
/// reader, which the kernel sends after the reader's close returned.
pub const WRITER_WAIT: Duration = Duration::from_millis(500);

/// Idle backing files kept registered, at most this many (an epoch over a dataset of
/// small files re-opens each; a miss costs a worker round trip)...
const IDLE_FILES: usize = 1 << 16;
/// ... and this many bytes (a worker may have evicted them: the kernel's reference keeps
/// their disk space until they go).
const IDLE_BYTES: u64 = 4 << 30;

/// `Id`: the kernel's handle on a registered backing file (a stand-in in tests).
pub struct Passthrough<Id = BackingId> {
    enabled: AtomicBool,
    table: Mutex<Table<Id>>,
    /// Signalled when a registration ends, and when an inode's last handle closes while
    /// a writer waits for it.
    registered: Condvar,
    /// How long an open for writing waits for its file's passthrough readers to close.
    writer_wait: Duration,
}

struct Table<Id> {
    by_inode: HashMap<u64, Backing<Id>>,
    by_handle: HashMap<u64, u64>,
    /// (inode, its `idle_since`) at each close of an inode's last handle, oldest first;
    /// an entry is stale once the inode was opened again (stale entries are skipped and,
    /// once they outnumber the current ones, compacted away).
    idle: VecDeque<(u64, u64)>,
    /// Registered backing files with no handle open, and their bytes.
    idle_files: usize,
    idle_bytes: u64,
    /// Counts closes of last handles: an idle entry's identity.
    closes: u64,
    /// Opens for writing waiting in [`Passthrough::writable`].
    writers_waiting: usize,
}

/// A file's content version: its UFS fingerprint (size, mtime).
pub type Version = (u64, i64);

struct Backing<Id> {
    mode: Mode<Id>,
    version: Version,
    /// Open handles in that mode.
    users: usize,
    bytes: u64,
    /// When its last handle closed (a `Table::closes` count), while idle.
    idle_since: u64,
}

enum Mode<Id> {
    /// Being registered by its first opener.
    Registering,
    Passthrough(Arc<Id>),
    /// Handles open with the kernel's page cache (no backing file for this file).
    Cached,
}

/// What an open does about passthrough.
pub enum Claim<Id = BackingId> {
    /// Read through this registered backing file (the kernel's rule: while one handle of
    /// an inode is in passthrough, all are, so a new version of a file open here is read
    /// once its descriptors here have closed).
    Backing(Arc<Id>),
    /// Register the file's backing file, then call [`Passthrough::registered`] (or
    /// [`Passthrough::failed`]).
    Register,
    /// Userspace reads through the page cache, as usual.
    No,
}

impl<Id> Passthrough<Id> {
    /// `writer_wait`: see [`Passthrough::writable`] (the waiting open is on an offload
    /// thread; the RELEASE it waits for is answered on a FUSE thread).
    pub fn new(wanted: bool, writer_wait: Duration) -> Self {
        Passthrough {
            writer_wait,
            enabled: AtomicBool::new(wanted),
            table: Mutex::new(Table {
                by_inode: HashMap::new(),
                by_handle: HashMap::new(),
                idle: VecDeque::new(),
                idle_files: 0,
                idle_bytes: 0,
                closes: 0,
                writers_waiting: 0,
            }),
            registered: Condvar::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    /// Whether a read-only open of `ino` is decided without registering a backing file
    /// (which asks a worker for it) or waiting for another open that registers one.
    pub fn settled(&self, ino: u64) -> bool {
        !self.enabled()
            || self
                .table
                .lock()
                .expect("passthrough table")
                .by_inode
                .get(&ino)
                .is_some_and(|b| !matches!(b.mode, Mode::Registering))
    }

    /// A read-only open of `ino`, at `version`, as handle `fh`.
    pub fn claim(&self, ino: u64, fh: u64, version: Version) -> Claim<Id> {
        if !self.enabled() {
            return Claim::No;
        }
        let mut t = self.table.lock().expect("passthrough table");
        // Another open registers this inode's backing file: its outcome decides this one.
        while t
            .by_inode
            .get(&ino)
            .is_some_and(|b| matches!(b.mode, Mode::Registering))
        {
            t = self.registered.wait(t).expect("passthrough table");
        }
        let claim = match t.by_inode.get(&ino) {
            None => None,
            // An idle backing file of an older version: replaced.
            Some(b) if b.users == 0 && b.version != version => {
                t.forget_idle(ino);
                None
            }
            Some(b) => Some(match &b.mode {
                Mode::Passthrough(id) => Claim::Backing(id.clone()),
                _ => Claim::No,
            }),
        };
        let Some(claim) = claim else {
            t.by_inode.insert(
                ino,
                Backing {
                    mode: Mode::Registering,
                    version,
                    users: 1,
                    bytes: 0,
                    idle_since: 0,
                },
            );
            t.by_handle.insert(fh, ino);
            return Claim::Register;
        };
        let b = t.by_inode.get_mut(&ino).expect("matched above");
        b.users += 1;
        if b.users == 1 {
            // Only registered backing files are ever idle.
            let bytes = b.bytes;
            t.idle_files -= 1;
            t.idle_bytes -= bytes;
        }
        t.by_handle.insert(fh, ino);
        if matches!(claim, Claim::Backing(_)) {
            metrics::counter!("granary_client_passthrough_opens_total").increment(1);
        }
        claim
    }

    pub fn registered(&self, ino: u64, id: Id, bytes: u64) -> Arc<Id> {
        let id = Arc::new(id);
        let mut t = self.table.lock().expect("passthrough table");
        if let Some(b) = t.by_inode.get_mut(&ino) {
            b.mode = Mode::Passthrough(id.clone());
            b.bytes = bytes;
        }
        self.registered.notify_all();
        metrics::counter!("granary_client_passthrough_opens_total").increment(1);
        id
    }

    /// No backing file for this open: it reads through the page cache, and so do the
    /// inode's next opens while it is open.
    pub fn failed(&self, ino: u64) {
        let mut t = self.table.lock().expect("passthrough table");
        if let Some(b) = t.by_inode.get_mut(&ino) {
            b.mode = Mode::Cached;
        }
        self.registered.notify_all();
    }

    /// Whether `ino` may be opened for writing. The kernel refuses (EIO) any open but a
    /// passthrough one while a passthrough handle of the inode is open, and a writer
    /// cannot read through a worker's cache file. The kernel lets go of a handle at close
    /// and sends its RELEASE after, so a file read and then written (`cat f; echo >> f`)
    /// is waited for a moment; a reader still open after that keeps the file busy.
    pub fn writable(&self, ino: u64) -> bool {
        if !self.enabled() {
            return true;
        }
        let passed = |t: &mut Table<Id>| {
            t.by_inode.get(&ino).is_some_and(|b| {
                b.users > 0 && matches!(b.mode, Mode::Passthrough(_) | Mode::Registering)
            })
        };
        let mut t = self.table.lock().expect("passthrough table");
        if !passed(&mut t) {
            return true;
        }
        t.writers_waiting += 1;
        let (mut t, _) = self
            .registered
            .wait_timeout_while(t, self.writer_wait, passed)
            .expect("passthrough table");
        t.writers_waiting -= 1;
        !passed(&mut t)
    }

    pub fn release(&self, fh: u64) {
        let mut guard = self.table.lock().expect("passthrough table");
        let t = &mut *guard;
        let Some(ino) = t.by_handle.remove(&fh) else {
            return;
        };
        let Some(b) = t.by_inode.get_mut(&ino) else {
            return;
        };
        b.users -= 1;
        if b.users > 0 {
            return;
        }
        if t.writers_waiting > 0 {
            self.registered.notify_all();
        }
        if !matches!(b.mode, Mode::Passthrough(_)) {
            t.by_inode.remove(&ino);
            return;
        }
        t.closes += 1;
        let (bytes, closes) = (b.bytes, t.closes);
        b.idle_since = closes;
        t.idle_files += 1;
        t.idle_bytes += bytes;
        t.idle.push_back((ino, closes));
        while t.idle_files > IDLE_FILES || t.idle_bytes > IDLE_BYTES {
            let Some((oldest, since)) = t.idle.pop_front() else {
                break;
            };
            if is_idle_since(&t.by_inode, oldest, since) {
                t.forget_idle(oldest);
            }
        }
        // Entries of files re-opened since are dropped once they outnumber current ones.
        if t.idle.len() > 2 * t.idle_files + 64 {
            let by_inode = &t.by_inode;
            t.idle
                .retain(|&(ino, since)| is_idle_since(by_inode, ino, since));
        }
    }
}

impl<Id> Table<Id> {
    /// Drops an idle backing file's registration.
    fn forget_idle(&mut self, ino: u64) {
        if let Some(gone) = self.by_inode.remove(&ino) {
            self.idle_files -= 1;
            self.idle_bytes -= gone.bytes;
        }
    }
}

/// Whether an idle-list entry is current: the inode is still idle since that close.
fn is_idle_since<Id>(by_inode: &HashMap<u64, Backing<Id>>, ino: u64, since: u64) -> bool {
    by_inode
        .get(&ino)
        .is_some_and(|b| b.users == 0 && b.idle_since == since)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Version = (100, 1);
    const V2: Version = (100, 2);

    fn backing(c: Claim<u32>) -> Option<u32> {
        match c {
            Claim::Backing(id) => Some(*id),
            _ => None,
        }
    }

    #[test]
    fn a_backing_file_outlives_its_last_close_until_the_version_changes() {
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        assert!(matches!(pt.claim(1, 10, V1), Claim::Register));
        std::thread::scope(|s| {
            // Another open while the first registers waits for its backing file.
            let second = s.spawn(|| backing(pt.claim(1, 11, V1)));
            std::thread::sleep(std::time::Duration::from_millis(50));
            pt.registered(1, 7, 100);
            assert_eq!(second.join().unwrap(), Some(7));
        });
        assert_eq!(backing(pt.claim(1, 12, V1)), Some(7));
        for fh in [10, 11, 12] {
            pt.release(fh);
        }
        assert_eq!(backing(pt.claim(1, 13, V1)), Some(7), "kept while idle");
        // A new version while the old one is open: the old backing file; once idle: replaced.
        assert_eq!(backing(pt.claim(1, 14, V2)), Some(7));
        pt.release(13);
        pt.release(14);
        assert!(
            matches!(pt.claim(1, 15, V2), Claim::Register),
            "the new version's backing file, once the old one's descriptors closed"
        );
    }

    #[test]
    fn a_file_open_through_the_page_cache_is_never_passed_through_meanwhile() {
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        assert!(matches!(pt.claim(2, 20, V1), Claim::Register));
        pt.failed(2);
        assert!(matches!(pt.claim(2, 21, V1), Claim::No));
        pt.release(20);
        assert!(matches!(pt.claim(2, 22, V1), Claim::No));
        pt.release(21);
        pt.release(22);
        assert!(
            matches!(pt.claim(2, 23, V1), Claim::Register),
            "tried again once closed"
        );
        let off = Passthrough::<u32>::new(false, Duration::ZERO);
        assert!(matches!(off.claim(2, 1, V1), Claim::No));
    }

    #[test]
    fn epochs_over_a_dataset_keep_every_file_registered() {
        // More files than half the bound, re-opened epoch after epoch: each close of a
        // file re-opened since its last close must not count against the bound again.
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        let files = IDLE_FILES as u64 / 2 + 1;
        let mut fh = 0;
        for epoch in 0..4 {
            for ino in 0..files {
                fh += 1;
                match pt.claim(ino, fh, V1) {
                    Claim::Register if epoch == 0 => {
                        pt.registered(ino, ino as u32, 1);
                    }
                    Claim::Backing(_) if epoch > 0 => {}
                    _ => panic!("epoch {epoch}: file {ino} was not kept registered"),
                }
                pt.release(fh);
            }
        }
        let t = pt.table.lock().unwrap();
        assert_eq!(t.idle_files, files as usize);
        assert!(t.idle.len() <= 2 * t.idle_files + 64, "stale entries go");
    }

    #[test]
    fn a_file_opened_over_and_over_leaves_no_trail() {
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        assert!(matches!(pt.claim(1, 1, V1), Claim::Register));
        pt.registered(1, 1, 1);
        pt.release(1);
        assert!(matches!(pt.claim(2, 2, V1), Claim::Register));
        pt.registered(2, 2, 1);
        pt.release(2);
        for fh in 3..10_000 {
            assert!(matches!(pt.claim(2, fh, V1), Claim::Backing(_)));
            pt.release(fh);
        }
        let t = pt.table.lock().unwrap();
        assert!(
            t.idle.len() <= 2 * t.idle_files + 64,
            "{} entries",
            t.idle.len()
        );
        assert_eq!((t.idle_files, t.idle_bytes), (2, 2));
    }

    #[test]
    fn a_writer_waits_for_the_release_of_passthrough_readers_only() {
        let pt = Passthrough::<u32>::new(true, Duration::from_secs(5));
        assert!(pt.writable(1), "never opened");
        assert!(matches!(pt.claim(1, 10, V1), Claim::Register));
        pt.registered(1, 7, 100);
        std::thread::scope(|s| {
            let writer = s.spawn(|| pt.writable(1));
            std::thread::sleep(Duration::from_millis(50));
            pt.release(10);
            assert!(writer.join().unwrap(), "the reader's RELEASE came");
        });
        assert!(
            pt.writable(1),
            "idle: the kernel holds no passthrough handle"
        );
        assert!(matches!(pt.claim(2, 20, V1), Claim::Register));
        pt.failed(2);
        assert!(pt.writable(2), "read through the page cache");

        let impatient = Passthrough::<u32>::new(true, Duration::ZERO);
        assert!(matches!(impatient.claim(1, 10, V1), Claim::Register));
        assert!(!impatient.writable(1), "registering");
        impatient.registered(1, 7, 100);
        assert!(!impatient.writable(1), "a reader open");
        let off = Passthrough::<u32>::new(false, Duration::ZERO);
        assert!(off.writable(1));
    }

    #[test]
    fn idle_backing_files_are_bounded() {
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        for ino in 0..=IDLE_FILES as u64 {
            assert!(matches!(pt.claim(ino, ino, V1), Claim::Register));
            pt.registered(ino, ino as u32, 1);
            pt.release(ino);
        }
        let t = pt.table.lock().unwrap();
        assert_eq!(t.by_inode.len(), IDLE_FILES);
        assert!(!t.by_inode.contains_key(&0), "the oldest went");
        drop(t);
        let pt = Passthrough::<u32>::new(true, Duration::ZERO);
        pt.claim(1, 1, V1);
        pt.registered(1, 1, IDLE_BYTES + 1);
        pt.release(1);
        assert!(
            pt.table.lock().unwrap().by_inode.is_empty(),
            "too big to keep"
        );
    }
}
