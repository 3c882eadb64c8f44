//! Message framing on the Unix stream socket: one header + payload per message, file
//! descriptors as SCM_RIGHTS on the header's bytes.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::proto::{Header, FLAG_ERROR, FLAG_TYPE_REPLY, HEADER_SIZE, MAX_MSG_SIZE};
use crate::Error;

/// Fds we can receive with one header without the kernel truncating: more than we accept
/// (`MAX_MSG_FDS`), so that a client sending a few too many gets an error reply instead of
/// a lost message.
const FD_SLOTS: usize = 64;

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// Everything after the header.
    pub payload: Vec<u8>,
    /// Received file descriptors (closed on drop unless taken).
    pub fds: Vec<OwnedFd>,
}

/// Receives one message. `Ok(None)`: the client closed the connection between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, Error> {
    let mut hdr = [0u8; HEADER_SIZE];
    let mut raw_fds = [-1 as RawFd; FD_SLOTS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    }];
    // SAFETY: the iovec points at `hdr`, a live buffer of HEADER_SIZE bytes that recvmsg may
    // fill with arbitrary bytes.
    let res = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) };
    let (n, nfds) = match res {
        Ok(v) => v,
        Err(e) if e.errno() == libc::ENOBUFS => return Err(Error::TooManyFds),
        // A client that exits with our last reply unread resets the connection: between two
        // messages that is still a disconnect, not a protocol error.
        Err(e) if e.errno() == libc::ECONNRESET => return Ok(None),
        Err(e) => return Err(Error::Io(io::Error::from_raw_os_error(e.errno()))),
    };
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in our table; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    read_full(sock, &mut hdr[n..])?;
    let header = Header::parse(&hdr);
    let size = header.msg_size as usize;
    if !(HEADER_SIZE..=MAX_MSG_SIZE).contains(&size) {
        return Err(Error::MessageSize { header });
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    read_full(sock, &mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn read_full(mut sock: &UnixStream, buf: &mut [u8]) -> Result<(), Error> {
    match sock.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Truncated),
        Err(e) => Err(Error::Io(e)),
    }
}

/// The sending half, shared by the socket thread (replies) and the device thread (DMA requests):
/// each message goes out whole under the lock.
#[derive(Debug)]
pub struct Writer {
    sock: Mutex<UnixStream>,
}

impl Writer {
    /// Wraps a clone of the connection.
    pub fn new(sock: UnixStream) -> Writer {
        Writer {
            sock: Mutex::new(sock),
        }
    }

    /// Sends header + payload, with `fds` attached to the first bytes.
    pub fn send(&self, header: Header, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
        buf.extend_from_slice(&header.encode());
        buf.extend_from_slice(payload);
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        if !fds.is_empty() {
            sent = sock
                .send_with_fds(&[&buf[..]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        (&*sock).write_all(&buf[sent..])
    }

    /// Sends a reply to `req` (same id and command).
    pub fn reply(&self, req: &Header, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let h = Header {
            msg_id: req.msg_id,
            command: req.command,
            msg_size: (HEADER_SIZE + payload.len()) as u32,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        };
        self.send(h, payload, fds)
    }

    /// Sends an error reply (header only, as the spec requires).
    pub fn reply_error(&self, req: &Header, errno: i32) -> io::Result<()> {
        let h = Header {
            msg_id: req.msg_id,
            command: req.command,
            msg_size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        };
        self.send(h, &[], &[])
    }
}
