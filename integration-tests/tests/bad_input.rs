//! Bad input gets a clear error and a precise errno, never a hang.

use std::io::ErrorKind;
use std::process::Command;
use std::time::{Duration, Instant};

use granary_integration_tests::{bin, run_to_exit, Cluster, MasterSpec};

fn master_with(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new(bin("granary-master"));
    cmd.arg("--config").arg(&cfg);
    run_to_exit(cmd, Duration::from_secs(20)).unwrap()
}

#[test]
fn missing_ufs_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = master_with(&format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nufs = \"/nonexistent/granary-ufs\"\n",
        dir.path().display()
    ));
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/granary-ufs"), "{err}");

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["local", "--ufs", "/nonexistent/granary-ufs", "--mount"])
        .arg(&mnt);
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/granary-ufs"), "{err}");
}

#[test]
fn granary_local_names_the_cluster_flags_it_does_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["local", "--cluster-token", "s3cret", "--ufs"])
        .arg(dir.path())
        .arg("--mount")
        .arg(&mnt);
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--cluster-token"), "{err}");
    assert!(!granary_integration_tests::is_mounted(&mnt));
}

#[test]
fn a_taken_master_port_names_the_flag_that_moves_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (ufs, mnt) = (dir.path().join("ufs"), dir.path().join("mnt"));
    std::fs::create_dir(&ufs).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["local", "--master-listen", &addr, "--ufs"])
        .arg(&ufs)
        .arg("--mount")
        .arg(&mnt)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains(&addr) && err.contains("--master-listen"),
        "{err}"
    );
    assert!(!granary_integration_tests::is_mounted(&mnt));
}

#[test]
fn config_errors_name_the_key() {
    let (code, err) = master_with("ufs = \"/tmp\"\nblock_sise = \"1MiB\"\n");
    assert_ne!(code, 0);
    assert!(err.contains("block_sise"), "{err}");
    let (code, err) = master_with("ufs = \"/tmp\"\nblock_size = \"huge\"\n");
    assert_ne!(code, 0);
    assert!(err.contains("block_size"), "{err}");
    let (code, err) = master_with("listen = \"127.0.0.1:0\"\n");
    assert_ne!(code, 0);
    assert!(err.contains("`ufs`"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("w.toml");
    std::fs::write(&cfg, "capacity = \"lots\"\n").unwrap();
    let mut cmd = Command::new(bin("granary-worker"));
    cmd.arg("--config").arg(&cfg);
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("capacity"), "{err}");
}

#[test]
fn a_shard_whose_masters_do_not_serve_it_is_not_added() {
    let ufs = tempfile::tempdir().unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        worker: false,
        ..Default::default()
    })
    .unwrap();
    let add = |masters: &str| {
        let mut cmd = Command::new(bin("granary"));
        cmd.arg("--master")
            .arg(c.master_addr())
            .args(["admin", "shards", "add", "2", masters]);
        run_to_exit(cmd, Duration::from_secs(30)).unwrap()
    };
    let nobody = format!("127.0.0.1:{}", granary_integration_tests::free_port());
    let (code, err) = add(&nobody);
    assert_ne!(code, 0);
    assert!(err.contains("none of shard 2's masters answers"), "{err}");
    let (code, err) = add(&c.master_addr());
    assert_ne!(code, 0);
    assert!(
        err.contains("is a master of shard 0, not of shard 2"),
        "{err}"
    );
    let mut cmd = Command::new(bin("granary"));
    cmd.arg("--master")
        .arg(c.master_addr())
        .args(["admin", "shards", "list"]);
    let out = cmd.output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(table.contains("routing table version"), "{table}");
    assert!(!table.contains(&nobody), "{table}");
}

#[test]
fn a_master_started_on_another_members_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ufs = dir.path().join("ufs");
    std::fs::create_dir_all(&ufs).unwrap();
    let data = dir.path().join("data");
    let (one, two) = (
        granary_integration_tests::free_port(),
        granary_integration_tests::free_port(),
    );
    let config = |id: u64| {
        let cfg = dir.path().join(format!("m{id}.toml"));
        let port = if id == 1 { one } else { two };
        let text = format!(
            "id = {id}\nlisten = \"127.0.0.1:{port}\"\n\
             members = [\"1@127.0.0.1:{one}\", \"2@127.0.0.1:{two}\"]\n\
             data_dir = \"{}\"\nufs = \"{}\"\n",
            data.display(),
            ufs.display()
        );
        std::fs::write(&cfg, text).unwrap();
        let mut cmd = Command::new(bin("granary-master"));
        cmd.arg("--config").arg(&cfg);
        cmd
    };
    let mut first =
        granary_integration_tests::Proc::spawn("master-1", config(1), dir.path().join("1.log"))
            .unwrap();
    granary_integration_tests::wait_until(
        "master 1's id recorded",
        Duration::from_secs(20),
        || data.join("member_id").exists(),
    )
    .unwrap();
    first.kill();
    let (code, err) = run_to_exit(config(2), Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("is master 1's, but config `id` is 2"), "{err}");
}

