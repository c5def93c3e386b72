//! The filesystem error type every library returns. Each variant maps to one errno at the
//! FUSE boundary, and survives a trip through gRPC (the errno rides in status metadata).

use std::sync::Arc;

use tonic::{Code, Status};

pub type FsResult<T> = Result<T, FsError>;

/// What went wrong, as text, and the error it came from when that happened in this
/// process: callers can walk `source()` down to an `io::Error`, a store or S3 error.
/// Across a process boundary (gRPC) only the text travels.
#[derive(Debug, Clone)]
pub struct Cause {
    text: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    pub fn new(text: impl Into<String>) -> Self {
        Cause {
            text: text.into(),
            source: None,
        }
    }

    /// `text` (which should say what was being done, and may repeat the source's own
    /// message for readers of the text alone) caused by `source`.
    pub fn from_source(
        text: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Cause {
            text: text.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Equal when they say the same: a cause is compared by its text.
impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Cause {}

const ERRNO_METADATA_KEY: &str = "x-granary-errno";
/// On [`FsError::Loading`]: the master is still listing what the call needs.
const LOADING_METADATA_KEY: &str = "x-granary-loading";
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
    #[error("too many links: {0}")]
    TooManyLinks(String),
    /// Past the largest file the staging or UFS filesystem holds (EFBIG).
    #[error("file too large: {0}")]
    FileTooBig(String),
    /// The staging or UFS filesystem is full (ENOSPC).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// In use by the system, as a mount point is (a prefix pinned to another shard).
    #[error("busy: {0}")]
    Busy(String),
    /// Open in a way that forbids writing it now (ETXTBSY, as for a running executable).
    #[error("text file busy: {0}")]
    TextBusy(String),
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
    /// The master is listing a directory in the UFS for this call, which takes longer
    /// than one call may (a directory of millions of files): the listing goes on, and
    /// asking again later finds it done.
    #[error("still loading: {0}")]
    Loading(String),
    #[error("under-storage error: {0}")]
    Ufs(#[source] Cause),
    #[error("stale: {0}")]
    Stale(String),
    #[error("i/o error: {0}")]
    Io(#[source] Cause),
}

impl FsError {
    /// An I/O failure described by `text`.
    pub fn io(text: impl Into<String>) -> Self {
        FsError::Io(Cause::new(text))
    }

    /// An I/O failure described by `text`, caused by `source`.
    pub fn io_from(
        text: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        FsError::Io(Cause::from_source(text, source))
    }

    /// An under-storage failure described by `text`.
    pub fn ufs(text: impl Into<String>) -> Self {
        FsError::Ufs(Cause::new(text))
    }

    /// An under-storage failure described by `text`, caused by `source`.
    pub fn ufs_from(
        text: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        FsError::Ufs(Cause::from_source(text, source))
    }

    /// The message without the kind's prefix: what travels in a gRPC status, whose code
    /// and errno carry the kind (so the other side shows it once, not twice).
    fn detail(&self) -> String {
        match self {
            FsError::NotFound(m)
            | FsError::Exists(m)
            | FsError::NotDir(m)
            | FsError::IsDir(m)
            | FsError::InvalidArgument(m)
            | FsError::BadHandle(m)
            | FsError::PermissionDenied(m)
            | FsError::NotPermitted(m)
            | FsError::NotEmpty(m)
            | FsError::CrossDevice(m)
            | FsError::TooManyLinks(m)
            | FsError::FileTooBig(m)
            | FsError::NoSpace(m)
            | FsError::Busy(m)
            | FsError::TextBusy(m)
            | FsError::ReadOnly(m)
            | FsError::Unsupported(m)
            | FsError::Unavailable(m)
            | FsError::TimedOut(m)
            | FsError::Loading(m)
            | FsError::Stale(m) => m.clone(),
            FsError::Ufs(c) | FsError::Io(c) => c.to_string(),
            FsError::NameTooLong(_) | FsError::StaleRouting(_) => self.to_string(),
        }
    }

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
            FsError::TooManyLinks(_) => libc::EMLINK,
            FsError::FileTooBig(_) => libc::EFBIG,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Busy(_) => libc::EBUSY,
            FsError::TextBusy(_) => libc::ETXTBSY,
            FsError::StaleRouting(_) => libc::EIO,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::Unsupported(_) => libc::ENOTSUP,
            FsError::Stale(_) => libc::ESTALE,
            FsError::Unavailable(_)
            | FsError::TimedOut(_)
            | FsError::Loading(_)
            | FsError::Ufs(_)
            | FsError::Io(_) => libc::EIO,
        }
    }

    /// Whether retrying elsewhere or later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FsError::Unavailable(_) | FsError::TimedOut(_) | FsError::Loading(_)
        )
    }

