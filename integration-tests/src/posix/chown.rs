//! chown(2)/lchown(2): root may give files away; others may not.

use super::{As, Case, USER_GID, USER_UID};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "chown/root",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", b"x");
                p.symlink("f", "l");
            },
            body: |p| {
                p.chown("f", USER_UID, USER_GID);
                p.stat("f");
                p.chown("f", u32::MAX, 0);
                p.stat("f");
                p.lchown("l", USER_UID, u32::MAX);
                p.lstat("l");
                p.stat("l");
                p.chown("missing", 0, 0);
            },
        },
        Case {
            name: "chown/unprivileged",
            body_as: As::User,
            setup: |p| p.make_file("roots", b"x"),
            body: |p| {
                p.chown("roots", USER_UID, USER_GID);
                p.make_file("mine", b"y");
                p.chown("mine", 0, 0);
                p.chown("mine", USER_UID, USER_GID);
                p.stat("mine");
            },
        },
    ]
}
