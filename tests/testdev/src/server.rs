//! The socket thread: receives the client's messages, answers its commands, routes replies to
//! our DMA requests to the device thread, and watches the INTx unmask eventfd.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use log::{debug, info, warn};

use crate::conn::{recv_message, Message, Writer};
use crate::device::Device;
use crate::engine::{self, DmaPort, Shared};
use crate::fault::{FaultState, Faults};
use crate::feature;
use crate::mem::{memfd, Backing, DmaRegion, DmaTable, Mapping};
use crate::proto::*;
use crate::regs;
use crate::Error;

/// Server options (the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// Device name, for logs.
    pub id: String,
    /// `VFIO_MIGRATION_*` flags offered (`--migration`; 0: no migration support, the
    /// MIGRATION feature is then not offered at all).
    pub migration: u64,
    /// Whether the DMA logging features are offered (`--dma-logging`).
    pub dma_logging: bool,
    /// Whether the device has an MSI capability (`--msi`): config space shows it and
    /// DEVICE_GET_IRQ_INFO reports [`regs::MSI_VECTORS`] for index 1 (MSI).
    pub msi: bool,
    /// How long the device waits for the client's reply to a DMA_READ/DMA_WRITE.
    pub dma_timeout: Duration,
    /// Faults to inject (`--fail-arc`, `--fail-read-after`, `--reject-resume`,
    /// `--exit-on-arc`; see `fault.rs`). None by default.
    pub faults: Faults,
    /// BAR2's size in bytes (`--memory-mib`): a power of two from
    /// [`regs::DEVICE_MEMORY_SIZE`] (the default) to [`regs::MAX_DEVICE_MEMORY_SIZE`].
    pub memory_size: u64,
    /// `--fill-memory SEED`: BAR2 starts filled with [`regs::pattern_byte`]`(SEED, i)` at
    /// byte `i` instead of zeroes (so that migrating it moves real data).
    pub fill_seed: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            id: "testdev".into(),
            migration: crate::fsm::MIGRATION_ALL,
            dma_logging: true,
            msi: false,
            dma_timeout: Duration::from_secs(10),
            faults: Faults::default(),
            memory_size: regs::DEVICE_MEMORY_SIZE,
            fill_seed: None,
        }
    }
}

type Reply = Result<(Vec<u8>, Option<OwnedFd>), i32>;

struct Session {
    shared: Arc<Shared>,
    writer: Arc<Writer>,
    bar2_fd: OwnedFd,
    msi: bool,
    dma_logging: bool,
    negotiated: bool,
    replies: Option<Sender<Message>>,
}

