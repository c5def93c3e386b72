//! The write path driven without a kernel, over the in-memory doubles: the namespace
//! accepts creates and commits, the store keeps what is stored by inode.

use super::doubles::{writable_fs, MemNamespace, MemStore};
use super::*;
use crate::staging::SMALL_FILE_MAX;
use granary_protos::v1::{CreateRequest, FileKind};

fn fs() -> (GranaryFs, Arc<MemNamespace>, Arc<MemStore>) {
    writable_fs(false, 1 << 30)
}

fn fs_with(local_worker: bool) -> (GranaryFs, Arc<MemNamespace>, Arc<MemStore>) {
    writable_fs(local_worker, 1 << 30)
}

#[test]
fn writes_are_read_back_then_committed_at_close() {
    for local_worker in [false, true] {
        writes_are_read_back_then_committed_at_close_with(local_worker);
    }
}

fn writes_are_read_back_then_committed_at_close_with(local_worker: bool) {
    let (fs, ns, store) = fs_with(local_worker);
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"hello world", 0).unwrap();
    fs.write(fh, 20, b"!", 0).unwrap();
    let (reader, _) = fs.open(inode.id, libc::O_RDONLY).unwrap();
    let mut expected = b"hello world".to_vec();
    expected.resize(20, 0);
    expected.push(b'!');
    assert_eq!(
        fs.read(reader, 0, 100).unwrap(),
        expected,
        "read-your-writes"
    );
    assert_eq!(fs.getattr(inode.id).unwrap().size, 21);
    assert_eq!(
        store.uploads.load(Ordering::Relaxed),
        0,
        "nothing uploaded before close"
    );

    fs.flush(fh).unwrap();
    fs.release(fh);
    fs.release(reader);
    assert_eq!(store.files.lock().unwrap()[&inode.id], expected);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 21);
    // A second close uploads nothing: the content did not change.
    let (again, _) = fs.open(inode.id, libc::O_RDWR).unwrap();
    fs.flush(again).unwrap();
    fs.release(again);
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    assert_eq!(store.whole.load(Ordering::Relaxed), u64::from(local_worker));
}

#[test]
fn overwrite_truncate_and_append_start_from_the_committed_content() {
    for local_worker in [false, true] {
        overwrite_truncate_and_append_with(local_worker);
    }
}

fn overwrite_truncate_and_append_with(local_worker: bool) {
    let (fs, _, store) = fs_with(local_worker);
    let (inode, fh) = fs.create(1, b"log", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"0123456789", 0).unwrap();
    fs.release(fh);

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY).unwrap();
    fs.write(fh, 2, b"ab", 0).unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"01ab456789");

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.write(fh, 0, b"+", libc::O_WRONLY | libc::O_APPEND)
        .unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"01ab456789+");

    let attrs = SetAttr {
        size: Some(4),
        ..Default::default()
    };
    assert_eq!(fs.setattr(inode.id, &attrs).unwrap().size, 4);
    assert_eq!(
        store.files.lock().unwrap()[&inode.id],
        b"01ab",
        "truncate(2) commits at once"
    );

    let (fh, _) = fs.open(inode.id, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    fs.release(fh);
    assert!(store.files.lock().unwrap()[&inode.id].is_empty());
}

#[test]
fn create_of_a_name_made_elsewhere_opens_it_unless_exclusive() {
    let (fs, ns, _) = fs();
    let elsewhere = ns
        .create(CreateRequest {
            parent: 1,
            name: b"shared".to_vec(),
            kind: FileKind::File as i32,
            ..Default::default()
        })
        .unwrap();
    let (inode, fh) = fs
        .create(1, b"shared", 0o644, libc::O_WRONLY, 0, 0)
        .unwrap();
    assert_eq!(inode.id, elsewhere.id);
    fs.release(fh);
    let err = fs
        .create(1, b"shared", 0o644, libc::O_WRONLY | libc::O_EXCL, 0, 0)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    let (fh, _) = fs.open(elsewhere.id, libc::O_RDONLY).unwrap();
    assert_eq!(fs.write(fh, 0, b"x", 0).unwrap_err().errno(), libc::EBADF);
}

