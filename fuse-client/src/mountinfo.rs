//! What `/proc/self/mountinfo` says of a mount point, read without touching the mount
//! itself: a request of this process to its own FUSE mount (a stat) waits for the
//! session to answer, forever if the process is exiting with the connection held open.

use std::path::{Path, PathBuf};

/// The device number of the FUSE mount at `mountpoint`, if one is mounted there.
pub fn fuse_device(mountpoint: &Path) -> Option<u64> {
    let canonical = canonical(mountpoint)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let fstype = fields.iter().skip_while(|f| **f != "-").nth(1)?;
        if !fstype.starts_with("fuse") || Path::new(&unescape(fields.get(4)?)) != canonical {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
    })
}

/// `path` as mountinfo spells it: absolute, its parent's symlinks resolved; the last
/// component is not resolved (that would stat the mount).
fn canonical(path: &Path) -> Option<PathBuf> {
    let path = std::path::absolute(path).ok()?;
    Some(match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().ok()?.join(name),
        _ => path,
    })
}

/// A mountinfo field with its octal escapes (`\040` for a space, …) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match (b[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            super::unescape("/mnt/a\\040b\\011c\\134d\\x"),
            "/mnt/a b\tc\\d\\x"
        );
    }

    #[test]
    fn a_directory_is_no_fuse_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::fuse_device(dir.path()).is_none());
        assert!(super::fuse_device(std::path::Path::new("/proc/")).is_none());
    }
}
