//! rename(2) and renameat2(RENAME_NOREPLACE): every overwrite rule POSIX gives.

use super::{pattern, As, Case};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "rename/files",
            body_as: As::Root,
            setup: |p| {
                p.make_file("a", &pattern(1, 3000));
                p.make_file("b", &pattern(2, 100));
                p.mkdir("d", 0o755);
            },
            body: |p| {
                p.rename("a", "a2");
                p.stat("a");
                p.content("a2");
                p.rename("a2", "b");
                p.content("b");
                p.rename("b", "d/b");
                p.content("d/b");
                p.rename("d/b", "d/b");
                p.content("d/b");
                p.rename("missing", "x");
                p.make_file("c", b"c");
                p.rename_noreplace("c", "d/b");
                p.rename_noreplace("c", "d/c");
                p.list("");
                p.list("d");
            },
        },
        Case {
            name: "rename/directories",
            body_as: As::Root,
            setup: |p| {
                p.mkdir("src", 0o755);
                p.mkdir("src/sub", 0o755);
                p.make_file("src/sub/f", &pattern(3, 700));
                p.mkdir("empty", 0o755);
                p.mkdir("full", 0o755);
                p.make_file("full/x", b"x");
                p.make_file("file", b"file");
            },
            body: |p| {
                p.rename("src", "src/sub/inside");
                p.rename("src", "full");
                p.rename("src", "file");
                p.rename("file", "empty");
                p.rename("src", "empty");
                p.stat("src");
                p.content("empty/sub/f");
                p.rename("empty/sub", "moved");
                p.content("moved/f");
                p.make_file("moved/g", b"new file in moved dir");
                p.content("moved/g");
                p.list("");
                p.list("empty");
            },
        },
    ]
}
