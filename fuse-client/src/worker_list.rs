//! The live workers as each shard's masters list them, shared by the read and write
//! paths: a file is read and written through the workers of its own shard (a shard may be
//! a separate cluster with its own workers). A caller takes the last known list without
//! waiting on the masters: a stale list is listed again by a background thread, and no
//! lock is held across that call, so cached blocks stay readable at full speed while
//! every master is unreachable.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::v1::WorkerInfo;

use granary_meta_client::MetadataService;

/// Tries of a block read or an upload that fails retryably (a worker restarting, or one
/// that has not yet learned a mount, which takes up to a heartbeat): about 2.5 s in all.
const RETRY_ATTEMPTS: u32 = 6;
/// How long a retry waits for the masters to list the workers again before it goes on
/// with the list it has.
const REFRESH_WAIT: Duration = Duration::from_secs(1);
/// How long a caller that knows no worker of a shard waits for its masters (their
/// calls give up sooner, after the retry deadline).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(60);
/// A shard whose masters just said it has no workers is not asked again sooner.
const EMPTY_ANSWER_FRESH: Duration = Duration::from_secs(1);

pub struct WorkerList {
    shared: Arc<Shared>,
    wake: SyncSender<()>,
    hostname: String,
}

struct Shared {
    meta: Arc<dyn MetadataService>,
    ttl: Duration,
    /// By shard.
    state: Mutex<HashMap<u16, Listing>>,
    listed: Condvar,
}

#[derive(Default)]
struct Listing {
    /// When the masters last answered, and what (sorted by worker id).
    at: Option<Instant>,
    workers: Arc<Vec<WorkerInfo>>,
    /// Listing attempts finished, and the last one's error.
    attempts: u64,
    error: Option<FsError>,
}

impl Shared {
    /// Asks every shard's masters once whose list is stale or wanted, all shards at once
    /// (one whose masters are unreachable holds up only its own callers); no lock is held
    /// across the calls.
    fn list_all(&self) {
        let due: Vec<u16> = self
            .state
            .lock()
            .expect("worker list lock")
            .iter()
            .filter(|(_, l)| l.at.is_none_or(|t| t.elapsed() >= self.ttl) || l.error.is_some())
            .map(|(&shard, _)| shard)
            .collect();
        match due.as_slice() {
            [] => {}
            [shard] => self.list(*shard),
            _ => std::thread::scope(|s| {
                for shard in due {
                    s.spawn(move || self.list(shard));
                }
            }),
        }
    }

    /// Asks shard `shard`'s masters once and records the answer.
    fn list(&self, shard: u16) {
        let answer = self.meta.workers_of(shard);
        let mut all = self.state.lock().expect("worker list lock");
        let st = all.entry(shard).or_default();
        match answer {
            // A master that just joined may not know the workers yet.
            Ok(list) if list.is_empty() && !st.workers.is_empty() => {
                tracing::debug!("a master listed no workers; keeping the last list");
                st.error = None;
            }
            Ok(mut list) => {
                list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                st.at = Some(Instant::now());
                st.workers = Arc::new(list);
                st.error = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the workers; keeping the last list");
                st.error = Some(e);
            }
        }
        st.attempts += 1;
        self.listed.notify_all();
    }
}

/// Lists the workers whenever woken, until the list is dropped.
fn refresher(shared: Weak<Shared>, wake: Receiver<()>) {
    while wake.recv().is_ok() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.list_all();
    }
}

impl WorkerList {
    /// `ttl`: how old a list may get before a caller's use of it starts a new listing.
    pub fn new(meta: Arc<dyn MetadataService>, hostname: String, ttl: Duration) -> Self {
        let shared = Arc::new(Shared {
            meta,
            ttl,
            state: Mutex::default(),
            listed: Condvar::new(),
        });
        // One wake-up pending is enough: the listing it starts answers every caller.
        let (wake, rx) = sync_channel(1);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("granary-workers".into())
            .spawn(move || refresher(weak, rx))
            .expect("spawn the worker list thread");
        WorkerList {
            shared,
            wake,
            hostname,
        }
    }