#[test]
fn a_small_file_kept_in_memory_moves_to_a_file_when_it_grows() {
    let (fs, _, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"grows", 0o644, libc::O_RDWR, 0, 0).unwrap();
    let chunk = vec![7u8; 100 << 10];
    let mut expected = Vec::new();
    for i in 0..4u64 {
        fs.write(fh, i * chunk.len() as u64, &chunk, 0).unwrap();
        expected.extend_from_slice(&chunk);
        assert_eq!(fs.read(fh, 0, expected.len() as u32).unwrap(), expected);
    }
    assert!(expected.len() as u64 > SMALL_FILE_MAX);
    fs.flush(fh).unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], expected);
    assert_eq!(
        store.whole.load(Ordering::Relaxed),
        0,
        "too big to send whole"
    );

    // Truncated back to a small size, then grown past the limit by a truncate alone.
    let attrs = |size| SetAttr {
        size: Some(size),
        ..Default::default()
    };
    fs.setattr(inode.id, &attrs(10)).unwrap();
    assert_eq!(store.files.lock().unwrap()[&inode.id], vec![7u8; 10]);
    fs.setattr(inode.id, &attrs(SMALL_FILE_MAX + 1)).unwrap();
    let mut grown = vec![7u8; 10];
    grown.resize(SMALL_FILE_MAX as usize + 1, 0);
    assert_eq!(store.files.lock().unwrap()[&inode.id], grown);
}

#[test]
fn attributes_read_during_a_commit_show_the_new_size() {
    for local_worker in [false, true] {
        let (fs, ns, _) = fs_with(local_worker);
        let fs = Arc::new(fs);
        let (inode, fh) = fs.create(1, b"racy", 0o644, libc::O_WRONLY, 0, 0).unwrap();
        fs.write(fh, 0, b"eleven byte", 0).unwrap();
        *ns.commit_delay.lock().unwrap() = Duration::from_millis(300);
        let flusher = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.flush(fh))
        };
        while ns.commits_started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The upload is done and the commit under way: neither the staged size nor the
        // size from before the write may be shown as if committed.
        assert_eq!(fs.getattr(inode.id).unwrap().size, 11);
        flusher.join().unwrap().unwrap();
        assert_eq!(fs.getattr(inode.id).unwrap().size, 11);
        fs.release(fh);
    }
}

#[test]
fn small_files_stage_in_files_once_the_buffer_memory_is_spent() {
    let (fs, _, store) = writable_fs(true, 150 << 10);
    let memory = store.memory.clone();
    let chunk = vec![3u8; 100 << 10];
    let (a, fa) = fs.create(1, b"a", 0o644, libc::O_RDWR, 0, 0).unwrap();
    let (b, fb) = fs.create(1, b"b", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fa, 0, &chunk, 0).unwrap();
    assert_eq!(memory.used(), 100 << 10, "a is held in memory");
    fs.write(fb, 0, &chunk, 0).unwrap();
    assert_eq!(memory.used(), 100 << 10, "b did not fit: it went to a file");
    // a grows past what is left: it moves to a file too, and gives its memory back.
    fs.write(fa, chunk.len() as u64, &chunk, 0).unwrap();
    assert_eq!(memory.used(), 0);
    for fh in [fa, fb] {
        fs.flush(fh).unwrap();
        fs.release(fh);
    }
    let files = store.files.lock().unwrap();
    assert_eq!(files[&a.id], [chunk.clone(), chunk.clone()].concat());
    assert_eq!(files[&b.id], chunk);
    assert_eq!(
        store.whole.load(Ordering::Relaxed),
        0,
        "neither was sent whole"
    );
}

