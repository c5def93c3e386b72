//! Small pieces every Granary part shares: inode ids, path rules, errno-mapped errors,
//! block arithmetic, byte sizes in config, the under-storage (UFS) access trait,
//! logging and metrics setup.

pub mod auth;
pub mod blocks;
pub mod bytesize;
pub mod config;
pub mod consistency;
pub mod error;
pub mod exit;
pub mod fd_passing;
pub mod ids;
pub mod in_process;
pub mod interval;
pub mod memory;
pub mod net;
pub mod path;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod ufs;

pub use error::{FsError, FsResult};

/// This machine's host name. Clients compare it with a worker's to find a co-located
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
