//! The POSIX conformance suite (`granary_integration_tests::posix`): every case runs on a
//! Granary mount and on a plain directory, as root or as an unprivileged user, and both
//! must record the same outcomes.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use granary_integration_tests::posix::{cases, pattern, As, USER_GID, USER_UID};
use granary_integration_tests::{bin, run_to_exit, wait_until, Cluster, MasterSpec};

fn probe(phase: &str, case: &str, dir: &Path, user: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_posix-probe"));
    cmd.arg(phase).arg(case).arg(dir);
    if user {
        cmd.uid(USER_UID).gid(USER_GID);
    }
    let out = cmd.output().expect("run posix-probe");
    assert!(
        out.status.success(),
        "posix-probe {phase} {case} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a case in a fresh directory under `root`: setup as root, body as its user.
fn run_case(root: &Path, name: &str, body_as: As) -> (String, String) {
    let dir = root.join(name.replace('/', "-"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let setup = probe("setup", name, &dir, false);
    let body = probe("run", name, &dir, body_as == As::User);
    (setup, body)
}

#[test]
fn conformance_suite_matches_a_plain_directory() {
    let ufs = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let mnt = cluster.mount("mnt", "allow_other = true").unwrap();
    // The unprivileged user must reach the mount point whatever the umask made of the
    // harness's directory.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let reference = tempfile::tempdir().unwrap();
    std::fs::set_permissions(reference.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut differences = Vec::new();
    let all = cases();
    assert!(all.len() >= 20, "the suite shrank to {} cases", all.len());
    for case in all {
        let on_mount = run_case(&mnt.path, case.name, case.body_as);
        let on_plain = run_case(reference.path(), case.name, case.body_as);
        if on_mount != on_plain {
            differences.push(format!(
                "== {} ({:?})\n-- mount setup:\n{}-- plain setup:\n{}-- mount:\n{}-- plain:\n{}",
                case.name, case.body_as, on_mount.0, on_plain.0, on_mount.1, on_plain.1
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} cases differ:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// Frees `path`'s cached blocks on the workers, so the next read fetches from the UFS.
fn free_cache(cluster: &Cluster, path: &str) {
    let mut cmd = Command::new(bin("granary"));
    cmd.arg("--master")
        .arg(cluster.master_addr())
        .args(["fs", "free", path, "-q"]);
    let (code, out) = run_to_exit(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn hard_links_share_one_ufs_object_that_follows_the_remaining_names() {
    let ufs = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let a = cluster.mount("a", "").unwrap();
    let b = cluster.mount("b", "").unwrap();
    let data = pattern(9, 300_000);
    std::fs::write(a.path.join("f"), &data).unwrap();
    std::fs::create_dir(a.path.join("d")).unwrap();
    std::fs::hard_link(a.path.join("f"), a.path.join("d/g")).unwrap();
    std::fs::hard_link(a.path.join("f"), a.path.join("h")).unwrap();
    let f = std::fs::metadata(a.path.join("f")).unwrap();
    for name in ["f", "d/g", "h"] {
        let m = std::fs::metadata(b.path.join(name)).unwrap();
        assert_eq!(
            (m.ino(), m.nlink()),
            (f.ino(), 3),
            "{name} seen by another mount"
        );
    }
    assert_eq!(std::fs::read(ufs.path().join("f")).unwrap(), data);
    assert!(!ufs.path().join("d/g").exists() && !ufs.path().join("h").exists());

    // The first name goes: the object moves under the next one, and a mount that still
    // knows the old place reads it from the new one (its cached blocks dropped first).
    std::fs::remove_file(a.path.join("f")).unwrap();
    assert!(!ufs.path().join("f").exists());
    assert_eq!(std::fs::read(ufs.path().join("d/g")).unwrap(), data);
    free_cache(&cluster, "/h");
    let fetches = cluster.worker_ufs_fetches().unwrap();
    assert_eq!(std::fs::read(b.path.join("h")).unwrap(), data);
    assert!(
        cluster.worker_ufs_fetches().unwrap() > fetches,
        "read from the UFS"
    );
    assert_eq!(std::fs::metadata(b.path.join("h")).unwrap().nlink(), 2);

    // A write through one name, then the object's name renamed: still one object.
    let mut newer = data.clone();
    newer[..5].copy_from_slice(b"newer");
    std::fs::write(b.path.join("h"), &newer).unwrap();
    std::fs::rename(a.path.join("d/g"), a.path.join("top")).unwrap();
    assert_eq!(std::fs::read(ufs.path().join("top")).unwrap(), newer);
    assert_eq!(std::fs::read(a.path.join("h")).unwrap(), newer);
    std::fs::remove_file(a.path.join("top")).unwrap();
    assert_eq!(std::fs::read(ufs.path().join("h")).unwrap(), newer);
    assert!(cluster.worker_cache_used_bytes().unwrap() > 0.0);
    std::fs::remove_file(b.path.join("h")).unwrap();
    assert!(
        !ufs.path().join("h").exists(),
        "the object goes with the last name"
    );
    wait_until(
        "the worker dropping the deleted file's blocks",
        Duration::from_secs(20),
        || cluster.worker_cache_used_bytes().is_ok_and(|b| b == 0.0),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", cluster.worker.as_ref().unwrap().log_text()));
    assert!(b.path.join("h").symlink_metadata().is_err());

    // Special files live in the namespace only, and survive a relisting of their
    // directory from the UFS.
    let fifo = std::ffi::CString::new(a.path.join("d/pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let sock = std::os::unix::net::UnixListener::bind(a.path.join("d/sock")).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["fs", "load-metadata", "--force", "/d", "--master"])
        .arg(cluster.master_addr());
    let (code, out) = run_to_exit(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{out}");
    let listed: Vec<String> = std::fs::read_dir(b.path.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(std::fs::metadata(b.path.join("d/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::read_dir(ufs.path().join("d"))
        .unwrap()
        .next()
        .is_none());
    drop(sock);
}
