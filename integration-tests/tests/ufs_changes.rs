//! Changes made in the UFS behind Granary's back: picked up by `metadata_sync_interval`,
//! by `granary fs load-metadata --force`, and, for a file whose blocks are not cached, by
//! the worker noticing the new version. An old version's cached blocks are never served
//! once the namespace knows the new one.

use std::process::Command;
use std::time::Duration;

use granary_integration_tests::{bin, run_to_exit, wait_until, Cluster, MasterSpec};

/// A cluster over the directory `ufs`, with the defaults.
fn cluster(ufs: &std::path::Path) -> Cluster {
    Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        ..Default::default()
    })
    .unwrap()
}

const SHORT_CACHES: &str =
    "entry_ttl_ms = 0\nattr_ttl_ms = 0\nmeta_cache_ttl_ms = 0\nkeep_cache = false";

#[test]
fn load_metadata_force_and_stale_versions_show_the_new_content() {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::write(ufs.path().join("cached"), b"version one").unwrap();
    std::fs::write(ufs.path().join("uncached"), b"first").unwrap();
    std::fs::write(ufs.path().join("grows"), b"AAAA\n").unwrap();
    // The last one shrinks to a multiple of the kernel's READ size (a full answer ends there).
    let shrinks = [102_407, 700_001, (3 << 20) + 5, (2 << 20) + 1000];
    for size in shrinks {
        std::fs::write(ufs.path().join(format!("shrinks-{size}")), vec![b'A'; size]).unwrap();
    }
    let c = cluster(ufs.path());
    let m = c.mount("mnt", SHORT_CACHES).unwrap();
    // With the kernel's caches on (their defaults), its cached size bounds a read: the
    // read that finds the file grown has the kernel drop it, so the same read(2) loop
    // goes on to the new end.
    let cached = c.mount("cached-attrs", "").unwrap();
    assert_eq!(
        std::fs::metadata(cached.path.join("grows")).unwrap().len(),
        5
    );
    std::fs::write(ufs.path().join("grows"), b"BBBBBBBBBBBB\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(cached.path.join("grows")).unwrap(),
        "BBBBBBBBBBBB\n"
    );
    // Shrunk: the read that finds it ends at the new end, as the kernel learns from its
    // short answer, never padded with zeros to the old size.
    for size in shrinks {
        let name = format!("shrinks-{size}");
        assert_eq!(
            std::fs::metadata(cached.path.join(&name)).unwrap().len(),
            size as u64
        );
        std::fs::write(ufs.path().join(&name), vec![b'B'; size - 1000]).unwrap();
        let got = std::fs::read(cached.path.join(&name)).unwrap();
        assert!(
            got == vec![b'B'; size - 1000],
            "{name}: {} bytes, {} of them zeros",
            got.len(),
            got.iter().filter(|&&b| b == 0).count()
        );
        assert_eq!(
            std::fs::metadata(cached.path.join(&name)).unwrap().len(),
            (size - 1000) as u64,
            "{name}: its size as stat(2) shows it"
        );
    }
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"version one"
    );
    assert_eq!(std::fs::metadata(m.path.join("uncached")).unwrap().len(), 5);

    // Never read before: the worker sees the UFS object changed, the client refreshes
    // the directory and reads the new version.
    std::fs::write(ufs.path().join("uncached"), b"second, longer").unwrap();
    assert_eq!(
        std::fs::read(m.path.join("uncached")).unwrap(),
        b"second, longer"
    );

    // Cached: the namespace still has the old version until told to look again.
    std::fs::write(ufs.path().join("cached"), b"version two!").unwrap();
    std::fs::write(ufs.path().join("added"), b"new file").unwrap();
    assert!(!m.path.join("added").exists());
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["fs", "load-metadata", "--force", "/", "--master"])
        .arg(c.master_addr());
    let (code, out) = run_to_exit(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"version two!"
    );
    assert_eq!(std::fs::read(m.path.join("added")).unwrap(), b"new file");
}

