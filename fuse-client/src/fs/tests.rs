//! GranaryFs driven without a kernel, over in-memory metadata and data doubles.

use super::*;
use crate::content_store::{NotStored, Stored};
use crate::staging::Backing;
use granary_protos::v1::{BlockLocationsReply, WorkerInfo};
use std::sync::atomic::AtomicUsize;

#[derive(Default)]
struct Namespace {
    inodes: Vec<Inode>,
    lookups: AtomicUsize,
}

impl MetadataService for Namespace {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.inodes
            .iter()
            .find(|i| i.parent == parent && i.name == name && i.id != parent)
            .cloned()
            .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()))
    }
    fn getattr(&self, id: u64) -> FsResult<Inode> {
        self.inodes
            .iter()
            .find(|i| i.id == id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(id.to_string()))
    }
    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)> {
        let mut kids: Vec<Inode> = self
            .inodes
            .iter()
            .filter(|i| i.parent == id && i.id != id && i.name.as_slice() > start_after)
            .cloned()
            .collect();
        kids.sort_by(|a, b| a.name.cmp(&b.name));
        let more = kids.len() > limit as usize;
        kids.truncate(limit as usize);
        Ok((kids, more))
    }
    fn workers(&self) -> FsResult<Vec<WorkerInfo>> {
        Ok(Vec::new())
    }
    fn block_locations(&self, _: u64) -> FsResult<BlockLocationsReply> {
        Ok(BlockLocationsReply::default())
    }
    fn statfs(&self) -> FsResult<StatFsReply> {
        Ok(StatFsReply::default())
    }
}

/// File bytes are a function of (file id, offset).
struct Bytes;
impl BlockRead for Bytes {
    fn read(&self, file: &Inode, _: &mut ReadState, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let end = (offset + len as u64).min(file.size);
        Ok((offset..end).map(|o| (o as u8) ^ (file.id as u8)).collect())
    }
}

/// A mount that writes nothing.
struct NoStore;
impl ContentStore for NoStore {
    fn backing(&self, file: &Inode, _: u64) -> FsResult<Backing> {
        Err(FsError::ReadOnly(shown(&file.name)))
    }
    fn store(&self, file: &Inode, backing: Backing, _: u64, _: bool) -> Result<Stored, NotStored> {
        Err(NotStored {
            error: FsError::ReadOnly(shown(&file.name)),
            backing,
        })
    }
}

fn node(id: u64, parent: u64, name: &str, kind: FileKind, size: u64) -> Inode {
    Inode {
        id,
        parent,
        name: name.as_bytes().to_vec(),
        kind: kind as i32,
        size,
        block_size: 1024,
        ..Default::default()
    }
}

fn fs() -> (GranaryFs, Arc<Namespace>) {
    let mut inodes = vec![
        node(1, 1, "", FileKind::Directory, 0),
        node(2, 1, "dir", FileKind::Directory, 0),
    ];
    for i in 0..2500u64 {
        inodes.push(node(100 + i, 2, &format!("f{i:05}"), FileKind::File, i));
    }
    let mut link = node(3, 1, "link", FileKind::Symlink, 0);
    link.symlink_target = b"dir/f00001".to_vec();
    inodes.push(link);
    let ns = Arc::new(Namespace {
        inodes,
        ..Default::default()
    });
    let opts = FsOptions {
        meta_cache_ttl: Duration::from_secs(60),
        meta_cache_entries: 10_000,
        read_only: true,
    };
    let store = Arc::new(NoStore);
    (GranaryFs::new(ns.clone(), Arc::new(Bytes), store, opts), ns)
}

#[test]
fn lookups_are_cached_and_errors_are_precise() {
    let (fs, ns) = fs();
    assert_eq!(fs.lookup(1, b"dir").unwrap().id, 2);
    assert_eq!(fs.lookup(1, b"dir").unwrap().id, 2);
    assert_eq!(
        ns.lookups.load(Ordering::Relaxed),
        1,
        "second lookup served from cache"
    );
    assert_eq!(fs.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(
        fs.lookup(1, &[b'x'; 256]).unwrap_err().errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(fs.opendir(100).unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(
        fs.open(2, libc::O_RDONLY).unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(
        fs.open(100, libc::O_WRONLY).unwrap_err().errno(),
        libc::EROFS
    );
    assert_eq!(fs.readlink(3).unwrap(), b"dir/f00001");
    assert_eq!(fs.readlink(2).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn readdir_pages_through_large_directories_and_fills_the_cache() {
    let (fs, ns) = fs();
    let fh = fs.opendir(2).unwrap();
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let page = fs.readdir(fh, offset, 700).unwrap();
        let Some(last) = page.last() else { break };
        offset = last.offset;
        names.extend(page.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
    }
    fs.releasedir(fh);
    assert_eq!(names.len(), 2 + 2500);
    assert_eq!(&names[..3], &[".", "..", "f00000"]);
    assert_eq!(names.last().unwrap(), "f02499");
    let before = ns.lookups.load(Ordering::Relaxed);
    assert_eq!(fs.lookup(2, b"f01234").unwrap().id, 1334);
    assert_eq!(
        ns.lookups.load(Ordering::Relaxed),
        before,
        "readdir filled the entry cache"
    );
}

#[test]
fn reads_clip_at_end_of_file() {
    let (fs, _) = fs();
    let (fh, _) = fs.open(110, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 100).unwrap().len(), 10);
    assert_eq!(fs.read(fh, 4, 2).unwrap(), vec![4 ^ 110u8, 5 ^ 110u8]);
    assert!(fs.read(fh, 10, 5).unwrap().is_empty());
    fs.release(fh);
    assert_eq!(fs.read(fh, 0, 1).unwrap_err().errno(), libc::EBADF);
    assert_eq!(fs.readdir(fh, 0, 10).unwrap_err().errno(), libc::EBADF);
}
