//! A Granary worker: caches blocks of UFS files on local disk and serves them to clients
//! over the framed data protocol; registers with, and heartbeats to, every master.

pub mod block_store;
pub mod config;
pub mod data_server;
pub mod fetcher;
pub mod master_link;
pub mod mounts;
pub mod server;

pub use config::WorkerConfig;
pub use server::{start, RunningWorker, WorkerError};

/// This machine's host name; clients compare it with their own to find a co-located
/// worker whose cache files they can read directly.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
