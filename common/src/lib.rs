//! Small pieces every Granary part shares: inode ids, path rules, errno-mapped errors,
//! block arithmetic, byte sizes in config, the under-storage (UFS) access trait,
//! logging and metrics setup.

pub mod blocks;
pub mod bytesize;
pub mod config;
pub mod error;
pub mod ids;
pub mod path;
pub mod telemetry;
pub mod ufs;

pub use error::{FsError, FsResult};
