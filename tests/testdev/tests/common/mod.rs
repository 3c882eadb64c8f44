//! A fake vfio-user client built from the spec's byte layouts (QEMU docs/interop/vfio-user.rst):
//! every message is assembled here by hand, byte offset by byte offset, without the device's
//! own encoders, so that a layout bug cannot hide in both ends.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testdev::regs::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// Command numbers from the spec's table.
pub const CMD_VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const GET_REGION_INFO: u16 = 5;
pub const GET_IRQ_INFO: u16 = 7;
pub const SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const DMA_READ: u16 = 11;
pub const DMA_WRITE: u16 = 12;
pub const RESET: u16 = 13;
pub const DEVICE_FEATURE: u16 = 16;
pub const MIG_DATA_READ: u16 = 17;
pub const MIG_DATA_WRITE: u16 = 18;
pub const CONFIG: u32 = 7;

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Concatenates little-endian fields given as (value, width in bytes).
pub fn fields(f: &[(u64, usize)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(x, w) in f {
        v.extend_from_slice(&x.to_le_bytes()[..w]);
    }
    v
}

/// A whole message: 16-byte header (id @0 u16, command @2 u16, size @4 u32, flags @8 u32,
/// error @12 u32) then the payload.
pub fn message(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = fields(&[
        (id as u64, 2),
        (cmd as u64, 2),
        (16 + payload.len() as u64, 4),
        (flags as u64, 4),
        (0, 4),
    ]);
    v.extend_from_slice(payload);
    v
}

#[derive(Debug)]
pub struct Msg {
    pub id: u16,
    pub cmd: u16,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

impl Msg {
    pub fn is_error(&self) -> bool {
        self.flags & 0x20 != 0
    }
    pub fn ok(self) -> Msg {
        assert!(
            !self.is_error(),
            "command {} failed with errno {}",
            self.cmd,
            self.error
        );
        assert_eq!(self.flags & 0xf, 1, "a reply");
        self
    }
    pub fn errno(&self) -> u32 {
        assert!(
            self.is_error(),
            "command {} unexpectedly succeeded",
            self.cmd
        );
        self.error
    }
}

pub struct Client {
    pub sock: UnixStream,
    next_id: u16,
    pub server: Option<JoinHandle<Result<(), testdev::Error>>>,
    /// Server requests (DMA_READ/DMA_WRITE) that arrived while waiting for a reply.
    pub requests: VecDeque<Msg>,
}

impl Client {
    /// A server on one end of a socket pair, running in a thread.
    pub fn start() -> Client {
        Client::start_with(false)
    }

    /// [`Client::start`], the device with an MSI capability when `msi` (`--msi`).
    pub fn start_with(msi: bool) -> Client {
        Client::start_opts(testdev::Options {
            msi,
            ..test_options()
        })
    }

    /// A server with `opts`, on one end of a Unix socket pair.
    pub fn start_opts(opts: testdev::Options) -> Client {
        let _ = env_logger::builder().is_test(true).try_init();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let server = std::thread::spawn(move || testdev::serve(b, &opts));
        Client {
            sock: a,
            next_id: 100,
            server: Some(server),
            requests: VecDeque::new(),
        }
    }

    /// A client of a server elsewhere (a `skiff-testdev` process) on `sock`; `finish` is
    /// not for it (no server thread to join).
    pub fn over(sock: UnixStream) -> Client {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            sock,
            next_id: 100,
            server: None,
            requests: VecDeque::new(),
        }
    }

    /// [`Client::start_opts`], then VERSION.
    pub fn negotiated_opts(opts: testdev::Options) -> Client {
        let mut c = Client::start_opts(opts);
        c.version(r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096}}"#);
        c
    }

    pub fn negotiated() -> Client {
        Client::negotiated_with(false)
    }

    /// [`Client::negotiated`] with the device's MSI capability on or off.
    pub fn negotiated_with(msi: bool) -> Client {
        let mut c = Client::start_with(msi);
        c.version(r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096}}"#);
        c
    }

    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            (&self.sock).write_all(bytes).unwrap();
        } else {
            let n = self.sock.send_with_fds(&[bytes], fds).unwrap();
            (&self.sock).write_all(&bytes[n..]).unwrap();
        }
    }

    /// Receives one message; None on EOF.
    pub fn recv(&mut self) -> Option<Msg> {
        let mut h = [0u8; 16];
        let mut fds = [-1; 8];
        let mut iov = [libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: 16,
        }];
        // SAFETY: the iovec points at `h`, 16 writable bytes.
        let (n, nfds) =
            unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }.expect("recv (timed out?)");
        // SAFETY: the fds were just received and are ours.
        let fds: Vec<File> = fds[..nfds]
            .iter()
            .map(|&f| unsafe { File::from_raw_fd(f) })
            .collect();
        if n == 0 {
            return None;
        }
        (&self.sock).read_exact(&mut h[n..]).unwrap();
        let size = le32(&h, 4) as usize;
        assert!(size >= 16);
        let mut payload = vec![0u8; size - 16];
        (&self.sock).read_exact(&mut payload).unwrap();
        Some(Msg {
            id: le16(&h, 0),
            cmd: le16(&h, 2),
            flags: le32(&h, 8),
            error: le32(&h, 12),
            payload,
            fds,
        })
    }

    /// Sends a command and returns its reply; server requests arriving meanwhile are queued.
    pub fn call_fds(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Msg {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.send_raw(&message(id, cmd, 0, payload), fds);
        self.reply_to(id, cmd)
    }

    pub fn reply_to(&mut self, id: u16, cmd: u16) -> Msg {
        loop {
            let m = self.recv().expect("server closed the connection");
            if m.flags & 0xf == 0 {
                self.requests.push_back(m);
                continue;
            }
            assert_eq!((m.id, m.cmd), (id, cmd), "reply matches the request");
            return m;
        }
    }

    pub fn call(&mut self, cmd: u16, payload: &[u8]) -> Msg {
        self.call_fds(cmd, payload, &[])
    }

    pub fn version(&mut self, json: &str) -> Msg {
        let mut p = fields(&[(0, 2), (1, 2)]);
        p.extend_from_slice(json.as_bytes());
        p.push(0);
        self.call(CMD_VERSION, &p).ok()
    }

    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
        let m = self.call(
            REGION_READ,
            &fields(&[(offset, 8), (region as u64, 4), (count as u64, 4)]),
        );
        if m.is_error() {
            return Err(m.error);
        }
        let m = m.ok();
        check_access(&m, offset, region, count);
        assert_eq!(m.payload.len(), 16 + count as usize);
        Ok(m.payload[16..].to_vec())
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), u32> {
        let mut p = fields(&[(offset, 8), (region as u64, 4), (data.len() as u64, 4)]);
        p.extend_from_slice(data);
        let m = self.call(REGION_WRITE, &p);
        if m.is_error() {
            return Err(m.error);
        }
        check_access(&m.ok(), offset, region, data.len() as u32);
        Ok(())
    }

    pub fn reg(&mut self, off: u64) -> u32 {
        le32(&self.region_read(0, off, 4).unwrap(), 0)
    }

    pub fn set_reg(&mut self, off: u64, v: u32) {
        self.region_write(0, off, &v.to_le_bytes()).unwrap();
    }

    /// Writes the command parameters and rings the doorbell.
    pub fn command(&mut self, code: u32, addr: u64, addr2: u64, len: u32, seed: u32) {
        // One 8-byte write covers a LO/HI pair.
        self.region_write(0, REG_ADDR_LO, &addr.to_le_bytes())
            .unwrap();
        self.region_write(0, REG_ADDR2_LO, &addr2.to_le_bytes())
            .unwrap();
        self.set_reg(REG_LEN, len);
        self.set_reg(REG_SEED, seed);
        self.set_reg(REG_DOORBELL, code);
    }

    /// Waits until COMPLETED + FAILED reaches `n` (bounded).
    pub fn wait_done(&mut self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.reg(REG_COMPLETED) + self.reg(REG_FAILED) < n {
            assert!(Instant::now() < deadline, "command did not finish");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Maps `size` bytes at `iova`, with `fd` (offset 0) or without.
    pub fn dma_map(&mut self, iova: u64, size: u64, fd: Option<RawFd>) -> Msg {
        let p = fields(&[(32, 4), (3, 4), (0, 8), (iova, 8), (size, 8)]);
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.call_fds(DMA_MAP, &p, &fds)
    }

    /// Waits for the next server request (DMA_READ/DMA_WRITE).
    pub fn next_request(&mut self) -> Msg {
        if let Some(m) = self.requests.pop_front() {
            return m;
        }
        let m = self.recv().expect("server closed the connection");
        assert_eq!(m.flags & 0xf, 0, "a command from the server, got {m:?}");
        m
    }

    /// Replies to a server request with `payload` (or an error when `errno` is set).
    pub fn answer(&self, req: &Msg, payload: &[u8], errno: Option<u32>) {
        let mut m = message(req.id, req.cmd, 1, payload);
        if let Some(e) = errno {
            m = message(req.id, req.cmd, 1 | 0x20, &[]);
            m[12..16].copy_from_slice(&e.to_le_bytes());
        }
        self.send_raw(&m, &[]);
    }

    /// Closes the connection and returns what the server returned.
    pub fn finish(mut self) -> Result<(), testdev::Error> {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let h = self.server.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "server did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().expect("server thread panicked")
    }
}

/// The options the tests use unless they say otherwise (the binary's defaults, a shorter DMA
/// timeout).
pub fn test_options() -> testdev::Options {
    testdev::Options {
        id: "test".into(),
        dma_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

/// A region access reply starts with offset @0 u64, region @8 u32, count @12 u32.
fn check_access(m: &Msg, offset: u64, region: u32, count: u32) {
    let p = &m.payload;
    assert_eq!(
        (le64(p, 0), le32(p, 8), le32(p, 12)),
        (offset, region, count)
    );
}

/// A memfd of `size` bytes, as guest RAM.
pub fn memfd(size: u64) -> File {
    let fd = testdev::mem::memfd("fake-ram", size).unwrap();
    File::from(fd)
}

pub fn read_at(f: &File, off: u64, n: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; n];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

pub fn write_at(f: &File, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    f.write_all_at(data, off).unwrap();
}

/// Whether `fd` becomes readable within `ms`; consumes the eventfd count.
pub fn fired(fd: &impl AsRawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n == 1 {
        let mut b = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into a live buffer.
        unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        true
    } else {
        false
    }
}

pub fn pattern(seed: u32, len: u32) -> Vec<u8> {
    (0..len).map(|i| pattern_byte(seed, i)).collect()
}
