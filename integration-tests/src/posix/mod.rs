//! A POSIX conformance suite in the layout of pjdfstest: one module per syscall family.
//! Each case runs in a fresh directory, first its setup as root, then its body as root or
//! as an unprivileged user; every syscall's outcome (success or errno) and every stat is
//! recorded as a line. The same case run on a Granary mount and on a plain directory
//! must record the same lines.
//!
//! Cases run in the `posix-probe` binary, so the unprivileged ones can run under another
//! uid without forking the multi-threaded test process.

mod chmod;
mod chown;
mod data;
mod link;
mod mkdir;
mod mknod;
mod names;
mod open;
mod perms;
mod rename;
mod rmdir;
mod symlink;
mod times;
mod truncate;
mod unlink;
mod utimensat;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The unprivileged user cases run as (nobody).
pub const USER_UID: u32 = 65534;
pub const USER_GID: u32 = 65534;

/// Who runs a case's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum As {
    Root,
    User,
}

pub struct Case {
    pub name: &'static str,
    pub body_as: As,
    /// Prepares the case directory as root (may be a no-op).
    pub setup: fn(&mut Probe),
    pub body: fn(&mut Probe),
}

pub fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for family in [
        open::cases(),
        mkdir::cases(),
        rmdir::cases(),
        unlink::cases(),
        rename::cases(),
        truncate::cases(),
        chmod::cases(),
        chown::cases(),
        utimensat::cases(),
        symlink::cases(),
        times::cases(),
        link::cases(),
        mknod::cases(),
        names::cases(),
        perms::cases(),
        data::cases(),
    ] {
        all.extend(family);
    }
    all
}

pub fn find(name: &str) -> Option<Case> {
    cases().into_iter().find(|c| c.name == name)
}

fn no_setup(_: &mut Probe) {}

/// Runs syscalls relative to one directory and records what they answer.
pub struct Probe {
    dir: PathBuf,
    pub lines: Vec<String>,
}

fn errno_name(e: i32) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EFBIG, "EFBIG"),
        (libc::EROFS, "EROFS"),
        (libc::EMLINK, "EMLINK"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENOTSUP, "ENOTSUP"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::EBUSY, "EBUSY"),
        (libc::ENOTTY, "ENOTTY"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == e)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("errno {e}"))
}

