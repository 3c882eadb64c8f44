//! virtio-console: one port, receiveq (0) and transmitq (1), no multiport, no emergency write.
//!
//! Bytes the guest puts on the transmitq go to the host writer (stdout, a file, or a pseudo
//! terminal). Input comes from a host fd (the terminal on stdin, the pty) and fills the buffers the
//! guest posts on the receiveq; the fd is only watched while such buffers exist, so waiting input
//! does not make the worker spin.
//!
//! With [`ConsoleOutput::Stdout`] and a terminal on stdin, the terminal is put in raw mode
//! (output post-processing kept, so host log lines stay readable) until the device is dropped or
//! [`Console::restore_terminal`] is called. With [`ConsoleOutput::Pty`] skiff opens a new pseudo
//! terminal, logs its path at info level ([`Console::pty_path`]), and keeps the slave side open
//! itself (in raw mode) so that clients may come and go.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use migration::{Snapshottable, StateError, StateSection};
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::common::{
    avail_ok, notify, read_from_ranges, return_chain, write_to_ranges, ChainError, DescChain,
    QueueBody, WorkerSlot,
};
use super::worker::WorkerBody;
use super::{
    device_type, features, AccessPlatform, ActivatedQueue, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::legacy::log_limit::LogLimiter;
use crate::GuestMemoryMmap;

/// Largest size of each queue.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Version of the console state section.
pub const CONSOLE_STATE_VERSION: u16 = 1;
// virtio-bindings 0.2 has no `virtio_console` module (features, config layout): virtio-console
// here offers none of its feature bits, and the queue numbers are the spec's (5.3.2).
/// receiveq (host → guest).
const RXQ: u16 = 0;
/// transmitq (guest → host).
const TXQ: u16 = 1;
/// Bytes taken from one transmit chain at most (the rest is dropped and counted).
const MAX_TX_CHAIN: usize = 1 << 20;
/// Bytes read from the input per receive buffer at most.
const RX_CHUNK: usize = 4096;

/// Where the console's output goes (and its input comes from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// skiff's stdout; input from stdin when stdin is a terminal.
    Stdout,
    /// A file, created or truncated; no input.
    File(PathBuf),
    /// A file appended to (created when absent), e.g. by a restored VM continuing its output.
    AppendFile(PathBuf),
    /// A new pseudo terminal for both directions.
    Pty,
}

/// Configuration of a virtio-console device. (No device at all is the caller's "off".)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Device id (counters, API, migration).
    pub id: String,
    /// Output (and input) endpoint.
    pub output: ConsoleOutput,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (the device sits behind the virtual IOMMU).
    pub iommu: bool,
}

/// Errors creating a virtio-console device.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The output file cannot be created.
    #[error("console output {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A pseudo terminal cannot be set up.
    #[error("cannot create a pseudo terminal: {op}: {source}")]
    Pty {
        /// The step that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The terminal on stdin cannot be put in raw mode.
    #[error("cannot put the terminal on stdin in raw mode: {0}")]
    Terminal(#[source] io::Error),
}

/// Console counters.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    /// Bytes written by the guest and passed to the output.
    pub tx_bytes: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Guest bytes the output did not take (a full pty, a write error, an oversized chain).
    pub tx_dropped: AtomicU64,
    /// Descriptor chains rejected as malformed.
    pub invalid_descriptors: AtomicU64,
}

impl ConsoleMetrics {
    /// The counters as `(name, value)` pairs.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("tx_bytes", g(&self.tx_bytes)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("tx_dropped", g(&self.tx_dropped)),
            ("invalid_descriptors", g(&self.invalid_descriptors)),
        ]
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The input descriptor: stdin (borrowed, never closed) or one the device owns.
#[derive(Debug)]
enum InputFd {
    Stdin,
    Owned(OwnedFd),
}

impl AsRawFd for InputFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            InputFd::Stdin => libc::STDIN_FILENO,
            InputFd::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

