//! Wire types shared by every Granary part: the gRPC control/metadata API, the state
//! machine commands carried by the replicated log, and the framed block data protocol.

pub mod frame;

/// Control and metadata API (tonic/prost).
pub mod v1 {
    tonic::include_proto!("granary.v1");
}

/// Headers of the framed block data protocol.
pub mod data {
    tonic::include_proto!("granary.data.v1");
}

/// Raft transport between masters and the snapshot format.
pub mod raft {
    tonic::include_proto!("granary.raft.v1");
}

/// Status metadata a non-leader master adds to name the leader's address.
pub const LEADER_METADATA_KEY: &str = "x-granary-leader";

/// Version spoken on the data port; bumped on incompatible header changes. 3: a
/// short-circuit answer's `local_path` may be a shared data file holding the block at
/// `local_offset` (a client of 2 would read it at offset 0).
pub const DATA_PROTOCOL_VERSION: u32 = 3;