/// The file type in a stat's mode, as `ls` would name it.
fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "dir",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        _ => "other",
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Probe {
    pub fn new(dir: &Path) -> Probe {
        Probe {
            dir: dir.to_path_buf(),
            lines: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> CString {
        let p = if rel.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(rel)
        };
        CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
    }

    pub fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    /// Records a libc call's outcome (negative: errno); returns the value on success.
    pub fn rec(&mut self, what: &str, rc: i64) -> Option<i64> {
        if rc < 0 {
            let e = errno_name(last_errno());
            self.note(format!("{what}: {e}"));
            None
        } else {
            self.note(format!("{what}: ok"));
            Some(rc)
        }
    }

    pub fn open(&mut self, rel: &str, flags: i32, mode: u32) -> Option<i32> {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        self.rec(&format!("open {rel} {flags:#o}"), fd as i64)
            .map(|fd| fd as i32)
    }

    pub fn close(&mut self, fd: i32) {
        // SAFETY: closing a descriptor this probe opened.
        let rc = unsafe { libc::close(fd) };
        self.rec("close", rc as i64);
    }

    /// Asks whether `fd` is a terminal (the ioctl behind `isatty`, which Python's `open()`
    /// makes).
    pub fn terminal_check(&mut self, fd: i32) {
        // SAFETY: `termios` is plain data the ioctl may fill.
        let rc = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::ioctl(fd, libc::TCGETS, &mut t)
        };
        self.rec("ioctl TCGETS", rc as i64);
    }

    pub fn write(&mut self, fd: i32, data: &[u8]) {
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if let Some(n) = self.rec(&format!("write {} bytes", data.len()), n as i64) {
            self.note(format!("  wrote {n}"));
        }
    }

    pub fn pwrite(&mut self, fd: i32, data: &[u8], offset: i64) {
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), offset) };
        self.rec(
            &format!("pwrite {} bytes at {offset}", data.len()),
            n as i64,
        );
    }

    /// Reads up to `len` bytes at `offset`; records a digest of what came back.
    pub fn pread(&mut self, fd: i32, len: usize, offset: i64) {
        let mut buf = vec![0u8; len];
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, offset) };
        if let Some(n) = self.rec(&format!("pread {len} at {offset}"), n as i64) {
            buf.truncate(n as usize);
            self.note(format!("  got {} bytes {}", n, digest(&buf)));
        }
    }

    /// Records the whole content of a file.
    pub fn content(&mut self, rel: &str) {
        match std::fs::read(self.dir.join(rel)) {
            Ok(d) => self.note(format!("content {rel}: {} bytes {}", d.len(), digest(&d))),
            Err(e) => self.note(format!(
                "content {rel}: {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            )),
        }
    }

    fn stat_with(&mut self, rel: &str, follow: bool) -> Option<libc::stat> {
        let p = self.path(rel);
        // SAFETY: stat is plain data filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            if follow {
                libc::stat(p.as_ptr(), &mut st)
            } else {
                libc::lstat(p.as_ptr(), &mut st)
            }
        };
        let what = if follow { "stat" } else { "lstat" };
        self.rec(&format!("{what} {rel}"), rc as i64)?;
        let kind = kind_name(st.st_mode);
        // Directory sizes are filesystem-specific; they are not compared.
        let size = if kind == "dir" {
            String::new()
        } else {
            format!(" size={}", st.st_size)
        };
        let rdev = if matches!(kind, "chr" | "blk") {
            format!(
                " rdev={}:{}",
                libc::major(st.st_rdev),
                libc::minor(st.st_rdev)
            )
        } else {
            String::new()
        };
        self.note(format!(
            "  {kind} perm={:o}{size}{rdev} nlink={} uid={} gid={}",
            st.st_mode & 0o7777,
            st.st_nlink,
            st.st_uid,
            st.st_gid
        ));
        Some(st)
    }

    pub fn stat(&mut self, rel: &str) -> Option<libc::stat> {
        self.stat_with(rel, true)
    }

    pub fn lstat(&mut self, rel: &str) -> Option<libc::stat> {
        self.stat_with(rel, false)
    }

    pub fn mkdir(&mut self, rel: &str, mode: u32) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mkdir(p.as_ptr(), mode) };
        self.rec(&format!("mkdir {rel} {mode:o}"), rc as i64);
    }

    pub fn rmdir(&mut self, rel: &str) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::rmdir(p.as_ptr()) };
        self.rec(&format!("rmdir {rel}"), rc as i64);
    }

    pub fn unlink(&mut self, rel: &str) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::unlink(p.as_ptr()) };
        self.rec(&format!("unlink {rel}"), rc as i64);
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        let (a, b) = (self.path(from), self.path(to));
        // SAFETY: NUL-terminated paths.
        let rc = unsafe { libc::rename(a.as_ptr(), b.as_ptr()) };
        self.rec(&format!("rename {from} {to}"), rc as i64);
    }

    pub fn rename_noreplace(&mut self, from: &str, to: &str) {
        let (a, b) = (self.path(from), self.path(to));
        // SAFETY: NUL-terminated paths.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        self.rec(&format!("rename_noreplace {from} {to}"), rc as i64);
    }

    pub fn symlink(&mut self, target: &str, rel: &str) {
        let (t, p) = (CString::new(target).expect("no NUL"), self.path(rel));
        // SAFETY: NUL-terminated strings.
        let rc = unsafe { libc::symlink(t.as_ptr(), p.as_ptr()) };
        self.rec(&format!("symlink {target} {rel}"), rc as i64);
    }

    pub fn readlink(&mut self, rel: &str) {
        match std::fs::read_link(self.dir.join(rel)) {
            Ok(t) => self.note(format!("readlink {rel}: {}", t.display())),
            Err(e) => self.note(format!(
                "readlink {rel}: {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            )),
        }
    }

    pub fn link(&mut self, from: &str, to: &str) {
        let (a, b) = (self.path(from), self.path(to));
        // SAFETY: NUL-terminated paths.
        let rc = unsafe { libc::link(a.as_ptr(), b.as_ptr()) };
        self.rec(&format!("link {from} {to}"), rc as i64);
    }

    /// mknod(2) with a file type in `mode` and a device number (major, minor).
    pub fn mknod(&mut self, rel: &str, mode: u32, dev: (u32, u32)) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(dev.0, dev.1)) };
        self.rec(
            &format!(
                "mknod {rel} {} {mode:o} {}:{}",
                kind_name(mode),
                dev.0,
                dev.1
            ),
            rc as i64,
        );
    }

    pub fn mkfifo(&mut self, rel: &str, mode: u32) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mkfifo(p.as_ptr(), mode) };
        self.rec(&format!("mkfifo {rel} {mode:o}"), rc as i64);
    }

    /// Opens fifo `rel` for reading and writing without blocking, and passes bytes
    /// through it (the kernel's pipe, behind an inode of this filesystem).
    pub fn fifo_roundtrip(&mut self, rel: &str, data: &[u8]) {
        let Some(fd) = self.open(rel, libc::O_RDWR | libc::O_NONBLOCK, 0) else {
            return;
        };
        self.write(fd, data);
        let mut buf = vec![0u8; data.len() + 16];
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if let Some(n) = self.rec("read fifo", n as i64) {
            buf.truncate(n as usize);
            self.note(format!("  got {n} bytes {}", digest(&buf)));
        }
        self.close(fd);
    }

    /// Binds a Unix socket at `rel`, connects to it by that path and passes bytes from
    /// the client to the accepted connection.
    pub fn socket_roundtrip(&mut self, rel: &str, data: &[u8]) {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let path = self.dir.join(rel);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => {
                self.note(format!("bind {rel}: ok"));
                l
            }
            Err(e) => {
                let e = errno_name(e.raw_os_error().unwrap_or(0));
                return self.note(format!("bind {rel}: {e}"));
            }
        };
        let mut client = match UnixStream::connect(&path) {
            Ok(c) => {
                self.note(format!("connect {rel}: ok"));
                c
            }
            Err(e) => {
                let e = errno_name(e.raw_os_error().unwrap_or(0));
                return self.note(format!("connect {rel}: {e}"));
            }
        };
        let (mut server, _) = listener.accept().expect("accept a connected client");
        client.write_all(data).expect("write to a connected socket");
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).expect("read from a socket");
        self.note(format!(
            "  socket passed {} bytes {}",
            got.len(),
            digest(&got)
        ));
    }

    pub fn chmod(&mut self, rel: &str, mode: u32) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::chmod(p.as_ptr(), mode) };
        self.rec(&format!("chmod {rel} {mode:o}"), rc as i64);
    }

    pub fn chown(&mut self, rel: &str, uid: u32, gid: u32) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::chown(p.as_ptr(), uid, gid) };
        self.rec(&format!("chown {rel} {uid} {gid}"), rc as i64);
    }

    pub fn lchown(&mut self, rel: &str, uid: u32, gid: u32) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::lchown(p.as_ptr(), uid, gid) };
        self.rec(&format!("lchown {rel} {uid} {gid}"), rc as i64);
    }

    pub fn truncate(&mut self, rel: &str, len: i64) {
        let p = self.path(rel);
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::truncate(p.as_ptr(), len) };
        self.rec(&format!("truncate {rel} {len}"), rc as i64);
    }

    pub fn ftruncate(&mut self, fd: i32, len: i64) {
        // SAFETY: a descriptor this probe opened.
        let rc = unsafe { libc::ftruncate(fd, len) };
        self.rec(&format!("ftruncate {len}"), rc as i64);
    }

    /// fstat(2) of a descriptor: what any stat records, for a file that may have no
    /// name any more.
    pub fn fstat(&mut self, fd: i32) {
        // SAFETY: stat is plain data filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::fstat(fd, &mut st) };
        if self.rec("fstat", rc as i64).is_some() {
            self.note(format!(
                "  {} perm={:o} size={} nlink={}",
                kind_name(st.st_mode),
                st.st_mode & 0o7777,
                st.st_size,
                st.st_nlink
            ));
        }
    }

    /// stat(2) of `rel` with its exact atime and mtime (for times set explicitly).
    pub fn times(&mut self, rel: &str) {
        if let Some(st) = self.stat(rel) {
            self.note(format!(
                "  atime={}.{:09} mtime={}.{:09}",
                st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec
            ));
        }
    }

    /// fcntl(F_SETFL): a descriptor's status flags (`O_APPEND`, ...) from now on.
    pub fn set_flags(&mut self, fd: i32, flags: i32) {
        // SAFETY: a descriptor this probe opened.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        self.rec(&format!("fcntl F_SETFL {flags:#o}"), rc as i64);
    }

    pub fn fsync(&mut self, fd: i32) {
        // SAFETY: a descriptor this probe opened.
        let rc = unsafe { libc::fsync(fd) };
        self.rec("fsync", rc as i64);
    }

    /// utimensat with (seconds, nanoseconds) pairs; nanoseconds may be UTIME_NOW/OMIT.
    pub fn utimens(&mut self, rel: &str, atime: (i64, i64), mtime: (i64, i64)) {
        let p = self.path(rel);
        let ts = [
            libc::timespec {
                tv_sec: atime.0,
                tv_nsec: atime.1,
            },
            libc::timespec {
                tv_sec: mtime.0,
                tv_nsec: mtime.1,
            },
        ];
        // SAFETY: a NUL-terminated path and two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) };
        self.rec(&format!("utimensat {rel} {atime:?} {mtime:?}"), rc as i64);
    }

    /// Creates (or replaces) a file holding `data`.
    pub fn make_file(&mut self, rel: &str, data: &[u8]) {
        if let Some(fd) = self.open(rel, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644) {
            self.write(fd, data);
            self.close(fd);
        }
    }

    /// Names in a directory, sorted.
    pub fn list(&mut self, rel: &str) {
        match std::fs::read_dir(self.dir.join(rel)) {
            Ok(rd) => {
                // Each name with the type readdir gives it (d_type).
                let mut names: Vec<String> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| {
                        let kind = match e.file_type() {
                            Ok(t) if t.is_dir() => "/",
                            Ok(t) if t.is_symlink() => "@",
                            Ok(t) if t.is_fifo() => "|",
                            Ok(t) if t.is_socket() => "=",
                            Ok(t) if t.is_char_device() => "%c",
                            Ok(t) if t.is_block_device() => "%b",
                            _ => "",
                        };
                        format!("{}{kind}", e.file_name().to_string_lossy())
                    })
                    .collect();
                names.sort();
                self.note(format!("list {rel}: {names:?}"));
            }
            Err(e) => self.note(format!(
                "list {rel}: {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            )),
        }
    }
}

/// A short, stable digest of bytes (FNV-1a), enough to compare contents.
pub fn digest(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

/// Content made of a seed, so every write is distinguishable.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
