//! The filesystem error type every library returns. Each variant maps to one errno at the
//! FUSE boundary, and survives a trip through gRPC (the errno rides in status metadata).

use tonic::{Code, Status};

pub type FsResult<T> = Result<T, FsError>;

const ERRNO_METADATA_KEY: &str = "x-granary-errno";
/// On a refusal for routing by an older table: the version the server has.
pub const ROUTING_VERSION_METADATA_KEY: &str = "x-granary-routing-version";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FsError {
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("is a directory: {0}")]
    IsDir(String),
    #[error("name too long ({0} bytes, limit 255)")]
    NameTooLong(usize),
    /// A bad name or path, or an argument that makes no sense here (EINVAL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A file or directory handle that is not open, or not open for the operation.
    #[error("bad file handle: {0}")]
    BadHandle(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    #[error("cross-device link: {0}")]
    CrossDevice(String),
    /// In use by the system, as a mount point is (a prefix pinned to another shard).
    #[error("busy: {0}")]
    Busy(String),
    /// The caller routed by an older routing table than this server's (version given):
    /// it fetches the new one and routes again.
    #[error("the routing table changed (now version {0}); routing again")]
    StaleRouting(u64),
    #[error("read-only filesystem: {0}")]
    ReadOnly(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("under-storage error: {0}")]
    Ufs(String),
    #[error("stale: {0}")]
    Stale(String),
    #[error("i/o error: {0}")]
    Io(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound(_) => libc::ENOENT,
            FsError::Exists(_) => libc::EEXIST,
            FsError::NotDir(_) => libc::ENOTDIR,
            FsError::IsDir(_) => libc::EISDIR,
            FsError::NameTooLong(_) => libc::ENAMETOOLONG,
            FsError::InvalidArgument(_) => libc::EINVAL,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::PermissionDenied(_) => libc::EACCES,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NotEmpty(_) => libc::ENOTEMPTY,
            FsError::CrossDevice(_) => libc::EXDEV,
            FsError::Busy(_) => libc::EBUSY,
            FsError::StaleRouting(_) => libc::EIO,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::Unsupported(_) => libc::ENOTSUP,
            FsError::Stale(_) => libc::ESTALE,
            FsError::Unavailable(_) | FsError::TimedOut(_) | FsError::Ufs(_) | FsError::Io(_) => {
                libc::EIO
            }
        }
    }

    /// Whether retrying elsewhere or later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FsError::Unavailable(_) | FsError::TimedOut(_))
    }

    fn from_errno(errno: i32, msg: String) -> FsError {
        match errno {
            libc::ENOENT => FsError::NotFound(msg),
            libc::EEXIST => FsError::Exists(msg),
            libc::ENOTDIR => FsError::NotDir(msg),
            libc::EISDIR => FsError::IsDir(msg),
            libc::ENAMETOOLONG => FsError::NameTooLong(255),
            libc::EINVAL => FsError::InvalidArgument(msg),
            libc::EBADF => FsError::BadHandle(msg),
            libc::EACCES => FsError::PermissionDenied(msg),
            libc::EPERM => FsError::NotPermitted(msg),
            libc::ENOTEMPTY => FsError::NotEmpty(msg),
            libc::EXDEV => FsError::CrossDevice(msg),
            libc::EBUSY => FsError::Busy(msg),
            libc::EROFS => FsError::ReadOnly(msg),
            libc::ENOTSUP => FsError::Unsupported(msg),
            libc::ESTALE => FsError::Stale(msg),
            _ => FsError::Io(msg),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => FsError::from_errno(errno, e.to_string()),
            None => match e.kind() {
                std::io::ErrorKind::NotFound => FsError::NotFound(e.to_string()),
                std::io::ErrorKind::TimedOut => FsError::TimedOut(e.to_string()),
                _ => FsError::Io(e.to_string()),
            },
        }
    }
}

impl From<FsError> for Status {
    fn from(e: FsError) -> Status {
        let code = match &e {
            FsError::NotFound(_) => Code::NotFound,
            FsError::Exists(_) => Code::AlreadyExists,
            FsError::NotDir(_)
            | FsError::IsDir(_)
            | FsError::NameTooLong(_)
            | FsError::InvalidArgument(_)
            | FsError::BadHandle(_) => Code::InvalidArgument,
            FsError::PermissionDenied(_) | FsError::NotPermitted(_) => Code::PermissionDenied,
            FsError::NotEmpty(_) | FsError::CrossDevice(_) | FsError::Busy(_) => {
                Code::FailedPrecondition
            }
            FsError::StaleRouting(_) => Code::FailedPrecondition,
            FsError::ReadOnly(_) => Code::FailedPrecondition,
            FsError::Unsupported(_) => Code::Unimplemented,
            FsError::Unavailable(_) => Code::Unavailable,
            FsError::TimedOut(_) => Code::DeadlineExceeded,
            FsError::Stale(_) => Code::FailedPrecondition,
            FsError::Ufs(_) | FsError::Io(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        status.metadata_mut().insert(
            ERRNO_METADATA_KEY,
            e.errno().to_string().parse().expect("ascii digits"),
        );
        if let FsError::StaleRouting(version) = e {
            status.metadata_mut().insert(
                ROUTING_VERSION_METADATA_KEY,
                version.to_string().parse().expect("ascii digits"),
            );
        }
        status
    }
}

impl From<Status> for FsError {
    fn from(s: Status) -> FsError {
        let msg = s.message().to_string();
        if let Some(version) = s
            .metadata()
            .get(ROUTING_VERSION_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            return FsError::StaleRouting(version);
        }
        if let Some(errno) = s
            .metadata()
            .get(ERRNO_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            if errno != libc::EIO {
                return FsError::from_errno(errno, msg);
            }
        }
        match s.code() {
            Code::NotFound => FsError::NotFound(msg),
            Code::AlreadyExists => FsError::Exists(msg),
            Code::PermissionDenied | Code::Unauthenticated => FsError::PermissionDenied(msg),
            // Unknown is what tonic reports when a connection dies mid-call.
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted => FsError::Unavailable(msg),
            Code::DeadlineExceeded => FsError::TimedOut(msg),
            Code::Unimplemented => FsError::Unsupported(msg),
            _ => FsError::Io(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_survives_grpc() {
        for e in [
            FsError::NotFound("x".into()),
            FsError::NameTooLong(300),
            FsError::NotDir("d".into()),
            FsError::Exists("e".into()),
            FsError::Unavailable("u".into()),
            FsError::Busy("b".into()),
            FsError::StaleRouting(7),
        ] {
            let back = FsError::from(Status::from(e.clone()));
            assert_eq!(back.errno(), e.errno(), "{e:?} -> {back:?}");
            if let FsError::StaleRouting(v) = e {
                assert_eq!(back, FsError::StaleRouting(v));
            }
        }
        assert!(FsError::from(Status::unavailable("down")).is_retryable());
    }
}
