//! The cluster token: every gRPC call between Granary parts carries it in metadata, and
//! servers refuse calls without the right one. An empty configured token disables the check
//! (single-user local mode).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

pub const TOKEN_METADATA_KEY: &str = "x-granary-token";
/// Same value as `granary_protos::CONSISTENCY_METADATA_KEY` (common does not depend on protos).
pub const CONSISTENCY_METADATA_KEY: &str = "x-granary-consistency";

/// Client side: attaches the token (and, for reads, the chosen consistency; for routed
/// calls, the routing table version they were routed by) to every call.
#[derive(Clone, Debug, Default)]
pub struct AttachToken {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
    consistency: Option<MetadataValue<tonic::metadata::Ascii>>,
    routing: Option<Arc<AtomicU64>>,
}

impl AttachToken {
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Ok(AttachToken::default());
        }
        let value = token
            .parse()
            .map_err(|_| "cluster_token must be printable ASCII".to_string())?;
        Ok(AttachToken {
            value: Some(value),
            ..Default::default()
        })
    }

    /// Also asks for this read consistency on every call.
    pub fn with_consistency(mut self, c: crate::consistency::ReadConsistency) -> Self {
        self.consistency = c.to_string().parse().ok();
        self
    }

    /// Also says, on every call, which routing table version routed it (0: none).
    pub fn with_routing(mut self, version: Arc<AtomicU64>) -> Self {
        self.routing = Some(version);
        self
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert(TOKEN_METADATA_KEY, v.clone());
        }
        // A call may ask for its own (a read that must be linearizable whatever the
        // client's default).
        if let Some(v) = &self.consistency {
            if !req.metadata().contains_key(CONSISTENCY_METADATA_KEY) {
                req.metadata_mut()
                    .insert(CONSISTENCY_METADATA_KEY, v.clone());
            }
        }
        if let Some(version) = &self.routing {
            let v = version.load(Ordering::Relaxed);
            if v > 0 {
                req.metadata_mut().insert(
                    crate::error::ROUTING_VERSION_METADATA_KEY,
                    v.to_string().parse().expect("ascii digits"),
                );
            }
        }
        Ok(req)
    }
}

/// Server side: refuses calls whose token does not match.
#[derive(Clone, Debug, Default)]
pub struct CheckToken {
    token: String,
    /// Calls only the masters of one group make (their peer token).
    peers_only: bool,
}

impl CheckToken {
    pub fn new(token: &str) -> Self {
        CheckToken {
            token: token.to_string(),
            peers_only: false,
        }
    }

    /// For the calls between the masters of one group: refusals say so.
    pub fn for_peers(token: &str) -> Self {
        CheckToken {
            token: token.to_string(),
            peers_only: true,
        }
    }

    /// Whether `presented` is acceptable (constant-time in the token's length).
    pub fn accepts(&self, presented: &str) -> bool {
        if self.token.is_empty() {
            return true;
        }
        let (a, b) = (self.token.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get(TOKEN_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if self.accepts(presented) {
            Ok(req)
        } else if self.peers_only {
            Err(Status::permission_denied(
                "this call is only for the masters of the group (wrong or missing peer token)",
            ))
        } else if presented.is_empty() {
            Err(Status::unauthenticated(
                "missing cluster token: set cluster_token to the cluster's token",
            ))
        } else {
            Err(Status::unauthenticated("wrong cluster token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let mut check = CheckToken::new("s3cret");
        let mut attach = AttachToken::new("s3cret").unwrap();
        assert!(check.call(attach.call(Request::new(())).unwrap()).is_ok());
        let err = check.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("missing cluster token"));
        let mut wrong = AttachToken::new("guess").unwrap();
        assert!(check.call(wrong.call(Request::new(())).unwrap()).is_err());
        assert!(CheckToken::new("").call(Request::new(())).is_ok());
        let err = CheckToken::for_peers("peers")
            .call(attach.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("only for the masters"));
    }
}
