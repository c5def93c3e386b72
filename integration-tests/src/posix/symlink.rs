//! symlink(2)/readlink(2): links to files, directories, nothing; lstat vs stat.

use super::{no_setup, As, Case};
use libc::O_RDONLY;

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "symlink/basics",
        body_as: As::Root,
        setup: no_setup,
        body: |p| {
            p.make_file("target", b"target bytes");
            p.mkdir("dir", 0o755);
            p.symlink("target", "l1");
            p.symlink("dir", "l2");
            p.symlink("nowhere", "dangling");
            p.symlink("target", "l1");
            p.readlink("l1");
            p.readlink("target");
            p.lstat("l1");
            p.stat("l1");
            p.content("l1");
            p.make_file("l2/through", b"via link");
            p.list("dir");
            p.open("dangling", O_RDONLY, 0);
            p.lstat("dangling");
            p.symlink(&"x".repeat(1000), "long");
            p.readlink("long");
        },
    }]
}
