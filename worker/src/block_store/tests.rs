//! The block store against a real directory: layouts, eviction, restarts.

use super::*;

const FP: Fingerprint = Fingerprint {
    size: 100,
    mtime_ns: 1,
};

fn put(store: &BlockStore, id: BlockId, data: &[u8]) -> CachedBlock {
    put_version(store, id, FP, data)
}

fn put_version(store: &BlockStore, id: BlockId, fp: Fingerprint, data: &[u8]) -> CachedBlock {
    let tmp = store.temp_path();
    fs::write(&tmp, data).unwrap();
    store
        .commit(id, fp, &tmp, data.len() as u64, crc32c::crc32c(data))
        .unwrap()
}

/// Caches block `index` of a file of `size` bytes in 100-byte blocks through its
/// shared data file.
fn put_shared(store: &BlockStore, id: BlockId, fp: Fingerprint, data: &[u8]) -> CachedBlock {
    use std::io::Write;
    let mut fill = store.begin_shared(id, fp, 100).unwrap().expect("shared");
    fill.file.write_all(data).unwrap();
    fill.commit(data.len() as u64, crc32c::crc32c(data))
        .unwrap()
        .expect("entered")
}

const SHARED_FP: Fingerprint = Fingerprint {
    size: 250,
    mtime_ns: 5,
};

#[test]
fn blocks_of_a_file_share_one_data_file_that_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
    let path = {
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        assert!(
            !s.shares_data_file(100, 100),
            "one block: a file of its own"
        );
        assert!(
            !s.shares_data_file((1 << 20) / 8 + 1, 100),
            "too big to evict whole"
        );
        let blocks: Vec<CachedBlock> = [2u32, 0, 1]
            .iter()
            .map(|&i| {
                let start = i as usize * 100;
                put_shared(&s, (3, i), SHARED_FP, &data[start..(start + 100).min(250)])
            })
            .collect();
        assert!(blocks.iter().all(|b| b.path == blocks[0].path));
        assert_eq!(
            blocks.iter().map(|b| (b.offset, b.len)).collect::<Vec<_>>(),
            [(200, 50), (0, 100), (100, 100)]
        );
        assert_eq!(fs::read(&blocks[0].path).unwrap(), data, "the file, whole");
        blocks[0].path.clone()
    };
    let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    assert_eq!((report.blocks, report.bytes), (3, 250));
    // Bytes changed behind the cache's back fail their own block's checksum only, and
    // that block takes its file's other blocks with it (they share its bytes on disk).
    let f = File::options().write(true).open(&path).unwrap();
    f.write_all_at(b"XX", 120).unwrap();
    let first = s.lookup((3, 0), SHARED_FP).unwrap();
    assert_eq!(
        (first.path, first.offset, first.len),
        (path.clone(), 0, 100)
    );
    assert!(s.lookup((3, 1), SHARED_FP).is_none());
    assert!(s.lookup((3, 2), SHARED_FP).is_none());
    assert!(s.is_empty());
    assert!(!path.exists());
}

#[test]
fn a_shared_file_is_evicted_whole_and_open_readers_keep_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 2000, 0.9, 0.5).unwrap();
    put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
    let last = put_shared(&s, (3, 2), SHARED_FP, &[3; 50]);
    put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    let reader = File::open(&last.path).unwrap();
    for i in 0..7 {
        put(&s, (10, i), &[0; 200]);
    }
    // 250 + 1400 = 1650 <= 1800; one more block goes over and evicts from the
    // least recently used, the shared file, all of whose blocks go together.
    put(&s, (10, 7), &[0; 200]);
    for i in 0..3 {
        assert!(s.lookup((3, i), SHARED_FP).is_none());
    }
    assert!(!last.path.exists());
    assert_eq!(
        fs::read_dir(last.path.parent().unwrap()).unwrap().count(),
        0
    );
    let mut buf = [0u8; 250];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf[..100], [1; 100]);
    assert_eq!(buf[200..], [3; 50]);
    let (_, removed) = s.take_deltas();
    assert!(removed.contains(&(3, 1)));
    // Cached again, the file gets a data file of another name: a reader told the old
    // name before the eviction finds nothing there rather than a file with holes.
    let again = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    assert_ne!(again.path, last.path);
    assert!(!last.path.exists());
}

