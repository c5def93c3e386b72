//! What the kernel is told about a file: its attributes as stat(2) shows them and how an
//! open descriptor is served (page cache kept, direct I/O, no flush at close). Plain
//! functions over plain types, so tests see the policy; the FUSE adapter only copies the
//! answers into fuser's types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use granary_common::ufs::permissions;
use granary_protos::v1::{FileKind, Inode};

/// A file's attributes as the kernel shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    /// Device number of a character or block device.
    pub rdev: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Owner shown for every file when the mount config sets one (`uid`, `gid`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnerOverride {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Preferred I/O size reported to stat(2).
pub const BLOCK_SIZE_HINT: u32 = 1 << 17;

impl Attributes {
    pub fn of(i: &Inode, owner: OwnerOverride) -> Self {
        let kind = match FileKind::try_from(i.kind) {
            Ok(FileKind::Unspecified) | Err(_) => FileKind::File,
            Ok(k) => k,
        };
        let dir = kind == FileKind::Directory;
        // A symlink's size is its target's length, as lstat(2) reports it.
        let size = if kind == FileKind::Symlink {
            i.symlink_target.len() as u64
        } else {
            i.size
        };
        let time = |ns: i64| UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
        let mtime = time(i.mtime_ns);
        // Loaded from a UFS that keeps no access or change time: they are the mtime.
        let or_mtime = |ns: i64| if ns == 0 { mtime } else { time(ns) };
        // A UFS without modes (object stores): the usual defaults.
        let perm = permissions(i.mode, if dir { 0o755 } else { 0o644 });
        Attributes {
            ino: i.id,
            kind,
            size,
            blocks: size.div_ceil(512),
            perm: perm as u16,
            // A directory: `.`, its entry, and each subdirectory's `..`.
            nlink: if dir {
                2 + i.subdirs.min(u32::MAX as u64 - 2) as u32
            } else {
                1 + i.links.len() as u32
            },
            rdev: i.rdev as u32,
            uid: owner.uid.unwrap_or(i.uid),
            gid: owner.gid.unwrap_or(i.gid),
            atime: or_mtime(i.atime_ns),
            mtime,
            ctime: or_mtime(i.ctime_ns),
        }
    }
}

/// How the kernel serves an open descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenMode {
    /// Reads and writes bypass the page cache.
    pub direct_io: bool,
    /// The page cache this file already has stays valid.
    pub keep_cache: bool,
    /// close(2) sends no FLUSH (nothing to commit).
    pub no_flush: bool,
}

impl OpenMode {
    /// A descriptor opened with `flags`. A writer's writes go straight to the staged
    /// file, not first into the mount's page cache (where a multi-GiB checkpoint would
    /// take as many fresh pages again as the staged file does). A reader keeps the page
    /// cache only if `keep_cache` is configured and the content is `unchanged` since the
    /// file was last opened here, and has nothing to commit at close.
    pub fn for_open(flags: i32, keep_cache: bool, unchanged: bool) -> Self {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return OpenMode::writer();
        }
        OpenMode {
            direct_io: false,
            keep_cache: keep_cache && unchanged,
            no_flush: true,
        }
    }

    /// A descriptor open for writing (also what create(2) opens).
    pub fn writer() -> Self {
        OpenMode {
            direct_io: true,
            keep_cache: false,
            no_flush: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(kind: FileKind) -> Inode {
        Inode {
            id: 7,
            kind: kind as i32,
            size: 1000,
            mtime_ns: 5_000_000_000,
            uid: 10,
            gid: 20,
            ..Default::default()
        }
    }

    #[test]
    fn attributes_fill_what_the_ufs_does_not_keep() {
        let file = Attributes::of(&inode(FileKind::File), OwnerOverride::default());
        assert_eq!((file.perm, file.nlink, file.blocks), (0o644, 1, 2));
        assert_eq!(file.atime, file.mtime);
        assert_eq!(file.ctime, UNIX_EPOCH + Duration::from_secs(5));
        assert_eq!((file.uid, file.gid), (10, 20));

        let dir = Attributes::of(&inode(FileKind::Directory), OwnerOverride::default());
        assert_eq!((dir.perm, dir.nlink), (0o755, 2));
        // No permission bits at all, known as such (chmod 000), are not the defaults.
        let mut closed = inode(FileKind::File);
        closed.mode = granary_common::ufs::MODE_KNOWN;
        assert_eq!(Attributes::of(&closed, OwnerOverride::default()).perm, 0);
        closed.mode |= 0o640;
        assert_eq!(
            Attributes::of(&closed, OwnerOverride::default()).perm,
            0o640
        );
        let mut parent = inode(FileKind::Directory);
        parent.subdirs = 3;
        assert_eq!(Attributes::of(&parent, OwnerOverride::default()).nlink, 5);
        let mut linked = inode(FileKind::File);
        linked.links = vec![Default::default(); 2];
        assert_eq!(Attributes::of(&linked, OwnerOverride::default()).nlink, 3);
        let mut dev = inode(FileKind::BlockDevice);
        dev.rdev = 0x0801;
        let dev = Attributes::of(&dev, OwnerOverride::default());
        assert_eq!((dev.kind, dev.rdev), (FileKind::BlockDevice, 0x0801));

        let mut link = inode(FileKind::Symlink);
        link.symlink_target = b"../target".to_vec();
        assert_eq!(Attributes::of(&link, OwnerOverride::default()).size, 9);

        let mut own = inode(FileKind::File);
        own.mode = 0o4750;
        own.ctime_ns = 6_000_000_000;
        let shown = Attributes::of(
            &own,
            OwnerOverride {
                uid: Some(0),
                gid: None,
            },
        );
        assert_eq!((shown.perm, shown.uid, shown.gid), (0o4750, 0, 20));
        assert_eq!(shown.ctime, UNIX_EPOCH + Duration::from_secs(6));
    }

    #[test]
    fn readers_keep_an_unchanged_page_cache_and_writers_bypass_it() {
        let reader = OpenMode::for_open(libc::O_RDONLY, true, true);
        assert_eq!(
            reader,
            OpenMode {
                direct_io: false,
                keep_cache: true,
                no_flush: true
            }
        );
        assert!(!OpenMode::for_open(libc::O_RDONLY, true, false).keep_cache);
        assert!(!OpenMode::for_open(libc::O_RDONLY, false, true).keep_cache);
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR | libc::O_APPEND] {
            assert_eq!(OpenMode::for_open(flags, true, true), OpenMode::writer());
        }
        assert!(OpenMode::writer().direct_io && !OpenMode::writer().no_flush);
    }
}
