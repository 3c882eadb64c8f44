//! A vfio-user connection: version negotiation, requests matched to replies by message id, and
//! the server's own requests (DMA_READ / DMA_WRITE) served while requests are in flight.
//!
//! Threads: one reader per connection reads every message. Replies wake the request waiting
//! for their id (a condvar, with a deadline). Server commands go to a DMA worker thread through a
//! bounded queue, so a `DmaHandler` that itself waits on this connection (a DMA into one of the
//! device's own BARs) cannot block the reader. This is why twin-socket mode is not needed: one
//! socket is demultiplexed by the reader, and we never offer `twin_socket`.
//!
//! Failure is final: a closed socket, a malformed message, too many fds or a request left
//! unanswered past its timeout fails every pending and future request, shuts the socket down
//! and calls the failure hook once.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{
    Capabilities, Command, DmaAccess, Header, Version, WireError, DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE, MAX_MSG_FDS, VERSION_MAJOR, VERSION_MINOR,
};
use super::sock::{self, RecvError};
use crate::vfio::{DmaHandler, VfioError};

/// Server commands queued for the DMA worker before the reader answers EAGAIN.
const DMA_QUEUE_DEPTH: usize = 32;

/// Failure hook type.
pub type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// How long a request waits for its reply before the connection is declared dead.
    pub timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// Our `max_data_xfer_size`: the largest DMA_READ/DMA_WRITE we serve, and the chunk size
    /// of region accesses (together with the server's).
    pub max_data_xfer_size: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
        }
    }
}

impl ClientOptions {
    /// The largest message we accept: a full data transfer plus its headers.
    pub fn max_msg_size(&self) -> usize {
        self.max_data_xfer_size as usize + 4096
    }
}

/// A reply: its header, payload and the descriptors that came with it (closed when dropped).
#[derive(Debug)]
pub struct Reply {
    /// The header.
    pub header: Header,
    /// The payload after the header.
    pub payload: Vec<u8>,
    /// Descriptors passed with it.
    pub fds: Vec<OwnedFd>,
}

/// Why the connection is gone.
#[derive(Debug, Clone)]
enum Failure {
    Transport(io::ErrorKind, String),
    Protocol(String),
    Closed,
}

