//! The write path end to end: a seeded fsx-style random test against a local file,
//! close-to-open visibility in the UFS and on a second mount, new files in the UFS from
//! their creation, and many threads writing small files at once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use granary_integration_tests::{listing, Cluster, MasterSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cluster(ufs: &Path) -> Cluster {
    Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        block_size: "64KiB",
        ..Default::default()
    })
    .unwrap()
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

/// Reads `len` bytes at `offset` through a read-only shared mapping.
fn mmap_read(f: &File, offset: u64, len: usize) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let page = 4096u64;
    let start = offset / page * page;
    let span = (offset - start) as usize + len;
    // SAFETY: a fresh read-only mapping of an open file, unmapped below; the range lies
    // within the file (checked by the caller).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            start as i64,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let out = std::slice::from_raw_parts((p as *const u8).add((offset - start) as usize), len)
            .to_vec();
        libc::munmap(p, span);
        out
    }
}

const MAX_SIZE: u64 = 600_000;

#[test]
fn fsx_random_operations_match_a_local_file() {
    let seed: u64 = std::env::var("GRANARY_FSX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6772616e);
    let ops: usize = std::env::var("GRANARY_FSX_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    eprintln!("fsx seed {seed} ({ops} operations; GRANARY_FSX_SEED/GRANARY_FSX_OPS to change)");
    let mut rng = StdRng::seed_from_u64(seed);
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let mnt = c.mount("mnt", "").unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let (gp, lp) = (mnt.path.join("fsx"), local_dir.path().join("fsx"));
    let (mut g, mut l) = (open_rw(&gp), open_rw(&lp));
    let mut size = 0u64;
    let mut history: Vec<String> = Vec::new();
    for step in 0..ops {
        let op = rng.random_range(0..100);
        let what = if op < 40 {
            let off = rng.random_range(0..MAX_SIZE);
            let len = rng.random_range(1..=(MAX_SIZE - off).min(70_000));
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            g.write_all_at(&data, off).unwrap();
            l.write_all_at(&data, off).unwrap();
            size = size.max(off + len);
            format!("write {off}+{len}")
        } else if op < 65 {
            let off = rng.random_range(0..=size);
            let len = rng.random_range(0..=(size - off).min(100_000)) as usize;
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            g.read_exact_at(&mut a, off).unwrap();
            l.read_exact_at(&mut b, off).unwrap();
            assert!(
                a == b,
                "step {step} read {off}+{len} differs; seed {seed}; last ops {:?}",
                &history[history.len().saturating_sub(10)..]
            );
            format!("read {off}+{len}")
        } else if op < 75 {
            if size == 0 {
                continue;
            }
            let off = rng.random_range(0..size);
            let len = rng.random_range(1..=(size - off).min(50_000)) as usize;
            assert_eq!(
                mmap_read(&g, off, len),
                mmap_read(&l, off, len),
                "step {step} mmap read {off}+{len}; seed {seed}"
            );
            format!("mmap {off}+{len}")
        } else if op < 85 {
            let to = rng.random_range(0..MAX_SIZE);
            g.set_len(to).unwrap();
            l.set_len(to).unwrap();
            size = to;
            format!("truncate {to}")
        } else if op < 92 {
            g.sync_all().unwrap();
            "fsync".to_string()
        } else {
            // Close (commit) and reopen: what comes back is what was committed.
            drop(g);
            g = open_rw(&gp);
            drop(l);
            l = open_rw(&lp);
            "reopen".to_string()
        };
        assert_eq!(
            g.metadata().unwrap().len(),
            size,
            "step {step} after {what}: size; seed {seed}; last ops {:?}",
            &history[history.len().saturating_sub(10)..]
        );
        history.push(what);
    }
    drop(g);
    drop(l);
    let (a, b) = (std::fs::read(&gp).unwrap(), std::fs::read(&lp).unwrap());
    assert!(a == b, "final content differs; seed {seed}");
    assert!(
        std::fs::read(ufs.path().join("fsx")).unwrap() == b,
        "the UFS holds what the last close committed"
    );
}

#[test]
fn closed_files_are_in_the_ufs_and_visible_to_another_mount() {
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let writer = c.mount("writer", "").unwrap();
    // A second node's mount: short kernel and metadata caches, so close-to-open shows
    // within the TTL.
    let reader = c
        .mount(
            "reader",
            "entry_ttl_ms = 100\nattr_ttl_ms = 100\nmeta_cache_ttl_ms = 100\nshort_circuit = false",
        )
        .unwrap();
    std::fs::create_dir_all(writer.path.join("ckpt/step-1")).unwrap();
    let shard: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(writer.path.join("ckpt/step-1/model.bin"), &shard).unwrap();
    std::fs::write(writer.path.join("ckpt/log.txt"), b"epoch 1\n").unwrap();

    assert_eq!(
        std::fs::read(ufs.path().join("ckpt/step-1/model.bin")).unwrap(),
        shard
    );
    let fetches = c.worker_ufs_fetches().unwrap();
    assert_eq!(
        std::fs::read(reader.path.join("ckpt/step-1/model.bin")).unwrap(),
        shard
    );
    assert_eq!(
        c.worker_ufs_fetches().unwrap(),
        fetches,
        "the upload cached the blocks: reading them back needs no UFS read"
    );

    // Append on the writer; after its close the reader sees the new content.
    {
        use std::io::Write;
        let mut f = OpenOptions::new()
            .append(true)
            .open(writer.path.join("ckpt/log.txt"))
            .unwrap();
        f.write_all(b"epoch 2\n").unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        std::fs::read(reader.path.join("ckpt/log.txt")).unwrap(),
        b"epoch 1\nepoch 2\n"
    );
    assert_eq!(
        std::fs::read(ufs.path().join("ckpt/log.txt")).unwrap(),
        b"epoch 1\nepoch 2\n"
    );

    // Renames and removals reach the UFS too; no upload leftovers remain.
    std::fs::rename(
        writer.path.join("ckpt/step-1"),
        writer.path.join("ckpt/final"),
    )
    .unwrap();
    std::fs::remove_file(writer.path.join("ckpt/log.txt")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(ufs.path().join("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["final"]);
    assert_eq!(
        std::fs::read(ufs.path().join("ckpt/final/model.bin")).unwrap(),
        shard
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        std::fs::read(reader.path.join("ckpt/final/model.bin")).unwrap(),
        shard
    );
    assert!(!reader.path.join("ckpt/log.txt").exists());

    // A fresh mount sees the same tree (the namespace kept it).
    drop(writer);
    let again = c.mount("again", "").unwrap();
    assert_eq!(
        std::fs::read(again.path.join("ckpt/final/model.bin")).unwrap(),
        shard
    );
}

#[test]
fn a_new_file_is_in_the_ufs_from_its_creation_and_its_bytes_from_its_close() {
    use std::io::Write;
    let ufs = tempfile::tempdir().unwrap();
    std::fs::create_dir(ufs.path().join("out")).unwrap();
    let c = cluster(ufs.path());
    let m = c.mount("writer", "").unwrap();
    assert_eq!(listing(&m.path.join("out")), Vec::<String>::new());

    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path.join("out/a"))
        .unwrap();
    assert_eq!(
        std::fs::read(ufs.path().join("out/a")).unwrap(),
        b"",
        "there, empty, at once"
    );
    f.write_all(b"written").unwrap();
    assert_eq!(
        std::fs::read(ufs.path().join("out/a")).unwrap(),
        b"",
        "not before the close"
    );
    drop(f);
    assert_eq!(std::fs::read(ufs.path().join("out/a")).unwrap(), b"written");

    // Created and closed unwritten: the empty file stays, nothing else appears.
    File::create(m.path.join("out/empty")).unwrap();
    assert_eq!(std::fs::read(ufs.path().join("out/empty")).unwrap(), b"");

    // An object put there behind Granary's back (the directory was listed before): a
    // creation of its name is never refused for it, and its first close replaces it.
    std::fs::write(ufs.path().join("out/outside"), b"made outside").unwrap();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path.join("out/outside"))
        .unwrap();
    f.write_all(b"ours").unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(ufs.path().join("out/outside")).unwrap(),
        b"ours"
    );
    assert_eq!(std::fs::read(m.path.join("out/outside")).unwrap(), b"ours");
    assert_eq!(listing(&ufs.path().join("out")), ["a", "empty", "outside"]);
}

#[test]
fn many_threads_creating_small_files_each_get_their_own_bytes() {
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let m = c.mount("writer", "").unwrap();
    let (threads, files) = (16usize, 25usize);
    let content = |t: usize, i: usize| format!("thread {t} file {i}\n").repeat(t + i + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (root, content) = (&m.path, &content);
            s.spawn(move || {
                let dir = root.join(format!("t{}", t % 4));
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..files {
                    std::fs::write(dir.join(format!("f{t}-{i}")), content(t, i)).unwrap();
                    let f = std::fs::metadata(dir.join(format!("f{t}-{i}"))).unwrap();
                    assert_eq!(f.len(), content(t, i).len() as u64);
                }
            });
        }
    });
    let other = c.mount("reader", "").unwrap();
    for t in 0..threads {
        for i in 0..files {
            let rel = format!("t{}/f{t}-{i}", t % 4);
            let want = content(t, i).into_bytes();
            assert_eq!(
                std::fs::read(ufs.path().join(&rel)).unwrap(),
                want,
                "{rel} in the UFS"
            );
            assert_eq!(
                std::fs::read(other.path.join(&rel)).unwrap(),
                want,
                "{rel} on another mount"
            );
        }
    }
    for d in 0..4 {
        for root in [&other.path, &ufs.path().to_path_buf()] {
            let n = std::fs::read_dir(root.join(format!("t{d}")))
                .unwrap()
                .count();
            assert_eq!(
                n,
                threads / 4 * files,
                "{}/t{d} holds every file once and nothing else",
                root.display()
            );
        }
    }
}

