//! Mutually authenticated TLS (rustls, TLS 1.3 only) on migration connections.
//!
//! Both sides present a certificate and accept only a peer whose certificate chains to the CA
//! they were given; the source also checks the target's certificate against the host of its
//! `tcp:` URL. The handshake runs right after connect/accept, so the target reads no byte of a
//! migration stream from a source it has not authenticated.
//!
//! A migration reads replies on one thread while another writes RAM on the same connection, so
//! a [`TlsConn`] shares its rustls session between its clones: a reader waits for ciphertext on
//! the socket without holding the session, then takes it to decrypt; a writer takes it to
//! encrypt and send. (rustls's `StreamOwned` owns its socket and cannot be shared that way.)

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use api_server::migration::MigrationTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Errors setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("tls: {}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
    /// The CA file gave no usable trust anchor, or the client verifier could not be built.
    #[error("tls: {0}")]
    Verifier(String),
    /// The host of the URL is not a valid name or address for certificate checks.
    #[error("tls: {0:?} cannot be checked against a certificate")]
    ServerName(String),
    /// TLS was asked for on a connection that is not TCP.
    #[error("tls: only over tcp: connections")]
    NotTcp,
    /// The handshake failed (e.g. the peer's certificate is not from the CA, expired, or
    /// missing).
    #[error("TLS handshake with the {peer} failed: {source}")]
    Handshake {
        /// "source" or "target".
        peer: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn pem_error(path: &Path, why: impl ToString) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in it"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| pem_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The source's side: its certificate for the target, and the CA the target's must chain to.
pub fn client_config(t: &MigrationTls) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&t.ca)?)
        .with_client_auth_cert(certs(&t.cert)?, key(&t.key)?)?;
    Ok(Arc::new(config))
}

/// The target's side: its certificate, and the CA every source's certificate must chain to
/// (a source without one is refused).
pub fn server_config(t: &MigrationTls) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&t.ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&t.cert)?, key(&t.key)?)?;
    Ok(Arc::new(config))
}

/// One end of a TLS connection whose session is shared by its clones.
#[derive(Debug)]
pub struct TlsConn {
    sock: TcpStream,
    session: Arc<Mutex<Session>>,
    /// Ciphertext read from the socket, before the session takes it.
    inbuf: Box<[u8]>,
}

/// How long a failed handshake keeps reading before it closes (see [`TlsConn::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
/// One read's wait within [`LINGER`].
const LINGER_STEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Largest TLS record plus its header: one socket read never needs more.
const RECORD_BUF: usize = 16 * 1024 + 256;

impl TlsConn {
    fn new(
        sock: TcpStream,
        session: rustls::Connection,
        peer: &'static str,
    ) -> Result<Self, TlsError> {
        let mut conn = Self {
            sock,
            session: Arc::new(Mutex::new(Session {
                conn: session,
                pending: Vec::new(),
                eof: false,
                eof_fed: false,
            })),
            inbuf: vec![0; RECORD_BUF].into_boxed_slice(),
        };
        if let Err(source) = conn.handshake() {
            conn.linger();
            return Err(TlsError::Handshake { peer, source });
        }
        Ok(conn)
    }

    /// After a failed handshake: end our side, then read and drop what the peer still sends
    /// for a moment, so the socket closes with FIN rather than RST and the peer reads our alert
    /// (an RST would discard it, and the peer would only see a broken pipe).
    fn linger(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let _ = self.sock.set_read_timeout(Some(LINGER_STEP));
        let deadline = std::time::Instant::now() + LINGER;
        while std::time::Instant::now() < deadline {
            match (&self.sock).read(&mut self.inbuf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    fn handshake(&mut self) -> io::Result<()> {
        let mut s = lock(&self.session);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut self.sock)?;
        }
        // The client's last flight (its certificate, finished) may still be buffered.
        while s.conn.wants_write() {
            s.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// Open TLS as the source on `sock`, checking the target's certificate against `host`.
    pub fn client(
        sock: TcpStream,
        config: &Arc<ClientConfig>,
        host: &str,
    ) -> Result<Self, TlsError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TlsError::ServerName(host.to_string()))?;
        let session = ClientConnection::new(config.clone(), name)?;
        Self::new(sock, session.into(), "target")
    }

    /// Accept TLS as the target on `sock`: the source must present a certificate from the CA.
    pub fn server(sock: TcpStream, config: &Arc<ServerConfig>) -> Result<Self, TlsError> {
        let session = ServerConnection::new(config.clone())?;
        Self::new(sock, session.into(), "source")
    }

    /// The socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Another handle on the same connection and session.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            sock: self.sock.try_clone()?,
            session: self.session.clone(),
            inbuf: vec![0; RECORD_BUF].into_boxed_slice(),
        })
    }

    /// Send what the session has to send (records, alerts, key updates).
    fn flush_tls(s: &mut rustls::Connection, mut sock: &TcpStream) -> io::Result<()> {
        while s.wants_write() {
            s.write_tls(&mut sock)?;
        }
        Ok(())
    }
}

