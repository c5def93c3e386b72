//! An S3 bucket as the UFS, against a real S3-compatible server (moto) started by each
//! test. Objects are put and checked with a plain S3 client (boto3), never through
//! Granary's own S3 code.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use granary_integration_tests::s3::S3Server;
use granary_integration_tests::{
    bin, close, free_port, is_mounted, run_to_exit, wait_until, Cluster, MasterSpec, Proc,
};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 64 << 10;
const SHORT_CACHES: &str =
    "entry_ttl_ms = 0\nattr_ttl_ms = 0\nmeta_cache_ttl_ms = 0\nkeep_cache = false";

/// Every file under `root` (relative path → bytes).
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Empty files, files of exactly one block and one byte either side, a multi-block file,
/// more entries in one prefix than one S3 listing page (1000), deep prefixes, names with
/// spaces and UTF-8.
fn edge_case_tree(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut put = |rel: &str, len: usize| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        std::fs::write(p, data).unwrap();
    };
    put("empty", 0);
    put("blocks/exact", BLOCK);
    put("blocks/one-less", BLOCK - 1);
    put("blocks/one-more", BLOCK + 1);
    put("blocks/three-and-a-bit", 3 * BLOCK + 17);
    put("big.bin", 2 << 20);
    for i in 0..1100 {
        put(&format!("many/f{i:05}"), i % 300);
    }
    put("a/b/c/d/e/deep.txt", 100);
    put("with space/file name.txt", 1234);
    put("ünïcødé/数据 文件.bin", 4321);
    put("emoji-🙂.txt", 5);
}

fn s3_cluster(s3: &S3Server, uri: &str) -> Cluster {
    Cluster::start(&MasterSpec {
        ufs: PathBuf::from(uri),
        tables: s3.config(),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn an_edge_case_tree_reads_byte_identical_and_lists_exactly() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    edge_case_tree(src.path());
    s3.put_tree(src.path(), "data", "sets/edge").unwrap();
    // A neighbour sharing the prefix's first characters stays outside the UFS root.
    s3.put_tree(&src.path().join("a"), "data", "sets/edge-other")
        .unwrap();

    let c = s3_cluster(&s3, "s3://data/sets/edge");
    let m = c.mount("mnt", "").unwrap();
    let want = files(src.path());
    let got = files(&m.path);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (rel, bytes) in &want {
        assert!(got[rel] == *bytes, "{} differs", rel.display());
    }
    assert_eq!(
        std::fs::read_dir(m.path.join("many")).unwrap().count(),
        1100
    );
    let big = std::fs::metadata(m.path.join("big.bin")).unwrap();
    assert_eq!(big.len(), 2 << 20);
    assert!(m.path.join("a/b/c/d/e").is_dir());
    // Read again: from the worker's cache this time, still identical.
    let fetches = c.worker_ufs_fetches().unwrap();
    assert!(files(&m.path) == want);
    assert_eq!(c.worker_ufs_fetches().unwrap(), fetches);
}

/// Blocks read as several ranged GETs at once (parts of 64 KiB, 3 in flight, blocks of
/// 1 MiB), each checking the object's version on its own answer: bytes identical across
/// part and block edges, and an object replaced in the bucket (same size, only the ETag
/// differs) read in its new version once a part's answer shows it.
#[test]
fn blocks_read_in_parallel_parts_are_identical_and_every_part_checks_the_version() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut put = |name: &str, len: usize| {
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        std::fs::write(src.path().join(name), data).unwrap();
    };
    put("one-part", 64 << 10);
    put("parts-and-a-bit", (5 << 16) + 3);
    put("blocks", (5 << 20) / 2 + 17);
    put("shrinks", 3 << 20);
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: PathBuf::from("s3://data/ds"),
        block_size: "1MiB",
        tables: format!(
            "{}read_part_size = \"64KiB\"\nread_parts_in_flight = 3\n",
            s3.config()
        ),
        ..Default::default()
    })
    .unwrap();
    let m = c.mount("mnt", SHORT_CACHES).unwrap();
    // The first block of `blocks` only, so the rest is fetched after the replacement.
    let mut head = vec![0u8; 1000];
    std::fs::File::open(m.path.join("blocks"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head == std::fs::read(src.path().join("blocks")).unwrap()[..1000]);
    for name in ["one-part", "parts-and-a-bit"] {
        let got = std::fs::read(m.path.join(name)).unwrap();
        assert!(
            got == std::fs::read(src.path().join(name)).unwrap(),
            "{name}"
        );
    }

    put("blocks", (5 << 20) / 2 + 17);
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let want = std::fs::read(src.path().join("blocks")).unwrap();
    // From an uncached block on (block 0 is cached in the old version): the parts'
    // answers show the new version, and the read goes on in it.
    let mut f = std::fs::File::open(m.path.join("blocks")).unwrap();
    f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert!(
        tail == want[1 << 20..],
        "the new version past the cached block"
    );
    let got = std::fs::read(m.path.join("blocks")).unwrap();
    assert!(got == want, "the new version, whole");

    // Shrunk below the block asked for, which was never cached: S3 refuses the range
    // (416), the read finds the new version, and past its end is the end of the file.
    let mut f = std::fs::File::open(m.path.join("shrinks")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3 << 20);
    put("shrinks", 100);
    s3.put_tree(src.path(), "data", "ds").unwrap();
    f.seek(std::io::SeekFrom::Start(2 << 20)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty(), "{} bytes past the new end", tail.len());
}

