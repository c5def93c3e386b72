//! unlink(2): files, directories, symlinks, missing names, open files.

use super::{no_setup, pattern, As, Case};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "unlink/open_read_only",
            body_as: As::Root,
            setup: |p| p.make_file("f", &pattern(3, 300_000)),
            body: |p| {
                let Some(fd) = p.open("f", libc::O_RDONLY, 0) else {
                    return;
                };
                p.unlink("f");
                // Long enough for caches of a deleted file to be dropped.
                std::thread::sleep(std::time::Duration::from_secs(1));
                p.fstat(fd);
                p.pread(fd, 300_000, 0);
                p.close(fd);
            },
        },
        Case {
            name: "unlink/open_file",
            body_as: As::Root,
            setup: no_setup,
            body: |p| {
                // A file unlinked while open lives on for its descriptors.
                let Some(fd) = p.open("f", libc::O_CREAT | libc::O_RDWR, 0o644) else {
                    return;
                };
                p.unlink("f");
                p.fstat(fd);
                p.write(fd, b"written after unlink");
                p.pread(fd, 100, 0);
                p.fstat(fd);
                p.close(fd);
                p.stat("f");
                p.list("");
            },
        },
        Case {
            name: "unlink/truncate_open_file",
            body_as: As::Root,
            setup: |p| p.make_file("f", &pattern(5, 1000)),
            body: |p| {
                let Some(fd) = p.open("f", libc::O_RDWR, 0) else {
                    return;
                };
                p.unlink("f");
                p.ftruncate(fd, 3);
                p.pread(fd, 100, 0);
                p.ftruncate(fd, 20);
                p.fstat(fd);
                p.pread(fd, 100, 0);
                p.close(fd);
            },
        },
        Case {
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
        },
    ]
}
