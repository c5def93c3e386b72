//! unlink(2): files, directories, symlinks, missing names, open files.

use super::{As, Case};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "unlink/basics",
        body_as: As::Root,
        setup: |p| {
            p.make_file("f", b"data");
            p.make_file("target", b"target");
            p.symlink("target", "link");
            p.mkdir("d", 0o755);
        },
        body: |p| {
            p.unlink("f");
            p.stat("f");
            p.unlink("f");
            p.unlink("d");
            p.unlink("link");
            p.lstat("link");
            p.content("target");
            p.unlink("d/missing");
            p.list("");
        },
    }]
}