#[test]
fn writes_through_the_mount_become_objects() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let seed = tempfile::tempdir().unwrap();
    std::fs::write(seed.path().join("old.txt"), b"from the bucket").unwrap();
    s3.put_tree(seed.path(), "data", "ds").unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: PathBuf::from("s3://data/ds"),
        tables: format!(
            "{}part_size = \"5MiB\"\nupload_parts_in_flight = 2\n",
            s3.config()
        ),
        ..Default::default()
    })
    .unwrap();
    let m = c.mount("mnt", "").unwrap();
    let p = |rel: &str| m.path.join(rel);

    // Three parts of a multipart upload (5 MiB, the least S3 takes), two at a time.
    let big: Vec<u8> = (0..(11 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let mut f = std::fs::File::create(p("big.bin")).unwrap();
    f.write_all(&big).unwrap();
    f.sync_all().unwrap();
    // fsync stored it: the object is there before close.
    assert!(s3
        .keys("data", "ds/")
        .unwrap()
        .contains(&"ds/big.bin".into()));
    close(f).unwrap();

    std::fs::write(p("new.txt"), b"first version, long").unwrap();
    std::fs::write(p("new.txt"), b"second").unwrap();
    std::fs::write(p("old.txt"), b"overwritten").unwrap();
    std::fs::create_dir(p("dir")).unwrap();
    std::fs::create_dir(p("empty-dir")).unwrap();
    std::fs::create_dir(p("gone")).unwrap();
    std::fs::remove_dir(p("gone")).unwrap();
    std::fs::rename(p("new.txt"), p("dir/renamed.txt")).unwrap();
    std::fs::create_dir(p("tree")).unwrap();
    std::fs::write(p("tree/one"), b"1").unwrap();
    std::fs::create_dir(p("tree/sub")).unwrap();
    std::fs::write(p("tree/sub/two"), b"22").unwrap();
    std::fs::rename(p("tree"), p("moved")).unwrap();
    std::fs::write(p("doomed"), b"x").unwrap();
    std::fs::remove_file(p("doomed")).unwrap();
    assert_eq!(
        std::fs::remove_dir(p("dir")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );

    let stored = s3.get_tree("data", "ds").unwrap();
    let stored = files(stored.path());
    let text = |rel: &str| stored.get(Path::new(rel)).map(|b| b.as_slice());
    assert_eq!(text("old.txt"), Some(&b"overwritten"[..]));
    assert_eq!(text("dir/renamed.txt"), Some(&b"second"[..]));
    assert_eq!(text("moved/one"), Some(&b"1"[..]));
    assert_eq!(text("moved/sub/two"), Some(&b"22"[..]));
    assert!(text("big.bin") == Some(&big[..]));
    for gone in ["new.txt", "tree/one", "tree/sub/two", "doomed"] {
        assert_eq!(text(gone), None, "{gone} is still in the bucket");
    }
    // Directories are prefixes; an empty one keeps a marker object, which is never listed.
    let keys = s3.keys("data", "ds/").unwrap();
    assert!(
        keys.contains(&"ds/empty-dir/.granary-dir".into()),
        "{keys:?}"
    );
    assert!(!keys.iter().any(|k| k.starts_with("ds/gone")), "{keys:?}");
    assert_eq!(std::fs::read_dir(p("empty-dir")).unwrap().count(), 0);

    // A fresh cluster over the same bucket sees what the first one wrote.
    drop(m);
    drop(c);
    let c = s3_cluster(&s3, "s3://data/ds");
    let m = c.mount("mnt", "").unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["big.bin", "dir", "empty-dir", "moved", "old.txt"].map(String::from)
    );
    assert!(std::fs::read(m.path.join("big.bin")).unwrap() == big);
    assert_eq!(std::fs::read(m.path.join("moved/sub/two")).unwrap(), b"22");
}

#[test]
fn changed_objects_are_read_in_their_new_version() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    // Same sizes before and after: only the ETag tells the versions apart.
    std::fs::write(src.path().join("cached"), b"version one").unwrap();
    std::fs::write(src.path().join("uncached"), b"first").unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let c = s3_cluster(&s3, "s3://data/ds");
    let m = c.mount("mnt", SHORT_CACHES).unwrap();
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"version one"
    );
    assert_eq!(std::fs::metadata(m.path.join("uncached")).unwrap().len(), 5);

    std::fs::write(src.path().join("cached"), b"version two").unwrap();
    std::fs::write(src.path().join("uncached"), b"again").unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    // Never read before: the worker sees the object changed and the new bytes come.
    assert_eq!(std::fs::read(m.path.join("uncached")).unwrap(), b"again");
    // Cached: the old version until the namespace is told to look again.
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["fs", "load-metadata", "--force", "/", "--master"])
        .arg(c.master_addr());
    let (code, out) = run_to_exit(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read(m.path.join("cached")).unwrap(),
        b"version two"
    );
}

