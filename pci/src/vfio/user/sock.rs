//! Unix socket plumbing for vfio-user: connect with a timeout, send and receive bytes with file
//! descriptors (SCM_RIGHTS) through `sendmsg`/`recvmsg`.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a receive stopped.
#[derive(Debug)]
pub enum RecvError {
    /// The peer closed the connection after `got` bytes of what was asked.
    Eof {
        /// Bytes received before the end.
        got: usize,
    },
    /// More file descriptors came than allowed (the extra ones are closed).
    TooManyFds,
    /// The socket failed.
    Io(io::Error),
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long or has a NUL", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

/// Connect to the Unix socket at `path`, giving up after `timeout` (a server whose listen
/// backlog is full makes a blocking connect wait forever; this one retries until the deadline).
pub fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let addr = sockaddr(path)?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        let err = io::Error::last_os_error();
        let retry = matches!(
            err.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS)
        );
        if r == 0 || err.raw_os_error() == Some(libc::EISCONN) {
            let s = UnixStream::from(fd);
            s.set_nonblocking(false)?;
            return Ok(s);
        }
        if !retry {
            return Err(err);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {} timed out", path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send all of `bytes`, with `fds` attached to the first `sendmsg` (SIGPIPE suppressed).
pub fn send_all(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    let mut first = true;
    while sent < bytes.len() || first {
        let n = send_once(sock, &bytes[sent..], if first { &raw } else { &[] })?;
        first = false;
        if n == 0 && sent < bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket took no bytes",
            ));
        }
        sent += n;
    }
    Ok(())
}

fn send_once(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if fds.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(fd_bytes as u32) as usize }
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes, enough for one cmsghdr carrying
        // `fds.len()` descriptors; CMSG_FIRSTHDR is non-null for such a buffer, and the copy
        // writes fd_bytes into CMSG_DATA which CMSG_SPACE accounted for.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: `msg` points to a live iovec over `bytes` and a live control buffer.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` into `buf`; received descriptors are appended to `fds` (close-on-exec).
/// Returns the byte count (0: end of stream). Fails with `TooManyFds` when `fds` would exceed
/// `max_fds` or the kernel truncated the control data.
fn recv_once(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> Result<usize, RecvError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let max_bytes = (max_fds.max(1) * mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(max_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points to a live iovec over `buf` and a live control buffer of `space`.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(RecvError::Io(e));
        }
    };
    let mut too_many = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk it within
    // those bounds. Each SCM_RIGHTS payload is an array of descriptors now owned by this
    // process, read unaligned and wrapped in OwnedFd exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / mem::size_of::<RawFd>() {
                    let p = data.add(i * mem::size_of::<RawFd>()) as *const RawFd;
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if fds.len() > max_fds {
        too_many = true;
    }
    if too_many {
        fds.clear();
        return Err(RecvError::TooManyFds);
    }
    Ok(n)
}

/// Fill `buf` completely, collecting at most `max_fds` descriptors in `fds`.
pub fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> Result<(), RecvError> {
    let mut got = 0;
    while got < buf.len() {
        match recv_once(sock, &mut buf[got..], fds, max_fds)? {
            0 => return Err(RecvError::Eof { got }),
            n => got += n,
        }
    }
    Ok(())
}
