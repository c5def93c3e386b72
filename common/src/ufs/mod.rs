//! Under-storage (UFS) access. Masters list it to load metadata; workers read byte ranges
//! from it on a cache miss. Paths handed to a UFS are relative to its root and validated:
//! no `..`, no absolute paths, and a local UFS never follows symlinks out of its root.

mod local;

use std::fmt::Debug;
use std::io::Write;
use std::sync::Arc;

pub use local::LocalUfs;

use crate::error::{FsError, FsResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    File,
    Directory,
    Symlink,
}

/// One object as the UFS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UfsObject {
    pub name: Vec<u8>,
    pub kind: ObjectKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub symlink_target: Vec<u8>,
}

pub trait Ufs: Send + Sync + Debug {
    /// The URI this UFS was opened from.
    fn uri(&self) -> &str;
    /// Lists a directory's entries (relative path, `""` is the root), sorted by name.
    fn list(&self, dir: &[u8]) -> FsResult<Vec<UfsObject>>;
    /// Describes one object.
    fn stat(&self, path: &[u8]) -> FsResult<UfsObject>;
    /// Copies `len` bytes starting at `offset` of a file into `sink`; returns bytes copied
    /// (fewer only at end of file).
    fn read_range(&self, path: &[u8], offset: u64, len: u64, sink: &mut dyn Write)
        -> FsResult<u64>;
}

/// Opens a UFS from its URI. Supported now: `file:///absolute/path`.
pub fn open_ufs(uri: &str) -> FsResult<Arc<dyn Ufs>> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Arc::new(LocalUfs::open(uri, path)?));
    }
    Err(FsError::Unsupported(format!(
        "UFS URI `{uri}`: only file:///path is supported in this version"
    )))
}

/// Turns a plain directory path into a `file://` URI (absolute, canonical).
pub fn local_uri(path: &std::path::Path) -> FsResult<String> {
    let abs = std::fs::canonicalize(path)
        .map_err(|e| FsError::NotFound(format!("UFS directory {}: {e}", path.display())))?;
    if !abs.is_dir() {
        return Err(FsError::NotDir(format!(
            "UFS path {} is not a directory",
            abs.display()
        )));
    }
    Ok(format!("file://{}", abs.display()))
}
