//! Metadata sharding: the routing table (which shard owns a path), and the routed
//! metadata service and router daemon built on it.

mod table;

pub use table::{child_path, Placement, RoutingError, RoutingTable};
