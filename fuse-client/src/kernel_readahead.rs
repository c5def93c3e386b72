//! The kernel's readahead window for the mount. FUSE starts every mount at 128 KiB
//! (whatever the INIT reply asks, it only lowers it), so a sequential reader with a
//! dropped page cache waited on a 128 KiB READ at a time while the local disk under the
//! worker's cache reads ahead megabytes. The window is the mount's bdi setting, which
//! root can raise once the kernel has taken the INIT reply.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// How long the setter waits for the kernel's INIT, and then for the kernel to apply the
/// INIT reply (written right after the mount's init callback signals).
const INIT_WAIT: Duration = Duration::from_secs(10);
const INIT_APPLIED: Duration = Duration::from_millis(100);

/// Raises the readahead window of the FUSE mount at `mountpoint` to `bytes`, in the
/// background, once `initialized` says the mount took the kernel's INIT. The mount's
/// device comes from mountinfo, not from a stat of the mount: this process asking its
/// own mount could wait forever if it exits meanwhile. `underlying_dev` is the device
/// of the directory before the mount, so it is never mistaken for the mount.
pub fn raise_in_background(
    mountpoint: &Path,
    underlying_dev: u64,
    bytes: u64,
    initialized: Receiver<()>,
) {
    let mountpoint = mountpoint.to_path_buf();
    let set = move || {
        initialized
            .recv_timeout(INIT_WAIT)
            .map_err(|_| std::io::Error::other("the kernel sent no INIT"))?;
        std::thread::sleep(INIT_APPLIED);
        raise(&mountpoint, underlying_dev, bytes)
    };
    let spawned = std::thread::Builder::new()
        .name("granary-readahead".into())
        .spawn(move || match set() {
            Ok(()) => tracing::debug!(kib = bytes >> 10, "kernel readahead window set"),
            Err(e) => tracing::info!(
                error = %e,
                "kernel readahead window left at the kernel's default (needs root)"
            ),
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the readahead setter");
    }
}

fn raise(mountpoint: &Path, underlying_dev: u64, bytes: u64) -> std::io::Result<()> {
    let dev = crate::mountinfo::fuse_device(mountpoint)
        .filter(|&dev| dev != underlying_dev)
        .ok_or_else(|| std::io::Error::other("the mount is not there"))?;
    std::fs::write(bdi_setting(dev), format!("{}", bytes >> 10))
}

fn bdi_setting(dev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_the_devices_bdi() {
        assert_eq!(
            bdi_setting(libc::makedev(0, 40)),
            PathBuf::from("/sys/class/bdi/0:40/read_ahead_kb")
        );
    }

    #[test]
    fn a_directory_that_is_no_mount_is_left_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        assert!(raise(dir.path(), dev, 8 << 20).is_err());
    }
}
