//! Filesystem semantics independent of the kernel interface: lookups and attributes
//! through a metadata cache, directory streams, open handles and reads. The FUSE adapter
//! only translates types; tests drive this type directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use granary_common::path::validate_name;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{FileKind, Inode, StatFsReply};
use moka::sync::Cache;

use crate::block_reader::{DataPath, ReadState};
use crate::meta_client::MetadataService;

/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 1024;

#[derive(Debug, Clone)]
pub struct FsOptions {
    pub meta_cache_ttl: Duration,
    pub meta_cache_entries: u64,
}

struct OpenFile {
    inode: Inode,
    state: Mutex<ReadState>,
}

struct DirStream {
    dir: Inode,
    entries: Vec<Inode>,
    complete: bool,
}

/// One entry of a directory stream. `offset` is what the kernel passes back to continue
/// after this entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub inode: Inode,
    pub name: Vec<u8>,
    pub offset: u64,
}

pub struct GranaryFs {
    meta: Arc<dyn MetadataService>,
    data: Arc<dyn DataPath>,
    attrs: Cache<u64, Inode>,
    entries: Cache<(u64, Vec<u8>), u64>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_handle: AtomicU64,
}

fn is_dir(i: &Inode) -> bool {
    i.kind == FileKind::Directory as i32
}

impl GranaryFs {
    pub fn new(meta: Arc<dyn MetadataService>, data: Arc<dyn DataPath>, opts: FsOptions) -> Self {
        GranaryFs {
            meta,
            data,
            attrs: Cache::builder()
                .max_capacity(opts.meta_cache_entries)
                .time_to_live(opts.meta_cache_ttl)
                .build(),
            entries: Cache::builder()
                .max_capacity(opts.meta_cache_entries)
                .time_to_live(opts.meta_cache_ttl)
                .build(),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    fn remember(&self, inode: &Inode) {
        self.attrs.insert(inode.id, inode.clone());
        if inode.id != inode.parent {
            self.entries
                .insert((inode.parent, inode.name.clone()), inode.id);
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        validate_name(name)?;
        if let Some(id) = self.entries.get(&(parent, name.to_vec())) {
            if let Some(i) = self.attrs.get(&id) {
                return Ok(i);
            }
        }
        let inode = self.meta.lookup(parent, name)?;
        self.remember(&inode);
        Ok(inode)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Inode> {
        if let Some(i) = self.attrs.get(&ino) {
            return Ok(i);
        }
        let inode = self.meta.getattr(ino)?;
        self.attrs.insert(ino, inode.clone());
        Ok(inode)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.getattr(ino)?;
        if i.kind != FileKind::Symlink as i32 {
            return Err(FsError::InvalidPath("not a symbolic link".into()));
        }
        Ok(i.symlink_target)
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a file for reading; write access is refused (read-only filesystem).
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly("this Granary mount is read-only".into()));
        }
        let inode = self.getattr(ino)?;
        match FileKind::try_from(inode.kind) {
            Ok(FileKind::File) => {}
            Ok(FileKind::Directory) => {
                return Err(FsError::IsDir(
                    String::from_utf8_lossy(&inode.name).into_owned(),
                ))
            }
            _ => return Err(FsError::InvalidPath("not a regular file".into())),
        }
        let fh = self.handle();
        let file = Arc::new(OpenFile {
            inode,
            state: Mutex::new(ReadState::default()),
        });
        self.files.write().expect("files lock").insert(fh, file);
        Ok(fh)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = self
            .files
            .read()
            .expect("files lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::InvalidPath(format!("unknown file handle {fh}")))?;
        if offset >= file.inode.size || size == 0 {
            return Ok(Vec::new());
        }
        let mut state = file.state.lock().expect("read state lock");
        self.data.read(&file.inode, &mut state, offset, size)
    }

    /// For an open handle, a local file with the same bytes that the kernel may read
    /// directly (see [`DataPath::whole_file`]).
    pub fn whole_file(&self, fh: u64) -> Option<std::fs::File> {
        let file = self.files.read().expect("files lock").get(&fh).cloned()?;
        self.data.whole_file(&file.inode)
    }

    pub fn release(&self, fh: u64) {
        self.files.write().expect("files lock").remove(&fh);
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let dir = self.getattr(ino)?;
        if !is_dir(&dir) {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        let fh = self.handle();
        let stream = DirStream {
            dir,
            entries: Vec::new(),
            complete: false,
        };
        self.dirs
            .write()
            .expect("dirs lock")
            .insert(fh, Arc::new(Mutex::new(stream)));
        Ok(fh)
    }

    /// Entries from position `offset` on (0 is `.`, 1 is `..`), at most `max`.
    pub fn readdir(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let stream = self
            .dirs
            .read()
            .expect("dirs lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::InvalidPath(format!("unknown directory handle {fh}")))?;
        let mut s = stream.lock().expect("dir stream lock");
        let mut out = Vec::new();
        let mut pos = offset;
        while out.len() < max {
            match pos {
                0 => out.push(DirEntry {
                    inode: s.dir.clone(),
                    name: b".".to_vec(),
                    offset: 1,
                }),
                1 => {
                    let parent = self.getattr(s.dir.parent).unwrap_or_else(|_| s.dir.clone());
                    out.push(DirEntry {
                        inode: parent,
                        name: b"..".to_vec(),
                        offset: 2,
                    });
                }
                _ => {
                    let i = (pos - 2) as usize;
                    while i >= s.entries.len() && !s.complete {
                        let after = s.entries.last().map(|e| e.name.clone()).unwrap_or_default();
                        let (page, more) = self.meta.readdir(s.dir.id, &after, READDIR_PAGE)?;
                        for e in &page {
                            self.remember(e);
                        }
                        s.complete = !more || page.is_empty();
                        s.entries.extend(page);
                    }
                    let Some(e) = s.entries.get(i) else { break };
                    out.push(DirEntry {
                        inode: e.clone(),
                        name: e.name.clone(),
                        offset: pos + 1,
                    });
                }
            }
            pos += 1;
        }
        Ok(out)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().expect("dirs lock").remove(&fh);
    }

    pub fn statfs(&self) -> FsResult<StatFsReply> {
        self.meta.statfs()
    }
}

#[cfg(test)]
mod tests {
    //! GranaryFs driven without a kernel, over in-memory metadata and data doubles.

    use super::*;
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
    impl DataPath for Bytes {
        fn read(
            &self,
            file: &Inode,
            _: &mut ReadState,
            offset: u64,
            len: u32,
        ) -> FsResult<Vec<u8>> {
            let end = (offset + len as u64).min(file.size);
            Ok((offset..end).map(|o| (o as u8) ^ (file.id as u8)).collect())
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
        };
        (GranaryFs::new(ns.clone(), Arc::new(Bytes), opts), ns)
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
        let fh = fs.open(110, libc::O_RDONLY).unwrap();
        assert_eq!(fs.read(fh, 0, 100).unwrap().len(), 10);
        assert_eq!(fs.read(fh, 4, 2).unwrap(), vec![4 ^ 110u8, 5 ^ 110u8]);
        assert!(fs.read(fh, 10, 5).unwrap().is_empty());
        fs.release(fh);
        assert_eq!(fs.read(fh, 0, 1).unwrap_err().errno(), libc::EINVAL);
    }
}
