//! Migration transport: one or more byte streams between source and target, over TCP
//! (`tcp:HOST:PORT`) or a Unix socket (`unix:PATH`).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api_server::migration::MigrationUrl;

/// How long a connection attempt or an accept may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that sends or takes nothing for this long is considered gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A bandwidth limit shared by every connection of a migration (a token bucket refilled at
/// `bytes_per_s`, holding at most 100 ms worth).
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: u64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A limit of `bytes_per_s`.
    pub fn new(bytes_per_s: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            bytes_per_s: bytes_per_s.max(1),
            state: std::sync::Mutex::new((0.0, Instant::now())),
        })
    }

    /// Wait until `n` bytes may go.
    fn take(&self, n: usize) {
        let rate = self.bytes_per_s as f64;
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(st.1).as_secs_f64() * rate;
            st.0 = (st.0 + refill).min(rate / 10.0) - n as f64;
            st.1 = now;
            if st.0 < 0.0 {
                Duration::from_secs_f64(-st.0 / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// One migration connection.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
    /// A connection whose writes are paced by a shared bandwidth limit.
    Limited(Box<Conn>, std::sync::Arc<RateLimit>),
    /// A connection whose first bytes were already read (they are read again first).
    Prefixed(std::io::Cursor<Vec<u8>>, Box<Conn>),
    /// TLS over TCP (`tls` in the request).
    Tls(Box<super::tls::TlsConn>),
}

/// The byte a local-migration source sends with the guest-RAM memfd (a migration stream starts
/// with its magic, `S`, instead).
pub const MEMFD_MARKER: u8 = b'F';

impl Conn {
    /// Another handle on the same connection (to read replies while writing).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Limited(c, l) => Conn::Limited(Box::new(c.try_clone()?), l.clone()),
            Conn::Prefixed(p, c) => Conn::Prefixed(p.clone(), Box::new(c.try_clone()?)),
            Conn::Tls(t) => Conn::Tls(Box::new(t.try_clone()?)),
        })
    }

    /// Whether what the peer sent so far starts with a TLS record (a plain TCP connection to
    /// a peer that expects TLS); looks without waiting or consuming anything.
    pub fn answered_with_tls(&self) -> bool {
        let fd = match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Limited(c, _) => return c.answered_with_tls(),
            _ => return false,
        };
        let mut head = [0u8; 3];
        // SAFETY: recv writes at most 3 bytes into `head`; MSG_PEEK leaves them queued and
        // MSG_DONTWAIT keeps it from blocking.
        let n = unsafe {
            libc::recv(
                fd,
                head.as_mut_ptr().cast(),
                head.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 3 && migration::stream::starts_tls_record(&head)
    }

    /// Whether the peer sent something more or went away (closed, reset) — looks at the socket
    /// without waiting or consuming anything.
    pub fn peer_spoke(&self) -> bool {
        let fd = match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tls(t) => t.socket().as_raw_fd(),
            // The socket only: a clone's copy of the prefix says nothing about the peer.
            Conn::Limited(c, _) | Conn::Prefixed(_, c) => return c.peer_spoke(),
        };
        let mut byte = [0u8; 1];
        // SAFETY: recv writes at most 1 byte into `byte`; MSG_PEEK leaves it queued and
        // MSG_DONTWAIT keeps it from blocking.
        let n = unsafe {
            libc::recv(
                fd,
                byte.as_mut_ptr().cast(),
                byte.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n >= 0 || std::io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
    }

    /// Pace this connection's writes with `limit`.
    pub fn limited(self, limit: &std::sync::Arc<RateLimit>) -> Self {
        Conn::Limited(Box::new(self), limit.clone())
    }

    /// Bound every read and write by `timeout`.
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Conn::Tls(t) => {
                t.socket().set_read_timeout(timeout)?;
                t.socket().set_write_timeout(timeout)
            }
            Conn::Limited(c, _) | Conn::Prefixed(_, c) => c.set_timeouts(timeout),
        }
    }

    /// Bound reads only (`None`: wait as long as it takes).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(timeout),
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tls(t) => t.socket().set_read_timeout(timeout),
            Conn::Limited(c, _) | Conn::Prefixed(_, c) => c.set_read_timeout(timeout),
        }
    }

    /// Shut both directions down (unblocks a thread reading or writing it).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tls(t) => t.socket().shutdown(std::net::Shutdown::Both),
            Conn::Limited(c, _) | Conn::Prefixed(_, c) => {
                c.shutdown();
                Ok(())
            }
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
            Conn::Limited(c, _) => c.read(buf),
            Conn::Prefixed(p, c) => {
                let n = p.read(buf)?;
                if n > 0 {
                    Ok(n)
                } else {
                    c.read(buf)
                }
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
            Conn::Limited(c, limit) => {
                // At most 64 KiB at a time, so the pacing stays smooth.
                let n = buf.len().min(64 << 10);
                limit.take(n);
                c.write(&buf[..n])
            }
            Conn::Prefixed(_, c) => c.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
            Conn::Limited(c, _) | Conn::Prefixed(_, c) => c.flush(),
        }
    }
}

