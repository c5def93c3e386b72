//! Under-storage (UFS) access. Masters list it to load metadata; workers read byte ranges
//! from it on a cache miss. Paths handed to a UFS are relative to its root and validated:
//! no `..`, no absolute paths, and a local UFS never follows symlinks out of its root.

mod local;
mod s3;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write;
use std::sync::Arc;

pub use local::LocalUfs;
pub use s3::{S3Options, S3Ufs};

use crate::error::{FsError, FsResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    File,
    Directory,
    Symlink,
}

/// Set in an inode's `mode` when its permission bits are known (0 included: a file
/// made `chmod 000`); an object store keeps no modes, and a mode without it reads as the
/// usual defaults (0644, directories 0755) where its bits are 0.
pub const MODE_KNOWN: u32 = 0o1000000;

/// The permission bits of `mode`, or `default` where none are known.
pub fn permissions(mode: u32, default: u32) -> u32 {
    match (mode & MODE_KNOWN, mode & 0o7777) {
        (0, 0) => default,
        (_, bits) => bits,
    }
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
    /// Its owner and group, where the UFS keeps them.
    pub owner: Option<(u32, u32)>,
}

/// A file's version: its size and mtime as the UFS reported them when its metadata was
/// read. A cache holds bytes of one version; a read of another is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
}

impl Fingerprint {
    /// `Stale` unless the UFS now reports the file at `now` (size, mtime) as this version.
    pub fn check(&self, path: &[u8], now_size: u64, now_mtime_ns: i64) -> FsResult<()> {
        if now_size == self.size && now_mtime_ns == self.mtime_ns {
            return Ok(());
        }
        Err(FsError::Stale(format!(
            "{} changed in the UFS (size {} -> {now_size}); reload its metadata",
            String::from_utf8_lossy(path),
            self.size
        )))
    }
}

/// What a read of a file that is no longer at `path` tells the reader: moved (a rename,
/// or a hard link's first name unlinked) or deleted since it read its metadata, so it
/// reloads it and asks again.
pub fn moved_away(path: &[u8]) -> FsError {
    FsError::Stale(format!(
        "{} is no longer in the UFS; reload its metadata",
        String::from_utf8_lossy(path)
    ))
}

/// Names a UFS never reports: uploads in progress (see [`Ufs::create_upload`]). A crash
/// mid-upload leaves such a file behind, never a partial file under the final name.
pub const UPLOAD_PREFIX: &[u8] = b".granary-upload.";

/// An object being written. Nothing is visible under the final name until
/// [`UfsUpload::complete`]; dropping an upload without completing it discards it.
pub trait UfsUpload: Write + Send {
    /// The file being written, where the UFS is a local (or NFS) filesystem: a process
    /// on this machine may write into it directly (see the worker's local uploads).
    fn local_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Moves the object under its final name atomically (replacing what was there);
    /// returns the object as the UFS now reports it. With `durable`, every byte and the
    /// rename survive a machine crash too, not only a crash of any process.
    fn complete(self: Box<Self>, durable: bool) -> FsResult<UfsObject>;
    /// Stores everything written where [`Self::complete`] finds it, so that little is
    /// left for `complete` (S3: sends the last part and waits for every part). Called
    /// after the last write, if at all.
    fn store_written(&mut self) -> FsResult<()> {
        Ok(())
    }
}

