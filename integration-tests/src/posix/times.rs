//! Which calls change a file's mtime and ctime and which leave them, as pjdfstest checks
//! them: a stat before and after each call (values differ between filesystems; whether
//! they moved does not).

use super::{pattern, As, Case, Probe};
use libc::{O_CREAT, O_RDWR, O_TRUNC, O_WRONLY};

/// Long enough for any clock the filesystems compared stamp with to move.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// (mtime, ctime) of `rel`, without recording a line.
fn stamp(p: &Probe, rel: &str) -> Option<((i64, i64), (i64, i64))> {
    let path = p.path(rel);
    // SAFETY: stat is plain data filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::stat(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((
        (st.st_mtime, st.st_mtime_nsec),
        (st.st_ctime, st.st_ctime_nsec),
    ))
}

/// Runs `call` between two stats of `rel` and records whether mtime and ctime moved.
fn across(p: &mut Probe, rel: &str, what: &str, call: impl FnOnce(&mut Probe)) {
    let before = stamp(p, rel);
    std::thread::sleep(PAUSE);
    call(p);
    let after = stamp(p, rel);
    let moved = |a: Option<(i64, i64)>, b: Option<(i64, i64)>| match (a, b) {
        (Some(a), Some(b)) if a == b => "unchanged",
        (Some(_), Some(_)) => "changed",
        _ => "unknown",
    };
    p.note(format!(
        "  {what}: mtime {}, ctime {}",
        moved(before.map(|t| t.0), after.map(|t| t.0)),
        moved(before.map(|t| t.1), after.map(|t| t.1))
    ));
}

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "times/created_then_closed",
            body_as: As::Root,
            setup: |p| {
                if let Some(fd) = p.open("new", O_CREAT | O_WRONLY, 0o644) {
                    p.close(fd);
                }
            },
            body: |p| {
                across(p, "new", "nothing", |_| {});
                across(p, "new", "utimensat atime only", |p| {
                    p.utimens("new", (1_900_000_000, 0), (0, libc::UTIME_OMIT))
                });
                across(p, "new", "chmod", |p| p.chmod("new", 0o600));
            },
        },
        Case {
            name: "times/writes_and_truncates",
            body_as: As::Root,
            setup: |p| p.make_file("f", &pattern(7, 3000)),
            body: |p| {
                let Some(fd) = p.open("f", O_RDWR, 0) else {
                    return;
                };
                across(p, "f", "pwrite", |p| p.pwrite(fd, b"x", 10));
                across(p, "f", "ftruncate", |p| p.ftruncate(fd, 123));
                across(p, "f", "close", |p| p.close(fd));
                across(p, "f", "truncate", |p| p.truncate("f", 7));
                across(p, "f", "open O_TRUNC and close", |p| {
                    if let Some(fd) = p.open("f", O_WRONLY | O_TRUNC, 0) {
                        p.close(fd);
                    }
                });
                across(p, "f", "open read-only and close", |p| {
                    if let Some(fd) = p.open("f", libc::O_RDONLY, 0) {
                        p.close(fd);
                    }
                });
            },
        },
        Case {
            name: "times/explicit_times_while_writing",
            body_as: As::Root,
            setup: |p| p.make_file("f", b"old"),
            body: |p| {
                // As tar and `cp -p` do: write, set the times, then close.
                let Some(fd) = p.open("f", O_WRONLY, 0) else {
                    return;
                };
                p.pwrite(fd, b"new content", 0);
                p.utimens("f", (1_500_000_000, 0), (1_600_000_000, 0));
                p.close(fd);
                p.times("f");
            },
        },
        Case {
            name: "times/failed_calls",
            body_as: As::User,
            setup: |p| p.make_file("roots", b"x"),
            body: |p| {
                across(p, "roots", "truncate refused", |p| p.truncate("roots", 0));
                across(p, "roots", "link refused", |p| p.link("roots", "mine"));
                across(p, "roots", "chmod refused", |p| p.chmod("roots", 0o777));
            },
        },
    ]
}