impl Failure {
    fn to_error(&self, what: &'static str) -> VfioError {
        match self {
            Failure::Transport(kind, msg) => VfioError::Transport {
                what,
                source: io::Error::new(*kind, msg.clone()),
            },
            Failure::Protocol(reason) => VfioError::Protocol {
                what,
                reason: reason.clone(),
            },
            Failure::Closed => VfioError::Transport {
                what,
                source: io::Error::new(io::ErrorKind::NotConnected, "connection closed"),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Transport(_, m) => m.clone(),
            Failure::Protocol(r) => format!("protocol error: {r}"),
            Failure::Closed => "connection closed".into(),
        }
    }
}

fn protocol(e: WireError) -> Failure {
    Failure::Protocol(e.to_string())
}

struct Pending {
    command: u16,
    reply: Option<Reply>,
}

struct State {
    pending: HashMap<u16, Pending>,
    failure: Option<Failure>,
    /// `fail` is running (the hook is being called).
    failing: bool,
    next_id: u16,
    /// Server DMA requests read off the socket, and those answered (served or refused).
    dma_received: u64,
    dma_done: u64,
}

#[derive(Default)]
struct HookState {
    hook: Option<FailureHook>,
    reason: Option<String>,
}

struct Shared {
    sock: UnixStream,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    cond: Condvar,
    dma_handler: RwLock<Option<Arc<dyn DmaHandler>>>,
    hook: Mutex<HookState>,
    options: ClientOptions,
}

/// Lock ignoring poisoning: the protected data stays consistent at every unlock point, and a
/// panicking handler thread must not take the connection down with a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A received message.
struct RawMessage {
    header: Header,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Shared {
    /// Mark the connection failed (first failure wins), wake every waiter, shut the socket and
    /// call the failure hook once (not for an intentional close).
    ///
    /// The hook runs before waiting requests see the failure, so a caller that got the error
    /// knows the hook has run. Requests issued meanwhile find the socket shut down.
    fn fail(&self, f: Failure) {
        {
            let mut st = lock(&self.state);
            if st.failure.is_some() || st.failing {
                return;
            }
            st.failing = true;
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        if !matches!(f, Failure::Closed) {
            let reason = f.describe();
            log::error!("vfio-user: connection failed: {reason}");
            let hook = {
                let mut h = lock(&self.hook);
                h.reason = Some(reason.clone());
                h.hook.clone()
            };
            if let Some(hook) = hook {
                hook(&reason);
            }
        }
        lock(&self.state).failure = Some(f);
        self.cond.notify_all();
    }

    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let _g = lock(&self.send_lock);
        sock::send_all(&self.sock, bytes, fds)
    }

    /// Answer server command `req` with `payload`, or with an error reply when `errno` is set.
    fn answer(&self, req: &Header, payload: &[u8], errno: Option<u32>) {
        if req.no_reply() {
            return;
        }
        let payload = if errno.is_some() { &[][..] } else { payload };
        let header = match req.reply(payload.len(), errno) {
            Ok(h) => h,
            Err(e) => return self.fail(protocol(e)),
        };
        let mut msg = header.encode().to_vec();
        msg.extend_from_slice(payload);
        if let Err(e) = self.send(&msg, &[]) {
            self.fail(Failure::Transport(
                e.kind(),
                format!("sending a reply: {e}"),
            ));
        }
    }

    fn read_message(&self, reader: &UnixStream) -> Result<RawMessage, Failure> {
        let recv_failure = |e: RecvError, part: &str| match e {
            RecvError::Eof { got: 0 } if part == "header" => Failure::Transport(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection".into(),
            ),
            RecvError::Eof { got } => Failure::Protocol(format!(
                "truncated message: connection closed in its {part} after {got} bytes"
            )),
            RecvError::TooManyFds => Failure::Protocol(format!(
                "the server sent more than {MAX_MSG_FDS} file descriptors in one message"
            )),
            RecvError::Io(e) => Failure::Transport(e.kind(), format!("receive: {e}")),
        };
        let mut fds = Vec::new();
        let mut hdr = [0u8; HEADER_SIZE];
        sock::recv_exact(reader, &mut hdr, &mut fds, MAX_MSG_FDS)
            .map_err(|e| recv_failure(e, "header"))?;
        let header = Header::decode(&hdr).map_err(protocol)?;
        let max = self.options.max_msg_size();
        if header.size as usize > max {
            return Err(Failure::Protocol(format!(
                "message of {} bytes (command {}) exceeds our limit of {max}",
                header.size, header.command
            )));
        }
        let mut payload = vec![0u8; header.size as usize - HEADER_SIZE];
        sock::recv_exact(reader, &mut payload, &mut fds, MAX_MSG_FDS)
            .map_err(|e| recv_failure(e, "payload"))?;
        Ok(RawMessage {
            header,
            payload,
            fds,
        })
    }

    fn dispatch(&self, msg: RawMessage, dma_tx: &SyncSender<RawMessage>) {
        let h = msg.header;
        if h.is_reply() {
            let mut st = lock(&self.state);
            match st.pending.get_mut(&h.id) {
                Some(p) if p.command == h.command && p.reply.is_none() => {
                    p.reply = Some(Reply {
                        header: h,
                        payload: msg.payload,
                        fds: msg.fds,
                    });
                    drop(st);
                    self.cond.notify_all();
                }
                Some(p) => log::warn!(
                    "vfio-user: reply {} is for command {} but the request was {}: dropped",
                    h.id,
                    h.command,
                    p.command
                ),
                None => log::warn!("vfio-user: reply with unknown id {}: dropped", h.id),
            }
            return;
        }
        match Command::from_u16(h.command) {
            Some(Command::DmaRead | Command::DmaWrite) => {
                if !msg.fds.is_empty() {
                    log::warn!("vfio-user: DMA request came with fds: closed");
                }
                lock(&self.state).dma_received += 1;
                match dma_tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(m)) => {
                        log::warn!("vfio-user: DMA queue full, request {} refused", h.id);
                        self.answer(&m.header, &[], Some(libc::EAGAIN as u32));
                        self.dma_finished();
                    }
                    Err(TrySendError::Disconnected(m)) => {
                        self.answer(&m.header, &[], Some(libc::EIO as u32));
                        self.dma_finished();
                    }
                }
            }
            _ => {
                log::warn!(
                    "vfio-user: server sent command {}: not supported",
                    h.command
                );
                self.answer(&h, &[], Some(libc::ENOTSUP as u32));
            }
        }
    }

    /// One server DMA request is answered.
    fn dma_finished(&self) {
        lock(&self.state).dma_done += 1;
        self.cond.notify_all();
    }

