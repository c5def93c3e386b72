//! open(2) and creat(2): creation flags, access modes, truncation and appending.

use super::{no_setup, pattern, As, Case};
use libc::{O_APPEND, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "open/create_exclusive",
            body_as: As::Root,
            setup: no_setup,
            body: |p| {
                if let Some(fd) = p.open("f", O_CREAT | O_EXCL | O_WRONLY, 0o640) {
                    p.close(fd);
                }
                p.stat("f");
                p.open("f", O_CREAT | O_EXCL | O_WRONLY, 0o640);
                if let Some(fd) = p.open("f", O_CREAT | O_WRONLY, 0o600) {
                    p.close(fd);
                }
                p.stat("f");
                p.open("missing", O_RDONLY, 0);
                p.open("missing/x", O_CREAT | O_WRONLY, 0o644);
            },
        },
        Case {
            name: "open/not_a_terminal",
            body_as: As::Root,
            setup: |p| p.make_file("f", b"x"),
            body: |p| {
                if let Some(fd) = p.open("f", O_RDONLY, 0) {
                    p.terminal_check(fd);
                    p.close(fd);
                }
            },
        },
        Case {
            name: "open/directories",
            body_as: As::Root,
            setup: |p| p.mkdir("d", 0o755),
            body: |p| {
                p.open("d", O_WRONLY, 0);
                p.open("d", O_RDWR, 0);
                if let Some(fd) = p.open("d", O_RDONLY | O_DIRECTORY, 0) {
                    p.close(fd);
                }
                p.make_file("f", b"x");
                p.open("f", O_RDONLY | O_DIRECTORY, 0);
                p.open("f/x", O_RDONLY, 0);
                p.open("f/x", O_CREAT | O_WRONLY, 0o644);
            },
        },
        Case {
            name: "open/truncate_and_append",
            body_as: As::Root,
            setup: |p| p.make_file("f", &pattern(1, 10_000)),
            body: |p| {
                p.content("f");
                if let Some(fd) = p.open("f", O_WRONLY | O_APPEND, 0) {
                    p.write(fd, b"tail");
                    p.pwrite(fd, b"AT", 0);
                    p.close(fd);
                }
                p.content("f");
                p.stat("f");
                if let Some(fd) = p.open("f", O_RDWR | O_TRUNC, 0) {
                    p.pread(fd, 10, 0);
                    p.write(fd, b"fresh");
                    p.pread(fd, 100, 0);
                    p.close(fd);
                }
                p.content("f");
                p.stat("f");
            },
        },
        Case {
            name: "open/append_set_by_fcntl",
            body_as: As::Root,
            setup: |p| p.make_file("f", b"0123456789"),
            body: |p| {
                let Some(fd) = p.open("f", O_RDWR, 0) else {
                    return;
                };
                p.pwrite(fd, b"ab", 2);
                p.set_flags(fd, O_APPEND);
                p.write(fd, b"END");
                p.set_flags(fd, 0);
                p.pwrite(fd, b"X", 0);
                p.pread(fd, 100, 0);
                p.close(fd);
                p.content("f");
                // Opened to append, then not.
                let Some(fd) = p.open("f", O_RDWR | O_APPEND, 0) else {
                    return;
                };
                p.write(fd, b"tail");
                p.set_flags(fd, 0);
                p.pwrite(fd, b"Y", 1);
                p.close(fd);
                p.content("f");
            },
        },
        Case {
            name: "open/access_modes",
            body_as: As::Root,
            setup: |p| p.make_file("f", b"0123456789"),
            body: |p| {
                if let Some(fd) = p.open("f", O_RDONLY, 0) {
                    p.write(fd, b"nope");
                    p.pread(fd, 4, 2);
                    p.close(fd);
                }
                if let Some(fd) = p.open("f", O_WRONLY, 0) {
                    p.pread(fd, 4, 0);
                    p.pwrite(fd, b"AB", 3);
                    p.close(fd);
                }
                p.content("f");
            },
        },
        Case {
            name: "open/creat_replaces_content",
            body_as: As::Root,
            setup: |p| p.make_file("f", &pattern(2, 5000)),
            body: |p| {
                let path = p.path("f");
                // SAFETY: a NUL-terminated path.
                let fd = unsafe { libc::creat(path.as_ptr(), 0o600) };
                if let Some(fd) = p.rec("creat f", fd as i64) {
                    p.write(fd as i32, b"short");
                    p.close(fd as i32);
                }
                p.content("f");
                p.stat("f");
            },
        },
    ]
}