#[test]
fn content_stored_but_not_committed_is_committed_by_the_next_try_as_it_is() {
    let (fs, ns, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"version one", 0).unwrap();
    ns.faults.commits.store(1, Ordering::SeqCst);
    assert!(fs.flush(fh).unwrap_err().is_retryable());
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1, "stored once");
    assert_eq!(ns.getattr(inode.id).unwrap().size, 0, "not committed");
    // The retry commits what is in the UFS already; it is not stored again.
    fs.flush(fh).unwrap();
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 11);
    assert_eq!(fs.read(fh, 0, 100).unwrap(), b"version one");
    fs.release(fh);
}

#[test]
fn a_close_whose_commit_fails_says_so_and_one_that_commits_does_not() {
    let (fs, ns, _store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"version one", 0).unwrap();
    assert!(!fs.release(fh), "committed");
    let (fh, _) = fs.open(inode.id, libc::O_RDWR | libc::O_TRUNC).unwrap();
    fs.write(fh, 0, b"version two, longer", 0).unwrap();
    ns.faults.commits.store(2, Ordering::SeqCst);
    fs.flush(fh).unwrap_err();
    assert!(fs.release(fh), "its writes are lost");
    assert_eq!(ns.getattr(inode.id).unwrap().size, 11);
}

#[test]
fn truncating_content_whose_commit_failed_truncates_what_was_stored() {
    let (fs, ns, store) = fs_with(true);
    let (inode, fh) = fs.create(1, b"log", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"0123456789", 0).unwrap();
    ns.faults.commits.store(1, Ordering::SeqCst);
    fs.flush(fh).unwrap_err();
    let attrs = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    fs.setattr(inode.id, &attrs).unwrap();
    fs.release(fh);
    assert_eq!(ns.getattr(inode.id).unwrap().size, 0);
    assert!(store.files.lock().unwrap()[&inode.id].is_empty());
}

#[test]
fn an_fsync_after_a_close_makes_the_stored_content_durable_in_place_once() {
    let (fs, ns, store) = fs_with(false);
    let (inode, fh) = fs.create(1, b"f", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"abc", 0).unwrap();
    fs.flush(fh).unwrap();
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
    fs.fsync(fh).unwrap();
    assert_eq!(ns.syncs.load(Ordering::SeqCst), 1, "made durable");
    fs.fsync(fh).unwrap();
    fs.flush(fh).unwrap();
    assert_eq!(
        (
            store.uploads.load(Ordering::Relaxed),
            ns.syncs.load(Ordering::SeqCst)
        ),
        (1, 1),
        "nothing new to store or sync"
    );
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"abc");
    fs.release(fh);
}

#[test]
fn an_fsync_through_any_descriptor_makes_the_files_writes_durable() {
    let (fs, ns, store) = fs_with(false);
    let (inode, writer) = fs.create(1, b"f", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(writer, 0, b"staged", 0).unwrap();
    // Another process's read-only descriptor: the writer's bytes are still staged.
    let (reader, _) = fs.open(inode.id, libc::O_RDONLY).unwrap();
    fs.fsync(reader).unwrap();
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"staged");
    assert_eq!(store.durable.load(Ordering::Relaxed), 1, "stored durably");
    fs.release(writer);
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);

    // Written and closed, then `sync FILE` (a read-only open and fsync): the stored
    // object is made durable where it is.
    fs.fsync(reader).unwrap();
    assert_eq!(ns.syncs.load(Ordering::SeqCst), 1);
    fs.release(reader);
    assert_eq!(store.uploads.load(Ordering::Relaxed), 1);
}

