//! `granary local`: one process whose mount calls its master in-process (no TCP between
//! them). Changes made through it reach the directory and outlive a restart, its
//! `--config` applies to the mount, and unmounting it from outside stops it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use granary_integration_tests::{
    bin, force_unmount, free_port, is_mounted, listing, run_to_exit, scrape_counter, wait_until,
    Proc,
};

/// A running `granary local`, stopped (SIGTERM, then unmounted whatever happens) on drop.
struct Local {
    proc: Proc,
    mnt: PathBuf,
}

/// The master's port: a restart over the same state directory takes the same one (its
/// routing table recorded it).
fn command(dir: &Path, port: u16, config: &str) -> Command {
    command_over(&dir.join("ufs"), dir, port, config)
}

/// [`command`] with the dataset at `ufs`.
fn command_over(ufs: &Path, dir: &Path, port: u16, config: &str) -> Command {
    let cfg = dir.join("mount.toml");
    std::fs::write(&cfg, config).unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cmd = Command::new(bin("granary"));
    cmd.args(["local", "--ufs"])
        .arg(ufs)
        .arg("--mount")
        .arg(&mnt)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--master-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(&cfg);
    cmd
}

impl Local {
    fn start(dir: &Path, port: u16, config: &str) -> Local {
        Self::start_with(dir, command(dir, port, config))
    }

    fn start_with(dir: &Path, cmd: Command) -> Local {
        let proc = Proc::spawn("granary local", cmd, dir.join("local.log")).unwrap();
        let local = Local {
            proc,
            mnt: dir.join("mnt"),
        };
        let up = wait_until("the mount", Duration::from_secs(30), || {
            is_mounted(&local.mnt)
        });
        assert!(up.is_ok(), "{}", local.proc.log_text());
        local
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_exit(Duration::from_secs(20));
        force_unmount(&self.mnt);
    }
}

#[test]
fn changes_through_granary_local_reach_the_directory_and_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ufs = dir.path().join("ufs");
    std::fs::create_dir(&ufs).unwrap();
    std::fs::write(ufs.join("seed.txt"), b"in the dataset").unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let port = free_port();
    {
        let local = Local::start(dir.path(), port, "kernel_readahead = \"4MiB\"\n");
        let p = |rel: &str| local.path(rel);
        std::fs::create_dir_all(p("a/b")).unwrap();
        std::fs::write(p("a/b/f.bin"), &data).unwrap();
        std::fs::rename(p("a/b/f.bin"), p("a/g.bin")).unwrap();
        std::os::unix::fs::symlink("g.bin", p("a/link")).unwrap();
        std::fs::write(p("a/tmp"), b"scratch").unwrap();
        std::fs::remove_file(p("a/tmp")).unwrap();
        std::fs::create_dir(p("a/empty")).unwrap();
        std::fs::remove_dir(p("a/empty")).unwrap();
        assert_eq!(
            std::fs::remove_dir(p("a/b/nothing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert_eq!(
            std::fs::create_dir(p("a/b")).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(listing(&p("a")), ["b", "g.bin", "link"]);

        // The directory itself holds the same, and nothing half-made.
        assert_eq!(listing(&ufs.join("a")), ["b", "g.bin", "link"]);
        assert_eq!(std::fs::read(ufs.join("a/g.bin")).unwrap(), data);
        assert_eq!(
            std::fs::read_link(ufs.join("a/link")).unwrap(),
            Path::new("g.bin")
        );
        assert!(listing(&ufs.join("a/b")).is_empty());

        if unsafe { libc::geteuid() } == 0 {
            let dev = std::fs::metadata(&local.mnt).unwrap().dev();
            let setting = format!(
                "/sys/class/bdi/{}:{}/read_ahead_kb",
                libc::major(dev),
                libc::minor(dev)
            );
            let raised = wait_until("the readahead window", Duration::from_secs(10), || {
                std::fs::read_to_string(&setting).is_ok_and(|v| v.trim() == "4096")
            });
            assert!(
                raised.is_ok(),
                "{setting}: {:?}",
                std::fs::read_to_string(&setting)
            );
        }
    }
    assert!(!is_mounted(&dir.path().join("mnt")));

    let local = Local::start(dir.path(), port, "");
    assert_eq!(std::fs::read(local.path("a/g.bin")).unwrap(), data);
    assert_eq!(std::fs::read(local.path("a/link")).unwrap(), data);
    assert_eq!(
        std::fs::read(local.path("seed.txt")).unwrap(),
        b"in the dataset"
    );
    assert_eq!(listing(&local.path("a")), ["b", "g.bin", "link"]);
}

#[test]
fn a_restart_on_another_master_port_names_the_one_to_use() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ufs")).unwrap();
    let port = free_port();
    drop(Local::start(dir.path(), port, ""));
    let cmd = command(dir.path(), free_port(), "");
    let (code, err) = run_to_exit(cmd, Duration::from_secs(30)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("--master-listen 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!is_mounted(&dir.path().join("mnt")));
}

#[test]
fn an_unknown_key_in_the_local_mount_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ufs")).unwrap();
    let cmd = command(dir.path(), free_port(), "no_such_key = 1\n");
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("no_such_key"), "{err}");
    assert!(!is_mounted(&dir.path().join("mnt")));
}

#[test]
fn unmounting_granary_local_from_outside_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ufs")).unwrap();
    let mut local = Local::start(dir.path(), free_port(), "");
    std::fs::write(local.path("kept"), b"written before").unwrap();
    force_unmount(&local.mnt);
    let exit = local.proc.wait_exit(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|st| st.success()),
        "{exit:?}: {}",
        local.proc.log_text()
    );
    assert_eq!(
        std::fs::read(dir.path().join("ufs/kept")).unwrap(),
        b"written before"
    );
    let log = local.proc.log_text();
    assert!(
        !log.contains("failed"),
        "an outside unmount is a clean stop: {log}"
    );
}

