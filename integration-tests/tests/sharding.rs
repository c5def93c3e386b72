//! One namespace over several shards, with real processes: 3 shards of 3 masters each, 2
//! workers, a router, a mount that routes by itself and one that goes through the router.
//! Files spread by hash and by a pinned prefix; both mounts read and write all of them;
//! a rename across shards is EXDEV; a shard added and a prefix pinned to it while the
//! mounts run; the router killed (the routing mount goes on from its cached table); one
//! shard's leader killed (only that shard pauses).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_integration_tests::{wait_until, Cluster, MasterSpec};

const TOP: usize = 12;

fn content(path: &str) -> Vec<u8> {
    format!("bytes of {path}\n").repeat(40).into_bytes()
}

/// `/tNN/fK` for 12 top-level directories, and `/datasets/{imagenet/train,other}`.
fn files() -> Vec<String> {
    let mut v: Vec<String> = (0..TOP)
        .flat_map(|t| (0..3).map(move |f| format!("t{t:02}/f{f}")))
        .collect();
    v.extend((0..5).map(|i| format!("datasets/imagenet/train/img{i}")));
    v.push("datasets/other/x".into());
    v
}

/// A UFS directory holding [`files`], and their paths.
fn dataset() -> (tempfile::TempDir, Vec<String>) {
    let ufs = tempfile::tempdir().unwrap();
    let files = files();
    for f in &files {
        let p = ufs.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content(f)).unwrap();
    }
    (ufs, files)
}

fn shard_of(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino() >> 48
}

fn group(ufs: &Path, shard: u16, masters: u64, shard0: &[String]) -> Cluster {
    Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        masters,
        shard_id: shard,
        routing: shard0.to_vec(),
        worker: false,
        ..Default::default()
    })
    .unwrap()
}

/// Waits until `group`'s leader lists `n` workers.
fn workers_registered(group: &Cluster, n: usize) {
    wait_until(
        "workers registered with the shard",
        Duration::from_secs(30),
        || group.worker_ids_on_leader().is_ok_and(|w| w.len() == n),
    )
    .unwrap();
}

fn read_all(mnt: &Path, files: &[String]) -> Vec<String> {
    files
        .iter()
        .filter(|f| std::fs::read(mnt.join(f)).ok() != Some(content(f)))
        .cloned()
        .collect()
}