#[test]
fn of_two_incarnations_of_a_file_the_restart_keeps_the_fuller() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, stray) = {
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
        let kept = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
        // Left by a crash: an older data file of the same version, with one block.
        let stray = s.data_path((3, SHARED_FP), 7);
        fs::write(&stray, [1; 100]).unwrap();
        let at = SharedAt {
            incarnation: 7,
            offset: 0,
        };
        let entry = Entry::new(100, SHARED_FP, crc32c::crc32c(&[1; 100]), Some(at), false);
        File::create(s.entry_path((3, 0), &entry)).unwrap();
        (kept, stray)
    };
    let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    assert_eq!((report.blocks, report.discarded), (2, 1));
    assert!(!stray.exists());
    assert_eq!(s.lookup((3, 0), SHARED_FP).unwrap().path, kept.path);
    assert_eq!(fs::read_dir(stray.parent().unwrap()).unwrap().count(), 3);
}

#[test]
fn a_fill_that_is_not_committed_leaves_nothing() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    let path = {
        let mut fill = s.begin_shared((4, 1), SHARED_FP, 100).unwrap().unwrap();
        fill.file.write_all(b"half").unwrap();
        s.data_path((4, SHARED_FP), fill.at.incarnation)
    };
    assert!(!path.exists());
    assert!(s.is_empty());
    // A fill that fails next to a committed block gives its bytes back.
    let block = put_shared(&s, (4, 0), SHARED_FP, &[9; 100]);
    {
        let mut fill = s.begin_shared((4, 1), SHARED_FP, 100).unwrap().unwrap();
        fill.file.write_all(&[7; 100]).unwrap();
    }
    let mut tail = [1u8; 100];
    File::open(&block.path)
        .unwrap()
        .read_exact_at(&mut tail, 100)
        .unwrap();
    assert_eq!(tail, [0; 100], "the failed fill's bytes are a hole");
}

#[test]
fn lru_eviction_between_watermarks() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1000, 0.9, 0.5).unwrap();
    let blocks: Vec<CachedBlock> = (0..4).map(|i| put(&s, (1, i), &[i as u8; 200])).collect();
    assert_eq!(s.used(), 800);
    assert!(s.lookup((1, 0), FP).is_some()); // block 0 is now the most recent
    put(&s, (1, 4), &[4; 200]); // 1000 > 900: evict down to <= 500
    assert!(s.used() <= 500, "used {}", s.used());
    assert!(s.lookup((1, 0), FP).is_some());
    assert!(s.lookup((1, 4), FP).is_some());
    assert!(s.lookup((1, 1), FP).is_none());
    assert!(!blocks[1].path.exists());
    let (mut added, mut removed) = s.take_deltas();
    added.sort();
    removed.sort();
    assert_eq!(added, [(1, 0), (1, 4)], "the blocks still cached");
    assert_eq!(removed, [(1, 1), (1, 2), (1, 3)]);
}

#[test]
fn restart_keeps_valid_blocks_and_drops_corrupt_or_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (truncated, old_version, old_layout) = {
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        put(&s, (7, 0), b"good block");
        let corrupt = put(&s, (7, 1), b"will be corrupted");
        let truncated = put(&s, (8, 0), b"cut short by a crash");
        let old_version = put(&s, (9, 0), b"old version");
        fs::write(&corrupt.path, b"WILL BE CORRUPTED").unwrap();
        fs::write(&truncated.path, b"cut").unwrap();
        fs::write(s.temp_path(), b"partial fetch").unwrap();
        // A crash between caching a new version and deleting the old one.
        let kept = old_version.path.with_file_name("kept");
        fs::copy(&old_version.path, &kept).unwrap();
        let new_version = put(&s, (9, 0), b"new version!");
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&kept)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        assert!(new_version.path.exists());
        fs::rename(&kept, &old_version.path).unwrap();
        let old_layout = dir.path().join("blocks/0000000000000007");
        fs::create_dir_all(&old_layout).unwrap();
        fs::write(old_layout.join("0"), b"older layout").unwrap();
        (truncated, old_version, old_layout)
    };
    let (s, report) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    assert_eq!(report.blocks, 3);
    assert_eq!(s.lookup((7, 0), FP).unwrap().len, 10);
    assert!(
        s.lookup((7, 1), FP).is_none(),
        "checksum mismatch must not be served"
    );
    assert!(s.lookup((8, 0), FP).is_none());
    assert!(!truncated.path.exists());
    let newest = s.lookup((9, 0), FP).unwrap();
    assert_eq!(fs::read(newest.path).unwrap(), b"new version!");
    assert!(!old_version.path.exists());
    assert!(!old_layout.exists());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_new_ufs_version_invalidates_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    let v1 = put(&s, (1, 0), b"v1");
    let newer = Fingerprint {
        size: 100,
        mtime_ns: 2,
    };
    assert!(s.lookup((1, 0), newer).is_none());
    // A client asking for another version does not drop this one: the UFS decides which
    // is current, when the block is fetched.
    assert_eq!(s.lookup((1, 0), FP), Some(v1.clone()));
    let v2 = put_version(&s, (1, 0), newer, b"v2");
    assert!(s.lookup((1, 0), FP).is_none(), "the stale block is gone");
    assert_eq!(s.lookup((1, 0), newer), Some(v2));
    assert!(!v1.path.exists());
}

