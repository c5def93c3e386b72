//! A master's gRPC services, one per kind of caller (see `granary.proto`): `Namespace`
//! for mounts and clients, `Workers` for workers, `Peer` for the other members of the
//! group and `Admin` for operators. Each is implemented on [`MasterService`] in its own
//! file; the server checks each caller's token for the service it calls.
//!
//! [`MasterService`]: crate::service::MasterService

mod admin;
mod namespace;
mod peer;
mod routing;
mod workers;

use granary_common::auth::CONSISTENCY_METADATA_KEY;
use granary_common::consistency::ReadConsistency;
use tonic::{Request, Status};

/// The consistency a read asked for (metadata `x-granary-consistency`).
fn consistency_of<T>(req: &Request<T>) -> Result<ReadConsistency, Status> {
    match req.metadata().get(CONSISTENCY_METADATA_KEY) {
        None => Ok(ReadConsistency::default()),
        Some(v) => v
            .to_str()
            .map_err(|_| Status::invalid_argument("x-granary-consistency is not ASCII"))?
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("read_consistency: {e}"))),
    }
}

fn count(method: &'static str) {
    metrics::counter!("granary_master_rpc_total", "method" => method).increment(1);
}