#[test]
fn a_new_file_the_master_made_empty_is_stored_at_close_only_if_written() {
    let (fs, ns, store) = fs();
    ns.empty_objects.store(true, Ordering::SeqCst);
    let (empty, fh) = fs.create(1, b"empty", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    assert!(
        fs.closes_without_waiting(empty.id, libc::O_WRONLY),
        "nothing to store"
    );
    assert!(fs.flush_cached(fh).unwrap().is_ok());
    fs.release(fh);
    assert_eq!(
        (
            store.uploads.load(Ordering::Relaxed),
            ns.commits_started.load(Ordering::SeqCst)
        ),
        (0, 0),
        "closed unwritten: nothing to store or commit"
    );
    assert_eq!(fs.getattr(empty.id).unwrap().size, 0);

    let (written, fh) = fs
        .create(1, b"written", 0o644, libc::O_WRONLY, 0, 0)
        .unwrap();
    fs.write(fh, 0, b"abc", 0).unwrap();
    assert!(
        !fs.closes_without_waiting(written.id, libc::O_WRONLY),
        "written: its close stores it"
    );
    assert!(fs.flush_cached(fh).is_none());
    fs.flush(fh).unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&written.id], b"abc");
    assert_eq!(ns.getattr(written.id).unwrap().size, 3);

    // fsync(2) of a new file still makes its (empty) object durable.
    let (synced, fh) = fs
        .create(1, b"synced", 0o644, libc::O_WRONLY, 0, 0)
        .unwrap();
    ns.empty_objects.store(false, Ordering::SeqCst);
    let (unstored, unstored_fh) = fs
        .create(1, b"unstored", 0o644, libc::O_WRONLY, 0, 0)
        .unwrap();
    assert!(
        !fs.closes_without_waiting(unstored.id, libc::O_WRONLY),
        "no empty object made: its close stores one"
    );
    fs.release(unstored_fh);
    assert_eq!(store.files.lock().unwrap()[&unstored.id], b"");
    fs.fsync(fh).unwrap();
    fs.release(fh);
    assert_eq!(
        (
            store.uploads.load(Ordering::Relaxed),
            ns.syncs.load(Ordering::SeqCst)
        ),
        (2, 1),
        "the master's empty object is made durable in place"
    );
    assert!(!store.files.lock().unwrap().contains_key(&synced.id));
}

#[test]
fn mknod_makes_special_files_in_the_namespace_and_regular_files_empty() {
    let (fs, ns, store) = fs();
    let dev = fs
        .mknod(1, b"tty", libc::S_IFCHR | 0o620, 0x0403, 5, 6)
        .unwrap();
    assert_eq!(
        (dev.kind, dev.mode, dev.rdev, dev.uid, dev.gid),
        (FileKind::CharDevice as i32, 0o620, 0x0403, 5, 6)
    );
    let fifo = fs
        .mknod(1, b"pipe", libc::S_IFIFO | 0o600, 77, 0, 0)
        .unwrap();
    assert_eq!(
        (fifo.kind, fifo.rdev),
        (FileKind::Fifo as i32, 0),
        "rdev only for devices"
    );
    let sock = fs
        .mknod(1, b"sock", libc::S_IFSOCK | 0o755, 0, 0, 0)
        .unwrap();
    assert_eq!(fs.lookup(1, b"sock").unwrap().kind, FileKind::Socket as i32);
    assert_eq!(ns.getattr(sock.id).unwrap().kind, FileKind::Socket as i32);
    assert_eq!(
        store.uploads.load(Ordering::Relaxed),
        0,
        "no special file reaches the UFS"
    );
    let plain = fs
        .mknod(1, b"plain", libc::S_IFREG | 0o640, 0, 0, 0)
        .unwrap();
    assert_eq!((plain.kind, plain.size), (FileKind::File as i32, 0));
    assert_eq!(
        fs.mknod(1, b"plain", libc::S_IFREG | 0o640, 0, 0, 0)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        fs.mknod(1, b"dir", libc::S_IFDIR | 0o755, 0, 0, 0)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        store.uploads.load(Ordering::Relaxed),
        1,
        "the regular file does"
    );
}

#[test]
fn a_directory_listing_is_kept_across_opens_only_while_the_directory_is_unchanged() {
    let (fs, _, _) = fs();
    let unchanged = |fs: &GranaryFs| {
        let (fh, unchanged) = fs.opendir(1).unwrap();
        fs.releasedir(fh);
        unchanged
    };
    assert!(!unchanged(&fs), "first listing");
    assert!(unchanged(&fs));
    fs.mkdir(1, b"d", 0o755, 0, 0).unwrap();
    assert!(!unchanged(&fs), "an entry was added");
    assert!(unchanged(&fs));
}

