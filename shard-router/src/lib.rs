//! Metadata sharding: the routing table (which shard owns a path), and the routed
//! metadata service and router daemon built on it.

pub mod leader;
mod load;
pub mod router;
mod sharded;
mod table;

pub use load::load_tree;
pub use sharded::{fetch_table, ShardedMetadata, ROOT};
pub use table::{child_path, Placement, RoutingError, RoutingTable};