#[test]
fn a_restarted_worker_serves_its_warm_cache_with_the_bucket_gone() {
    let mut s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    edge_case_tree(src.path());
    std::fs::remove_dir_all(src.path().join("many")).unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let mut c = s3_cluster(&s3, "s3://data/ds");
    let m = c.mount("mnt", "").unwrap();
    let want = files(src.path());
    assert!(files(&m.path) == want);

    c.start_worker("1GiB").unwrap();
    s3.stop();
    assert!(files(&m.path) == want, "warm cache after a worker restart");
    assert_eq!(c.worker_ufs_fetches().unwrap(), 0.0);
}

#[test]
fn an_unreachable_bucket_is_eio_at_the_mount_and_caches_nothing_wrong() {
    let mut s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("cold"), vec![3u8; 300_000]).unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let c = s3_cluster(&s3, "s3://data/ds");
    let m = c.mount("mnt", "").unwrap();
    assert_eq!(
        std::fs::metadata(m.path.join("cold")).unwrap().len(),
        300_000
    );

    s3.stop();
    let err = std::fs::read(m.path.join("cold")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = c.worker.as_ref().unwrap().log_text();
    assert!(
        log.contains(&s3.endpoint),
        "the worker names the endpoint:\n{log}"
    );

    // Back (empty: moto keeps objects in memory), the same object put again.
    s3.restart().unwrap();
    s3.make_bucket("data").unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    assert!(std::fs::read(m.path.join("cold")).unwrap() == vec![3u8; 300_000]);
}

#[test]
fn changes_the_bucket_carried_out_after_giving_up_on_them_show_once_it_answers() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let c = Cluster::start(&MasterSpec {
        ufs: PathBuf::from("s3://data/ds"),
        tables: format!("{}request_timeout_ms = 1500\n", s3.config()),
        ..Default::default()
    })
    .unwrap();
    let m = c
        .mount("mnt", &format!("{SHORT_CACHES}\nretry_deadline_ms = 2000"))
        .unwrap();
    std::fs::create_dir(m.path.join("run")).unwrap();
    std::fs::write(m.path.join("run/ckpt.tmp"), b"weights").unwrap();

    // The store stalls: the calls are given up on (EIO), while their requests wait in
    // the store, which carries them out once it answers again.
    s3.freeze();
    let renamed = std::fs::rename(m.path.join("run/ckpt.tmp"), m.path.join("run/ckpt"));
    let made = std::fs::create_dir(m.path.join("run/logs"));
    std::thread::sleep(Duration::from_secs(2));
    s3.thaw();
    assert!(renamed.is_err() && made.is_err(), "{renamed:?} {made:?}");

    let names = || -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(m.path.join("run"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    };
    // Whatever the store carried out of them, the mount ends up showing it.
    let in_bucket = || -> Vec<String> {
        let mut n: Vec<String> = s3
            .keys("data", "ds/run/")
            .unwrap()
            .iter()
            .filter_map(|k| k.strip_prefix("ds/run/")?.split('/').next())
            .filter(|n| *n != ".granary-dir")
            .map(str::to_string)
            .collect();
        n.dedup();
        n
    };
    wait_until(
        "the namespace to follow the bucket",
        Duration::from_secs(40),
        || names() == in_bucket(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}, bucket {:?}", names(), in_bucket()));
    let file = names().into_iter().find(|n| n.starts_with("ckpt")).unwrap();
    assert_eq!(
        std::fs::read(m.path.join("run").join(file)).unwrap(),
        b"weights"
    );
}

/// `granary local --ufs s3://…` with the endpoint and keys from the AWS environment.
fn local_over(s3: &S3Server, dir: &Path, uri: &str, endpoint: Option<&str>) -> Command {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["local", "--ufs", uri, "--mount"])
        .arg(&mnt)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--master-listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    s3.env(&mut cmd);
    if let Some(e) = endpoint {
        cmd.env("AWS_ENDPOINT_URL", e);
    }
    cmd
}