#[test]
fn a_deleted_file_loses_the_blocks_of_every_version_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    let longer = Fingerprint {
        size: 500,
        mtime_ns: 1,
    };
    for i in 0..5 {
        put_version(&s, (7, i), longer, &[i as u8; 100]);
    }
    // Overwritten with one block, which replaces block 0 only.
    put_version(&s, (7, 0), FP, &[9; 100]);
    put(&s, (8, 0), &[8; 100]);
    let (blocks, bytes) = s.evict_files(&HashSet::from([7]));
    assert_eq!((blocks, bytes), (5, 500));
    assert!((0..5).all(|i| s.cached((7, i), FP).is_none() && s.cached((7, i), longer).is_none()));
    assert!(s.cached((8, 0), FP).is_some(), "another file's block stays");
    assert_eq!(s.evict_files(&HashSet::from([7])), (0, 0));
    // Blocks found on disk at a restart are found by file too.
    for i in [0, 3, 40] {
        put(&s, (9, i), &[1; 100]);
    }
    drop(s);
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    assert_eq!(s.evict_files(&HashSet::from([8, 9])), (4, 400));
    assert_eq!(s.used(), 0);
}

#[test]
fn shrinking_capacity_evicts_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
        for i in 0..10 {
            put(&s, (2, i), &[0; 100]);
        }
    }
    let (s, _) = BlockStore::open(dir.path(), 500, 0.9, 0.6).unwrap();
    assert!(s.used() <= 300, "used {}", s.used());
}

#[test]
fn dropping_one_block_of_a_shared_file_drops_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
    let b = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    put(&s, (9, 0), b"a block file");
    s.take_deltas();
    assert_eq!(s.evict(&[(3, 1)]), (2, 200));
    assert_eq!(s.used(), 12);
    assert!(!b.path.exists());
    let (_, removed) = s.take_deltas();
    assert_eq!(removed.len(), 2);
    // A new version of the file, cached, drops the old one whole too.
    put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
    let old = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    let newer = Fingerprint {
        size: 250,
        mtime_ns: 6,
    };
    assert!(s.lookup((3, 0), newer).is_none());
    assert_eq!(s.len(), 3, "asked for, another version stays");
    put_shared(&s, (3, 0), newer, &[4; 100]);
    assert_eq!(s.len(), 2, "the block file and the new version's block");
    assert_eq!(s.used(), 112);
    assert!(!old.path.exists());
}

#[test]
fn a_data_file_deleted_behind_the_store_is_not_made_again_with_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
    let gone = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    s.take_deltas();
    fs::remove_file(&gone.path).unwrap();
    let fresh = put_shared(&s, (3, 2), SHARED_FP, &[3; 50]);
    assert_ne!(fresh.path, gone.path, "a new incarnation");
    assert!(!gone.path.exists());
    assert!(
        s.lookup((3, 0), SHARED_FP).is_none(),
        "its blocks are dropped"
    );
    assert!(s.lookup((3, 1), SHARED_FP).is_none());
    assert_eq!((s.len(), s.used()), (1, 50));
    let (_, removed) = s.take_deltas();
    assert!(removed.contains(&(3, 0)) && removed.contains(&(3, 1)));
}

