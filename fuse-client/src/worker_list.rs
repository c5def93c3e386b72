//! The live workers as the masters list them, shared by the read and write paths, and
//! the retry policy of the operations that pick one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::v1::WorkerInfo;

use crate::meta_client::MetadataService;

/// Tries of a block read or an upload that fails retryably (a worker restarting, or one
/// that has not yet learned a mount, which takes up to a heartbeat): about 2.5 s in all.
const RETRY_ATTEMPTS: u32 = 6;

pub struct WorkerList {
    meta: Arc<dyn MetadataService>,
    hostname: String,
    ttl: Duration,
    /// When listed, and the list (shared: reads take it per block).
    workers: Mutex<(Option<Instant>, Arc<Vec<WorkerInfo>>)>,
}

impl WorkerList {
    /// `ttl`: how old a list may get before it is listed again.
    pub fn new(meta: Arc<dyn MetadataService>, hostname: String, ttl: Duration) -> Self {
        WorkerList {
            meta,
            hostname,
            ttl,
            workers: Mutex::new((None, Arc::default())),
        }
    }

    /// The workers to choose from, failing (retryably) when none is known; `refresh`
    /// (a retry after a failure) lists them again first.
    pub fn live(&self, refresh: bool) -> FsResult<Arc<Vec<WorkerInfo>>> {
        let mut w = self.workers.lock().expect("workers lock");
        let fresh = matches!(w.0, Some(t) if t.elapsed() < self.ttl);
        if refresh || !fresh || w.1.is_empty() {
            match self.meta.workers() {
                // A master that just joined may not know the workers yet.
                Ok(list) if list.is_empty() && !w.1.is_empty() => {
                    tracing::debug!("a master listed no workers; keeping the last list");
                }
                Ok(mut list) => {
                    list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                    *w = (Some(Instant::now()), Arc::new(list));
                }
                // Cached blocks stay readable while the masters are unreachable.
                Err(e) if !w.1.is_empty() => {
                    tracing::debug!(error = %e, "cannot refresh the worker list; using the last one");
                }
                Err(e) => return Err(e),
            }
        }
        if w.1.is_empty() {
            return Err(FsError::Unavailable(
                "no live workers registered with the master".into(),
            ));
        }
        Ok(w.1.clone())
    }

    /// The worker on this machine, if it is in the list.
    pub fn local(&self, workers: &[WorkerInfo]) -> Option<WorkerInfo> {
        workers
            .iter()
            .find(|w| w.hostname == self.hostname)
            .cloned()
    }

    /// The local worker's upload socket, which takes files written here; `None` without
    /// such a worker.
    pub fn local_upload_socket(&self) -> Option<String> {
        let worker = self.local(&self.live(false).ok()?)?;
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