/// The host endpoints, which move to the worker while the device is active.
struct ConsoleIo {
    out: Box<dyn Write + Send>,
    input: Option<InputFd>,
}

/// Saved terminal settings, restored on drop.
struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Put `fd` (a terminal) in raw mode, keeping output post-processing when `keep_opost`.
    fn enter(fd: RawFd, keep_opost: bool) -> io::Result<Self> {
        // SAFETY: termios is plain old data; tcgetattr fills it in.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios for a valid fd.
        if unsafe { libc::tcgetattr(fd, &mut t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = t;
        // SAFETY: cfmakeraw only modifies the termios we pass.
        unsafe { libc::cfmakeraw(&mut t) };
        if keep_opost {
            t.c_oflag |= libc::OPOST;
        }
        // SAFETY: tcsetattr reads one termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios saved by `enter` for the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// A new pseudo terminal: the master (the device's endpoint), the slave kept open, and its path.
fn open_pty() -> Result<(OwnedFd, File, PathBuf), ConsoleError> {
    let err = |op| move |source| ConsoleError::Pty { op, source };
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
    };
    if m < 0 {
        return Err(err("posix_openpt")(io::Error::last_os_error()));
    }
    // SAFETY: `m` is a fresh descriptor nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt take a pty master fd.
    if unsafe { libc::grantpt(master.as_raw_fd()) } < 0 {
        return Err(err("grantpt")(io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } < 0 {
        return Err(err("unlockpt")(io::Error::last_os_error()));
    }
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most `buf.len()` bytes including the NUL.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(err("ptsname_r")(io::Error::from_raw_os_error(r)));
    }
    // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(err("open slave"))?;
    // Raw mode on the slave: no echo of what the guest prints back into the guest's input, no
    // line editing.
    RawTerminal::enter(slave.as_raw_fd(), false)
        .map(std::mem::forget)
        .map_err(err("raw mode"))?;
    Ok((master, slave, path))
}

/// A virtio-console device.
pub struct Console {
    id: String,
    iommu: bool,
    acked_features: u64,
    io: Option<ConsoleIo>,
    pty_path: Option<PathBuf>,
    _pty_slave: Option<File>,
    raw_terminal: Option<RawTerminal>,
    metrics: Arc<ConsoleMetrics>,
    worker: WorkerSlot<ConsoleWorker>,
}

impl Console {
    /// Serve both queues once on the calling thread, as the worker does when kicked (fuzz targets).
    pub fn serve_once(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        let mut body = self.worker_body(mem, interrupt, queues, access)?;
        body.process_tx();
        body.process_rx();
        self.io = Some(body.io);
        Ok(())
    }

    fn worker_body(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<ConsoleWorker, VirtioError> {
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                RXQ => rx = Some(q),
                TXQ => tx = Some(q),
                i => return Err(VirtioError::activate(&self.id, format!("no queue {i}"))),
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(VirtioError::activate(
                &self.id,
                "needs both the receive and the transmit queue",
            ));
        };
        let rx_q = self.worker.prepare_queue(rx.queue, RXQ, false, &mem)?;
        let tx_q = self.worker.prepare_queue(tx.queue, TXQ, false, &mem)?;
        let Some(io) = self.io.take() else {
            return Err(VirtioError::activate(
                &self.id,
                "the endpoints were lost when a worker thread failed",
            ));
        };
        let body = ConsoleWorker {
            id: self.id.clone(),
            mem,
            interrupt,
            rx: rx_q,
            tx: tx_q,
            rx_kick: rx.kick,
            tx_kick: tx.kick,
            io,
            metrics: self.metrics.clone(),
            input_watched: false,
            input_eof: false,
            chain: DescChain::default(),
            access,
            invalid: LogLimiter::new(),
            io_error: LogLimiter::new(),
            irq: LogLimiter::new(),
        };
        Ok(body)
    }

    /// Build the device and open its endpoints (see the module documentation).
    pub fn new(config: ConsoleConfig) -> Result<Self, ConsoleError> {
        let (io, pty, raw) = match &config.output {
            ConsoleOutput::Stdout => {
                // SAFETY: isatty only inspects the descriptor.
                let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
                let raw = if tty {
                    Some(
                        RawTerminal::enter(libc::STDIN_FILENO, true)
                            .map_err(ConsoleError::Terminal)?,
                    )
                } else {
                    None
                };
                let io = ConsoleIo {
                    out: Box::new(io::stdout()),
                    input: tty.then_some(InputFd::Stdin),
                };
                (io, None, raw)
            }
            ConsoleOutput::File(path) | ConsoleOutput::AppendFile(path) => {
                let append = matches!(config.output, ConsoleOutput::AppendFile(_));
                let f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.clone(),
                        source,
                    })?;
                (
                    ConsoleIo {
                        out: Box::new(f),
                        input: None,
                    },
                    None,
                    None,
                )
            }
            ConsoleOutput::Pty => {
                let (master, slave, path) = open_pty()?;
                let out = master.try_clone().map_err(|source| ConsoleError::Pty {
                    op: "dup master",
                    source,
                })?;
                log::info!(
                    "{}: virtio-console on pseudo terminal {}",
                    config.id,
                    path.display()
                );
                (
                    ConsoleIo {
                        out: Box::new(File::from(out)),
                        input: Some(InputFd::Owned(master)),
                    },
                    Some((path, slave)),
                    None,
                )
            }
        };
        let mut dev = Self::build(config.id, config.iommu, io);
        if let Some((path, slave)) = pty {
            dev.pty_path = Some(path);
            dev._pty_slave = Some(slave);
        }
        dev.raw_terminal = raw;
        Ok(dev)
    }

    /// Build the device on any writer and optional input fd (tests, other front ends). The input
    /// should be non-blocking or only become readable with data (a pipe, a socket, a terminal).
    pub fn with_io(
        id: impl Into<String>,
        iommu: bool,
        out: Box<dyn Write + Send>,
        input: Option<OwnedFd>,
    ) -> Self {
        Self::build(
            id.into(),
            iommu,
            ConsoleIo {
                out,
                input: input.map(InputFd::Owned),
            },
        )
    }

    fn build(id: String, iommu: bool, io: ConsoleIo) -> Self {
        Self {
            worker: WorkerSlot::new(id.clone()),
            id,
            iommu,
            acked_features: 0,
            io: Some(io),
            pty_path: None,
            _pty_slave: None,
            raw_terminal: None,
            metrics: Arc::new(ConsoleMetrics::default()),
        }
    }

    /// The pseudo terminal's path (`/dev/pts/N`) with [`ConsoleOutput::Pty`].
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<ConsoleMetrics> {
        self.metrics.clone()
    }

    /// Put the terminal on stdin back in the mode it had (also done on drop). Call it before
    /// leaving the process without unwinding (`std::process::exit`).
    pub fn restore_terminal(&mut self) {
        self.raw_terminal = None;
    }

    /// Take the endpoints back from a stopped worker.
    fn reclaim(&mut self, body: Option<ConsoleWorker>) {
        if let Some(body) = body {
            self.io = Some(body.io);
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::common(self.iommu)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// cols, rows, max_nr_ports, emerg_wr: all meaningless without F_SIZE/F_MULTIPORT/
    /// F_EMERG_WRITE, so all zero.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        if self.worker.is_active() {
            return Err(VirtioError::activate(&self.id, "already active"));
        }
        let body = self.worker_body(mem, interrupt, queues, access)?;
        self.worker.start(body)
    }

    fn reset(&mut self) {
        let body = self.worker.reset();
        self.reclaim(body);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics.values()
    }
}

crate::worker_device_state!(Console);

impl Snapshottable for Console {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Layout (version 1): acked features `u64`, queue count `u8` (0 or 2), queue states. Input
    /// is read only into posted buffers, so nothing is buffered in the device.
    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        self.worker
            .save_queue_section(self.acked_features, CONSOLE_STATE_VERSION)
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let saved = self.worker.load_queue_section(
            section,
            CONSOLE_STATE_VERSION,
            self.avail_features(),
            2,
        )?;
        self.acked_features = saved.acked_features;
        let stopped = self.worker.apply_restore(saved);
        self.reclaim(stopped);
        Ok(())
    }
}

