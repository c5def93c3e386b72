//! GranaryFs driven without a kernel, over the in-memory doubles: lookups, listings and
//! reads.

use super::doubles::{MemNamespace, MemStore, ROOT};
use super::*;

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

/// File bytes are a function of (file id, offset).
fn content(id: u64, size: u64) -> Vec<u8> {
    (0..size).map(|o| (o as u8) ^ (id as u8)).collect()
}

/// A read-only mount of `/dir` (2500 files), `/link` -> `dir/f00001`.
fn fs() -> (GranaryFs, Arc<MemNamespace>, Arc<MemStore>) {
    let ns = Arc::new(MemNamespace::default());
    let store = Arc::new(MemStore::new(false, 1 << 30));
    ns.insert(node(2, ROOT, "dir", FileKind::Directory, 0));
    for i in 0..2500u64 {
        ns.insert(node(100 + i, 2, &format!("f{i:05}"), FileKind::File, i));
        store
            .files
            .lock()
            .unwrap()
            .insert(100 + i, content(100 + i, i));
    }
    let mut link = node(3, ROOT, "link", FileKind::Symlink, 0);
    link.symlink_target = b"dir/f00001".to_vec();
    ns.insert(link);
    let opts = FsOptions {
        meta_cache_ttl: Duration::from_secs(60),
        meta_cache_entries: 10_000,
        read_only: true,
    };
    let fs = GranaryFs::new(ns.clone(), store.clone(), store.clone(), opts);
    (fs, ns, store)
}

#[test]
fn lookups_are_cached_and_errors_are_precise() {
    let (fs, ns, _) = fs();
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
    let (fs, ns, _) = fs();
    let (fh, _) = fs.opendir(2).unwrap();
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
    let (fs, _, _) = fs();
    let (fh, _) = fs.open(110, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 100).unwrap().len(), 10);
    assert_eq!(fs.read(fh, 4, 2).unwrap(), vec![4 ^ 110u8, 5 ^ 110u8]);
    assert!(fs.read(fh, 10, 5).unwrap().is_empty());
    fs.release(fh);
    assert_eq!(fs.read(fh, 0, 1).unwrap_err().errno(), libc::EBADF);
    assert_eq!(fs.readdir(fh, 0, 10).unwrap_err().errno(), libc::EBADF);
}

#[test]
fn a_file_changed_in_the_ufs_is_listed_again_and_read_at_its_new_version() {
    let (fs, ns, store) = fs();
    let (served, _) = fs.open(110, libc::O_RDONLY).unwrap();
    let (unread, _) = fs.open(110, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(served, 0, 100).unwrap(), content(110, 10));
    // The worker finds the UFS object changed; listing the directory again shows it.
    store.stale_once.lock().unwrap().insert(110);
    store
        .files
        .lock()
        .unwrap()
        .insert(110, b"new and longer".to_vec());
    ns.update(110, |i| i.size = 14);
    assert_eq!(fs.read(unread, 0, 100).unwrap(), b"new and longer");
    assert_eq!(ns.refreshes.load(Ordering::SeqCst), 1);
    // A handle that served the old version fails from then on, though nothing it reads
    // is found changed itself: its next bytes would be the new version's (and would go
    // into the page cache a new open shares).
    assert_eq!(fs.read(served, 10, 100).unwrap_err().errno(), libc::ESTALE);
    assert_eq!(fs.read(served, 0, 100).unwrap_err().errno(), libc::ESTALE);
    let (again, _) = fs.open(110, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(again, 0, 100).unwrap(), b"new and longer");
    for fh in [served, unread, again] {
        fs.release(fh);
    }
}

#[test]
fn cached_answers_come_only_from_the_caches() {
    let (fs, ns, _) = fs();
    assert!(fs.lookup_cached(1, b"dir").is_none());
    assert!(fs.getattr_cached(2).is_none());
    assert!(fs.opendir_cached(2).is_none());
    assert!(fs.readlink_cached(3).is_none());
    assert!(fs.open_cached(100, libc::O_RDONLY).is_none());
    assert_eq!(ns.lookups.load(Ordering::Relaxed), 0, "no call went out");

    fs.lookup(1, b"dir").unwrap();
    fs.lookup(1, b"link").unwrap();
    fs.lookup(2, b"f00000").unwrap();
    let calls = ns.lookups.load(Ordering::Relaxed);
    assert_eq!(fs.lookup_cached(1, b"dir").unwrap().id, 2);
    assert_eq!(fs.getattr_cached(2).unwrap().id, 2);
    let (dir, _) = fs.opendir_cached(2).unwrap().unwrap();
    assert_eq!(fs.readdir(dir, 0, 2).unwrap().len(), 2);
    assert_eq!(fs.readlink_cached(3).unwrap().unwrap(), b"dir/f00001");
    assert_eq!(
        fs.readlink_cached(2).unwrap().unwrap_err().errno(),
        libc::EINVAL
    );
    let (fh, _) = fs.open_cached(100, libc::O_RDONLY).unwrap().unwrap();
    assert_eq!(fs.read(fh, 0, 10).unwrap(), content(100, 0));
    assert_eq!(
        fs.opendir_cached(100).unwrap().unwrap_err().errno(),
        libc::ENOTDIR
    );
    // Opens that may change the file always go the full way.
    assert!(fs.open_cached(100, libc::O_WRONLY).is_none());
    assert!(fs
        .open_cached(100, libc::O_RDONLY | libc::O_TRUNC)
        .is_none());
    assert_eq!(ns.lookups.load(Ordering::Relaxed), calls);
}

#[test]
fn a_prefix_pinned_elsewhere_is_dropped_from_the_caches_once() {
    let (fs, ns, _) = fs();
    assert!(
        fs.moved_prefixes().is_empty(),
        "the table the mount started with"
    );
    fs.lookup(ROOT, b"dir").unwrap();
    fs.lookup(2, b"f00001").unwrap();
    assert!(fs.lookup_cached(ROOT, b"dir").is_some());
    *ns.pins.lock().unwrap() = (1, vec![(b"/dir".to_vec(), 1)]);
    assert_eq!(fs.moved_prefixes(), vec![(ROOT, b"dir".to_vec())]);
    assert!(
        fs.lookup_cached(ROOT, b"dir").is_none(),
        "its entry is dropped"
    );
    assert!(fs.moved_prefixes().is_empty(), "once");
    // Nested, moved again, and unpinned.
    *ns.pins.lock().unwrap() = (2, vec![(b"/dir".to_vec(), 2), (b"/dir/f00001".to_vec(), 1)]);
    let mut moved = fs.moved_prefixes();
    moved.sort();
    assert_eq!(
        moved,
        vec![(ROOT, b"dir".to_vec()), (2, b"f00001".to_vec())]
    );
    *ns.pins.lock().unwrap() = (3, vec![(b"/dir".to_vec(), 2)]);
    assert_eq!(fs.moved_prefixes(), vec![(2, b"f00001".to_vec())]);
    // A prefix whose parent is gone has nothing cached.
    *ns.pins.lock().unwrap() = (4, vec![(b"/dir".to_vec(), 2), (b"/gone/x".to_vec(), 1)]);
    assert!(fs.moved_prefixes().is_empty());
}