#[test]
fn a_state_dir_kept_for_another_ufs_is_refused_naming_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ufs")).unwrap();
    // Mounted only once its namespace recorded the UFS it serves.
    drop(Local::start(dir.path(), free_port(), ""));
    let other = dir.path().join("other-ufs");
    std::fs::create_dir(&other).unwrap();
    // The same state directory, another dataset.
    let cmd = command_over(&other, dir.path(), free_port(), "");
    let (code, err) = run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("--state-dir") && err.contains("--ufs") && err.contains("other-ufs"),
        "{err}"
    );
    assert!(!is_mounted(&dir.path().join("mnt")));
}

#[test]
fn fsync_of_a_directory_or_of_a_descriptor_with_nothing_staged_reaches_the_ufs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ufs")).unwrap();
    let metrics = free_port();
    let mut cmd = command(dir.path(), free_port(), "");
    cmd.arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics}"));
    let local = Local::start_with(dir.path(), cmd);
    let syncs = || scrape_counter(metrics, "granary_master_rpc_total{method=\"sync\"}").unwrap();
    std::fs::create_dir(local.path("ckpt")).unwrap();
    std::fs::write(local.path("ckpt/step.tmp"), b"weights").unwrap();
    std::fs::rename(local.path("ckpt/step.tmp"), local.path("ckpt/step")).unwrap();
    assert_eq!(syncs(), 0.0);

    // The checkpoint pattern: the rename made durable by an fsync of its directory.
    std::fs::File::open(local.path("ckpt"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(syncs(), 1.0);
    // `sync FILE`: a read-only descriptor of a file written and closed.
    std::fs::File::open(local.path("ckpt/step"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(syncs(), 2.0);
    // A writer's own fsync stores its bytes durably: no second call.
    let mut f = std::fs::File::create(local.path("ckpt/log")).unwrap();
    std::io::Write::write_all(&mut f, b"step 1").unwrap();
    f.sync_all().unwrap();
    assert_eq!(syncs(), 2.0);
    assert_eq!(
        std::fs::read(dir.path().join("ufs/ckpt/log")).unwrap(),
        b"step 1"
    );
}
