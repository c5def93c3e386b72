//! The POSIX conformance suite (`granary_integration_tests::posix`): every case runs on a
//! Granary mount and on a plain directory, as root or as an unprivileged user, and both
//! must record the same outcomes, except the documented `EXCEPTIONS`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use granary_integration_tests::posix::{cases, As, EXCEPTIONS, USER_GID, USER_UID};
use granary_integration_tests::{Cluster, MasterSpec};

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
        if let Some((_, why)) = EXCEPTIONS.iter().find(|(n, _)| *n == case.name) {
            assert_ne!(
                on_mount, on_plain,
                "{}: listed as an exception ({why}) but matches",
                case.name
            );
            continue;
        }
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

#[test]
fn hard_links_are_refused_with_eperm() {
    let ufs = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let mnt = cluster.mount("mnt", "").unwrap();
    std::fs::write(mnt.path.join("f"), b"x").unwrap();
    let err = std::fs::hard_link(mnt.path.join("f"), mnt.path.join("g")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
}