/// The console's worker thread body.
struct ConsoleWorker {
    id: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    io: ConsoleIo,
    metrics: Arc<ConsoleMetrics>,
    input_watched: bool,
    input_eof: bool,
    chain: DescChain,
    access: Option<Arc<dyn AccessPlatform>>,
    invalid: LogLimiter,
    io_error: LogLimiter,
    irq: LogLimiter,
}

impl ConsoleWorker {
    fn reject(&mut self, e: ChainError) {
        add(&self.metrics.invalid_descriptors, 1);
        if self.invalid.allow() {
            log::warn!("{}: dropping malformed descriptor chain: {e}", self.id);
        }
    }

    fn write_out(&mut self, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            match self.io.out.write(&data[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock && self.io_error.allow() {
                        log::warn!("{}: console output failed: {e}", self.id);
                    }
                    break;
                }
            }
        }
        let _ = self.io.out.flush();
        add(&self.metrics.tx_bytes, done as u64);
        add(&self.metrics.tx_dropped, (data.len() - done) as u64);
    }

    fn process_tx(&mut self) {
        let mem = self.mem.clone();
        if !avail_ok(&self.tx, &mem) {
            add(&self.metrics.invalid_descriptors, 1);
            return;
        }
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            match self.chain.fill(chain, &mem, self.access.as_deref()) {
                Ok(()) => {
                    let data = read_from_ranges(&mem, &self.chain.readable, MAX_TX_CHAIN);
                    add(
                        &self.metrics.tx_dropped,
                        self.chain.readable_len.saturating_sub(data.len() as u64),
                    );
                    self.write_out(&data);
                }
                Err(e) => self.reject(e),
            }
            used = true;
            let head = self.chain.head;
            if return_chain(&mut self.tx, &mem, head, 0).is_err() {
                break;
            }
        }
        if used {
            notify(
                &mut self.tx,
                &mem,
                &*self.interrupt,
                TXQ,
                &mut self.irq,
                &self.id,
            );
        }
    }

    /// Move waiting input into receive buffers; returns whether the input should stay watched.
    fn process_rx(&mut self) -> bool {
        let Some(fd) = self.io.input.as_ref().map(|i| i.as_raw_fd()) else {
            return false;
        };
        let mem = self.mem.clone();
        let mut used = false;
        let mut keep = true;
        let mut buf = [0u8; RX_CHUNK];
        for _ in 0..CONSOLE_QUEUE_SIZE {
            if !avail_ok(&self.rx, &mem) {
                add(&self.metrics.invalid_descriptors, 1);
                keep = false;
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                keep = false;
                break;
            };
            if let Err(e) = self.chain.fill(chain, &mem, self.access.as_deref()) {
                self.reject(e);
                used = true;
                let head = self.chain.head;
                let _ = return_chain(&mut self.rx, &mem, head, 0);
                continue;
            }
            if self.chain.writable.is_empty() {
                self.reject(ChainError::Direction("readable"));
                used = true;
                let head = self.chain.head;
                let _ = return_chain(&mut self.rx, &mem, head, 0);
                continue;
            }
            let want = (self.chain.writable_len as usize).min(RX_CHUNK);
            // SAFETY: reads at most `want` ≤ buf.len() bytes into `buf`.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) };
            if n <= 0 {
                self.rx.go_to_previous_position();
                let e = io::Error::last_os_error();
                if n == 0
                    || !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    )
                {
                    // End of input (or a dead fd): stop watching it for good.
                    if n < 0 && self.io_error.allow() {
                        log::warn!("{}: console input failed: {e}; input closed", self.id);
                    }
                    self.input_eof = true;
                    keep = false;
                }
                break;
            }
            let n = n as usize;
            let written = write_to_ranges(&mem, &self.chain.writable, &buf[..n]);
            add(&self.metrics.rx_bytes, written as u64);
            used = true;
            let head = self.chain.head;
            if return_chain(&mut self.rx, &mem, head, written as u32).is_err() {
                keep = false;
                break;
            }
        }
        if used {
            notify(
                &mut self.rx,
                &mem,
                &*self.interrupt,
                RXQ,
                &mut self.irq,
                &self.id,
            );
        }
        keep
    }

    fn set_input_watch(&mut self, ops: &mut EventOps, watch: bool) {
        let Some(fd) = self.io.input.as_ref().map(|i| i.as_raw_fd()) else {
            return;
        };
        let watch = watch && !self.input_eof;
        if watch == self.input_watched {
            return;
        }
        let ev = Events::new_raw(fd, EventSet::IN);
        let r = if watch { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.input_watched = watch,
            Err(e) => {
                if self.io_error.allow() {
                    log::warn!("{}: cannot (un)watch console input: {e:?}", self.id);
                }
                if watch {
                    // Not pollable (e.g. a regular file): give up on input.
                    self.input_eof = true;
                }
            }
        }
    }
}