#[test]
fn granary_local_serves_a_bucket_and_names_what_is_wrong() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello.txt"), b"hello from s3").unwrap();
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A missing bucket, an endpoint nobody answers, refused keys: named, nothing mounted.
    let cmd = local_over(&s3, dir.path(), "s3://no-such-bucket/ds", None);
    let (code, err) = run_to_exit(cmd, Duration::from_secs(60)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("no-such-bucket") && err.contains(&s3.endpoint),
        "{err}"
    );

    let nobody = format!("http://127.0.0.1:{}", free_port());
    let cmd = local_over(&s3, dir.path(), "s3://data/ds", Some(&nobody));
    let (code, err) = run_to_exit(cmd, Duration::from_secs(90)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains(&nobody), "{err}");

    let strict = S3Server::start_refusing_keys().unwrap();
    let cmd = local_over(&s3, dir.path(), "s3://data/ds", Some(&strict.endpoint));
    let (code, err) = run_to_exit(cmd, Duration::from_secs(60)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("credentials") && err.contains(&strict.endpoint),
        "{err}"
    );
    assert!(!is_mounted(&dir.path().join("mnt")));

    // Right: it serves the bucket.
    let cmd = local_over(&s3, dir.path(), "s3://data/ds", None);
    let mut local = Proc::spawn("granary local", cmd, dir.path().join("local.log")).unwrap();
    let mnt = dir.path().join("mnt");
    let up = wait_until("the mount", Duration::from_secs(30), || is_mounted(&mnt));
    let read = up.map(|_| std::fs::read(mnt.join("hello.txt")));
    local.signal(libc::SIGTERM);
    local.wait_exit(Duration::from_secs(20));
    granary_integration_tests::force_unmount(&mnt);
    let log = local.log_text();
    assert_eq!(read.unwrap().unwrap(), b"hello from s3", "{log}");
    assert!(log.contains("serving s3://data/ds"), "{log}");
    assert!(
        !log.contains("switched to configuration"),
        "raft-rs internals at the default level:\n{log}"
    );
}

#[test]
fn an_unknown_s3_config_key_is_named() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nufs = \"s3://data/x\"\n[s3]\nendpoint = \"{}\"\nno_such_key = 1\n",
            dir.path().display(),
            s3.endpoint
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("granary-master"));
    cmd.arg("--config").arg(&cfg);
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("no_such_key"), "{err}");
}

#[test]
fn a_warm_up_stopped_by_ctrl_c_resumes_where_it_stopped() {
    let s3 = S3Server::start().unwrap();
    s3.make_bucket("data").unwrap();
    let src = tempfile::tempdir().unwrap();
    for i in 0..1500 {
        let dir = src.path().join(format!("d{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:05}")), vec![(i % 251) as u8; 2000]).unwrap();
    }
    s3.put_tree(src.path(), "data", "ds").unwrap();
    let c = s3_cluster(&s3, "s3://data/ds");
    let load = || {
        let mut cmd = Command::new(bin("granary"));
        cmd.args(["fs", "load", "/", "-r", "-q", "--parallel", "1", "--master"])
            .arg(c.master_addr());
        cmd
    };

    // One block at a time from S3: seconds of work, stopped a moment in.
    let dir = tempfile::tempdir().unwrap();
    let mut first = Proc::spawn("fs load", load(), dir.path().join("load.log")).unwrap();
    wait_until(
        "the load to start fetching",
        Duration::from_secs(30),
        || c.worker_ufs_fetches().unwrap_or(0.0) >= 20.0,
    )
    .unwrap();
    first.signal(libc::SIGINT);
    let status = first.wait_exit(Duration::from_secs(30)).expect("it stops");
    let log = first.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    let fetched = c.worker_ufs_fetches().unwrap();
    assert!(
        fetched < 1500.0,
        "it went on after Ctrl-C: {fetched} blocks\n{log}"
    );

    // Again: what was cached is not fetched twice, and the rest is.
    let (code, out) = run_to_exit(load(), Duration::from_secs(120)).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1500/1500 files cached"), "{out}");
    assert!(!out.contains(", 0 B already cached"), "{out}");
    assert_eq!(c.worker_ufs_fetches().unwrap(), 1500.0);
}
