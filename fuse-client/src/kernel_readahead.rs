//! The kernel's readahead window for the mount. FUSE starts every mount at 128 KiB
//! (whatever the INIT reply asks, it only lowers it), so a sequential reader with a
//! dropped page cache waited on a 128 KiB READ at a time while the local disk under the
//! worker's cache reads ahead megabytes. The window is the mount's bdi setting, which
//! root can raise once the kernel has taken the INIT reply.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Raises the readahead window of the FUSE mount at `mountpoint` to `bytes`, in the
/// background: the first stat of the mount waits for INIT. `underlying_dev` is the
/// device of the directory before the mount, so a mount that failed or went away is
/// never mistaken for it.
pub fn raise_in_background(mountpoint: &Path, underlying_dev: u64, bytes: u64) {
    let mountpoint = mountpoint.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("granary-readahead".into())
        .spawn(move || match raise(&mountpoint, underlying_dev, bytes) {
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
    let dev = std::fs::metadata(mountpoint)?.dev();
    // FUSE mounts get an anonymous device (major 0).
    if dev == underlying_dev || libc::major(dev) != 0 {
        return Err(std::io::Error::other("the mount is not there"));
    }
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
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        assert!(raise(dir.path(), dev, 8 << 20).is_err());
    }
}
