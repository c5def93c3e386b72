//! The Granary client: metadata and data access, the filesystem type, and its FUSE mount.

pub mod block_reader;
pub mod cli;
pub mod config;
pub mod content_store;
pub mod data_client;
pub mod fs;
pub mod fuse_adapter;
mod kernel_readahead;
pub mod kernel_view;
pub mod local_upload;
pub mod mount;
mod mountinfo;
mod offload;
pub mod passthrough;
mod read_order;
pub mod staging;
pub mod warmup;
pub mod worker_list;

pub use config::MountConfig;
pub use mount::{
    build_fs, build_fs_over, check_mountpoint, connect_metadata, mount, run_mount, MountError,
    MountHandle,
};