#[test]
fn metadata_sync_interval_relists_old_directories() {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::create_dir(ufs.path().join("d")).unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        metadata_sync_interval: "1s",
        ..Default::default()
    })
    .unwrap();
    let m = c.mount("mnt", SHORT_CACHES).unwrap();
    assert_eq!(std::fs::read_dir(m.path.join("d")).unwrap().count(), 0);
    std::fs::write(ufs.path().join("d/late"), b"arrived later").unwrap();
    wait_until("the new UFS file to show", Duration::from_secs(10), || {
        std::fs::read(m.path.join("d/late")).is_ok_and(|d| d == b"arrived later")
    })
    .unwrap();
    std::fs::remove_file(ufs.path().join("d/late")).unwrap();
    wait_until(
        "the removed UFS file to go",
        Duration::from_secs(10),
        || !m.path.join("d/late").exists(),
    )
    .unwrap();
}

#[test]
fn a_name_made_in_the_ufs_behind_granary_exists_once_granary_tries_to_make_it() {
    let ufs = tempfile::tempdir().unwrap();
    let c = cluster(ufs.path());
    let m = c.mount("mnt", SHORT_CACHES).unwrap();
    std::fs::create_dir(m.path.join("top")).unwrap();
    assert_eq!(std::fs::read_dir(m.path.join("top")).unwrap().count(), 0);
    // Made in the UFS only (by hand, or by a try whose Raft proposal failed over).
    std::fs::create_dir(ufs.path().join("top/outside")).unwrap();
    std::os::unix::fs::symlink("target", ufs.path().join("top/link")).unwrap();

    let e = std::fs::create_dir(m.path.join("top/outside")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert!(std::fs::metadata(m.path.join("top/outside"))
        .unwrap()
        .is_dir());
    let e = std::os::unix::fs::symlink("other", m.path.join("top/link")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(
        std::fs::read_link(m.path.join("top/link")).unwrap(),
        std::path::Path::new("target")
    );
}

#[test]
fn a_file_replaced_in_the_ufs_is_never_read_half_old_half_new() {
    let ufs = tempfile::tempdir().unwrap();
    let (old, new) = (vec![b'a'; 12 << 20], vec![b'b'; 12 << 20]);
    for i in 0..2 {
        std::fs::write(ufs.path().join(format!("shard{i}.bin")), &old).unwrap();
    }
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        block_size: "4MiB",
        ..Default::default()
    })
    .unwrap();
    // Mounts with handles (zero-message opens have none to tell one reader from the
    // next: README).
    let configs = [SHORT_CACHES, "read_only = true"];
    for (i, config) in configs.iter().enumerate() {
        let name = format!("shard{i}.bin");
        let m = c.mount(&format!("mnt{i}"), config).unwrap();
        // Its first block cached by the worker, the rest not.
        let mut head = [0u8; 1000];
        std::io::Read::read_exact(
            &mut std::fs::File::open(m.path.join(&name)).unwrap(),
            &mut head,
        )
        .unwrap();
        assert_eq!(head, [b'a'; 1000]);
        // Replaced behind Granary, same size (written, then renamed over), the old
        // version's pages gone from the kernel.
        std::fs::write(ufs.path().join("shard.tmp"), &new).unwrap();
        std::fs::rename(ufs.path().join("shard.tmp"), ufs.path().join(&name)).unwrap();
        drop_page_cache(&m.path.join(&name));

        // The read that finds the change past the old version's cached block fails; it
        // never goes on with the new version's bytes.
        match std::fs::read(m.path.join(&name)) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{config}: {e}"),
            Ok(read) => panic!(
                "{config}: read {} bytes of the old version, {} of the new",
                read.iter().filter(|&&b| b == b'a').count(),
                read.iter().filter(|&&b| b == b'b').count()
            ),
        }
        assert!(
            std::fs::read(m.path.join(&name)).unwrap() == new,
            "{config}"
        );
    }
}

/// Drops the kernel's cached pages of `path` (posix_fadvise DONTNEED).
fn drop_page_cache(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: an open descriptor; the call only drops clean cached pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn modes_and_owners_listed_from_the_ufs_are_kept() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let ufs = tempfile::tempdir().unwrap();
    for (name, mode) in [("closed", 0), ("private", 0o600)] {
        let p = ufs.path().join(name);
        std::fs::write(&p, b"secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::chown(ufs.path().join("private"), Some(1234), Some(5678)).unwrap();
    let c = cluster(ufs.path());
    let m = c.mount("mnt", "").unwrap();
    for (name, mode) in [("closed", 0), ("private", 0o600)] {
        let seen = std::fs::metadata(m.path.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(seen & 0o7777, mode, "{name}");
    }
    let private = std::fs::metadata(m.path.join("private")).unwrap();
    assert_eq!((private.uid(), private.gid()), (1234, 5678));
}