/// The rustls session shared by a connection's clones, and the ciphertext it has not taken yet.
#[derive(Debug)]
struct Session {
    conn: rustls::Connection,
    /// Ciphertext read from the socket that the session could not take yet: rustls holds at
    /// most about one record of decrypted data, so with plaintext waiting to be read it refuses
    /// more ("received plaintext buffer full").
    pending: Vec<u8>,
    /// The socket reached its end.
    eof: bool,
    /// The session was told so.
    eof_fed: bool,
}

impl Session {
    /// Give the session the ciphertext it takes now: all of it, unless decrypted data is
    /// waiting to be read; then, once everything went in, the end of the socket.
    fn feed(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() && self.conn.wants_read() {
            let mut data = &self.pending[..];
            let n = self.conn.read_tls(&mut data)?;
            self.pending.drain(..n);
            self.conn.process_new_packets().map_err(invalid)?;
            if n == 0 {
                break;
            }
        }
        if self.eof && self.pending.is_empty() && !self.eof_fed {
            self.conn.read_tls(&mut &[][..])?;
            self.eof_fed = true;
        }
        Ok(())
    }
}

fn lock(m: &Mutex<Session>) -> MutexGuard<'_, Session> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut s = lock(&self.session);
                s.feed()?;
                match s.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Alerts or key updates the records just read call for.
                Self::flush_tls(&mut s.conn, &self.sock)?;
                if s.eof_fed {
                    // The session reports a clean end or a truncation itself; this is a guard.
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            // Wait for ciphertext without holding the session, so writers go on meanwhile.
            let n = (&self.sock).read(&mut self.inbuf)?;
            let mut s = lock(&self.session);
            if n == 0 {
                s.eof = true;
            } else {
                s.pending.extend_from_slice(&self.inbuf[..n]);
            }
        }
    }
}