#[test]
fn a_file_open_across_a_rename_of_its_directory_is_stored_under_the_new_name() {
    use std::io::Write;
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let writer = c.mount("writer", "").unwrap();
    let other = c.mount("other", "").unwrap();
    std::fs::create_dir(writer.path.join("run")).unwrap();
    std::fs::write(writer.path.join("run/log"), b"step 1\n").unwrap();
    std::fs::write(writer.path.join("run/metrics"), b"loss 9\n").unwrap();
    // Both cached at the writer: the appends below start from its copies.
    assert_eq!(
        std::fs::read(writer.path.join("run/metrics")).unwrap(),
        b"loss 9\n"
    );
    let mut log = OpenOptions::new()
        .append(true)
        .open(writer.path.join("run/log"))
        .unwrap();
    log.write_all(b"step 2\n").unwrap();

    // Another node rotates the directory (the writer's caches still name `run`), and a
    // new run starts under the old name.
    std::fs::rename(other.path.join("run"), other.path.join("run.1")).unwrap();
    std::fs::create_dir(other.path.join("run")).unwrap();
    std::fs::write(other.path.join("run/log"), b"new run\n").unwrap();

    log.write_all(b"step 3\n").unwrap();
    drop(log);
    assert_eq!(
        std::fs::read(ufs.path().join("run.1/log")).unwrap(),
        b"step 1\nstep 2\nstep 3\n"
    );
    assert_eq!(
        std::fs::read(ufs.path().join("run/log")).unwrap(),
        b"new run\n",
        "the new run's file is not overwritten"
    );

    // A file first opened for writing after the rename, by its old cached name.
    let mut metrics = OpenOptions::new()
        .append(true)
        .open(writer.path.join("run.1/metrics"))
        .unwrap();
    metrics.write_all(b"loss 3\n").unwrap();
    drop(metrics);
    assert_eq!(
        std::fs::read(ufs.path().join("run.1/metrics")).unwrap(),
        b"loss 9\nloss 3\n"
    );
    assert_eq!(
        std::fs::read(writer.path.join("run.1/metrics")).unwrap(),
        b"loss 9\nloss 3\n"
    );
}

#[test]
fn a_name_renamed_over_again_and_again_always_opens() {
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let m = c.mount("m", "").unwrap();
    let (latest, tmp) = (m.path.join("latest"), m.path.join("latest.tmp"));
    std::fs::write(&latest, b"v0").unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let failures = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=200 {
                std::fs::write(&tmp, format!("v{i}")).unwrap();
                std::fs::rename(&tmp, &latest).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let reader = s.spawn(|| {
            let mut failures = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match std::fs::read(&latest) {
                    Ok(v) if v.starts_with(b"v") => {}
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        });
        reader.join().unwrap()
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..1]
    );
    assert_eq!(std::fs::read(&latest).unwrap(), b"v200");
}