    /// Serve one DMA_READ/DMA_WRITE; the reply's errno is EINVAL for a malformed or oversized
    /// request and EFAULT when there is no handler or it fails.
    fn serve_dma(&self, msg: &RawMessage) {
        let h = &msg.header;
        let write = h.command == Command::DmaWrite as u16;
        let req = if write {
            DmaAccess::decode_write(&msg.payload)
        } else {
            DmaAccess::decode_read(&msg.payload)
        };
        let req = match req {
            Ok(r) if r.count <= u64::from(self.options.max_data_xfer_size) => r,
            Ok(r) => {
                log::warn!(
                    "vfio-user: DMA of {} bytes exceeds max_data_xfer_size",
                    r.count
                );
                return self.answer(h, &[], Some(libc::EINVAL as u32));
            }
            Err(e) => {
                log::warn!("vfio-user: malformed DMA request: {e}");
                return self.answer(h, &[], Some(libc::EINVAL as u32));
            }
        };
        let handler = self
            .dma_handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(handler) = handler else {
            log::warn!(
                "vfio-user: DMA at {:#x} but no DMA handler is set",
                req.addr
            );
            return self.answer(h, &[], Some(libc::EFAULT as u32));
        };
        let mut buf = Vec::new();
        let res = if write {
            handler.dma_write(req.addr, req.data)
        } else {
            buf.resize(req.count as usize, 0);
            handler.dma_read(req.addr, &mut buf)
        };
        match res {
            Ok(()) => self.answer(h, &req.encode_reply(&buf), None),
            Err(e) => {
                log::warn!(
                    "vfio-user: DMA {} of {} bytes at {:#x} failed: {e}",
                    if write { "write" } else { "read" },
                    req.count,
                    req.addr
                );
                self.answer(h, &[], Some(libc::EFAULT as u32));
            }
        }
    }
}

fn reader_loop(shared: Arc<Shared>, reader: UnixStream, dma_tx: SyncSender<RawMessage>) {
    loop {
        match shared.read_message(&reader) {
            Ok(msg) => shared.dispatch(msg, &dma_tx),
            Err(f) => return shared.fail(f),
        }
        if lock(&shared.state).failure.is_some() {
            return;
        }
    }
}

fn dma_worker(shared: Arc<Shared>, rx: Receiver<RawMessage>) {
    while let Ok(msg) = rx.recv() {
        shared.serve_dma(&msg);
        shared.dma_finished();
    }
}

/// Run the client's receive path on the calling thread (fuzz targets): read and dispatch every
/// message `input` carries until it fails or ends, as the reader thread does, with the requests
/// `pending` (id, command) waiting for replies and server DMA requests served through `handler`
/// (answers go to `answers`). Returns the replies matched to `pending` and the failure, if any.
pub fn replay_server_messages(
    input: &UnixStream,
    answers: UnixStream,
    pending: &[(u16, Command)],
    handler: Option<Arc<dyn DmaHandler>>,
    options: ClientOptions,
) -> (Vec<Reply>, Option<String>) {
    let pending = pending
        .iter()
        .map(|&(id, c)| {
            let p = Pending {
                command: c as u16,
                reply: None,
            };
            (id, p)
        })
        .collect();
    let shared = Shared {
        sock: answers,
        send_lock: Mutex::new(()),
        state: Mutex::new(State {
            pending,
            failure: None,
            failing: false,
            next_id: 0,
            dma_received: 0,
            dma_done: 0,
        }),
        cond: Condvar::new(),
        dma_handler: RwLock::new(handler),
        hook: Mutex::new(HookState::default()),
        options,
    };
    let (tx, rx) = mpsc::sync_channel(DMA_QUEUE_DEPTH);
    loop {
        match shared.read_message(input) {
            Ok(msg) => shared.dispatch(msg, &tx),
            Err(f) => shared.fail(f),
        }
        while let Ok(msg) = rx.try_recv() {
            shared.serve_dma(&msg);
            shared.dma_finished();
        }
        if lock(&shared.state).failure.is_some() {
            break;
        }
    }
    let mut st = lock(&shared.state);
    let failure = st.failure.as_ref().map(Failure::describe);
    let replies = st.pending.drain().filter_map(|(_, p)| p.reply).collect();
    (replies, failure)
}

/// A vfio-user connection to one device server.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    server: Capabilities,
    version: (u16, u16),
}

impl Client {
    /// Connect to the server listening at `path` and negotiate the version.
    pub fn connect(path: &Path, options: ClientOptions) -> Result<Client, VfioError> {
        let stream = sock::connect(path, options.connect_timeout).map_err(|source| {
            VfioError::Transport {
                what: "connect",
                source: io::Error::new(source.kind(), format!("{}: {source}", path.display())),
            }
        })?;
        Client::from_stream(stream, options)
    }

