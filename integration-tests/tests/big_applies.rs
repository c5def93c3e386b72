//! Work that one log entry makes the state machine do (a directory rename rewrites every
//! descendant) must not stall the Raft group: heartbeats keep going, so no member starts
//! an election, and cached reads keep being served. A directory too big for one command
//! is listed in parts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_integration_tests::{Cluster, MasterSpec};
use granary_protos::v1::{LoadMetadataReply, LoadMetadataRequest};

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 1000;
const FLAT: usize = 20_000;

/// Loads metadata through the leader; returns the last progress message (the totals).
fn load_metadata(c: &Cluster, req: LoadMetadataRequest) -> LoadMetadataReply {
    c.on_leader(Duration::from_secs(600), |mut client| {
        let req = req.clone();
        async move {
            let mut progress = client.load_metadata(req).await?.into_inner();
            let mut last = None;
            while let Some(p) = progress.message().await? {
                last = Some(p);
            }
            Ok(tonic::Response::new(last.unwrap_or_default()))
        }
    })
    .unwrap()
}

#[test]
fn renaming_a_100k_entry_tree_causes_no_election() {
    // 100k files are made and removed several times faster on tmpfs.
    let ufs = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    for d in 0..DIRS {
        let dir = ufs.path().join(format!("tree/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::File::create(dir.join(format!("f{f:03}"))).unwrap();
        }
    }
    // One flat directory bigger than one command's worth of entries: listed in parts.
    let flat = ufs.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    for f in 0..FLAT {
        std::fs::File::create(flat.join(format!("f{f:05}"))).unwrap();
    }
    std::fs::create_dir(ufs.path().join("data")).unwrap();
    for i in 0..20 {
        std::fs::write(
            ufs.path().join(format!("data/f{i:02}")),
            vec![i as u8; 4096],
        )
        .unwrap();
    }
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        masters: 3,
        ..Default::default()
    })
    .unwrap();
    let loaded = Instant::now();
    let counted = load_metadata(
        &c,
        LoadMetadataRequest {
            path: b"/tree".to_vec(),
            recursive: true,
            force: false,
        },
    );
    assert!(counted.done);
    assert_eq!(
        (counted.directories, counted.files),
        (DIRS as u64 + 1, (DIRS * FILES_PER_DIR) as u64)
    );
    eprintln!(
        "loaded {} entries in {:?}",
        DIRS * FILES_PER_DIR,
        loaded.elapsed()
    );

    let m = c.mount("mnt", "keep_cache = false").unwrap();
    assert_eq!(
        std::fs::read_dir(m.path.join("flat")).unwrap().count(),
        FLAT
    );
    std::fs::remove_file(flat.join("f00007")).unwrap();
    std::fs::File::create(flat.join("added")).unwrap();
    let counted = load_metadata(
        &c,
        LoadMetadataRequest {
            path: b"/flat".to_vec(),
            recursive: false,
            force: true,
        },
    );
    assert_eq!(
        (counted.directories, counted.files),
        (1, FLAT as u64),
        "one directory listed, its files counted"
    );
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(m.path.join("flat"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), FLAT, "one removed, one added");
    assert!(names.contains("added") && !names.contains("f00007"));
    for i in 0..20 {
        std::fs::read(m.path.join(format!("data/f{i:02}"))).unwrap();
    }
    let leader = c.leader(Duration::from_secs(10)).unwrap();
    let term = c.quorum_info(leader).unwrap().term;
    let (stop, reads, errors) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    /// Stops the readers however the scope ends (a failed rename panics inside it).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for t in 0..2 {
            let (path, stop, reads, errors) = (&m.path, &stop, &reads, &errors);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let name = path.join(format!("data/f{:02}", i % 20));
                    match std::fs::read(&name) {
                        Ok(d) if d == vec![(i % 20) as u8; 4096] => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!(
                                "read {} failed: {:?}",
                                name.display(),
                                other.map(|d| d.len())
                            );
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        let renamed = Instant::now();
        std::fs::rename(m.path.join("tree"), m.path.join("moved")).unwrap();
        eprintln!("renamed in {:?}", renamed.elapsed());
        // Past an election timeout after the rename's apply: a stalled member would
        // have campaigned by now.
        std::thread::sleep(Duration::from_secs(3));
    });
    for (&id, _) in c.masters.iter() {
        let q = c.quorum_info(id).unwrap();
        assert_eq!(
            (q.term, q.leader_id),
            (term, leader),
            "master {id} saw an election"
        );
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "cached reads failed");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(m.path.join("moved/d050/f500").exists());
    assert!(!m.path.join("tree").exists());
    assert!(ufs.path().join("moved/d099/f999").exists());
}