#[test]
fn one_namespace_over_three_shards_routers_and_failures() {
    let (ufs, files) = dataset();
    let s0 = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        masters: 3,
        ..Default::default()
    })
    .unwrap();
    let shard0 = s0.master_addrs();
    let mut s1 = group(ufs.path(), 1, 3, &shard0);
    let s2 = group(ufs.path(), 2, 3, &shard0);
    s0.add_shard(1, s1.master_addrs()).unwrap();
    s0.add_shard(2, s2.master_addrs()).unwrap();
    let version = s0.pin("/datasets/imagenet", 2).unwrap();
    for g in [&s0, &s1, &s2] {
        g.wait_for_table(version).unwrap();
    }
    let (router, router_addr) = s0.start_router("router").unwrap();
    let _worker2 = s0.start_extra_worker("worker-2", &[]).unwrap();
    for g in [&s0, &s1, &s2] {
        workers_registered(g, 2);
    }
    // Short kernel and client caches: routing changes and failures show at once.
    let fresh =
        "entry_ttl_ms = 300\nattr_ttl_ms = 300\nmeta_cache_ttl_ms = 300\nkeep_cache = false";
    let direct = s0
        .mount_on("direct", std::slice::from_ref(&router_addr), fresh)
        .unwrap();
    let proxied = s0
        .mount_on(
            "proxied",
            std::slice::from_ref(&router_addr),
            "proxy = true",
        )
        .unwrap();

    // Every file, through both mounts; spread over every shard, the pin on shard 2.
    assert_eq!(read_all(&direct.path, &files), Vec::<String>::new());
    assert_eq!(read_all(&proxied.path, &files), Vec::<String>::new());
    let tops: Vec<(String, u64)> = (0..TOP)
        .map(|t| {
            let name = format!("t{t:02}");
            let shard = shard_of(&direct.path.join(&name));
            (name, shard)
        })
        .collect();
    let used: BTreeSet<u64> = tops.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        used,
        BTreeSet::from([0, 1, 2]),
        "hashed over every shard: {tops:?}"
    );
    assert_eq!(shard_of(&direct.path.join("datasets/imagenet")), 2);
    assert_eq!(
        shard_of(&direct.path.join("datasets/imagenet/train/img3")),
        2
    );
    assert_eq!(
        shard_of(&direct.path.join("datasets/other")),
        shard_of(&direct.path.join("datasets")),
        "the rest of /datasets stays with the shard `datasets` hashes to"
    );
    let listed = |mnt: &Path| -> BTreeSet<String> {
        std::fs::read_dir(mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let mut expected: BTreeSet<String> = tops.iter().map(|(n, _)| n.clone()).collect();
    expected.insert("datasets".into());
    assert_eq!(
        listed(&direct.path),
        expected,
        "the root merges every shard's"
    );
    assert_eq!(listed(&proxied.path), expected);
    assert_eq!(
        listed(&direct.path.join("datasets")),
        BTreeSet::from(["imagenet".to_string(), "other".to_string()])
    );

    // Loading the whole tree counts each directory and file once, whichever shards keep
    // it (every shard has a root; the pin's parent is a referral on one shard and a way
    // to the pin on another).
    let mut load = std::process::Command::new(granary_integration_tests::bin("granary"));
    load.args(["fs", "load-metadata", "/", "--master", &router_addr]);
    let done = load.output().unwrap();
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let dirs = 1 + TOP + 4; // the root, /tNN, datasets, imagenet, train, other
    assert!(
        out.contains(&format!(
            "loaded /: {dirs} directories, {} files",
            files.len()
        )),
        "{out}"
    );

    // Writable through both, seen by the other and in the UFS.
    std::fs::write(direct.path.join("t03/new.txt"), b"written directly").unwrap();
    assert_eq!(
        std::fs::read(proxied.path.join("t03/new.txt")).unwrap(),
        b"written directly"
    );
    std::fs::write(
        proxied.path.join("datasets/imagenet/new.txt"),
        b"through the router",
    )
    .unwrap();
    assert_eq!(
        std::fs::read(direct.path.join("datasets/imagenet/new.txt")).unwrap(),
        b"through the router"
    );
    assert_eq!(
        std::fs::read(ufs.path().join("datasets/imagenet/new.txt")).unwrap(),
        b"through the router"
    );
    std::fs::create_dir(direct.path.join("made-here")).unwrap();
    assert!(ufs.path().join("made-here").is_dir());

    // A rename across shards is EXDEV (mv copies); within a shard it is a rename.
    let (a, b) = tops
        .iter()
        .find_map(|(a, sa)| tops.iter().find(|(_, sb)| sb != sa).map(|(b, _)| (a, b)))
        .unwrap();
    let err = std::fs::rename(
        direct.path.join(a).join("f0"),
        direct.path.join(b).join("moved"),
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{a} -> {b}");
    std::fs::rename(
        direct.path.join(a).join("f0"),
        direct.path.join(a).join("renamed"),
    )
    .unwrap();
    assert!(ufs.path().join(a).join("renamed").exists());
    std::fs::rename(
        direct.path.join(a).join("renamed"),
        direct.path.join(a).join("f0"),
    )
    .unwrap();
    // So is a hard link; within a shard, through the router too, it is one file.
    let err = std::fs::hard_link(
        direct.path.join(a).join("f0"),
        direct.path.join(b).join("l"),
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{a} -> {b}");
    std::fs::hard_link(
        proxied.path.join(a).join("f0"),
        proxied.path.join(a).join("l"),
    )
    .unwrap();
    let (f, l) = (
        std::fs::metadata(proxied.path.join(a).join("f0")).unwrap(),
        std::fs::metadata(direct.path.join(a).join("l")).unwrap(),
    );
    assert_eq!((f.ino(), f.nlink()), (l.ino(), l.nlink()));
    assert_eq!(l.nlink(), 2);
    std::fs::remove_file(proxied.path.join(a).join("l")).unwrap();
    assert!(!ufs.path().join(a).join("l").exists());

    // A shard added, and a prefix pinned to it, while the mounts run. A mount with the
    // kernel's caches on (entries kept 300 s) drops a moved prefix's entry at once, and
    // the top-level names the new shard takes over by hash.
    let cached = s0
        .mount_on("cached", std::slice::from_ref(&router_addr), "")
        .unwrap();
    assert_eq!(read_all(&cached.path, &files), Vec::<String>::new());
    let top_names: Vec<String> = (0..TOP).map(|t| format!("t{t:02}")).collect();
    let before = shard_of(&cached.path.join("t05"));
    assert_ne!(before, 3);
    let s3 = group(ufs.path(), 3, 1, &shard0);
    s0.add_shard(3, s3.master_addrs()).unwrap();
    let version = s0.pin("/t05", 3).unwrap();
    s3.wait_for_table(version).unwrap();
    workers_registered(&s3, 2);
    wait_until("/t05 served by shard 3", Duration::from_secs(30), || {
        std::fs::metadata(direct.path.join("t05")).is_ok_and(|m| m.ino() >> 48 == 3)
    })
    .unwrap();
    wait_until(
        "/t05 served by shard 3 through the caching mount",
        Duration::from_secs(20),
        || std::fs::metadata(cached.path.join("t05")).is_ok_and(|m| m.ino() >> 48 == 3),
    )
    .unwrap();
    let hashed_to_3: Vec<&String> = top_names
        .iter()
        .filter(|t| *t != "t05" && shard_of(&direct.path.join(t)) == 3)
        .collect();
    assert!(
        !hashed_to_3.is_empty(),
        "the new shard takes some names by hash"
    );
    wait_until(
        "the caching mount to see the names shard 3 took over",
        Duration::from_secs(10),
        || {
            hashed_to_3
                .iter()
                .all(|t| shard_of(&cached.path.join(t)) == 3)
        },
    )
    .unwrap();
    assert_eq!(read_all(&cached.path, &files), Vec::<String>::new());
    assert_eq!(read_all(&direct.path, &files), Vec::<String>::new());
    assert_eq!(shard_of(&direct.path.join("t05/f1")), 3);
    for t in &top_names {
        std::fs::write(cached.path.join(t).join("new"), b"after the move").unwrap();
        assert_eq!(
            std::fs::read(direct.path.join(t).join("new")).unwrap(),
            b"after the move"
        );
    }

    // A pinned prefix is like a mount point: neither renamed nor removed, whether it is
    // at the top, below a directory of another shard, or below one of its own shard.
    let (t, st) = tops.iter().find(|(n, _)| n != "t05").unwrap().clone();
    std::fs::create_dir(direct.path.join(&t).join("inner")).unwrap();
    let inner = format!("/{t}/inner");
    let version = s0.pin(&inner, st as u32).unwrap();
    for g in [&s0, &s1, &s2, &s3] {
        g.wait_for_table(version).unwrap();
    }
    for mnt in [&direct.path, &proxied.path] {
        for (pinned, elsewhere) in [
            ("t05", "t05-moved".to_string()),
            ("datasets/imagenet", "datasets/moved".to_string()),
            (&inner[1..], format!("{t}/moved")),
        ] {
            let err = std::fs::rename(mnt.join(pinned), mnt.join(&elsewhere)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "rename {pinned}");
            let err = std::fs::remove_dir(mnt.join(pinned)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "rmdir {pinned}");
        }
        let err = std::fs::rename(mnt.join(&t).join("f0"), mnt.join("t05")).unwrap_err();
        assert!(
            [libc::EBUSY, libc::EXDEV, libc::EISDIR].contains(&err.raw_os_error().unwrap()),
            "a file over a pinned prefix: {err}"
        );
    }
    assert!(ufs.path().join(&t).join("inner").is_dir());
    assert!(ufs.path().join("t05/f1").is_file());

    // Without the router, the routing mount goes on from its cached table.
    drop(router);
    assert_eq!(read_all(&direct.path, &files), Vec::<String>::new());
    std::fs::write(direct.path.join("t07/after-router.txt"), b"still writable").unwrap();
    assert_eq!(
        std::fs::read(ufs.path().join("t07/after-router.txt")).unwrap(),
        b"still writable"
    );

    // One shard's leader dies: only its paths pause; the others see no error.
    let (on_one, elsewhere): (Vec<String>, Vec<String>) = files
        .iter()
        .cloned()
        .partition(|f| shard_of(&direct.path.join(f)) == 1);
    assert!(!on_one.is_empty() && !elsewhere.is_empty());
    let (stop, reads, errors) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (stop, reads, errors, elsewhere, mnt) =
                (&stop, &reads, &errors, &elsewhere, &direct.path);
            scope.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let f = &elsewhere[i % elsewhere.len()];
                    match std::fs::read(mnt.join(f)) {
                        Ok(d) if d == content(f) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!("read {f} failed: {:?}", other.map(|d| d.len()));
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        let leader = s1.leader(Duration::from_secs(10)).unwrap();
        s1.kill_master(leader);
        let killed = Instant::now();
        // A create needs shard 1's new leader.
        let dir = Path::new(&on_one[0]).parent().unwrap().to_path_buf();
        let mut n = 0;
        wait_until(
            "shard 1 to take writes again",
            Duration::from_secs(30),
            || {
                n += 1;
                std::fs::write(direct.path.join(&dir).join(format!("after-kill-{n}")), b"x").is_ok()
            },
        )
        .unwrap();
        eprintln!(
            "shard 1 took writes again {:?} after its leader was killed",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "other shards' reads failed"
    );
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(read_all(&direct.path, &files), Vec::<String>::new());
}

/// A shard that is its own cluster: its masters mount another UFS and its workers serve
/// only it. One mount spans both; each file is read and written through its own
/// cluster's workers.
#[test]
fn a_shard_of_another_cluster_is_served_by_its_own_workers() {
    let (ufs_a, ufs_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::create_dir(ufs_a.path().join("local")).unwrap();
    std::fs::write(ufs_a.path().join("local/y"), content("local/y")).unwrap();
    std::fs::create_dir(ufs_b.path().join("remote")).unwrap();
    std::fs::write(ufs_b.path().join("remote/x"), content("remote/x")).unwrap();
    let s0 = Cluster::start(&MasterSpec {
        ufs: ufs_a.path().to_path_buf(),
        worker: false,
        ..Default::default()
    })
    .unwrap();
    let s1 = group(ufs_b.path(), 1, 1, &s0.master_addrs());
    s0.add_shard(1, s1.master_addrs()).unwrap();
    let version = s0.pin("/remote", 1).unwrap();
    s1.wait_for_table(version).unwrap();
    let _a = s0.start_extra_worker("worker-a", &[0]).unwrap();
    let _b = s0.start_extra_worker("worker-b", &[1]).unwrap();
    workers_registered(&s0, 1);
    workers_registered(&s1, 1);
    let m = s0.mount("mnt", "keep_cache = false").unwrap();
    for f in ["local/y", "remote/x"] {
        for _ in 0..3 {
            assert_eq!(std::fs::read(m.path.join(f)).unwrap(), content(f), "{f}");
        }
    }
    std::fs::write(m.path.join("remote/new"), b"to cluster b").unwrap();
    assert_eq!(
        std::fs::read(ufs_b.path().join("remote/new")).unwrap(),
        b"to cluster b"
    );
    assert!(!ufs_a.path().join("remote").exists());
    std::fs::write(m.path.join("local/new"), b"to cluster a").unwrap();
    assert_eq!(
        std::fs::read(ufs_a.path().join("local/new")).unwrap(),
        b"to cluster a"
    );
}

/// All of one shard's masters down: the root still lists every top-level name (the down
/// shard's as this mount last listed them), the other shard's files read and its
/// directories are made; only the down shard's paths fail. `ls /` used to fail with EIO.
#[test]
fn a_shard_down_leaves_the_root_listed_and_the_other_shard_served() {
    let (ufs, files) = dataset();
    let s0 = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let mut s1 = group(ufs.path(), 1, 1, &s0.master_addrs());
    let version = s0.add_shard(1, s1.master_addrs()).unwrap();
    for g in [&s0, &s1] {
        g.wait_for_table(version).unwrap();
    }
    workers_registered(&s1, 1);
    let m = s0
        .mount(
            "mnt",
            "entry_ttl_ms = 0\nattr_ttl_ms = 0\nmeta_cache_ttl_ms = 0\n\
             rpc_timeout_ms = 1500\nretry_deadline_ms = 2000",
        )
        .unwrap();
    let listed = || -> std::io::Result<BTreeSet<String>> {
        std::fs::read_dir(&m.path)?
            .map(|e| e.map(|e| e.file_name().into_string().unwrap()))
            .collect()
    };
    let before = listed().unwrap();
    let on = |shard: u64| -> Vec<&String> {
        files
            .iter()
            .filter(|f| shard_of(&m.path.join(f)) == shard)
            .collect()
    };
    let (on_zero, on_one) = (on(0), on(1));
    assert!(!on_zero.is_empty() && !on_one.is_empty());

    s1.kill_master(1);
    // A directory made on shard 0 changes the root, so the next listing asks the shards.
    let made = (0..20)
        .map(|k| format!("new-{k}"))
        .find(|name| std::fs::create_dir(m.path.join(name)).is_ok())
        .expect("a name of shard 0");
    let after = listed().unwrap();
    let mut want = before.clone();
    want.insert(made);
    assert_eq!(after, want);
    for f in on_zero {
        assert_eq!(std::fs::read(m.path.join(f)).unwrap(), content(f), "{f}");
    }
    let err = std::fs::read(m.path.join(on_one[0])).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(m.proc.log_text().contains("listed as last seen"));
}

/// The masters the routing table kept by `s0` names for `shard`, sorted.
fn listed(s0: &Cluster, shard: u32) -> Vec<String> {
    let mut c = s0.routing_client(&s0.master_addr()).unwrap();
    let t = s0
        .block_on(c.get_routing_table(granary_protos::v1::GetRoutingTableRequest {}))
        .unwrap()
        .into_inner();
    let mut m = t
        .shards
        .into_iter()
        .find(|s| s.id == shard)
        .unwrap()
        .masters;
    m.sort();
    m
}

/// The routing table names each shard's masters as its group has them: members added to
/// shard 0's and shard 1's groups and one removed from shard 1's appear in the table
/// without anyone editing it, and a router finds shard 1 through the new member alone.
#[test]
fn the_routing_table_follows_each_shards_master_group() {
    let (ufs, files) = dataset();
    let mut s0 = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let mut s1 = group(ufs.path(), 1, 1, &s0.master_addrs());
    let version = s0.add_shard(1, s1.master_addrs()).unwrap();
    s1.wait_for_table(version).unwrap();
    let names = |c: &Cluster, ids: &[u64]| -> Vec<String> {
        let mut m: Vec<String> = ids.iter().map(|&id| c.addr_of(id)).collect();
        m.sort();
        m
    };
    s0.add_master(2).unwrap();
    s1.add_master(2).unwrap();
    // A master of another shard, one under another id and one not running are refused at
    // once, and named for what is wrong.
    s0.start_master(3).unwrap();
    let refusal = |s1: &Cluster, id: u64, addr: String| -> String {
        let leader = s1.addr_of(s1.leader(Duration::from_secs(10)).unwrap());
        let mut admin = s1.admin_client(&leader).unwrap();
        let started = Instant::now();
        let r = s1.block_on(admin.add_member(granary_protos::v1::AddMemberRequest { id, addr }));
        assert!(started.elapsed() < Duration::from_secs(10));
        r.unwrap_err().message().to_string()
    };
    let other_shard = refusal(&s1, 3, s0.addr_of(3));
    assert!(other_shard.contains("serves shard 0"), "{other_shard}");
    s0.kill_master(3);
    let gone = refusal(
        &s1,
        8,
        format!("127.0.0.1:{}", granary_integration_tests::free_port()),
    );
    assert!(gone.contains("join = true"), "{gone}");
    s1.start_master(3).unwrap();
    let other_id = refusal(&s1, 7, s1.addr_of(3));
    assert!(other_id.contains("runs with `id = 3`"), "{other_id}");
    s1.kill_master(3);
    let stranger = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        shard_id: 1,
        routing: s0.master_addrs(),
        peer_token: "another group's".into(),
        worker: false,
        ..Default::default()
    })
    .unwrap();
    let other_token = refusal(&s1, 9, stranger.addr_of(1));
    assert!(other_token.contains("peer_token"), "{other_token}");
    drop(stranger);
    let both = (names(&s0, &[1, 2]), names(&s1, &[1, 2]));
    wait_until(
        "the table names the new members",
        Duration::from_secs(30),
        || (listed(&s0, 0), listed(&s0, 1)) == both,
    )
    .unwrap();
    s1.admin_on_leader(|mut cl| async move {
        cl.remove_member(granary_protos::v1::RemoveMemberRequest { id: 1 })
            .await
    })
    .unwrap();
    wait_until(
        "the table drops the removed member",
        Duration::from_secs(30),
        || listed(&s0, 1) == names(&s1, &[2]),
    )
    .unwrap();
    s1.kill_master(1);
    // A router started now knows shard 1 only from the table.
    let (_router, addr) = s0.start_router("router").unwrap();
    let m = s0.mount_on("mnt", &[addr], "").unwrap();
    assert_eq!(read_all(&m.path, &files), Vec::<String>::new());
}