/// Serves one client on `sock` until it disconnects. `Ok` on a clean disconnect (between
/// messages), `Err` on a protocol or I/O error that ended the session.
pub fn serve(sock: UnixStream, opts: &Options) -> Result<(), Error> {
    info!(
        "{}: client connected (migration flags {:#x}, dma logging: {}, msi: {}, memory {} MiB)",
        opts.id,
        opts.migration,
        opts.dma_logging,
        opts.msi,
        opts.memory_size >> 20
    );
    let size = opts.memory_size;
    if !size.is_power_of_two()
        || !(regs::DEVICE_MEMORY_SIZE..=regs::MAX_DEVICE_MEMORY_SIZE).contains(&size)
    {
        return Err(Error::Setup(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("device memory of {size:#x} bytes (a power of two, 1 MiB to 1 GiB)"),
        )));
    }
    let mut dev = Device::with_memory(opts.msi, size);
    dev.mig_caps = opts.migration;
    if !opts.faults.is_empty() {
        warn!("{}: fault injection on: {:?}", opts.id, opts.faults);
    }
    dev.faults = FaultState::new(opts.faults.clone());
    let bar2_fd = memfd("skiff-testdev-bar2", size).map_err(Error::Setup)?;
    let bar2 = Mapping::new(&bar2_fd, 0, size, true).map_err(Error::Setup)?;
    if let Some(seed) = opts.fill_seed {
        fill_pattern(&bar2, seed);
        info!(
            "{}: device memory filled with pattern seed {seed:#x}",
            opts.id
        );
    }
    let shared = Arc::new(Shared {
        dev: Mutex::new(dev),
        wake: Condvar::new(),
        dma: RwLock::new(DmaTable::default()),
        bar2,
        client_max_xfer: AtomicUsize::new(MAX_DATA_XFER),
    });
    let writer = Arc::new(Writer::new(sock.try_clone()?));
    let (tx, rx) = mpsc::channel();
    let port = DmaPort::new(shared.clone(), writer.clone(), rx, opts.dma_timeout);
    let dev_thread = std::thread::Builder::new()
        .name(format!("{}-dev", opts.id))
        .spawn(move || engine::run(port))?;
    let mut s = Session {
        shared: shared.clone(),
        writer,
        bar2_fd,
        msi: opts.msi,
        dma_logging: opts.dma_logging,
        negotiated: false,
        replies: Some(tx),
    };
    let res = s.run(&sock);
    // Client gone: stop the device thread (a DMA wait ends when the reply channel closes),
    // drop the DMA mappings and the eventfds; the device state itself would be kept.
    s.replies = None;
    shared.lock().shutdown = true;
    shared.wake.notify_all();
    if dev_thread.join().is_err() {
        warn!("device thread panicked");
    }
    shared
        .dma
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    shared.lock().irqs = Default::default();
    // Late writes through the mapping not counted yet (a source device's after its state was
    // saved): counted and logged now.
    shared.lock().check_late_writes(&shared.bar2);
    match &res {
        Ok(()) => info!("{}: client disconnected", opts.id),
        Err(e) => warn!("{}: session ended: {e}", opts.id),
    }
    res
}