    /// Use an already connected socket (`--fd`, a socketpair) and negotiate the version.
    pub fn from_stream(stream: UnixStream, options: ClientOptions) -> Result<Client, VfioError> {
        let transport = |source| VfioError::Transport {
            what: "connect",
            source,
        };
        if options.max_data_xfer_size == 0 {
            return Err(VfioError::Invalid {
                what: "connect",
                reason: "max_data_xfer_size must not be 0".into(),
            });
        }
        stream
            .set_write_timeout(Some(options.timeout))
            .map_err(transport)?;
        let reader = stream.try_clone().map_err(transport)?;
        let shared = Arc::new(Shared {
            sock: stream,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                pending: HashMap::new(),
                failure: None,
                failing: false,
                next_id: 0,
                dma_received: 0,
                dma_done: 0,
            }),
            cond: Condvar::new(),
            dma_handler: RwLock::new(None),
            hook: Mutex::new(HookState::default()),
            options,
        });
        let (tx, rx) = mpsc::sync_channel(DMA_QUEUE_DEPTH);
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("vfio-user-rx".into())
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Passthrough);
                reader_loop(s, reader, tx)
            })
            .map_err(transport)?;
        let mut client = Client {
            shared: shared.clone(),
            reader: Some(reader),
            server: Capabilities::default(),
            version: (VERSION_MAJOR, VERSION_MINOR),
        };
        std::thread::Builder::new()
            .name("vfio-user-dma".into())
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Passthrough);
                dma_worker(shared, rx)
            })
            .map_err(transport)?;
        client.negotiate()?;
        Ok(client)
    }

    /// Our VERSION proposal.
    fn proposal(&self) -> Version {
        Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            caps: Capabilities {
                max_msg_fds: MAX_MSG_FDS as u32,
                max_data_xfer_size: self.shared.options.max_data_xfer_size,
                ..Capabilities::default()
            },
        }
    }

    fn negotiate(&mut self) -> Result<(), VfioError> {
        const WHAT: &str = "VFIO_USER_VERSION";
        let reply = self.request(WHAT, Command::Version, &self.proposal().encode(), &[])?;
        let bad = |reason: String| VfioError::Protocol { what: WHAT, reason };
        let v = Version::decode(&reply.payload).map_err(|e| bad(e.to_string()))?;
        if v.major != VERSION_MAJOR || v.minor > VERSION_MINOR {
            return Err(bad(format!(
                "the server answered version {}.{} to our {VERSION_MAJOR}.{VERSION_MINOR}",
                v.major, v.minor
            )));
        }
        if v.caps.max_data_xfer_size == 0 {
            return Err(bad("max_data_xfer_size 0".into()));
        }
        if let Some(t) = v.caps.twin_socket.filter(|t| t.supported) {
            // We did not offer twin-socket mode, so the server may not enable it; its socket
            // (if any) is closed with the reply and everything stays on the main socket.
            log::warn!("vfio-user: server enabled twin-socket mode unasked ({t:?}): ignored");
        }
        if !reply.fds.is_empty() {
            log::warn!(
                "vfio-user: {} unexpected fds with VERSION: closed",
                reply.fds.len()
            );
        }
        log::info!(
            "vfio-user: version {}.{}, server capabilities {:?}",
            v.major,
            v.minor,
            v.caps
        );
        self.server = v.caps;
        self.version = (v.major, v.minor);
        Ok(())
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The server's capabilities (spec defaults for what it left out).
    pub fn server_caps(&self) -> &Capabilities {
        &self.server
    }

    /// The options this connection was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.shared.options
    }

    /// Fds we may send in one message: the server's `max_msg_fds`, capped at ours.
    pub fn max_send_fds(&self) -> usize {
        (self.server.max_msg_fds as usize).min(MAX_MSG_FDS)
    }

    /// Largest data transfer in one region access: the smaller of both sides' limits.
    pub fn max_xfer(&self) -> usize {
        self.server
            .max_data_xfer_size
            .min(self.shared.options.max_data_xfer_size) as usize
    }

    /// The connection has failed (or was closed).
    pub fn is_failed(&self) -> bool {
        let st = lock(&self.shared.state);
        st.failure.is_some() || st.failing
    }

    /// Where the server's DMA_READ/DMA_WRITE go.
    pub fn set_dma_handler(&self, handler: Arc<dyn DmaHandler>) {
        *self
            .shared
            .dma_handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Called once when the connection fails; right away if it already has (each hook set is
    /// called once: a hook set after the failure still learns of it).
    pub fn set_failure_hook(&self, hook: FailureHook) {
        let call = {
            let mut h = lock(&self.shared.hook);
            h.hook = Some(hook.clone());
            h.reason.clone()
        };
        if let Some(reason) = call {
            hook(&reason);
        }
    }

    fn register(&self, what: &'static str, command: Command) -> Result<u16, VfioError> {
        let mut st = lock(&self.shared.state);
        if let Some(f) = &st.failure {
            return Err(f.to_error(what));
        }
        for _ in 0..=u16::MAX as usize {
            let id = st.next_id;
            st.next_id = id.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(e) = st.pending.entry(id) {
                e.insert(Pending {
                    command: command as u16,
                    reply: None,
                });
                return Ok(id);
            }
        }
        Err(VfioError::Invalid {
            what,
            reason: "65536 requests in flight".into(),
        })
    }

    fn forget(&self, id: u16) {
        lock(&self.shared.state).pending.remove(&id);
    }

    /// Send command `command` with `payload` and `fds`, wait for its reply (at most the
    /// timeout, after which the connection is failed). An error reply becomes `Refused` with the
    /// server's errno (EIO when it gave none).
    pub fn request(
        &self,
        what: &'static str,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, VfioError> {
        self.request_within(what, command, payload, fds, self.shared.options.timeout)
    }

    /// [`Client::request`] with its own reply timeout, for requests a device may take long to
    /// answer (a migration-state arc that saves or loads a large state).
    pub fn request_within(
        &self,
        what: &'static str,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Reply, VfioError> {
        if fds.len() > self.max_send_fds() {
            return Err(VfioError::Invalid {
                what,
                reason: format!(
                    "{} fds in one message, the server accepts {}",
                    fds.len(),
                    self.max_send_fds()
                ),
            });
        }
        let id = self.register(what, command)?;
        let header = match Header::command(id, command, payload.len()) {
            Ok(h) => h,
            Err(e) => {
                self.forget(id);
                return Err(VfioError::Invalid {
                    what,
                    reason: e.to_string(),
                });
            }
        };
        let mut msg = Vec::with_capacity(HEADER_SIZE + payload.len());
        msg.extend_from_slice(&header.encode());
        msg.extend_from_slice(payload);
        if let Err(source) = self.shared.send(&msg, fds) {
            self.forget(id);
            self.shared.fail(Failure::Transport(
                source.kind(),
                format!("sending {what}: {source}"),
            ));
            return Err(VfioError::Transport { what, source });
        }
        let reply = self.wait(what, id, timeout)?;
        if reply.header.is_error() {
            let errno = match reply.header.error {
                0 => libc::EIO,
                e => i32::try_from(e).unwrap_or(libc::EIO),
            };
            return Err(VfioError::Refused {
                what,
                source: io::Error::from_raw_os_error(errno),
            });
        }
        Ok(reply)
    }

    /// Wait until every DMA request the server sent before now has been answered (served by the
    /// handler, or refused). After a reply, that is every DMA the device started before it
    /// answered: the reader reads the socket in order. Used after migration-state arcs: the
    /// kernel's rule that outstanding (P2P) DMA completes before an arc into a P2P or stopped
    /// state completes covers, over vfio-user, the VMM's serving of it too — a peer write still
    /// queued here would otherwise land in a peer after the peer was stopped. Must not be called
    /// from a `DmaHandler` (it would wait for itself). Bounded by the request timeout.
    pub fn wait_dma_done(&self, what: &'static str) -> Result<(), VfioError> {
        let timeout = self.shared.options.timeout;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let target = st.dma_received;
        while st.dma_done < target {
            if let Some(f) = st.failure.clone() {
                return Err(f.to_error(what));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VfioError::Transport {
                    what,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the device's DMA was not served within {timeout:?}"),
                    ),
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn wait(&self, what: &'static str, id: u16, timeout: Duration) -> Result<Reply, VfioError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(reply) = st.pending.get_mut(&id).and_then(|p| p.reply.take()) {
                st.pending.remove(&id);
                return Ok(reply);
            }
            if let Some(f) = st.failure.clone() {
                st.pending.remove(&id);
                return Err(f.to_error(what));
            }
            let now = Instant::now();
            if now >= deadline {
                st.pending.remove(&id);
                drop(st);
                let msg = format!("no reply to {what} within {timeout:?}");
                self.shared
                    .fail(Failure::Transport(io::ErrorKind::TimedOut, msg.clone()));
                return Err(VfioError::Transport {
                    what,
                    source: io::Error::new(io::ErrorKind::TimedOut, msg),
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.fail(Failure::Closed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
