//! File content: holes, writes past the end, several descriptors on one file, fsync.

use super::{pattern, As, Case};
use libc::{O_CREAT, O_RDONLY, O_RDWR, O_WRONLY};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "data/holes_and_descriptors",
        body_as: As::Root,
        setup: |p| p.make_file("f", &pattern(5, 3000)),
        body: |p| {
            if let Some(fd) = p.open("f", O_RDWR, 0) {
                p.pwrite(fd, &pattern(6, 1000), 100_000);
                p.pread(fd, 200_000, 0);
                p.pwrite(fd, b"middle", 50_000);
                p.fsync(fd);
                if let Some(other) = p.open("f", O_RDONLY, 0) {
                    p.pread(other, 10, 50_000);
                    p.close(other);
                }
                p.close(fd);
            }
            p.stat("f");
            p.content("f");
            if let Some(a) = p.open("g", O_CREAT | O_WRONLY, 0o644) {
                if let Some(b) = p.open("g", O_WRONLY, 0) {
                    p.pwrite(a, b"aaaa", 0);
                    p.pwrite(b, b"bb", 1);
                    p.close(b);
                }
                p.close(a);
            }
            p.content("g");
        },
    }]
}
