//! mkdir(2): modes, existing names, missing parents, files in the path.

use super::{no_setup, As, Case};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "mkdir/basics",
        body_as: As::Root,
        setup: no_setup,
        body: |p| {
            p.mkdir("d", 0o755);
            p.stat("d");
            p.mkdir("private", 0o700);
            p.stat("private");
            p.mkdir("d", 0o755);
            p.mkdir("missing/d", 0o755);
            p.make_file("f", b"x");
            p.mkdir("f", 0o755);
            p.mkdir("f/d", 0o755);
            p.mkdir("d/nested", 0o750);
            p.stat("d/nested");
            p.list("d");
            p.list("");
        },
    }]
}
