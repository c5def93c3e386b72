//! A Granary master: the namespace state machine in redb, lazy metadata loading from the
//! UFS, the worker registry and block locations, and the gRPC API over them.

mod api;
pub mod block_locations;
pub mod command_log;
pub mod config;
mod deleted_files;
mod leader_clients;
mod lease_reads;
mod links;
mod list_ahead;
pub mod loader;
mod mutation_locks;
mod mutations;
pub mod raft;
mod routing;
pub mod server;
pub mod service;
mod snapshots;
mod state_machine;
#[cfg(test)]
mod state_machine_model;
pub mod store;
mod table_follower;
mod table_masters;
mod tables;
mod unsettled;
pub mod workers;

pub use config::MasterConfig;
pub use server::{run, start, MasterError, RunningMaster};