#[test]
fn a_block_is_filled_by_one_fill_at_a_time() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    let mut first = s.begin_shared((3, 1), SHARED_FP, 100).unwrap().unwrap();
    assert!(
        s.begin_shared((3, 1), SHARED_FP, 100).unwrap().is_none(),
        "no second fill of a block being filled"
    );
    first.file.write_all(&[2; 100]).unwrap();
    let block = first
        .commit(100, crc32c::crc32c(&[2; 100]))
        .unwrap()
        .unwrap();
    assert!(
        s.begin_shared((3, 1), SHARED_FP, 100).unwrap().is_none(),
        "nor of one cached"
    );
    // A failed fill of another block punches out its own range only.
    let mut failed = s.begin_shared((3, 0), SHARED_FP, 100).unwrap().unwrap();
    failed.file.write_all(&[1; 100]).unwrap();
    drop(failed);
    let mut buf = [0u8; 100];
    File::open(&block.path)
        .unwrap()
        .read_exact_at(&mut buf, 100)
        .unwrap();
    assert_eq!(buf, [2; 100]);
}

#[test]
fn a_file_dropped_while_a_block_is_filled_is_not_filled_in_place() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    let first = put_shared(&s, (3, 0), SHARED_FP, &[1; 100]);
    let reader = File::open(&first.path).unwrap();
    let mut fill = s.begin_shared((3, 1), SHARED_FP, 100).unwrap().unwrap();
    assert_eq!(s.evict(&[(3, 0)]), (1, 100));
    assert_eq!(s.used(), 0, "nothing left on disk uncounted");
    assert!(!first.path.exists());
    fill.file.write_all(&[2; 100]).unwrap();
    assert!(
        fill.commit(100, crc32c::crc32c(&[2; 100]))
            .unwrap()
            .is_none(),
        "not entered into a dropped file"
    );
    assert!(s.is_empty());
    let mut buf = [0u8; 100];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1; 100], "an open reader keeps its bytes");
    let again = put_shared(&s, (3, 1), SHARED_FP, &[2; 100]);
    assert_ne!(again.path, first.path);
}

#[test]
fn fills_of_many_files_at_once_stay_within_the_capacity() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // High watermark 1800 bytes, low 1000: 25 files read at once, each with two blocks
    // being filled, would take 5000.
    let (s, _) = BlockStore::open(dir.path(), 2000, 0.9, 0.5).unwrap();
    let mut first = Vec::new();
    let mut second = Vec::new();
    for f in 0..25 {
        first.push(s.begin_shared((f, 0), SHARED_FP, 100).unwrap().unwrap());
        second.push(s.begin_shared((f, 1), SHARED_FP, 100).unwrap().unwrap());
    }
    for (f, mut fill) in first.into_iter().enumerate() {
        fill.file.write_all(&[f as u8; 100]).unwrap();
        assert!(fill
            .commit(100, crc32c::crc32c(&[f as u8; 100]))
            .unwrap()
            .is_some());
        assert!(s.used() <= 2000, "used {} after file {f}", s.used());
    }
    let mut refused = 0;
    for (f, mut fill) in second.into_iter().enumerate() {
        fill.file.write_all(&[f as u8; 100]).unwrap();
        if fill
            .commit(100, crc32c::crc32c(&[f as u8; 100]))
            .unwrap()
            .is_none()
        {
            refused += 1;
        }
        assert!(s.used() <= 2000, "used {}", s.used());
    }
    assert!(refused > 0, "busy files past the capacity were retired");
    // What is cached reads back right.
    for f in 0..25u64 {
        for i in 0..2 {
            if let Some(b) = s.lookup((f, i), SHARED_FP) {
                let mut buf = vec![0u8; b.len as usize];
                File::open(&b.path)
                    .unwrap()
                    .read_exact_at(&mut buf, b.offset)
                    .unwrap();
                assert_eq!(buf, vec![f as u8; 100]);
            }
        }
    }
}

#[test]
fn a_block_cached_and_dropped_between_heartbeats_is_reported_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = BlockStore::open(dir.path(), 1 << 20, 0.9, 0.8).unwrap();
    put(&s, (1, 0), b"a");
    put(&s, (2, 0), b"b");
    s.evict(&[(1, 0)]);
    assert_eq!(s.take_deltas(), (vec![(2, 0)], vec![(1, 0)]));
    s.evict(&[(2, 0)]);
    put(&s, (2, 0), b"b");
    assert_eq!(s.take_deltas(), (vec![(2, 0)], vec![]));
    assert_eq!(s.take_deltas(), (vec![], vec![]));
}