impl Session {
    fn run(&mut self, sock: &UnixStream) -> Result<(), Error> {
        loop {
            self.wait_readable(sock)?;
            let msg = match recv_message(sock) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(Error::MessageSize { header }) => {
                    // Cannot skip an unbounded payload: answer, then close.
                    if !header.is_reply() {
                        let _ = self.writer.reply_error(&header, libc::E2BIG);
                    }
                    return Err(Error::MessageSize { header });
                }
                Err(e) => return Err(e),
            };
            if msg.header.is_reply() {
                if let Some(tx) = &self.replies {
                    if tx.send(msg).is_err() {
                        debug!("reply arrived after the device thread ended");
                    }
                }
                continue;
            }
            let h = msg.header;
            let res = if msg.header.flags & FLAG_TYPE_MASK != FLAG_TYPE_COMMAND {
                Err(libc::EINVAL)
            } else if msg.fds.len() > MAX_MSG_FDS {
                warn!(
                    "message {} carries {} fds (max {MAX_MSG_FDS})",
                    h.command,
                    msg.fds.len()
                );
                Err(libc::EINVAL)
            } else {
                self.handle(msg)
            };
            if h.command == CMD_DEVICE_FEATURE && self.shared.lock().faults.exit_requested() {
                // A device process dying mid-migration: no reply; the connection goes first.
                let _ = sock.shutdown(std::net::Shutdown::Both);
                return Err(Error::InjectedExit);
            }
            if h.flags & FLAG_NO_REPLY != 0 {
                if let Err(e) = res {
                    info!("command {} (no reply wanted) failed: errno {e}", h.command);
                }
                continue;
            }
            match res {
                Ok((payload, fd)) => {
                    let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
                    self.writer.reply(&h, &payload, &fds)?;
                }
                Err(errno) => {
                    debug!("command {} failed: errno {errno}", h.command);
                    self.writer.reply_error(&h, errno)?;
                }
            }
        }
    }

    /// Waits until the socket is readable, serving INTx unmask eventfd events meanwhile.
    fn wait_readable(&mut self, sock: &UnixStream) -> Result<(), Error> {
        loop {
            let unmask = self
                .shared
                .lock()
                .irqs
                .intx_unmask
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()?;
            let mut fds = [
                libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: unmask.as_ref().map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of 2 pollfds for the duration of the call; a
            // negative fd is ignored by poll.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if fds[1].revents & libc::POLLIN != 0 {
                if let Some(mut f) = unmask {
                    let mut b = [0u8; 8];
                    let _ = f.read(&mut b);
                    self.unmask_intx();
                }
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
        }
    }

    fn unmask_intx(&self) {
        let mut d = self.shared.lock();
        d.irqs.intx_masked = false;
        d.update_intx();
    }

    fn handle(&mut self, msg: Message) -> Reply {
        let p = &msg.payload;
        let cmd = msg.header.command;
        if cmd == CMD_VERSION {
            return self.version(p);
        }
        if !self.negotiated {
            warn!("command {cmd} before VERSION");
            return Err(libc::EINVAL);
        }
        match cmd {
            CMD_DMA_MAP => self.dma_map(p, msg.fds),
            CMD_DMA_UNMAP => self.dma_unmap(p),
            CMD_DEVICE_GET_INFO => {
                need(p, 16)?;
                if le32(p, 0) < 16 {
                    return Err(libc::EINVAL);
                }
                let flags = DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET;
                ok(Bytes::default()
                    .u32(16)
                    .u32(flags)
                    .u32(NUM_REGIONS)
                    .u32(NUM_IRQS))
            }
            CMD_DEVICE_GET_REGION_INFO => self.region_info(p),
            CMD_DEVICE_GET_IRQ_INFO => irq_info(p, self.msi),
            CMD_DEVICE_SET_IRQS => self.set_irqs(p, msg.fds),
            CMD_REGION_READ => self.region_read(p),
            CMD_REGION_WRITE => self.region_write(p),
            CMD_DEVICE_RESET => {
                info!("device reset");
                let mut d = self.shared.lock();
                // The reset drops the reference: count what was written through it first.
                d.check_late_writes(&self.shared.bar2);
                d.reset();
                self.shared.wake.notify_all();
                ok(Bytes::default())
            }
            CMD_DEVICE_FEATURE => {
                feature::device_feature(&self.shared, self.dma_logging, p).map(|v| (v, None))
            }
            CMD_MIG_DATA_READ => feature::mig_data_read(&self.shared, p).map(|v| (v, None)),
            CMD_MIG_DATA_WRITE => feature::mig_data_write(&self.shared, p).map(|v| (v, None)),
            // Known but not offered: no io fds, no write-multi (not negotiated).
            CMD_DEVICE_GET_REGION_IO_FDS | CMD_REGION_WRITE_MULTI => Err(libc::ENOTSUP),
            // Server-to-client commands sent to us.
            CMD_DMA_READ | CMD_DMA_WRITE => Err(libc::EINVAL),
            _ => {
                warn!("unknown command {cmd}");
                Err(libc::ENOSYS)
            }
        }
    }

    fn version(&mut self, p: &[u8]) -> Reply {
        if self.negotiated {
            warn!("second VERSION refused");
            return Err(libc::EINVAL);
        }
        need(p, 4)?;
        let (major, minor) = (
            u16::from_le_bytes([p[0], p[1]]),
            u16::from_le_bytes([p[2], p[3]]),
        );
        if major != VERSION_MAJOR {
            warn!("client proposes protocol {major}.{minor}; we speak {VERSION_MAJOR}.x");
            return Err(libc::ENOTSUP);
        }
        // The JSON is optional and may be NUL-terminated; unknown keys are ignored. Invalid JSON,
        // or a top level that is not an object, is refused with EINVAL (the client may retry).
        let json = p[4..].split(|&b| b == 0).next().unwrap_or(&[]);
        if !json.iter().all(u8::is_ascii_whitespace) {
            let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| {
                warn!("VERSION JSON: {e}");
                libc::EINVAL
            })?;
            let obj = v.as_object().ok_or(libc::EINVAL)?;
            let caps = obj.get("capabilities").and_then(|c| c.as_object());
            if let Some(x) = caps
                .and_then(|c| c.get("max_data_xfer_size"))
                .and_then(|x| x.as_u64())
            {
                if x == 0 {
                    return Err(libc::EINVAL);
                }
                let x = usize::try_from(x).unwrap_or(usize::MAX).min(MAX_DATA_XFER);
                self.shared.client_max_xfer.store(x, Ordering::Relaxed);
            }
            debug!("client capabilities: {}", v);
        }
        self.negotiated = true;
        let caps = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{MAX_MSG_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER},\"pgsizes\":4096}}}}\0"
        );
        // Our minor (0) is never above the client's. Our choice: no twin socket (DMA requests share the main socket; the socket thread
        // demultiplexes replies from commands).
        ok(Bytes::default()
            .u16(VERSION_MAJOR)
            .u16(VERSION_MINOR)
            .raw(caps.as_bytes()))
    }

    fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> Reply {
        need(p, 32)?;
        let (argsz, flags, offset, iova, size) =
            (le32(p, 0), le32(p, 4), le64(p, 8), le64(p, 16), le64(p, 24));
        if argsz < 32
            || flags & !(DMA_FLAG_READ | DMA_FLAG_WRITE) != 0
            || size == 0
            || fds.len() > 1
        {
            return Err(libc::EINVAL);
        }
        iova.checked_add(size).ok_or(libc::EINVAL)?;
        let backing = match fds.pop() {
            None => Backing::Remote,
            Some(fd) => {
                // A mapping past the end of the file would SIGBUS on access: refuse it. (A client
                // shrinking the file afterwards is not defended against.)
                let f = File::from(fd);
                let meta = f.metadata().map_err(|_| libc::EINVAL)?;
                if meta.file_type().is_file()
                    && offset.checked_add(size).is_none_or(|e| e > meta.len())
                {
                    warn!("DMA_MAP of {size:#x} bytes at file offset {offset:#x} exceeds the file ({:#x})", meta.len());
                    return Err(libc::EINVAL);
                }
                let m =
                    Mapping::new(&f, offset, size, flags & DMA_FLAG_WRITE != 0).map_err(|e| {
                        warn!("DMA_MAP mmap: {e}");
                        e.raw_os_error().unwrap_or(libc::EINVAL)
                    })?;
                Backing::Mapped(m)
            }
        };
        debug!(
            "DMA_MAP {iova:#x}+{size:#x} flags {flags:#x} {}",
            matches!(backing, Backing::Mapped(_))
        );
        let mut t = self.shared.dma.write().unwrap_or_else(|p| p.into_inner());
        t.map(DmaRegion {
            iova,
            size,
            flags,
            backing,
        })?;
        ok(Bytes::default())
    }

    fn dma_unmap(&mut self, p: &[u8]) -> Reply {
        need(p, 24)?;
        let (flags, iova, size) = (le32(p, 4), le64(p, 8), le64(p, 16));
        // No dirty bitmap, no "unmap all" flag in this device.
        if flags != 0 {
            return Err(libc::ENOTSUP);
        }
        // The write lock waits for a direct access in flight.
        self.shared
            .dma
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .unmap(iova, size)?;
        debug!("DMA_UNMAP {iova:#x}+{size:#x}");
        ok(Bytes::default().raw(&p[..24]))
    }

    fn region_info(&self, p: &[u8]) -> Reply {
        need(p, 32)?;
        let (argsz, index) = (le32(p, 0), le32(p, 8));
        if argsz < REGION_INFO_SIZE as u32 || index >= NUM_REGIONS {
            return Err(libc::EINVAL);
        }
        let rw = REGION_FLAG_READ | REGION_FLAG_WRITE;
        let (flags, size) = match index {
            0 => (rw, regs::REGS_BAR_SIZE),
            2 => (
                rw | REGION_FLAG_MMAP | REGION_FLAG_CAPS,
                self.shared.bar2.len() as u64,
            ),
            REGION_CONFIG => (rw, crate::config::CONFIG_SIZE as u64),
            _ => (0, 0),
        };
        if index != 2 {
            return ok(Bytes::default()
                .u32(32)
                .u32(flags)
                .u32(index)
                .u32(0)
                .u64(size)
                .u64(0));
        }
        // Sparse mmap capability: header (id, version 1, next 0), nr_areas 1, reserved, one area.
        let full = (REGION_INFO_SIZE + 8 + 8 + 16) as u32;
        let fd = self.bar2_fd.try_clone().map_err(|_| libc::ENOMEM)?;
        // Too small a buffer: the full size in argsz, no capability bytes (as kernel VFIO does).
        let fits = argsz >= full;
        let b = Bytes::default()
            .u32(full)
            .u32(flags)
            .u32(index)
            .u32(if fits { 32 } else { 0 });
        let b = b.u64(size).u64(0);
        let b = if fits {
            b.u16(REGION_CAP_SPARSE_MMAP)
                .u16(1)
                .u32(0)
                .u32(1)
                .u32(0)
                .u64(0)
                .u64(size)
        } else {
            b
        };
        Ok((b.0, Some(fd)))
    }

    fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> Reply {
        need(p, 20)?;
        let (argsz, flags, index, start, count) =
            (le32(p, 0), le32(p, 4), le32(p, 8), le32(p, 12), le32(p, 16));
        let data = flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
        let action = flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
        if argsz < 20
            || data.count_ones() != 1
            || action.count_ones() != 1
            || flags & !(data | action) != 0
        {
            return Err(libc::EINVAL);
        }
        let max = match index {
            IRQ_INTX => 1,
            IRQ_MSIX => regs::MSIX_VECTORS as u32,
            IRQ_MSI if self.msi => regs::MSI_VECTORS as u32,
            IRQ_MSI | 3 | 4 => 0,
            _ => return Err(libc::EINVAL),
        };
        let mut d = self.shared.lock();
        // count 0 with DATA_NONE + TRIGGER disables every interrupt of the index.
        if count == 0 && data == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER {
            match index {
                IRQ_INTX => (d.irqs.intx, d.irqs.intx_unmask) = (None, None),
                IRQ_MSIX => d.irqs.msix = Default::default(),
                IRQ_MSI => {
                    d.irqs.msi = Default::default();
                    // INTx may take over again.
                    d.update_intx();
                }
                _ => {}
            }
            return ok(Bytes::default());
        }
        if start.checked_add(count).is_none_or(|e| e > max) || count == 0 {
            return Err(libc::EINVAL);
        }
        let sel: Vec<bool> = match data {
            IRQ_SET_DATA_BOOL => {
                need(p, 20 + count as usize)?;
                p[20..20 + count as usize].iter().map(|&b| b != 0).collect()
            }
            _ => vec![true; count as usize],
        };
        // Our choice: an EVENTFD set carries exactly `count` fds, or none to de-assign.
        if data == IRQ_SET_DATA_EVENTFD && !fds.is_empty() && fds.len() != count as usize {
            return Err(libc::EINVAL);
        }
        let mut files: Vec<Option<File>> = fds.into_iter().map(|f| Some(File::from(f))).collect();
        files.resize_with(count as usize, || None);
        match (index, action, data) {
            (IRQ_INTX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                d.irqs.intx = files.pop().flatten();
                d.irqs.intx_masked = false;
                d.update_intx();
            }
            (IRQ_INTX, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD) => {
                d.irqs.intx_unmask = files.pop().flatten()
            }
            (IRQ_INTX, IRQ_SET_ACTION_UNMASK, _) if sel[0] => {
                d.irqs.intx_masked = false;
                d.update_intx();
            }
            (IRQ_INTX, IRQ_SET_ACTION_MASK, IRQ_SET_DATA_EVENTFD) => return Err(libc::ENOTSUP),
            (IRQ_INTX, IRQ_SET_ACTION_MASK, _) if sel[0] => d.irqs.intx_masked = true,
            (IRQ_INTX, IRQ_SET_ACTION_TRIGGER, _) if sel[0] => {
                if let Some(f) = &d.irqs.intx {
                    crate::write_eventfd(f);
                }
            }
            (IRQ_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                for (i, f) in files.into_iter().enumerate() {
                    d.irqs.msix[start as usize + i] = f;
                }
            }
            (IRQ_MSIX, IRQ_SET_ACTION_TRIGGER, _) => {
                for (i, _) in sel.iter().enumerate().filter(|(_, &s)| s) {
                    if let Some(f) = &d.irqs.msix[start as usize + i] {
                        crate::write_eventfd(f);
                    }
                }
            }
            (IRQ_MSIX, _, _) => return Err(libc::EINVAL),
            (IRQ_MSI, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                for (i, f) in files.into_iter().enumerate() {
                    d.irqs.msi[start as usize + i] = f;
                }
                // MSI takes over from INTx (or gives it back when every fd was de-assigned).
                d.update_intx();
            }
            (IRQ_MSI, IRQ_SET_ACTION_TRIGGER, _) => {
                for (i, _) in sel.iter().enumerate().filter(|(_, &s)| s) {
                    if let Some(f) = &d.irqs.msi[start as usize + i] {
                        crate::write_eventfd(f);
                    }
                }
            }
            // Like kernel VFIO: MASK/UNMASK only for INTx.
            (IRQ_MSI, _, _) => return Err(libc::EINVAL),
            _ => {}
        }
        ok(Bytes::default())
    }

    fn region_access_header(p: &[u8]) -> Result<(u64, u32, usize), i32> {
        need(p, 16)?;
        let (offset, region, count) = (le64(p, 0), le32(p, 8), le32(p, 12) as usize);
        if count == 0 || count > MAX_DATA_XFER {
            return Err(libc::EINVAL);
        }
        Ok((offset, region, count))
    }

    fn region_read(&self, p: &[u8]) -> Reply {
        let (offset, region, count) = Self::region_access_header(p)?;
        let mut data = vec![0u8; count];
        match region {
            0 => self.bar0_read(offset, &mut data)?,
            2 => {
                if !self.shared.bar2.read(offset, &mut data) {
                    return Err(libc::EINVAL);
                }
            }
            REGION_CONFIG => {
                if !self.shared.lock().config.read(offset, &mut data) {
                    return Err(libc::EINVAL);
                }
            }
            _ => return Err(libc::EINVAL),
        }
        ok(Bytes::default()
            .u64(offset)
            .u32(region)
            .u32(count as u32)
            .raw(&data))
    }

    fn region_write(&self, p: &[u8]) -> Reply {
        let (offset, region, count) = Self::region_access_header(p)?;
        if p.len() != 16 + count {
            return Err(libc::EINVAL);
        }
        let data = &p[16..];
        match region {
            0 => self.bar0_write(offset, data)?,
            2 => {
                // With BAR2 mmap'ed by the VMM, a REGION_WRITE here is a peer's DMA forwarded.
                let mut d = self.shared.lock();
                if !d.peer_region_write(&self.shared.bar2, offset, data) {
                    return Err(libc::EINVAL);
                }
            }
            REGION_CONFIG => {
                let mut d = self.shared.lock();
                if !d.config.write(offset, data) {
                    return Err(libc::EINVAL);
                }
                // MSI-X/MSI enable, MSI mask bits or INTx disable may have changed.
                d.config_written();
            }
            _ => return Err(libc::EINVAL),
        }
        ok(Bytes::default().u64(offset).u32(region).u32(count as u32))
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) -> Result<(), i32> {
        bar0_range(offset, data.len())?;
        let mut d = self.shared.lock();
        d.check_mmio();
        if reads_violations(offset, data.len()) {
            // The counters are complete when read (`transition.rs`).
            d.check_late_writes(&self.shared.bar2);
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = bar0_byte(&d, offset + i as u64);
        }
        Ok(())
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        bar0_range(offset, data.len())?;
        let mut d = self.shared.lock();
        d.check_mmio();
        if offset < regs::MSIX_TABLE_OFFSET {
            // Registers: whole, aligned 32-bit words only (a 64-bit store is two registers).
            if !offset.is_multiple_of(4)
                || !data.len().is_multiple_of(4)
                || offset + data.len() as u64 > regs::MSIX_TABLE_OFFSET
            {
                return Err(libc::EINVAL);
            }
            let mut wake = false;
            for (i, w) in data.chunks_exact(4).enumerate() {
                wake |= d.write_reg(offset + 4 * i as u64, le32(w, 0));
            }
            if wake {
                self.shared.wake.notify_all();
            }
            return Ok(());
        }
        for (i, &b) in data.iter().enumerate() {
            let off = (offset + i as u64) as usize;
            let t = regs::MSIX_TABLE_OFFSET as usize;
            if (t..t + d.msix_table.len()).contains(&off) {
                d.msix_table[off - t] = b;
            }
        }
        Ok(())
    }
}