pub trait Ufs: Send + Sync + Debug {
    /// The URI this UFS was opened from.
    fn uri(&self) -> &str;
    /// Reaches the UFS once (lists its root): a missing bucket or directory, bad
    /// credentials or an unreachable endpoint show now, named.
    fn check(&self) -> FsResult<()> {
        self.list(b"").map(|_| ())
    }
    /// Settings every process opening this URI should share (the S3 endpoint and
    /// region; never credentials): the masters record them with the mount.
    fn shared_options(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Lists a directory's entries (relative path, `""` is the root), sorted by name.
    fn list(&self, dir: &[u8]) -> FsResult<Vec<UfsObject>>;
    /// Describes one object.
    fn stat(&self, path: &[u8]) -> FsResult<UfsObject>;
    /// Copies `len` bytes starting at `offset` of the file at `path` into `sink`, as
    /// long as the file is at `version`; returns bytes copied (fewer only at end of
    /// file). A file gone or at another version fails with `Stale`, checked on what
    /// the bytes are read from (the GET's own answer, the opened file), so a renamed or
    /// replaced file never fills a cache under its old version, at no extra round trip.
    fn read_range(
        &self,
        path: &[u8],
        version: Fingerprint,
        offset: u64,
        len: u64,
        sink: &mut dyn Write,
    ) -> FsResult<u64>;
    /// How far ahead of what a `read_range` has handed its sink it is already reading:
    /// a range within it is better waited for than asked for again.
    fn read_ahead(&self) -> u64 {
        4 << 20
    }

    /// Starts writing the file at `path` (its parent directory must exist).
    fn create_upload(&self, path: &[u8]) -> FsResult<Box<dyn UfsUpload>> {
        Err(read_only(self.uri(), path))
    }
    /// Creates an empty file at `path` unless something is there (EEXIST then), without
    /// replacing anything at any moment. `None`: this UFS cannot promise that, so new
    /// files reach it with their first upload instead.
    fn create_empty(&self, path: &[u8]) -> FsResult<Option<UfsObject>> {
        let _ = path;
        Ok(None)
    }
    /// Creates a directory (EEXIST if something is there).
    fn mkdir(&self, path: &[u8]) -> FsResult<UfsObject> {
        Err(read_only(self.uri(), path))
    }
    /// Creates a symbolic link at `path` pointing at `target`.
    fn symlink(&self, target: &[u8], path: &[u8]) -> FsResult<UfsObject> {
        let _ = target;
        Err(read_only(self.uri(), path))
    }
    /// Removes a file or symlink, or (`directory`) an empty directory.
    fn remove(&self, path: &[u8], directory: bool) -> FsResult<()> {
        let _ = directory;
        Err(read_only(self.uri(), path))
    }
    /// Renames atomically, replacing a compatible object at `to`.
    fn rename(&self, from: &[u8], to: &[u8]) -> FsResult<()> {
        let _ = to;
        Err(read_only(self.uri(), from))
    }
    /// Makes the object at `path` durable as it is now (fsync(2)): a file's bytes and
    /// its name, a directory's entries. Object stores have nothing to do: a change is
    /// durable once made.
    fn sync(&self, path: &[u8]) -> FsResult<()> {
        let _ = path;
        Ok(())
    }
}

fn read_only(uri: &str, path: &[u8]) -> FsError {
    FsError::ReadOnly(format!(
        "{uri}: cannot write {} (this UFS is read-only)",
        String::from_utf8_lossy(path)
    ))
}

/// Opens a UFS from its URI: `file:///absolute/path` or `s3://bucket[/prefix]` (with
/// `s3` for how to reach it). Opening reaches nothing yet (see [`Ufs::check`]).
pub fn open_ufs(uri: &str, s3: &S3Options) -> FsResult<Arc<dyn Ufs>> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Arc::new(LocalUfs::open(uri, path)?));
    }
    if uri.starts_with("s3://") {
        return Ok(Arc::new(Arc::new(S3Ufs::open(uri, s3)?)));
    }
    Err(FsError::Unsupported(format!(
        "UFS URI `{uri}`: use file:///absolute/path or s3://bucket/prefix"
    )))
}

/// A UFS URI from what a user typed: an `s3://` or `file://` URI as is, anything else a
/// local directory (made absolute and canonical).
pub fn ufs_uri(given: &str) -> FsResult<String> {
    if given.starts_with("s3://") || given.starts_with("file://") {
        return Ok(given.to_string());
    }
    local_uri(std::path::Path::new(given))
}

/// One spelling per UFS: a local directory (a path or `file://` URI) as the `file://` URI
/// of its canonical path (if it exists), any URI without a trailing `/`. Two UFS are the
/// same when these are equal.
pub fn normalized_uri(given: &str) -> String {
    let local = match given.strip_prefix("file://") {
        Some(path) => Some(path),
        None if !given.contains("://") => Some(given),
        None => None,
    };
    if let Some(Ok(path)) = local.map(std::fs::canonicalize) {
        return format!("file://{}", path.display());
    }
    match given.trim_end_matches('/') {
        "" => given.to_string(),
        trimmed => trimmed.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::normalized_uri;

    #[test]
    fn one_ufs_has_one_normalized_uri() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = format!("file://{}", dir.path().canonicalize().unwrap().display());
        for spelled in [
            format!("{}", dir.path().display()),
            format!("{}/", dir.path().display()),
            format!("file://{}/", dir.path().display()),
            format!("file://{}/.", dir.path().display()),
        ] {
            assert_eq!(normalized_uri(&spelled), canonical, "{spelled}");
        }
        assert_eq!(normalized_uri("s3://b/p/"), "s3://b/p");
        assert_eq!(normalized_uri("s3://b/p"), "s3://b/p");
    }
}
