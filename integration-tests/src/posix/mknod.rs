//! mknod(2) and mkfifo(3): fifos, sockets and devices through every syscall family, and
//! what the kernel does with them (a pipe through a fifo, a Unix socket bound by path).

use super::{no_setup, As, Case, Probe, USER_GID, USER_UID};

/// Every special kind, by name, with the mode bits that make it.
const SPECIAL: [(&str, u32); 4] = [
    ("fifo", libc::S_IFIFO),
    ("sock", libc::S_IFSOCK),
    ("chr", libc::S_IFCHR),
    ("blk", libc::S_IFBLK),
];

fn make_specials(p: &mut Probe) {
    for (name, kind) in SPECIAL {
        p.mknod(name, kind | 0o644, (8, 1));
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "mknod/kinds",
            body_as: As::Root,
            setup: no_setup,
            body: |p| {
                make_specials(p);
                p.mkfifo("fifo2", 0o600);
                p.mknod("regular", libc::S_IFREG | 0o640, (0, 0));
                p.mknod("zero_type", 0o640, (0, 0));
                for name in [
                    "fifo",
                    "sock",
                    "chr",
                    "blk",
                    "fifo2",
                    "regular",
                    "zero_type",
                ] {
                    p.lstat(name);
                }
                p.content("regular");
                p.mknod("fifo", libc::S_IFIFO | 0o644, (0, 0));
                p.mkfifo("missing/f", 0o644);
                p.mkfifo("regular/f", 0o644);
                p.mknod("dir", libc::S_IFDIR | 0o755, (0, 0));
                p.mkfifo(&"n".repeat(256), 0o644);
                p.list("");
            },
        },
        Case {
            name: "mknod/attributes",
            body_as: As::Root,
            setup: make_specials,
            body: |p| {
                for (name, _) in SPECIAL {
                    p.chmod(name, 0o600);
                    p.chown(name, USER_UID, USER_GID);
                    p.utimens(name, (1_000_000_000, 7), (1_200_000_000, 9));
                    p.times(name);
                    p.truncate(name, 0);
                }
            },
        },
        Case {
            name: "mknod/rename_and_unlink",
            body_as: As::Root,
            setup: |p| {
                make_specials(p);
                p.make_file("file", b"file");
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.rename("fifo", "d/fifo");
                p.rename("sock", "file");
                p.lstat("file");
                p.rename("chr", "d");
                p.rename("d/fifo", "blk");
                p.lstat("blk");
                p.link("blk", "blk2");
                p.lstat("blk2");
                p.unlink("blk");
                p.lstat("blk2");
                p.unlink("blk2");
                p.unlink("file");
                p.rmdir("chr");
                p.unlink("chr");
                p.list("");
                p.list("d");
            },
        },
        Case {
            name: "mknod/unprivileged",
            body_as: As::User,
            setup: |p| p.mkfifo("roots", 0o644),
            body: |p| {
                p.mkfifo("mine", 0o644);
                p.mknod("sock", libc::S_IFSOCK | 0o600, (0, 0));
                p.mknod("chr", libc::S_IFCHR | 0o600, (1, 3));
                p.mknod("blk", libc::S_IFBLK | 0o600, (8, 0));
                p.chmod("roots", 0o666);
                p.chmod("mine", 0o600);
                p.lstat("mine");
                p.lstat("sock");
                p.list("");
            },
        },
        Case {
            name: "mknod/fifo_io",
            body_as: As::Root,
            setup: |p| p.mkfifo("pipe", 0o644),
            body: |p| {
                p.fifo_roundtrip("pipe", b"through the pipe");
                p.lstat("pipe");
            },
        },
        Case {
            name: "mknod/socket_bind",
            body_as: As::User,
            setup: no_setup,
            body: |p| {
                p.socket_roundtrip("sock", b"hello over a socket");
                p.lstat("sock");
                p.socket_roundtrip("sock", b"again");
                p.unlink("sock");
                p.socket_roundtrip("sock", b"after unlink");
            },
        },
    ]
}
