//! A Granary worker: caches blocks of UFS files on local disk and serves them to clients
//! over the framed data protocol; registers with, and heartbeats to, every master of
//! every metadata shard.

pub mod block_store;
pub mod config;
pub mod data_server;
pub mod fetcher;
pub mod local_upload;
pub mod master_link;
pub mod mounts;
pub mod server;
pub mod shards;
pub mod uploader;

pub use config::WorkerConfig;
pub use server::{run, start, RunningWorker, WorkerError};

pub use granary_common::hostname;
