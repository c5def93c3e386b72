//! Handing an open file to a process on the same machine over a Unix socket
//! (SCM_RIGHTS): a co-located client then writes an upload's bytes straight into the
//! worker's file instead of streaming them through a socket.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Room for one `cmsghdr` carrying one descriptor, aligned as the kernel wants it.
type Control = [u64; 4];

/// Sends one byte carrying a duplicate of `file`'s descriptor.
pub fn send_file(sock: &UnixStream, file: &File) -> io::Result<()> {
    let mut byte = [1u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control: Control = [0; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call,
    // and the control buffer has room for CMSG_SPACE(one int) (checked by the assert).
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize;
        assert!(space <= size_of::<Control>());
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            file.as_raw_fd(),
        );
        loop {
            let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            if n == 1 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(if n < 0 {
                e
            } else {
                io::Error::new(io::ErrorKind::WriteZero, "descriptor not sent")
            });
        }
    }
}

/// Receives the byte [`send_file`] sends and the descriptor it carries.
pub fn recv_file(sock: &UnixStream) -> io::Result<File> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control: Control = [0; 4];
    // SAFETY: as in send_file; the descriptor read from the control message is a fresh
    // one the kernel installed for this process, so taking ownership of it is sound.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<Control>() as _;
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break n;
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || cmsg.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no descriptor received",
            ));
        }
        if (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected control message",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        Ok(File::from(OwnedFd::from_raw_fd(fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_passed_descriptor_reaches_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut original = tempfile::tempfile().unwrap();
        send_file(&a, &original).unwrap();
        let mut received = recv_file(&b).unwrap();
        received.write_all(b"through the copy").unwrap();
        original.rewind().unwrap();
        let mut s = String::new();
        original.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the copy");
        drop(a);
        assert_eq!(
            recv_file(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