#[test]
fn a_file_whose_commit_holds_it_is_answered_and_closed_only_by_waiting() {
    let (fs, _, _) = fs();
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"hello", 0).unwrap();
    fs.flush(fh).unwrap();
    let (reader, _) = fs.open(inode.id, libc::O_RDONLY).unwrap();
    assert_eq!(fs.getattr_cached(inode.id).unwrap().size, 5, "staged size");
    assert!(fs.closes_without_waiting(inode.id, libc::O_RDONLY));
    let st = fs.staging.get(inode.id).unwrap();
    let held = st.lock();
    assert!(fs.getattr_cached(inode.id).is_none());
    assert!(fs.lookup_cached(1, b"ckpt").is_none());
    assert!(!fs.closes_without_waiting(inode.id, libc::O_WRONLY));
    assert!(fs.flush_cached(fh).is_none());
    assert!(
        fs.flush_cached(reader).is_some(),
        "a reader's flush commits nothing"
    );
    assert!(
        !fs.closes_without_waiting(inode.id, libc::O_RDONLY),
        "a reader's close looks at the staged file too"
    );
    drop(held);
    assert_eq!(fs.lookup_cached(1, b"ckpt").unwrap().size, 5);
    fs.release(fh);
    fs.release(reader);
    assert!(fs.staging.get(inode.id).is_none());
}

#[test]
fn a_listing_does_not_wait_for_a_commit_and_shows_the_size_being_committed() {
    let (fs, _, _) = fs();
    let (inode, fh) = fs.create(1, b"ckpt", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    fs.write(fh, 0, b"hello", 0).unwrap();
    let (_, log) = fs.create(1, b"log", 0o644, libc::O_WRONLY, 0, 0).unwrap();
    // A commit (waiting on the UFS) holds the file's staged state.
    let st = fs.staging.get(inode.id).unwrap();
    let held = st.lock();
    let (dir, _) = fs.opendir(1).unwrap();
    let entries = fs.readdir(dir, 0, 100).unwrap();
    let current = |name: &[u8]| {
        let e = entries.iter().find(|e| e.name == name).unwrap();
        (e.attrs_current, e.inode.size)
    };
    // Not the committed size (0): the kernel would cut its page cache of the file to it.
    assert_eq!(
        current(b"ckpt"),
        (false, 5),
        "the size written, not to be kept"
    );
    assert!(current(b"log").0);
    drop(held);
    fs.releasedir(dir);
    let (dir, _) = fs.opendir(1).unwrap();
    let entries = fs.readdir(dir, 0, 100).unwrap();
    let e = entries.iter().find(|e| e.name == b"ckpt").unwrap();
    assert_eq!((e.attrs_current, e.inode.size), (true, 5));
    fs.releasedir(dir);
    fs.release(fh);
    fs.release(log);
}

#[test]
fn fallocate_extends_with_zeros_and_refuses_holes() {
    let (fs, _, store) = fs();
    let (inode, fh) = fs.create(1, b"f", 0o644, libc::O_RDWR, 0, 0).unwrap();
    fs.write(fh, 0, b"abc", 0).unwrap();
    fs.fallocate(inode.id, 0, 8, 0).unwrap();
    assert_eq!(fs.getattr(inode.id).unwrap().size, 8);
    fs.fallocate(inode.id, 0, 2, 0).unwrap();
    fs.fallocate(inode.id, 0, 100, libc::FALLOC_FL_KEEP_SIZE)
        .unwrap();
    assert_eq!(
        fs.getattr(inode.id).unwrap().size,
        8,
        "never shrinks or grows"
    );
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let e = fs.fallocate(inode.id, 0, 2, punch).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP);
    fs.flush(fh).unwrap();
    fs.release(fh);
    assert_eq!(store.files.lock().unwrap()[&inode.id], b"abc\0\0\0\0\0");
}