#[test]
fn a_second_worker_on_a_cache_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = |port: u16| {
        let cfg = dir.path().join(format!("w{port}.toml"));
        let text = format!(
            "masters = [\"127.0.0.1:{}\"]\ndata_listen = \"127.0.0.1:{port}\"\ncache_dir = \"{}\"\n",
            granary_integration_tests::free_port(),
            cache.display()
        );
        std::fs::write(&cfg, text).unwrap();
        let mut cmd = Command::new(bin("granary-worker"));
        cmd.arg("--config").arg(&cfg);
        cmd
    };
    let first = granary_integration_tests::Proc::spawn(
        "worker",
        config(granary_integration_tests::free_port()),
        dir.path().join("first.log"),
    )
    .unwrap();
    granary_integration_tests::wait_until("the first worker's id", Duration::from_secs(20), || {
        cache.join("worker_id").exists()
    })
    .unwrap();
    let (code, err) = run_to_exit(
        config(granary_integration_tests::free_port()),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("in use by another running worker"), "{err}");
    drop(first);
}

#[test]
fn bad_mount_points_are_refused() {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::write(ufs.path().join("f"), b"x").unwrap();
    let cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        block_size: "64KiB",
        ..Default::default()
    })
    .unwrap();
    let try_mount = |path: &std::path::Path| {
        let mut cmd = Command::new(bin("granary-fuse"));
        cmd.arg("--master").arg(cluster.master_addr()).arg(path);
        run_to_exit(cmd, Duration::from_secs(20)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("occupied"), b"").unwrap();
    let (code, err) = try_mount(dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    let (code, err) = try_mount(&dir.path().join("occupied"));
    assert_ne!(code, 0);
    assert!(err.contains("not a directory"), "{err}");
    let (code, err) = try_mount(&dir.path().join("missing"));
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    // The mount of a process that died ("Transport endpoint is not connected").
    let dead = cluster.mount("dead", "").unwrap();
    dead.proc.signal(libc::SIGKILL);
    granary_integration_tests::wait_until("the mount to be dead", Duration::from_secs(10), || {
        std::fs::metadata(&dead.path).is_err()
    })
    .unwrap();
    let (code, err) = try_mount(&dead.path);
    assert_ne!(code, 0);
    assert!(err.contains("umount -l"), "{err}");
}

#[test]
fn bad_paths_get_precise_errnos() {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::write(ufs.path().join("file"), b"data").unwrap();
    std::fs::create_dir(ufs.path().join("dir")).unwrap();
    let cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        block_size: "64KiB",
        ..Default::default()
    })
    .unwrap();
    let m = cluster.mount("mnt", "").unwrap();
    let errno = |r: std::io::Result<std::fs::Metadata>| r.unwrap_err().raw_os_error();
    assert_eq!(
        errno(std::fs::metadata(m.path.join("missing"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno(std::fs::metadata(m.path.join("dir/missing"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno(std::fs::metadata(m.path.join("x".repeat(256)))),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        errno(std::fs::metadata(m.path.join("file/x"))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        std::fs::read(m.path.join("dir"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EISDIR)
    );
    // A read-only mount refuses every change with EROFS and keeps serving reads.
    let ro = cluster.mount("ro", "read_only = true").unwrap();
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(ro.path.join("file"));
    assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EROFS));
    let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(
        erofs(std::fs::write(ro.path.join("new"), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        erofs(std::fs::create_dir(ro.path.join("d2"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        erofs(std::fs::remove_file(ro.path.join("file"))),
        Some(libc::EROFS)
    );
    assert_eq!(std::fs::read(ro.path.join("file")).unwrap(), b"data");
}

#[test]
fn unreachable_master_fails_with_eio_after_bounded_retries() {
    let ufs = tempfile::tempdir().unwrap();
    std::fs::write(ufs.path().join("cached"), b"cached bytes").unwrap();
    std::fs::create_dir(ufs.path().join("never-listed")).unwrap();
    std::fs::write(ufs.path().join("never-listed/f"), b"x").unwrap();
    let mut cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        block_size: "64KiB",
        ..Default::default()
    })
    .unwrap();
    let m = cluster
        .mount("mnt", "retry_deadline_ms = 2000\nrpc_timeout_ms = 500")
        .unwrap();
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"cached bytes"
    );

    cluster.kill_master(1);
    let start = Instant::now();
    let err = std::fs::metadata(m.path.join("never-listed/f")).unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err:?}");
    assert!(took < Duration::from_secs(15), "EIO took {took:?}");
    assert_ne!(err.kind(), ErrorKind::NotFound);
    let log = m.proc.log_text();
    assert!(
        log.contains("shard 0") && log.contains("unreachable"),
        "mount log: {log}"
    );
    // What was already read stays readable from the kernel cache.
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"cached bytes"
    );
}
