//! rmdir(2): empty and non-empty directories, files, missing names.

use super::{As, Case};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "rmdir/basics",
        body_as: As::Root,
        setup: |p| {
            p.mkdir("empty", 0o755);
            p.mkdir("full", 0o755);
            p.make_file("full/f", b"x");
            p.make_file("f", b"x");
        },
        body: |p| {
            p.rmdir("full");
            p.rmdir("f");
            p.rmdir("missing");
            p.rmdir("empty");
            p.stat("empty");
            p.unlink("full/f");
            p.rmdir("full");
            p.list("");
        },
    }]
}
