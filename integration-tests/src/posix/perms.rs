//! Permission checks for an unprivileged user: EACCES on directories and files, the
//! sticky bit, and ownership of what the user creates.

use super::{As, Case};
use libc::{O_CREAT, O_RDONLY, O_WRONLY};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "perms/eacces",
            body_as: As::User,
            setup: |p| {
                p.mkdir("closed", 0o755);
                p.mkdir("secret", 0o700);
                p.make_file("secret/f", b"s");
                p.make_file("private", b"p");
                p.chmod("private", 0o600);
                p.make_file("readable", b"r");
                p.chmod("readable", 0o644);
            },
            body: |p| {
                p.open("closed/new", O_CREAT | O_WRONLY, 0o644);
                p.mkdir("closed/d", 0o755);
                p.list("secret");
                p.stat("secret/f");
                p.open("private", O_RDONLY, 0);
                p.open("readable", O_WRONLY, 0);
                if let Some(fd) = p.open("readable", O_RDONLY, 0) {
                    p.pread(fd, 10, 0);
                    p.close(fd);
                }
                p.unlink("readable");
                p.rename("readable", "stolen");
                p.truncate("readable", 0);
            },
        },
        Case {
            name: "perms/own_files_and_sticky",
            body_as: As::User,
            setup: |p| {
                p.mkdir("sticky", 0o1777);
                p.chmod("sticky", 0o1777);
                p.make_file("sticky/roots", b"r");
                p.chmod("sticky/roots", 0o666);
            },
            body: |p| {
                p.make_file("mine", b"m");
                p.stat("mine");
                p.mkdir("mydir", 0o700);
                p.stat("mydir");
                p.make_file("mydir/inner", b"i");
                p.content("mydir/inner");
                p.unlink("sticky/roots");
                p.rename("sticky/roots", "sticky/other");
                p.make_file("sticky/mine", b"m");
                p.unlink("sticky/mine");
                p.list("sticky");
            },
        },
    ]
}