/// Whether a BAR0 read of `n` bytes at `offset` covers a register that counts late peer
/// writes (REG_VIOLATIONS, REG_VIOL_LATE_PEER_WRITE).
fn reads_violations(offset: u64, n: usize) -> bool {
    let end = offset.saturating_add(n as u64);
    [regs::REG_VIOLATIONS, regs::REG_VIOL_LATE_PEER_WRITE]
        .iter()
        .any(|&r| offset < r + 4 && r < end)
}

fn bar0_range(offset: u64, n: usize) -> Result<u64, i32> {
    offset
        .checked_add(n as u64)
        .filter(|&e| e <= regs::REGS_BAR_SIZE)
        .ok_or(libc::EINVAL)
}

/// One byte of BAR0: registers are read as whole words, the MSI-X table and PBA from storage.
fn bar0_byte(d: &Device, off: u64) -> u8 {
    let t = regs::MSIX_TABLE_OFFSET;
    let pba = regs::MSIX_PBA_OFFSET;
    if off < t {
        (d.read_reg(off & !3) >> (8 * (off & 3))) as u8
    } else if off < t + d.msix_table.len() as u64 {
        d.msix_table[(off - t) as usize]
    } else if (pba..pba + d.msix_pba.len() as u64).contains(&off) {
        d.msix_pba[(off - pba) as usize]
    } else {
        0
    }
}