impl TlsConn {
    /// A write failed: if the peer sent an alert before it closed (e.g. it refused this side's
    /// certificate, which a TLS 1.3 client learns only after its handshake ended), report the
    /// alert instead of the bare socket error. Reads only what already arrived.
    fn explain(&self, s: &mut rustls::Connection, e: io::Error) -> io::Error {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        // SAFETY: recv writes at most `buf.len()` bytes into the local buffer; MSG_DONTWAIT
        // keeps it from blocking.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let mut data = &buf[..usize::try_from(n).unwrap_or(0)];
        while !data.is_empty() {
            if s.read_tls(&mut data).is_err() {
                break;
            }
            if let Err(alert) = s.process_new_packets() {
                return io::Error::new(
                    e.kind(),
                    format!("the peer ended the TLS session: {alert}"),
                );
            }
        }
        e
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = lock(&self.session);
        let n = s.conn.writer().write(buf)?;
        if let Err(e) = Self::flush_tls(&mut s.conn, &self.sock) {
            return Err(self.explain(&mut s.conn, e));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut s = lock(&self.session);
        s.conn.writer().flush()?;
        if let Err(e) = Self::flush_tls(&mut s.conn, &self.sock) {
            return Err(self.explain(&mut s.conn, e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    use integration::certs::{write_side, TestCa};

    /// A CA and two sides (source, target) in `dir`; `expired` makes the target's certificate
    /// expired.
    fn sides(dir: &Path, expired: bool) -> (MigrationTls, MigrationTls) {
        let ca = TestCa::new("skiff unit-test CA");
        (
            write_side(dir, "source", &ca.leaf("source", false), &ca),
            write_side(dir, "target", &ca.leaf("127.0.0.1", expired), &ca),
        )
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Connect a source and a target over loopback; the target's result comes from its thread.
    fn pair(
        src: &MigrationTls,
        dst: &MigrationTls,
    ) -> (
        Result<TlsConn, TlsError>,
        std::thread::JoinHandle<Result<TlsConn, TlsError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server_config(dst).unwrap();
        let target = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            TlsConn::server(s, &server)
        });
        let sock = TcpStream::connect(addr).unwrap();
        (
            TlsConn::client(sock, &client_config(src).unwrap(), "127.0.0.1"),
            target,
        )
    }

    #[test]
    fn data_flows_both_ways_while_a_clone_reads_replies() {
        let dir = temp("flow");
        let (src, dst) = sides(&dir, false);
        let (client, target) = pair(&src, &dst);
        let mut client = client.unwrap();
        let mut server = target.join().unwrap().unwrap();
        // The target echoes a short reply after reading everything; meanwhile the source
        // writes 8 MiB on one handle and reads the reply on a clone, as a migration does.
        let mut reply_reader = client.try_clone().unwrap();
        let replies = std::thread::spawn(move || {
            let mut r = [0u8; 5];
            reply_reader.read_exact(&mut r).map(|_| r)
        });
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expect = data.clone();
        let echo = std::thread::spawn(move || {
            let mut got = vec![0u8; expect.len()];
            server.read_exact(&mut got).unwrap();
            assert!(got == expect, "the target read other bytes than were sent");
            server.write_all(b"DONE!").unwrap();
            server.flush().unwrap();
        });
        client.write_all(&data).unwrap();
        client.flush().unwrap();
        echo.join().unwrap();
        assert_eq!(&replies.join().unwrap().unwrap(), b"DONE!");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A reader taking a few bytes at a time, falling behind now and then, while the writer
    /// sends frame-shaped writes: every byte arrives in order. (This did not reproduce the
    /// "received plaintext buffer full" failure of a real migration; `migration_tls.rs`, with
    /// 64 MiB of guest RAM, does.)
    #[test]
    fn small_reads_of_a_large_stream_get_every_byte() {
        let dir = temp("small-reads");
        let (src, dst) = sides(&dir, false);
        let (client, target) = pair(&src, &dst);
        let mut client = client.unwrap();
        let mut server = target.join().unwrap().unwrap();
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 253) as u8).collect();
        let expect = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(expect.len());
            let mut piece = [0u8; 7];
            while got.len() < expect.len() {
                // Fall behind now and then, so the socket holds more than a record for the
                // next read (as when a migration target is busy applying RAM).
                if got.len() % (256 << 10) < piece.len() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let want = piece.len().min(expect.len() - got.len());
                server.read_exact(&mut piece[..want]).unwrap();
                got.extend_from_slice(&piece[..want]);
            }
            assert!(got == expect, "the target read other bytes than were sent");
        });
        // Writes shaped like migration frames (header, payload, CRC): each write becomes its
        // own records, so one socket read can complete several of them.
        let mut rest = &data[..];
        for size in [5usize, 20_000, 4].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = (*size).min(rest.len());
            client.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
        client.flush().unwrap();
        reader.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_expired_target_certificate_is_refused_by_the_source() {
        let dir = temp("expired");
        let (src, dst) = sides(&dir, true);
        let (client, target) = pair(&src, &dst);
        let e = client.unwrap_err().to_string();
        assert!(e.contains("TLS handshake with the target failed"), "{e}");
        assert!(e.to_lowercase().contains("expired"), "{e}");
        assert!(target.join().unwrap().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_source_from_another_ca_is_refused_by_the_target() {
        let dir = temp("foreign");
        let (_, dst) = sides(&dir, false);
        let other = temp("foreign-ca");
        let (foreign_src, _) = sides(&other, false);
        // The foreign source trusts the target's CA, so only the target can refuse it.
        let src = MigrationTls {
            ca: dst.ca.clone(),
            ..foreign_src
        };
        let (_client, target) = pair(&src, &dst);
        let e = target.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("TLS handshake with the source failed"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    }

    #[test]
    fn unreadable_pem_files_are_named() {
        let t = MigrationTls {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        };
        let e = client_config(&t).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/"), "{e}");
    }
}
