//! utimensat(2): explicit times, UTIME_OMIT, UTIME_NOW, permission rules.

use super::{As, Case};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "utimensat/explicit",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", b"x");
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.utimens("f", (1_000_000_000, 5), (1_500_000_000, 123_456_789));
                p.times("f");
                p.utimens("f", (0, libc::UTIME_OMIT), (1_600_000_000, 0));
                p.times("f");
                p.utimens("d", (1_234_567_890, 0), (1_234_567_890, 0));
                p.times("d");
                p.utimens("missing", (0, 0), (0, 0));
            },
        },
        Case {
            name: "utimensat/others_file",
            body_as: As::User,
            setup: |p| {
                p.make_file("writable", b"x");
                p.chmod("writable", 0o666);
                p.make_file("readonly", b"x");
            },
            body: |p| {
                p.utimens("writable", (0, libc::UTIME_NOW), (0, libc::UTIME_NOW));
                p.utimens("writable", (1_000_000_000, 0), (1_000_000_000, 0));
                p.utimens("readonly", (0, libc::UTIME_NOW), (0, libc::UTIME_NOW));
            },
        },
    ]
}