impl QueueBody for ConsoleWorker {
    fn queues_mut(&mut self) -> Vec<&mut Queue> {
        vec![&mut self.rx, &mut self.tx]
    }
}

impl WorkerBody for ConsoleWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.rx_kick.as_raw_fd(), self.tx_kick.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("{}: cannot watch a queue eventfd: {e:?}", self.id);
            }
        }
        self.input_watched = false;
        self.set_input_watch(ops, true);
        self.process_tx();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.tx_kick.as_raw_fd() {
            let _ = self.tx_kick.read();
            self.process_tx();
        } else if fd == self.rx_kick.as_raw_fd() {
            let _ = self.rx_kick.read();
            self.set_input_watch(ops, true);
        } else if self.io.input.as_ref().map(|i| i.as_raw_fd()) == Some(fd) {
            let keep = self.process_rx();
            self.set_input_watch(ops, keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::tests_support::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn activate(dev: &mut Console, env: &TestEnv) {
        dev.set_acked_features(features::VIRTIO_F_VERSION_1);
        dev.activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn output_reaches_a_file() {
        let dir = std::env::temp_dir().join(format!("skiff-console-{}", std::process::id()));
        let cfg = ConsoleConfig {
            id: "console0".into(),
            output: ConsoleOutput::File(dir.clone()),
            iommu: false,
        };
        let mut dev = Console::new(cfg).unwrap();
        let env = TestEnv::new(2);
        activate(&mut dev, &env);
        env.q(TXQ)
            .add_readable(&env.mem, &[b"hello ", b"console\n"]);
        env.kick(TXQ);
        env.wait_used(TXQ, 1);
        dev.reset();
        assert_eq!(std::fs::read(&dir).unwrap(), b"hello console\n");
        assert_eq!(dev.metrics().tx_bytes.load(Ordering::Relaxed), 14);

        // A restored VM appends; a new one truncates.
        let reopen = |output: ConsoleOutput| {
            let mut dev = Console::new(ConsoleConfig {
                id: "console0".into(),
                output,
                iommu: false,
            })
            .unwrap();
            let env = TestEnv::new(2);
            activate(&mut dev, &env);
            env.q(TXQ).add_readable(&env.mem, &[b"more\n"]);
            env.kick(TXQ);
            env.wait_used(TXQ, 1);
            dev.reset();
        };
        reopen(ConsoleOutput::AppendFile(dir.clone()));
        assert_eq!(std::fs::read(&dir).unwrap(), b"hello console\nmore\n");
        reopen(ConsoleOutput::File(dir.clone()));
        assert_eq!(std::fs::read(&dir).unwrap(), b"more\n");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn input_is_delivered_into_receive_buffers_and_waits_for_buffers() {
        let (r, w) = pipe();
        let out = SharedBuf::default();
        let mut dev = Console::with_io("console0", false, Box::new(out.clone()), Some(r));
        let env = TestEnv::new(2);
        activate(&mut dev, &env);
        // Input before any buffer: nothing happens (and the worker does not spin).
        write_fd(&w, b"abc");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(env.used_idx(RXQ), 0);
        let head = env.q(RXQ).add_writable(&env.mem, &[64]);
        env.kick(RXQ);
        env.wait_used(RXQ, 1);
        let (id, len) = env.used_elem(RXQ, 0);
        assert_eq!((id, len), (u32::from(head), 3));
        assert_eq!(env.q(RXQ).buffer(&env.mem, head, 3), b"abc");
        // More input with a buffer already posted.
        env.q(RXQ).add_writable(&env.mem, &[2]);
        env.kick(RXQ);
        write_fd(&w, b"xyz");
        env.wait_used(RXQ, 2);
        assert_eq!(env.used_elem(RXQ, 1).1, 2);
        assert_eq!(dev.metrics().rx_bytes.load(Ordering::Relaxed), 5);
        // Hostile: a readable-only chain on the receive queue is rejected.
        env.q(RXQ).add_readable(&env.mem, &[b"bad"]);
        env.kick(RXQ);
        env.wait_used(RXQ, 3);
        assert_eq!(env.used_elem(RXQ, 2).1, 0);
        assert!(dev.metrics().invalid_descriptors.load(Ordering::Relaxed) >= 1);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn pty_is_created_and_carries_both_directions() {
        let cfg = ConsoleConfig {
            id: "console0".into(),
            output: ConsoleOutput::Pty,
            iommu: false,
        };
        let mut dev = match Console::new(cfg) {
            Ok(d) => d,
            Err(e) => {
                crate::test_skip::skip_or_fail("SKIFF_SKIP_PTY", &format!("no pty: {e}"));
                return;
            }
        };
        let path = dev.pty_path().unwrap().to_path_buf();
        assert!(path.starts_with("/dev/pts"), "{path:?}");
        let env = TestEnv::new(2);
        activate(&mut dev, &env);
        let client = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap();
        env.q(TXQ).add_readable(&env.mem, &[b"to-host"]);
        env.kick(TXQ);
        env.wait_used(TXQ, 1);
        let mut got = [0u8; 7];
        use std::io::Read;
        (&client).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to-host");
        let head = env.q(RXQ).add_writable(&env.mem, &[16]);
        env.kick(RXQ);
        (&client).write_all(b"hi").unwrap();
        env.wait_used(RXQ, 1);
        assert_eq!(env.q(RXQ).buffer(&env.mem, head, 2), b"hi");
    }

    #[test]
    fn state_round_trip() {
        let mut dev = Console::with_io("console0", false, Box::new(io::sink()), None);
        let env = TestEnv::new(2);
        activate(&mut dev, &env);
        env.q(TXQ).add_readable(&env.mem, &[b"x"]);
        env.kick(TXQ);
        env.wait_used(TXQ, 1);
        migration::Pausable::pause(&mut dev).unwrap();
        let s = dev.snapshot().unwrap();
        let mut fresh = Console::with_io("console0", false, Box::new(io::sink()), None);
        fresh.restore(&s).unwrap();
        assert_eq!(fresh.acked_features, features::VIRTIO_F_VERSION_1);
        assert_eq!(fresh.snapshot().unwrap(), s);
        let mut bad = s.clone();
        bad.data.truncate(5);
        assert!(fresh.restore(&bad).is_err());
        migration::Pausable::resume(&mut dev).unwrap();
    }
}