fn irq_info(p: &[u8], msi: bool) -> Reply {
    need(p, 16)?;
    let (argsz, index) = (le32(p, 0), le32(p, 8));
    if argsz < 16 || index >= NUM_IRQS {
        return Err(libc::EINVAL);
    }
    let (flags, count) = match index {
        IRQ_INTX => (
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            1,
        ),
        IRQ_MSI => (
            IRQ_INFO_EVENTFD,
            if msi { regs::MSI_VECTORS as u32 } else { 0 },
        ),
        IRQ_MSIX => (IRQ_INFO_EVENTFD, regs::MSIX_VECTORS as u32),
        _ => (0, 0),
    };
    ok(Bytes::default().u32(16).u32(flags).u32(index).u32(count))
}

/// Fills `mem` with [`regs::pattern_byte`]`(seed, i)` at byte `i` (`--fill-memory`), 1 MiB at a
/// time.
pub fn fill_pattern(mem: &Mapping, seed: u32) {
    const STEP: usize = 1 << 20;
    let mut buf = vec![0u8; STEP];
    for start in (0..mem.len()).step_by(STEP) {
        let n = STEP.min(mem.len() - start);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = regs::pattern_byte(seed, (start + i) as u32);
        }
        // In range by construction.
        let _ = mem.write(start as u64, &buf[..n]);
    }
}

fn need(p: &[u8], n: usize) -> Result<(), i32> {
    if p.len() < n {
        Err(libc::EINVAL)
    } else {
        Ok(())
    }
}

fn ok(b: Bytes) -> Reply {
    Ok((b.0, None))
}
