//! Live workers as known from their registrations and heartbeats. A worker silent for
//! longer than the timeout is dropped, and its block locations with it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use granary_protos::v1::{WorkerHeartbeatRequest, WorkerInfo};

#[derive(Debug, Default)]
pub struct WorkerRegistry {
    workers: RwLock<HashMap<String, (WorkerInfo, Instant)>>,
}

impl WorkerRegistry {
    pub fn register(&self, info: WorkerInfo) {
        self.workers
            .write()
            .expect("workers lock")
            .insert(info.worker_id.clone(), (info, Instant::now()));
    }

    /// Records a heartbeat; false if the worker is unknown (it must re-register).
    pub fn heartbeat(&self, hb: &WorkerHeartbeatRequest, blocks_delta: i64) -> bool {
        let mut workers = self.workers.write().expect("workers lock");
        match workers.get_mut(&hb.worker_id) {
            Some((info, seen)) => {
                info.capacity_bytes = hb.capacity_bytes;
                info.used_bytes = hb.used_bytes;
                info.cache_hits = hb.cache_hits;
                info.cache_misses = hb.cache_misses;
                info.blocks = (info.blocks as i64 + blocks_delta).max(0) as u64;
                *seen = Instant::now();
                true
            }
            None => false,
        }
    }

    pub fn get(&self, worker_id: &str) -> Option<WorkerInfo> {
        self.workers
            .read()
            .expect("workers lock")
            .get(worker_id)
            .map(|(i, seen)| with_age(i, *seen))
    }

    pub fn list(&self) -> Vec<WorkerInfo> {
        let mut out: Vec<_> = self
            .workers
            .read()
            .expect("workers lock")
            .values()
            .map(|(i, seen)| with_age(i, *seen))
            .collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }

    /// Removes workers not heard from within `timeout`; returns their ids.
    pub fn expire(&self, timeout: Duration) -> Vec<String> {
        let mut workers = self.workers.write().expect("workers lock");
        let dead: Vec<String> = workers
            .iter()
            .filter(|(_, (_, seen))| seen.elapsed() > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            workers.remove(id);
        }
        dead
    }
}

fn with_age(info: &WorkerInfo, seen: Instant) -> WorkerInfo {
    let mut i = info.clone();
    i.last_heartbeat_ms_ago = seen.elapsed().as_millis() as u64;
    i
}
