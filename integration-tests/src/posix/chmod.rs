//! chmod(2): modes on files and directories, by the owner and by others.

use super::{As, Case};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "chmod/owner",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", b"x");
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.chmod("f", 0o640);
                p.stat("f");
                p.chmod("f", 0o4755);
                p.stat("f");
                p.chmod("d", 0o700);
                p.stat("d");
                p.chmod("f", 0);
                p.stat("f");
                p.chmod("d", 0);
                p.stat("d");
                p.chmod("missing", 0o644);
            },
        },
        Case {
            name: "chmod/not_owner",
            body_as: As::User,
            setup: |p| {
                p.make_file("roots", b"x");
                p.chmod("roots", 0o666);
            },
            body: |p| {
                p.chmod("roots", 0o600);
                p.stat("roots");
                p.make_file("mine", b"y");
                p.chmod("mine", 0o600);
                p.stat("mine");
            },
        },
    ]
}