    /// The error for `errno`, with `msg` (an I/O error for an errno of no kind of its own).
    pub fn from_errno(errno: i32, msg: String) -> FsError {
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
            libc::EMLINK => FsError::TooManyLinks(msg),
            libc::EFBIG => FsError::FileTooBig(msg),
            libc::ENOSPC => FsError::NoSpace(msg),
            libc::EBUSY => FsError::Busy(msg),
            libc::ETXTBSY => FsError::TextBusy(msg),
            libc::EROFS => FsError::ReadOnly(msg),
            libc::ENOTSUP => FsError::Unsupported(msg),
            libc::ESTALE => FsError::Stale(msg),
            _ => FsError::io(msg),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        // An FsError carried through an `io::Write` (a UFS upload) comes out as itself.
        let e = match e.downcast::<FsError>() {
            Ok(inner) => return inner,
            Err(e) => e,
        };
        match (e.raw_os_error(), e.kind()) {
            // An errno of its own is what the caller needs; EIO and the like keep the error.
            (Some(errno), _)
                if errno != libc::EIO
                    && FsError::from_errno(errno, String::new()).errno() == errno =>
            {
                FsError::from_errno(errno, e.to_string())
            }
            (None, std::io::ErrorKind::NotFound) => FsError::NotFound(e.to_string()),
            (None, std::io::ErrorKind::TimedOut) => FsError::TimedOut(e.to_string()),
            _ => FsError::io_from(e.to_string(), e),
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
            FsError::NotEmpty(_)
            | FsError::CrossDevice(_)
            | FsError::TooManyLinks(_)
            | FsError::Busy(_)
            | FsError::TextBusy(_) => Code::FailedPrecondition,
            FsError::StaleRouting(_) => Code::FailedPrecondition,
            FsError::ReadOnly(_) => Code::FailedPrecondition,
            FsError::Unsupported(_) => Code::Unimplemented,
            FsError::FileTooBig(_) => Code::OutOfRange,
            FsError::NoSpace(_) => Code::ResourceExhausted,
            FsError::Unavailable(_) | FsError::Loading(_) => Code::Unavailable,
            FsError::TimedOut(_) => Code::DeadlineExceeded,
            FsError::Stale(_) => Code::FailedPrecondition,
            FsError::Ufs(_) | FsError::Io(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.detail());
        status.metadata_mut().insert(
            ERRNO_METADATA_KEY,
            e.errno().to_string().parse().expect("ascii digits"),
        );
        match e {
            FsError::StaleRouting(version) => {
                status.metadata_mut().insert(
                    ROUTING_VERSION_METADATA_KEY,
                    version.to_string().parse().expect("ascii digits"),
                );
            }
            FsError::Loading(_) => {
                status
                    .metadata_mut()
                    .insert(LOADING_METADATA_KEY, "1".parse().expect("ascii"));
            }
            _ => {}
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
        if s.metadata().contains_key(LOADING_METADATA_KEY) {
            return FsError::Loading(msg);
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
            _ => FsError::io(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fs_error_carried_in_an_io_error_comes_out_whole() {
        let carried = std::io::Error::other(FsError::PermissionDenied("refused".into()));
        assert_eq!(FsError::from(carried).errno(), libc::EACCES);
        let plain = std::io::Error::other("something");
        assert_eq!(FsError::from(plain).errno(), libc::EIO);
    }

    #[test]
    fn errno_survives_grpc() {
        for e in [
            FsError::NotFound("x".into()),
            FsError::NameTooLong(300),
            FsError::NotDir("d".into()),
            FsError::Exists("e".into()),
            FsError::Unavailable("u".into()),
            FsError::Busy("b".into()),
            FsError::TextBusy("t".into()),
            FsError::FileTooBig("f".into()),
            FsError::NoSpace("n".into()),
            FsError::StaleRouting(7),
            FsError::Loading("l".into()),
        ] {
            let back = FsError::from(Status::from(e.clone()));
            assert_eq!(back.errno(), e.errno(), "{e:?} -> {back:?}");
            if matches!(e, FsError::StaleRouting(_) | FsError::Loading(_)) {
                assert_eq!(back, e);
            }
        }
        assert!(FsError::from(Status::unavailable("down")).is_retryable());
    }

    #[test]
    fn an_io_failure_keeps_its_cause_and_a_precise_errno_stays_precise() {
        use std::error::Error;
        let e = FsError::from(std::io::Error::other("disk on fire"));
        assert_eq!(e.errno(), libc::EIO);
        let io = e
            .source()
            .and_then(Error::source)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io::Error is kept");
        assert_eq!(io.kind(), std::io::ErrorKind::Other);
        let eio = FsError::from(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(eio.source().and_then(Error::source).is_some(), "{eio:?}");
        let nospace = FsError::from(std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(nospace.errno(), libc::EACCES);
        // Across gRPC only the text travels, and the same text compares equal.
        let back = FsError::from(Status::from(e.clone()));
        assert_eq!(back.to_string(), e.to_string());
        assert_eq!(FsError::io("x"), FsError::io("x"));
    }
}