    /// The workers of shard `shard` to choose from, failing (retryably) when none is
    /// known. A stale list is served as it is while a new one is listed; `refresh` (a
    /// retry after a failure) waits up to a second for the masters' answer first. Only a
    /// shard whose workers are not known yet waits for its masters in full (bounded).
    pub fn live(&self, shard: u16, refresh: bool) -> FsResult<Arc<Vec<WorkerInfo>>> {
        let mut all = self.shared.state.lock().expect("worker list lock");
        let st = all.entry(shard).or_default();
        let stale = st.at.is_none_or(|t| t.elapsed() >= self.shared.ttl);
        // The masters just said there is none: answer that, without asking again.
        let just_empty = st.workers.is_empty()
            && st.error.is_none()
            && st.at.is_some_and(|t| t.elapsed() < EMPTY_ANSWER_FRESH);
        if (refresh || st.workers.is_empty()) && !just_empty {
            let seen = st.attempts;
            let wait = if st.workers.is_empty() {
                FIRST_LIST_WAIT
            } else {
                REFRESH_WAIT
            };
            // Listed at once below, whatever its age.
            st.at = None;
            let _ = self.wake.try_send(());
            let started = Instant::now();
            while all.get(&shard).is_some_and(|l| l.attempts == seen) {
                let left = wait.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                all = self
                    .shared
                    .listed
                    .wait_timeout(all, left)
                    .expect("worker list lock")
                    .0;
            }
        } else if stale {
            let _ = self.wake.try_send(());
        }
        let st = all.entry(shard).or_default();
        if st.workers.is_empty() {
            return Err(match &st.error {
                Some(e) if !e.is_retryable() => e.clone(),
                Some(e) => FsError::Unavailable(format!("cannot list the workers: {e}")),
                None => FsError::Unavailable("no live workers registered with the master".into()),
            });
        }
        Ok(st.workers.clone())
    }

    /// The worker on this machine, if it is in the list.
    pub fn local(&self, workers: &[WorkerInfo]) -> Option<WorkerInfo> {
        workers
            .iter()
            .find(|w| w.hostname == self.hostname)
            .cloned()
    }

    /// The upload socket of the worker on this machine that serves shard `shard`, which
    /// takes files written here; `None` without such a worker.
    pub fn local_upload_socket(&self, shard: u16) -> Option<String> {
        let worker = self.local(&self.live(shard, false).ok()?)?;
        (!worker.upload_socket.is_empty()).then_some(worker.upload_socket)
    }
}

/// A stable choice among `workers` for block `index` of a file.
pub fn hashed(workers: &[WorkerInfo], file_id: u64, index: u32) -> WorkerInfo {
    let h = file_id.wrapping_mul(0x9e3779b97f4a7c15) ^ index as u64;
    workers[(h % workers.len() as u64) as usize].clone()
}

/// A worker's data port address.
pub fn data_addr(w: &WorkerInfo) -> String {
    format!("{}:{}", w.host, w.data_port)
}

