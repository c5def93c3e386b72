//! `granary fs load` / `free` / `stat`: a tree warmed into every worker's cache by the
//! placement reads use, resumed without refetching, dropped again, and the cached
//! fraction reported.

use std::process::Command;
use std::time::Duration;

use granary_integration_tests::{bin, run_to_exit, wait_until, Cluster, MasterSpec};

const FILES: usize = 40;
const BLOCK: usize = 64 << 10;

fn granary(c: &Cluster, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(bin("granary"));
    cmd.arg("--master").arg(c.master_addr()).args(args);
    run_to_exit(cmd, Duration::from_secs(60)).unwrap()
}

/// A group over `ufs` with its worker and a second one, both listed by the leader.
fn two_workers(ufs: &std::path::Path) -> (Cluster, granary_integration_tests::Proc) {
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let second = c.start_extra_worker("second", &[]).unwrap();
    wait_until("both workers listed", Duration::from_secs(20), || {
        c.worker_ids_on_leader().is_ok_and(|w| w.len() == 2)
    })
    .unwrap();
    (c, second)
}

fn stat_line(c: &Cluster, path: &str) -> String {
    let mut cmd = Command::new(bin("granary"));
    cmd.arg("--master")
        .arg(c.master_addr())
        .args(["fs", "stat", path]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("cached:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_tree_is_loaded_across_the_workers_resumed_and_freed() {
    let ufs = tempfile::tempdir().unwrap();
    for i in 0..FILES {
        let dir = ufs.path().join(format!("part-{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:03}")), vec![i as u8; 1000 + i]).unwrap();
    }
    std::fs::write(ufs.path().join("three-blocks"), vec![9u8; 3 * BLOCK]).unwrap();
    let blocks = FILES + 3;
    let (c, _second) = two_workers(ufs.path());

    // Without --recursive only the files directly in the directory, and it says so.
    let (code, out) = granary(&c, &["fs", "load", "/", "--quiet"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 subdirectories left out"), "{out}");
    assert!(out.contains("1/1 files cached"), "{out}");

    let (code, out) = granary(&c, &["fs", "load", "/", "--recursive", "--quiet"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{}/{} files cached", FILES + 1, FILES + 1)),
        "{out}"
    );
    // Spread by the read placement: this worker fetched some, the other the rest.
    let here = c.worker_ufs_fetches().unwrap() as usize;
    assert!(
        here > 0 && here < blocks,
        "one worker fetched {here} of {blocks} blocks"
    );

    // Again: nothing is read from the UFS, everything was cached already.
    let (code, out) = granary(&c, &["fs", "load", "/", "-r", "-q"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 B fetched in 0 blocks"), "{out}");
    assert_eq!(c.worker_ufs_fetches().unwrap() as usize, here);
    wait_until(
        "the masters to know every block",
        Duration::from_secs(10),
        || stat_line(&c, "/").contains("(100.0%)"),
    )
    .unwrap();
    assert!(stat_line(&c, "/three-blocks").contains("3 of 3 blocks"));

    // Free a subtree: dropped from both workers, a later load fetches it again.
    let (code, out) = granary(&c, &["fs", "free", "/part-1", "-r", "-q"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("({} blocks)", FILES / 4)), "{out}");
    wait_until(
        "the masters to see the blocks go",
        Duration::from_secs(10),
        || stat_line(&c, "/part-1").contains("0 B of"),
    )
    .unwrap();
    let (code, out) = granary(&c, &["fs", "load", "/part-1", "-r", "-q"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("in {} blocks", FILES / 4)), "{out}");

    // The report counts every block lookup the workers answered (heartbeats bring them).
    let report = || -> serde_json::Value {
        let mut cmd = Command::new(bin("granary"));
        cmd.arg("--master")
            .arg(c.master_addr())
            .args(["admin", "report", "--json"]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The first load (three-blocks), two full ones and the reload of /part-1.
    let lookups = 3 + blocks * 2 + FILES / 4;
    wait_until(
        "the workers' counters in the report",
        Duration::from_secs(10),
        || {
            let r = report();
            r["cache"]["hits"].as_u64().unwrap() + r["cache"]["misses"].as_u64().unwrap()
                >= lookups as u64
        },
    )
    .unwrap();
    let r = report();
    let shard = &r["shards"][0];
    assert_eq!(shard["members"][0]["role"], "leader", "{r}");
    assert_eq!(shard["members"][0]["apply_lag"], 0, "{r}");
    assert_eq!(shard["workers"].as_array().unwrap().len(), 2, "{r}");
    assert!(r["cache"]["hit_ratio"].as_f64().unwrap() > 0.0, "{r}");

    let (code, out) = granary(&c, &["fs", "load", "/no-such-dir", "-r", "-q"]);
    assert_ne!(code, 0);
    assert!(out.contains("no-such-dir"), "{out}");
}

/// `fs load --local` fills the worker on this machine, the one a mount here reads
/// through (of two here, the first by id), not a share of every worker.
#[test]
fn a_local_load_fills_the_worker_this_machines_mounts_read_through() {
    let ufs = tempfile::tempdir().unwrap();
    for i in 0..12 {
        std::fs::write(ufs.path().join(format!("f{i:02}")), vec![i as u8; 5000]).unwrap();
    }
    let (c, _second) = two_workers(ufs.path());
    let (code, out) = granary(&c, &["fs", "load", "/", "--local", "-q"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("12/12 files cached"), "{out}");
    let blocks_by_worker = || -> Vec<(String, u64)> {
        let mut cmd = Command::new(bin("granary"));
        cmd.arg("--master")
            .arg(c.master_addr())
            .args(["admin", "report", "--json"]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut w: Vec<(String, u64)> = r["shards"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["id"].as_str().unwrap().to_string(),
                    w["blocks"].as_u64().unwrap(),
                )
            })
            .collect();
        w.sort();
        w
    };
    wait_until(
        "the masters to know every block",
        Duration::from_secs(10),
        || blocks_by_worker().iter().map(|w| w.1).sum::<u64>() == 12,
    )
    .unwrap();
    let w = blocks_by_worker();
    assert_eq!((w[0].1, w[1].1), (12, 0), "{w:?}");
}
