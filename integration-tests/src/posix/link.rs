//! link(2): names sharing one file, link counts, unlinking and renaming over links, the
//! link counts of directories, and who may link what.

use super::{no_setup, pattern, As, Case};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "link/counts",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", &pattern(4, 5000));
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.link("f", "g");
                p.link("f", "d/h");
                p.stat("f");
                p.stat("d/h");
                p.content("g");
                // A write through one name shows through the others.
                if let Some(fd) = p.open("g", libc::O_WRONLY, 0) {
                    p.pwrite(fd, b"through g", 100);
                    p.close(fd);
                }
                p.content("f");
                p.content("d/h");
                p.unlink("f");
                p.stat("f");
                p.stat("g");
                p.content("d/h");
                p.chmod("g", 0o600);
                p.stat("d/h");
                p.unlink("g");
                p.stat("d/h");
                p.content("d/h");
                p.unlink("d/h");
                p.list("");
                p.list("d");
            },
        },
        Case {
            name: "link/errors",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", b"x");
                p.make_file("other", b"y");
                p.mkdir("d", 0o755);
                p.symlink("f", "sym");
            },
            body: |p| {
                p.link("d", "d2");
                p.link("f", "other");
                p.link("f", "d");
                p.link("missing", "x");
                p.link("f", "nodir/x");
                p.link("f", "other/x");
                p.link("f", &"n".repeat(256));
                // link(2) does not follow a symlink: the new name is a symlink too.
                p.link("sym", "sym2");
                p.lstat("sym2");
                p.readlink("sym2");
                p.lstat("sym");
                p.stat("f");
                p.list("");
            },
        },
        Case {
            name: "link/rename_over_links",
            body_as: As::Root,
            setup: |p| {
                p.make_file("f", &pattern(5, 300));
                p.link("f", "g");
                p.make_file("other", &pattern(6, 200));
                p.mkdir("d", 0o755);
            },
            body: |p| {
                // Two names of one file: rename does nothing.
                p.rename("f", "g");
                p.stat("f");
                p.stat("g");
                p.rename_noreplace("f", "g");
                // Another file over a link: only that name goes.
                p.rename("other", "g");
                p.stat("f");
                p.content("g");
                p.content("f");
                // A link moved to another directory and back under a new name.
                p.link("f", "d/l");
                p.rename("d/l", "l2");
                p.stat("f");
                p.rename("f", "d/f");
                p.content("l2");
                p.stat("l2");
                p.unlink("d/f");
                p.content("l2");
                p.stat("l2");
                p.list("");
                p.list("d");
            },
        },
        Case {
            name: "link/directory_counts",
            body_as: As::Root,
            setup: no_setup,
            body: |p| {
                p.mkdir("d", 0o755);
                p.stat("d");
                p.mkdir("d/a", 0o755);
                p.mkdir("d/b", 0o755);
                p.make_file("d/file", b"x");
                p.stat("d");
                p.rename("d/b", "b");
                p.stat("d");
                p.rename("b", "d/a/b");
                p.stat("d");
                p.stat("d/a");
                p.rmdir("d/a/b");
                p.stat("d/a");
            },
        },
        Case {
            name: "link/unprivileged",
            body_as: As::User,
            setup: |p| {
                p.make_file("private", b"p");
                p.chmod("private", 0o600);
                p.make_file("shared", b"s");
                p.chmod("shared", 0o666);
                p.mkdir("closed", 0o755);
            },
            body: |p| {
                p.link("private", "mine1");
                p.link("shared", "mine2");
                p.link("shared", "closed/x");
                p.make_file("own", b"o");
                p.link("own", "own2");
                p.stat("own2");
                p.stat("shared");
                p.list("");
            },
        },
    ]
}