/// Runs `op` (told whether to refresh its worker list) until it succeeds, fails for
/// good, or has failed retryably `RETRY_ATTEMPTS` times; `what` names it in the log.
pub fn with_retries<T>(
    what: &str,
    file: u64,
    mut op: impl FnMut(bool) -> FsResult<T>,
) -> FsResult<T> {
    let mut attempt = 0;
    loop {
        match op(attempt > 0) {
            Err(e) if e.is_retryable() && attempt + 1 < RETRY_ATTEMPTS => {
                tracing::warn!(file, error = %e, "{what} failed; retrying with a fresh worker list");
                std::thread::sleep(Duration::from_millis((100u64 << attempt).min(1000)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_protos::v1::{BlockLocationsReply, Inode, StatFsReply};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Lists one worker once; every later listing blocks until `release` is dropped, as a
    /// call to unreachable masters retries for its whole deadline.
    struct Masters {
        calls: AtomicU64,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl MetadataService for Masters {
        fn lookup(&self, _: u64, _: &[u8]) -> FsResult<Inode> {
            unreachable!()
        }
        fn getattr(&self, _: u64) -> FsResult<Inode> {
            unreachable!()
        }
        fn readdir(&self, _: u64, _: &[u8], _: u32) -> FsResult<(Vec<Inode>, bool)> {
            unreachable!()
        }
        fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Ok(vec![WorkerInfo {
                    worker_id: "w1".into(),
                    hostname: "here".into(),
                    ..Default::default()
                }]);
            }
            let rx = self.release.lock().unwrap().take();
            if let Some(rx) = rx {
                let _ = rx.recv();
            }
            Err(FsError::Unavailable("no master answers".into()))
        }
        fn block_locations(&self, _: u64) -> FsResult<BlockLocationsReply> {
            unreachable!()
        }
        fn statfs(&self) -> FsResult<StatFsReply> {
            unreachable!()
        }
    }

    #[test]
    fn a_stale_list_is_served_while_the_masters_do_not_answer() {
        let (release, blocked) = std::sync::mpsc::channel();
        let masters = Arc::new(Masters {
            calls: AtomicU64::new(0),
            release: Mutex::new(Some(blocked)),
        });
        let list = Arc::new(WorkerList::new(
            masters.clone(),
            "here".into(),
            Duration::from_millis(1),
        ));
        assert_eq!(list.live(0, false).unwrap().len(), 1);
        std::thread::sleep(Duration::from_millis(5));

        // The list is stale and the masters hang: every use still gets the last list,
        // from several threads at once.
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let (list, done) = (list.clone(), done.clone());
            std::thread::spawn(move || {
                let mut served = 0;
                for _ in 0..1000 {
                    let workers = list.live(0, false).unwrap();
                    served += usize::from(list.local(&workers).is_some());
                }
                done.send(served).unwrap();
            });
        }
        for _ in 0..4 {
            let served = finished
                .recv_timeout(Duration::from_secs(30))
                .expect("uses of the list waited for the masters");
            assert_eq!(served, 1000);
        }
        // The background listing may start only after the uses are done.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while masters.calls.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            masters.calls.load(Ordering::SeqCst),
            2,
            "one listing in the background, not one per use"
        );
        // A retry waits for the masters a bounded time, then goes on with what it has.
        assert_eq!(list.live(0, true).unwrap().len(), 1);
        drop(release);
    }

    /// Masters that answer, every time, that no worker is registered.
    struct Empty(AtomicU64);

    impl MetadataService for Empty {
        fn lookup(&self, _: u64, _: &[u8]) -> FsResult<Inode> {
            unreachable!()
        }
        fn getattr(&self, _: u64) -> FsResult<Inode> {
            unreachable!()
        }
        fn readdir(&self, _: u64, _: &[u8], _: u32) -> FsResult<(Vec<Inode>, bool)> {
            unreachable!()
        }
        fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
        fn block_locations(&self, _: u64) -> FsResult<BlockLocationsReply> {
            unreachable!()
        }
        fn statfs(&self) -> FsResult<StatFsReply> {
            unreachable!()
        }
    }

    #[test]
    fn a_shard_without_workers_is_told_at_once_and_asked_again_later() {
        let masters = Arc::new(Empty(AtomicU64::new(0)));
        // A long ttl: the empty answer must not be kept for all of it, nor waited on.
        let list = WorkerList::new(masters.clone(), "here".into(), Duration::from_secs(300));
        for _ in 0..3 {
            let started = Instant::now();
            assert!(list.live(0, false).unwrap_err().is_retryable());
            assert!(list.local_upload_socket(0).is_none());
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "waited on the masters"
            );
        }
        assert_eq!(
            masters.0.load(Ordering::SeqCst),
            1,
            "asked once for a fresh answer"
        );
        std::thread::sleep(EMPTY_ANSWER_FRESH);
        assert!(list.live(0, false).is_err());
        assert_eq!(masters.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_mount_that_knows_no_worker_reports_why() {
        let masters = Arc::new(Masters {
            calls: AtomicU64::new(1),
            release: Mutex::new(None),
        });
        let list = WorkerList::new(masters, "here".into(), Duration::from_secs(3));
        let err = list.live(0, false).unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("no master answers"), "{err}");
    }
}
