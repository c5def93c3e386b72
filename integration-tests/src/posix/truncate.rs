//! truncate(2) and ftruncate(2): growing (zeros), shrinking, directories, open files.

use super::{pattern, As, Case};
use libc::{O_RDONLY, O_RDWR};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "truncate/past_the_largest_file",
            body_as: As::Root,
            setup: |p| p.make_file("f", b"x"),
            body: |p| {
                // The staging directory's filesystem answers as the plain one does
                // (EFBIG on ext4), never EIO.
                p.truncate("f", 999_999_999_999_999_999);
                if let Some(fd) = p.open("f", O_RDWR, 0) {
                    p.ftruncate(fd, 999_999_999_999_999_999);
                    p.pwrite(fd, b"x", 1 << 62);
                    p.close(fd);
                }
                p.stat("f");
            },
        },
        Case {
            name: "truncate/grow_and_shrink",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", &pattern(4, 10_000));
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.truncate("f", 4000);
                p.content("f");
                p.truncate("f", 20_000);
                p.content("f");
                p.stat("f");
                p.truncate("d", 0);
                p.truncate("missing", 0);
                p.truncate("f", -1);
                if let Some(fd) = p.open("f", O_RDWR, 0) {
                    p.ftruncate(fd, 100);
                    p.pread(fd, 200, 0);
                    p.pwrite(fd, b"end", 150);
                    p.ftruncate(fd, 152);
                    p.pread(fd, 200, 0);
                    p.close(fd);
                }
                p.content("f");
                if let Some(fd) = p.open("f", O_RDONLY, 0) {
                    p.ftruncate(fd, 0);
                    p.close(fd);
                }
                p.truncate("f", 0);
                p.stat("f");
            },
        },
    ]
}