/// Open `n` connections to `url`, each retried until [`CONNECT_TIMEOUT`].
pub fn connect(url: &MigrationUrl, n: usize) -> io::Result<Vec<Conn>> {
    (0..n).map(|_| connect_one(url)).collect()
}

/// Seconds of silence before a TCP keepalive probe, and between probes.
const KEEPALIVE_S: libc::c_int = 5;

/// Set `level`/`name` to `value` on `s` (a failure is logged: the connection works without it).
fn set_int_option(s: &TcpStream, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `s` is an open socket; the option value is a c_int that lives through the call and
    // whose size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        log::debug!(
            "migration: setsockopt({level}, {name}) failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// No Nagle delay; and a dead peer or a cut link ends the connection within [`IO_TIMEOUT`] in
/// every phase — also while one side only waits for the other's answer (keepalive probes) and
/// while data sits unacknowledged (TCP_USER_TIMEOUT), where a read would wait forever and the
/// kernel would retransmit for many minutes.
fn tune_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    set_int_option(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_int_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_S);
    set_int_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_S);
    let user_timeout_ms = IO_TIMEOUT.as_millis() as libc::c_int;
    set_int_option(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        user_timeout_ms,
    );
}

fn connect_one(url: &MigrationUrl) -> io::Result<Conn> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let attempt = match url {
            MigrationUrl::Tcp { host, port } => {
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"))
                    })?;
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map(|s| {
                    tune_tcp(&s);
                    Conn::Tcp(s)
                })
            }
            MigrationUrl::Unix { path } => UnixStream::connect(path).map(Conn::Unix),
        };
        match attempt {
            Ok(c) => {
                c.set_timeouts(Some(IO_TIMEOUT))?;
                return Ok(c);
            }
            // The target may not be listening yet; a refused or missing socket is retried.
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A listening migration endpoint on the target.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket (its file is removed when the listener is dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listen on `url` (a stale Unix socket file is replaced).
    pub fn bind(url: &MigrationUrl) -> io::Result<Self> {
        Ok(match url {
            MigrationUrl::Tcp { host, port } => {
                Listener::Tcp(TcpListener::bind((host.as_str(), *port))?)
            }
            MigrationUrl::Unix { path } => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
        })
    }

    /// Accept one connection, waiting at most `timeout`.
    pub fn accept(&self, timeout: Duration) -> io::Result<Conn> {
        let fd = match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        };
        wait_readable(fd, timeout)?;
        let conn = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                tune_tcp(&s);
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
        };
        conn.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(conn)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Wait until `fd` is readable, at most `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; one entry.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no migration source connected in time",
        )),
        _ => Ok(()),
    }
}

/// Hand `memfd` (the guest RAM) to the target at `url` (a Unix socket) on a connection of its
/// own, before the migration stream.
pub fn send_memfd(url: &MigrationUrl, memfd: BorrowedFd<'_>) -> io::Result<()> {
    match connect_one(url)? {
        Conn::Unix(s) => pci::vfio::user::sock::send_all(&s, &[MEMFD_MARKER], &[memfd]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "local=on needs a unix: URL",
        )),
    }
}

/// The first connection's first byte, on a Unix socket: the guest-RAM memfd of a local
/// migration (then the migration stream comes on the next connection), or the start of the
/// stream (given back, untouched).
pub enum FirstContact {
    /// A local migration's guest RAM.
    Memfd(std::fs::File),
    /// The migration stream.
    Stream(Conn),
}

/// Look at `conn`'s first byte (see [`FirstContact`]).
pub fn first_contact(conn: Conn) -> io::Result<FirstContact> {
    let Conn::Unix(s) = conn else {
        return Ok(FirstContact::Stream(conn));
    };
    let mut byte = [0u8; 1];
    let mut fds = Vec::new();
    use pci::vfio::user::sock::{recv_exact, RecvError};
    recv_exact(&s, &mut byte, &mut fds, 1).map_err(|e| match e {
        RecvError::Io(e) => e,
        RecvError::Eof { .. } => io::Error::from(io::ErrorKind::UnexpectedEof),
        RecvError::TooManyFds => io::Error::new(
            io::ErrorKind::InvalidData,
            "more than one file came with the memfd",
        ),
    })?;
    if byte[0] == MEMFD_MARKER {
        let fd = fds.pop().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "a memfd marker without a file")
        })?;
        return Ok(FirstContact::Memfd(std::fs::File::from(fd)));
    }
    Ok(FirstContact::Stream(Conn::Prefixed(
        std::io::Cursor::new(byte.to_vec()),
        Box::new(Conn::Unix(s)),
    )))
}

/// Wrap `conn` (TCP) in TLS as the source, checking the target's certificate against `host`.
pub fn tls_client(
    conn: Conn,
    config: &std::sync::Arc<rustls::ClientConfig>,
    host: &str,
) -> Result<Conn, super::tls::TlsError> {
    match conn {
        Conn::Tcp(s) => Ok(Conn::Tls(Box::new(super::tls::TlsConn::client(
            s, config, host,
        )?))),
        _ => Err(super::tls::TlsError::NotTcp),
    }
}

/// Wrap an accepted `conn` (TCP) in TLS as the target.
pub fn tls_server(
    conn: Conn,
    config: &std::sync::Arc<rustls::ServerConfig>,
) -> Result<Conn, super::tls::TlsError> {
    match conn {
        Conn::Tcp(s) => Ok(Conn::Tls(Box::new(super::tls::TlsConn::server(s, config)?))),
        _ => Err(super::tls::TlsError::NotTcp),
    }
}

/// Warn when `url` sends a VM in the clear to another host (plain TCP, not loopback).
pub fn warn_if_plain_remote(url: &MigrationUrl, tls: bool, role: &str) {
    let MigrationUrl::Tcp { host, .. } = url else {
        return;
    };
    if tls {
        return;
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !loopback {
        log::warn!(
            "{role} migration over plain TCP ({url}): the VM's memory and state cross the network \
             unencrypted and unauthenticated; pass tls with a certificate, key and CA"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_spoke_sees_data_and_a_closed_peer_without_consuming() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let conn = Conn::Unix(a);
        assert!(!conn.peer_spoke());
        b.write_all(b"x").unwrap();
        assert!(conn.peer_spoke());
        // Still there to read.
        let mut got = [0u8; 1];
        conn.try_clone().unwrap().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        assert!(!conn.peer_spoke());
        drop(b);
        assert!(conn.peer_spoke());
        // Through the wrappers, a prefix a clone carries does not count.
        let (a, _b) = UnixStream::pair().unwrap();
        let prefixed = Conn::Prefixed(
            std::io::Cursor::new(b"SK".to_vec()),
            Box::new(Conn::Unix(a)),
        );
        assert!(!prefixed.peer_spoke());
    }
}
