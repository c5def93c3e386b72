//! Name rules: ENAMETOOLONG at 256 bytes, ENOTDIR through files, odd but legal names.

use super::{no_setup, As, Case};
use libc::{O_CREAT, O_WRONLY};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "names/limits",
        body_as: As::Root,
        setup: no_setup,
        body: |p| {
            let max = "n".repeat(255);
            let over = "n".repeat(256);
            if let Some(fd) = p.open(&max, O_CREAT | O_WRONLY, 0o644) {
                p.close(fd);
            }
            p.stat(&max);
            p.open(&over, O_CREAT | O_WRONLY, 0o644);
            p.mkdir(&over, 0o755);
            p.stat(&over);
            p.rename(&max, &over);
            p.symlink("x", &over);
            for name in ["with space", "ünïcödé", "-dash", "tab\there", ".hidden"] {
                p.make_file(name, name.as_bytes());
                p.content(name);
            }
            p.make_file("plain", b"x");
            p.stat("plain/child");
            p.mkdir("plain/child", 0o755);
            p.list("");
        },
    }]
}
