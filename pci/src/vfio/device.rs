//! [`VfioPciDevice`]: a passthrough PCI function over any [`VfioBackend`].
//!
//! Configuration space is virtualised: the guest sees the device's identity (vendor, device,
//! class, subsystem, revision), its BARs with the sizes and kinds the device reports but placed
//! by the VMM's allocator, an MSI-X capability emulated here (table and PBA trapped in their
//! BAR), INTx pin A when the device has INTx, and nothing else — other capabilities and the
//! expansion ROM are hidden. Command register writes are forwarded to the device.
//!
//! BARs: the parts the device offers for mmap (sparse areas) are mapped straight into the guest
//! ([`MappedArea`]), except the pages holding the MSI-X table and PBA; everything else is
//! trapped and forwarded as region reads and writes.
//!
//! Interrupts go straight from the device to KVM: each MSI-X vector's eventfd is the vector's
//! irqfd while the vector is deliverable; while it is masked the device signals a parking eventfd
//! instead, whose count becomes the vector's pending bit (delivered on unmask). INTx uses an irqfd
//! with resample: KVM's resample eventfd is the device's unmask eventfd, so a level interrupt
//! never needs the VMM either.
//!
//! A device whose backend fails (a vfio-user server that died) reads as all-ones and ignores
//! writes; the VM keeps running.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devices::bus::BusDevice;
use devices::legacy::LogLimiter;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod migrate;

pub use migrate::VfioMigrationOptions;

use super::backend::*;
use super::msi::{find_msi, Msi, MsiChange};
use crate::configuration::{
    BarKind, BarMove, ConfigSpaceSize, PciConfigError, PciConfiguration, PciHeader, CAP_ID_MSIX,
    COMMAND_STATUS_REG, NUM_BAR_REGS,
};
use crate::device::PciDevice;
use crate::function::{BarRequest, MappedArea, PciFunction, PciFunctionError};
use crate::interrupt::{InterruptManager, IntxLine};
use crate::msix::{MsixConfig, MSIX_CAP_WRITABLE_MASK, MSIX_TABLE_ENTRY_SIZE};

/// Page size the mapped areas are aligned to.
const PAGE: u64 = 4096;
/// Capabilities walked at most in the device's list (a loop is malformed).
const MAX_CAPABILITIES: usize = 48;

/// Errors building a [`VfioPciDevice`].
#[derive(Debug, Error)]
pub enum VfioPciError {
    /// The backend failed while the device was being set up.
    #[error("{id}: {source}")]
    Backend {
        /// Device id.
        id: String,
        /// The backend error.
        #[source]
        source: VfioError,
    },
    /// The device describes itself in a way skiff cannot pass through.
    #[error("{id}: {reason}")]
    Unsupported {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Building the virtual configuration space failed.
    #[error("{id}: configuration space: {source}")]
    Config {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: PciConfigError,
    },
    /// Interrupt set-up failed.
    #[error("{id}: interrupt set-up: {source}")]
    Interrupts {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the VMM counts for a passthrough device (`vm.counters`).
#[derive(Debug, Default)]
pub struct VfioStats {
    /// Trapped BAR reads forwarded to the device.
    pub mmio_reads: AtomicU64,
    /// Trapped BAR writes forwarded to the device.
    pub mmio_writes: AtomicU64,
    /// Trapped accesses that failed (answered with all-ones / dropped).
    pub mmio_errors: AtomicU64,
    /// DMA requests the VMM served for the device (vfio-user DMA_READ/DMA_WRITE).
    pub dma_requests: AtomicU64,
    /// DMA requests refused (no memory or device at the address, or a p2p=off peer).
    pub dma_errors: AtomicU64,
}

/// One of the device's BARs.
#[derive(Debug, Clone)]
struct VfioBar {
    index: usize,
    size: u64,
    kind: BarKind,
    region: RegionInfo,
}

/// MSI-X emulation state.
struct Msix {
    config: MsixConfig,
    cap_reg: usize,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    /// Signalled by the device instead of the irqfd while a vector is not deliverable.
    parking: Vec<EventFd>,
    /// Which eventfd the device has for each vector: true = the irqfd.
    direct: Vec<bool>,
    /// Whether MSI-X is enabled on the device.
    on_device: bool,
}

/// A passthrough PCI function.
pub struct VfioPciDevice {
    id: String,
    backend: Arc<dyn VfioBackend>,
    config: PciConfiguration,
    bars: Vec<VfioBar>,
    msix: Option<Msix>,
    msi: Option<Msi>,
    intx: Option<IntxLine>,
    intx_on_device: bool,
    pending_bar_move: Option<BarMove>,
    failed: Arc<AtomicBool>,
    error_hook: Arc<std::sync::Mutex<Option<devices::virtio::ErrorHook>>>,
    stats: Arc<VfioStats>,
    bad_access: LogLimiter,
    /// The DMA server of this device (the backend holds it weakly, so the two do not keep each
    /// other alive).
    dma: Option<Arc<dyn DmaHandler>>,
    /// The VFIO migration state machine of the device.
    mig: migrate::DeviceMigration,
}

/// Gives a backend a handler without owning it.
struct WeakDmaHandler(std::sync::Weak<dyn DmaHandler>);

impl DmaHandler for WeakDmaHandler {
    fn dma_read(&self, addr: u64, data: &mut [u8]) -> std::io::Result<()> {
        match self.0.upgrade() {
            Some(h) => h.dma_read(addr, data),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        match self.0.upgrade() {
            Some(h) => h.dma_write(addr, data),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The device's MSI-X capability: (table size, table BIR, table offset, PBA BIR, PBA offset).
fn find_msix(cfg: &[u8]) -> Option<(u16, usize, u64, usize, u64)> {
    let mut ptr = usize::from(cfg[0x34] & 0xfc);
    for _ in 0..MAX_CAPABILITIES {
        if ptr < 0x40 || ptr + 12 > cfg.len() {
            return None;
        }
        if cfg[ptr] == CAP_ID_MSIX {
            let control = le16(cfg, ptr + 2);
            let table = le32(cfg, ptr + 4);
            let pba = le32(cfg, ptr + 8);
            return Some((
                (control & 0x7ff) + 1,
                (table & 7) as usize,
                u64::from(table & !7),
                (pba & 7) as usize,
                u64::from(pba & !7),
            ));
        }
        ptr = usize::from(cfg[ptr + 1] & 0xfc);
    }
    None
}

/// The identity the guest sees: the device's own, read from its configuration space `cfg`.
fn header_of(cfg: &[u8]) -> PciHeader {
    PciHeader {
        vendor_id: le16(cfg, 0),
        device_id: le16(cfg, 2),
        revision_id: cfg[8],
        prog_if: cfg[9],
        subclass: cfg[10],
        class_code: cfg[11],
        subsystem_vendor_id: le16(cfg, 0x2c),
        subsystem_id: le16(cfg, 0x2e),
        multifunction: false,
    }
}

impl VfioPciDevice {
    /// Build the function for the device behind `backend`: read its configuration space and
    /// regions, set up MSI-X vectors from `interrupts` and, with `intx` = `(pin, gsi)`, INTx.
    pub fn new(
        id: &str,
        backend: Arc<dyn VfioBackend>,
        interrupts: Arc<dyn InterruptManager>,
        intx: Option<(u8, u32)>,
    ) -> Result<Self, VfioPciError> {
        let cfg = Self::read_config_space(id, backend.as_ref())?;
        let header = header_of(&cfg);
        let mut config = PciConfiguration::new(&header, ConfigSpaceSize::Legacy);
        let bars = Self::read_bars(id, backend.as_ref(), &cfg)?;
        for b in &bars {
            config
                .add_bar(b.index, b.size, b.kind, 0)
                .map_err(|source| VfioPciError::Config {
                    id: id.to_string(),
                    source,
                })?;
        }
        let msix = match find_msix(&cfg) {
            Some(cap) => Some(Self::setup_msix(
                id,
                backend.as_ref(),
                &mut config,
                interrupts.clone(),
                cap,
                &bars,
            )?),
            None => None,
        };
        let msi = Self::setup_msi(id, backend.as_ref(), &mut config, &interrupts, &cfg)?;
        let intx = Self::setup_intx(id, backend.as_ref(), &mut config, &interrupts, &cfg, intx)?;
        let mig = migrate::DeviceMigration::probe(id, backend.migration());
        let mut dev = Self {
            id: id.to_string(),
            backend,
            config,
            bars,
            msix,
            msi,
            intx,
            intx_on_device: false,
            pending_bar_move: None,
            failed: Arc::new(AtomicBool::new(false)),
            error_hook: Default::default(),
            stats: Arc::new(VfioStats::default()),
            bad_access: LogLimiter::new(),
            dma: None,
            mig,
        };
        dev.install_failure_hook();
        dev.enable_intx().map_err(|source| VfioPciError::Backend {
            id: id.to_string(),
            source,
        })?;
        log::info!(
            "{id}: {} {:04x}:{:04x}, BARs {:?}, MSI-X {}, MSI {}, INTx {}",
            dev.backend.kind(),
            header.vendor_id,
            header.device_id,
            dev.bars
                .iter()
                .map(|b| (b.index, b.size))
                .collect::<Vec<_>>(),
            dev.msix.as_ref().map_or(0, |m| m.config.num_vectors()),
            dev.msi.as_ref().map_or(0, |m| m.max_vectors()),
            dev.intx.is_some()
        );
        Ok(dev)
    }

    /// The first 256 bytes of the device's configuration space, checked to be an endpoint's.
    fn read_config_space(id: &str, backend: &dyn VfioBackend) -> Result<Vec<u8>, VfioPciError> {
        let be = |source| VfioPciError::Backend {
            id: id.to_string(),
            source,
        };
        let unsupported = |reason: String| VfioPciError::Unsupported {
            id: id.to_string(),
            reason,
        };
        let info = backend.device_info().map_err(be)?;
        if info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(unsupported(format!(
                "the device has {} regions; a PCI device has at least {}",
                info.num_regions,
                VFIO_PCI_CONFIG_REGION_INDEX + 1
            )));
        }
        let mut cfg = vec![0u8; 256];
        backend
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
            .map_err(be)?;
        if cfg[0x0e] & 0x7f != 0 {
            return Err(unsupported(format!(
                "header type {:#x}: only endpoints (type 0) can be passed through",
                cfg[0x0e]
            )));
        }
        Ok(cfg)
    }

    /// The emulated MSI capability, when the device's configuration space `cfg` has one and the
    /// device has MSI vectors.
    fn setup_msi(
        id: &str,
        backend: &dyn VfioBackend,
        config: &mut PciConfiguration,
        interrupts: &Arc<dyn InterruptManager>,
        cfg: &[u8],
    ) -> Result<Option<Msi>, VfioPciError> {
        let Some(capable) = find_msi(cfg, MAX_CAPABILITIES) else {
            return Ok(None);
        };
        let count = backend
            .irq_info(VFIO_PCI_MSI_IRQ_INDEX)
            .map(|i| i.count)
            .unwrap_or(0);
        if count == 0 {
            return Ok(None);
        }
        Msi::new(config, capable.min(count), interrupts.clone())
            .map(Some)
            .map_err(|e| VfioPciError::Unsupported {
                id: id.to_string(),
                reason: e.to_string(),
            })
    }

    /// The INTx line `intx` = `(pin, gsi)` asks for, when the device has INTx (an interrupt pin in
    /// `cfg` and an INTx IRQ), with the pin and line registers set.
    fn setup_intx(
        id: &str,
        backend: &dyn VfioBackend,
        config: &mut PciConfiguration,
        interrupts: &Arc<dyn InterruptManager>,
        cfg: &[u8],
        intx: Option<(u8, u32)>,
    ) -> Result<Option<IntxLine>, VfioPciError> {
        let intx_count = backend
            .irq_info(VFIO_PCI_INTX_IRQ_INDEX)
            .map(|i| i.count)
            .unwrap_or(0);
        match intx {
            Some((pin, gsi)) if intx_count > 0 && cfg[0x3d] != 0 => {
                let line =
                    interrupts
                        .intx_irqfd(gsi)
                        .map_err(|source| VfioPciError::Interrupts {
                            id: id.to_string(),
                            source,
                        })?;
                config.set_interrupt_pin(pin);
                config.set_interrupt_line(u8::try_from(gsi).unwrap_or(0xff));
                Ok(Some(line))
            }
            _ => Ok(None),
        }
    }

    /// Have the backend mark the device failed (and report it to the error hook, once) when it
    /// dies.
    fn install_failure_hook(&self) {
        let failed = self.failed.clone();
        let error_hook = self.error_hook.clone();
        let hook_id = self.id.clone();
        self.backend.set_failure_hook(Arc::new(move |reason: &str| {
            if !failed.swap(true, Ordering::SeqCst) {
                log::error!("{hook_id}: the device is gone ({reason}); it reads as all-ones");
                let hook = error_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(hook) = hook {
                    hook(&hook_id, &format!("the device is gone: {reason}"));
                }
            }
        }));
    }

    /// The BARs the device reports: sizes from its regions, kinds from its BAR registers.
    fn read_bars(
        id: &str,
        backend: &dyn VfioBackend,
        cfg: &[u8],
    ) -> Result<Vec<VfioBar>, VfioPciError> {
        let mut bars = Vec::new();
        let mut index = 0;
        while index < NUM_BAR_REGS {
            let raw = le32(cfg, 0x10 + 4 * index);
            let kind = if raw & 1 != 0 {
                BarKind::Io
            } else if raw & 0b110 == 0b100 {
                BarKind::Mem64 {
                    prefetchable: raw & 0b1000 != 0,
                }
            } else {
                BarKind::Mem32 {
                    prefetchable: raw & 0b1000 != 0,
                }
            };
            let region =
                backend
                    .region_info(index as u32)
                    .map_err(|source| VfioPciError::Backend {
                        id: id.to_string(),
                        source,
                    })?;
            let step = if matches!(kind, BarKind::Mem64 { .. }) {
                2
            } else {
                1
            };
            if region.size != 0 {
                if !region.size.is_power_of_two() {
                    return Err(VfioPciError::Unsupported {
                        id: id.to_string(),
                        reason: format!(
                            "BAR {index} has size {:#x}, not a power of two",
                            region.size
                        ),
                    });
                }
                // Small memory BARs are rounded up to a page so they can be mapped and moved
                // page by page; the guest sees the larger size (harmless: reads beyond are 0).
                let size = match kind {
                    BarKind::Io => region.size,
                    _ => region.size.max(PAGE),
                };
                bars.push(VfioBar {
                    index,
                    size,
                    kind,
                    region,
                });
            }
            index += step;
        }
        Ok(bars)
    }

    fn setup_msix(
        id: &str,
        backend: &dyn VfioBackend,
        config: &mut PciConfiguration,
        interrupts: Arc<dyn InterruptManager>,
        (size, table_bar, table_offset, pba_bar, pba_offset): (u16, usize, u64, usize, u64),
        bars: &[VfioBar],
    ) -> Result<Msix, VfioPciError> {
        let unsupported = |reason: String| VfioPciError::Unsupported {
            id: id.to_string(),
            reason,
        };
        let count = backend
            .irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_err(|source| VfioPciError::Backend {
                id: id.to_string(),
                source,
            })?
            .count;
        let vectors = size.min(u16::try_from(count).unwrap_or(u16::MAX));
        if vectors == 0 {
            return Err(unsupported(
                "the MSI-X capability names vectors the device does not have".into(),
            ));
        }
        let inside = |bar: usize, offset: u64, len: u64| {
            bars.iter()
                .any(|b| b.index == bar && offset.checked_add(len).is_some_and(|end| end <= b.size))
        };
        let table_len = u64::from(vectors) * MSIX_TABLE_ENTRY_SIZE;
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        if !inside(table_bar, table_offset, table_len) || !inside(pba_bar, pba_offset, pba_len) {
            return Err(unsupported(format!(
                "the MSI-X table (BAR {table_bar} + {table_offset:#x}) or PBA (BAR {pba_bar} + {pba_offset:#x}) is outside its BAR"
            )));
        }
        let msix =
            MsixConfig::new(vectors, interrupts).map_err(|source| VfioPciError::Interrupts {
                id: id.to_string(),
                source,
            })?;
        let cap = msix.capability(
            table_bar as u8,
            table_offset as u32,
            pba_bar as u8,
            pba_offset as u32,
        );
        let cap_reg = config
            .add_capability(&cap)
            .map_err(|source| VfioPciError::Config {
                id: id.to_string(),
                source,
            })?
            / 4;
        config.set_writable_bits(cap_reg, MSIX_CAP_WRITABLE_MASK);
        let parking = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| VfioPciError::Interrupts {
                id: id.to_string(),
                source,
            })?;
        Ok(Msix {
            config: msix,
            cap_reg,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
            parking,
            direct: vec![false; usize::from(vectors)],
            on_device: false,
        })
    }

    /// Report the device's failure (its backend died) to `hook` as `(id, reason)`.
    pub fn set_error_hook(&mut self, hook: devices::virtio::ErrorHook) {
        *self.error_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Serve the DMA the device cannot do itself with `handler` (kept alive by this function).
    pub fn set_dma_handler(&mut self, handler: Arc<dyn DmaHandler>) {
        self.backend
            .set_dma_handler(Arc::new(WeakDmaHandler(Arc::downgrade(&handler))));
        self.dma = Some(handler);
    }

    /// The counters the VMM's DMA handler adds to.
    pub fn stats(&self) -> Arc<VfioStats> {
        self.stats.clone()
    }

    /// The backend (the VMM maps the DMA space through it).
    pub fn backend(&self) -> &Arc<dyn VfioBackend> {
        &self.backend
    }

    /// Whether the backend failed (the device then reads as all-ones).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn note_error(&mut self, what: &str, e: &VfioError) {
        self.stats.mmio_errors.fetch_add(1, Ordering::Relaxed);
        if self.bad_access.allow() {
            log::warn!(
                "{}: {what}: {e} (occurrence {})",
                self.id,
                self.bad_access.count()
            );
        }
    }

    /// Give the device the INTx irqfd and the resample eventfd as its unmask eventfd.
    fn enable_intx(&mut self) -> Result<(), VfioError> {
        let Some(line) = &self.intx else {
            return Ok(());
        };
        self.backend
            .set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[Some(&line.irqfd)])?;
        self.backend.set_intx_unmask_eventfd(&line.resamplefd)?;
        self.intx_on_device = true;
        Ok(())
    }

    /// Bring the device's MSI-X eventfds in line with the emulated table: enabled or not, and
    /// each vector's eventfd the irqfd (deliverable) or its parking eventfd (masked).
    fn sync_msix(&mut self) {
        let Some(m) = self.msix.as_mut() else { return };
        let enabled = m.config.enabled();
        if enabled != m.on_device {
            let result = if enabled {
                if self.intx_on_device {
                    if let Err(e) = self.backend.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX) {
                        log::warn!("{}: cannot disable INTx: {e}", self.id);
                    }
                    self.intx_on_device = false;
                }
                for v in 0..m.config.num_vectors() {
                    m.direct[usize::from(v)] =
                        m.config.is_deliverable(v) && m.config.ensure_route(v);
                }
                let fds: Vec<Option<&EventFd>> = (0..m.config.num_vectors())
                    .map(|v| {
                        if m.direct[usize::from(v)] {
                            m.config.vector_irqfd(v)
                        } else {
                            Some(&m.parking[usize::from(v)])
                        }
                    })
                    .collect();
                self.backend
                    .set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &fds)
            } else {
                self.backend.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
            };
            m.on_device = enabled;
            if let Err(e) = result {
                log::warn!(
                    "{}: MSI-X {}: {e}",
                    self.id,
                    if enabled { "enable" } else { "disable" }
                );
            }
            if !enabled {
                if !self.msi.as_ref().is_some_and(Msi::enabled) {
                    if let Err(e) = self.enable_intx() {
                        log::warn!("{}: cannot re-enable INTx: {e}", self.id);
                    }
                }
                return;
            }
        }
        let Some(m) = self.msix.as_mut() else { return };
        if !m.on_device {
            return;
        }
        for v in 0..m.config.num_vectors() {
            let i = usize::from(v);
            let want = m.config.is_deliverable(v) && m.config.ensure_route(v);
            if want == m.direct[i] {
                continue;
            }
            let fd = if want {
                m.config.vector_irqfd(v)
            } else {
                Some(&m.parking[i])
            };
            if let Err(e) =
                self.backend
                    .set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, u32::from(v), &[fd])
            {
                log::warn!("{}: MSI-X vector {v}: {e}", self.id);
                continue;
            }
            m.direct[i] = want;
            // What the device signalled while the vector was parked is delivered now.
            if want && m.parking[i].read().is_ok_and(|n| n > 0) {
                let _ = m.config.trigger(v);
            }
        }
    }

    /// Bring the device's MSI eventfds in line with the emulated capability.
    fn sync_msi(&mut self) {
        let Some(m) = self.msi.as_mut() else { return };
        let mut intx_back = false;
        match m.sync(&self.config) {
            MsiChange::None => {}
            MsiChange::Enable => {
                if self.intx_on_device {
                    if let Err(e) = self.backend.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX) {
                        log::warn!("{}: cannot disable INTx: {e}", self.id);
                    }
                    self.intx_on_device = false;
                }
                let n = m.enabled_vectors();
                let fds: Vec<Option<&EventFd>> = (0..n).map(|v| Some(m.device_fd(v))).collect();
                if let Err(e) = self
                    .backend
                    .set_irq_eventfds(VFIO_PCI_MSI_IRQ_INDEX, 0, &fds)
                {
                    log::warn!("{}: MSI enable: {e}", self.id);
                }
                for v in 0..n {
                    m.deliver_pending(v);
                }
            }
            MsiChange::Disable => {
                if let Err(e) = self.backend.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX) {
                    log::warn!("{}: MSI disable: {e}", self.id);
                }
                intx_back = !self.msix.as_ref().is_some_and(|x| x.on_device);
            }
            MsiChange::Vectors(vs) => {
                for v in vs {
                    let fd = m.device_fd(v);
                    if let Err(e) =
                        self.backend
                            .set_irq_eventfds(VFIO_PCI_MSI_IRQ_INDEX, v, &[Some(fd)])
                    {
                        log::warn!("{}: MSI vector {v}: {e}", self.id);
                    }
                    m.deliver_pending(v);
                }
            }
        }
        if intx_back {
            if let Err(e) = self.enable_intx() {
                log::warn!("{}: cannot re-enable INTx: {e}", self.id);
            }
        }
    }

    /// Move interrupts the device signalled on parked vectors into the PBA.
    fn collect_parked(&mut self) {
        let Some(m) = self.msix.as_mut() else { return };
        for v in 0..m.config.num_vectors() {
            let i = usize::from(v);
            if !m.direct[i] && m.parking[i].read().is_ok_and(|n| n > 0) {
                // Not deliverable: trigger sets the pending bit.
                let _ = m.config.trigger(v);
            }
        }
    }

    /// The BAR decoding at `base` now.
    fn bar_at(&self, base: u64) -> Option<usize> {
        self.bars
            .iter()
            .position(|b| self.config.bar_address(b.index) == Some(base))
    }

    /// Whether `offset..offset+len` of BAR `index` is the MSI-X table (Some(true)) or PBA
    /// (Some(false)).
    fn msix_part(&self, index: usize, offset: u64, len: u64) -> Option<(bool, u64)> {
        let m = self.msix.as_ref()?;
        let within = |bar: usize, start: u64, size: u64| {
            bar == index && offset >= start && offset + len <= start + size
        };
        if within(m.table_bar, m.table_offset, m.config.table_size()) {
            return Some((true, offset - m.table_offset));
        }
        if within(m.pba_bar, m.pba_offset, m.config.pba_size()) {
            return Some((false, offset - m.pba_offset));
        }
        None
    }

    /// The pages of BAR `index` that hold the MSI-X table or PBA (they stay trapped).
    fn msix_pages(&self, index: usize) -> Vec<(u64, u64)> {
        let Some(m) = &self.msix else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (bar, off, len) in [
            (m.table_bar, m.table_offset, m.config.table_size()),
            (m.pba_bar, m.pba_offset, m.config.pba_size()),
        ] {
            if bar == index {
                let start = off & !(PAGE - 1);
                out.push((start, (off + len).next_multiple_of(PAGE)));
            }
        }
        out
    }

    fn forward_command(&mut self) {
        let command = self.config.command();
        if let Err(e) =
            self.backend
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &command.to_le_bytes())
        {
            self.note_error("command register write", &e);
        }
    }
}

/// Split `area` around the `holes` (sorted or not), keeping page-aligned pieces.
fn carve(area: SparseArea, holes: &[(u64, u64)]) -> Vec<SparseArea> {
    let mut pieces = vec![(area.offset, area.offset + area.size)];
    for &(hs, he) in holes {
        let mut next = Vec::new();
        for (s, e) in pieces {
            if he <= s || hs >= e {
                next.push((s, e));
                continue;
            }
            if hs > s {
                next.push((s, hs));
            }
            if he < e {
                next.push((he, e));
            }
        }
        pieces = next;
    }
    pieces
        .into_iter()
        .filter(|(s, e)| e > s)
        .map(|(s, e)| SparseArea {
            offset: s,
            size: e - s,
        })
        .collect()
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        if let Some(m) = self.msi.as_mut() {
            if m.pending_reg() == reg_idx {
                let bits = m.pending_bits();
                self.config.set_reg(reg_idx, bits);
            }
        }
        self.config.read_reg(reg_idx)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if let Some(m) = self.config.write_reg(reg_idx, offset, data) {
            self.pending_bar_move = Some(m);
        }
        if reg_idx == COMMAND_STATUS_REG {
            self.forward_command();
        }
        if self.msi.as_ref().is_some_and(|m| m.owns(reg_idx)) {
            self.sync_msi();
        }
        if self.msix.as_ref().is_some_and(|m| m.cap_reg == reg_idx) {
            let control = (self.config.read_reg(reg_idx) >> 16) as u16;
            if let Some(m) = self.msix.as_mut() {
                m.config.set_message_control(control);
            }
            self.sync_msix();
        }
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn take_bar_move(&mut self) -> Option<BarMove> {
        self.pending_bar_move.take()
    }
}

impl BusDevice for VfioPciDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some(b) = self.bar_at(base) else {
            data.fill(0xff);
            return;
        };
        let index = self.bars[b].index;
        match self.msix_part(index, offset, data.len() as u64) {
            Some((true, at)) => {
                if let Some(m) = self.msix.as_mut() {
                    m.config.read_table(at, data);
                }
                return;
            }
            Some((false, at)) => {
                self.collect_parked();
                if let Some(m) = self.msix.as_mut() {
                    m.config.read_pba(at, data);
                }
                return;
            }
            None => {}
        }
        if self.failed() {
            data.fill(0xff);
            return;
        }
        self.stats.mmio_reads.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.backend.region_read(index as u32, offset, data) {
            data.fill(0xff);
            self.note_error("BAR read", &e);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(b) = self.bar_at(base) else { return };
        let index = self.bars[b].index;
        match self.msix_part(index, offset, data.len() as u64) {
            Some((true, at)) => {
                if let Some(m) = self.msix.as_mut() {
                    m.config.write_table(at, data);
                }
                self.sync_msix();
                return;
            }
            Some((false, at)) => {
                if let Some(m) = self.msix.as_mut() {
                    m.config.write_pba(at, data);
                }
                return;
            }
            None => {}
        }
        if self.failed() {
            return;
        }
        self.stats.mmio_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.backend.region_write(index as u32, offset, data) {
            self.note_error("BAR write", &e);
        }
    }
}

impl PciFunction for VfioPciDevice {
    fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        self.bars
            .iter()
            .map(|b| {
                let holes = self.msix_pages(b.index);
                let fd = b.region.mmap_fd.clone();
                let writable = b.region.flags & VFIO_REGION_INFO_FLAG_WRITE != 0;
                let mapped = match (&fd, b.kind) {
                    (Some(fd), BarKind::Mem32 { .. } | BarKind::Mem64 { .. }) => b
                        .region
                        .mappable_areas()
                        .into_iter()
                        .filter(|a| {
                            a.offset.is_multiple_of(PAGE)
                                && a.size.is_multiple_of(PAGE)
                                && a.offset
                                    .checked_add(a.size)
                                    .is_some_and(|e| e <= b.region.size)
                        })
                        .flat_map(|a| carve(a, &holes))
                        .map(|a| MappedArea {
                            bar_offset: a.offset,
                            len: a.size,
                            fd: fd.clone(),
                            fd_offset: b.region.offset + a.offset,
                            writable,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                BarRequest {
                    index: b.index,
                    size: b.size,
                    kind: b.kind,
                    mapped,
                }
            })
            .collect()
    }

    fn set_bar(&mut self, index: usize, addr: u64) -> Result<(), PciFunctionError> {
        self.config
            .set_bar_address(index, addr)
            .map_err(|source| PciFunctionError::Config {
                id: self.id.clone(),
                source,
            })
    }

    fn bar_address(&self, index: usize) -> Option<u64> {
        self.config.bar_address(index)
    }

    fn intx_resample_fd(&self) -> Option<RawFd> {
        // The resample eventfd is the device's unmask eventfd: the device itself consumes it.
        None
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let mut d = vec![("backend", self.backend.kind().to_string())];
        d.extend(self.backend.describe());
        d
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("mmio_reads", s.mmio_reads.load(Ordering::Relaxed)),
            ("mmio_writes", s.mmio_writes.load(Ordering::Relaxed)),
            ("mmio_errors", s.mmio_errors.load(Ordering::Relaxed)),
            ("dma_requests", s.dma_requests.load(Ordering::Relaxed)),
            ("dma_errors", s.dma_errors.load(Ordering::Relaxed)),
            ("failed", u64::from(self.failed())),
        ]
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if self.failed() {
            return;
        }
        for index in [
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_PCI_MSI_IRQ_INDEX,
            VFIO_PCI_INTX_IRQ_INDEX,
        ] {
            let _ = self.backend.disable_irqs(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use crate::interrupt::fake::FakeInterruptManager;

    type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

    /// A device answering from memory: config space, BAR0 (4 KiB registers, MSI-X table at 0x800,
    /// PBA at 0xc00) and BAR2 (64 KiB, mappable from a memfd); records interrupt set-up.
    #[derive(Default)]
    struct FakeBackend {
        cfg: Mutex<Vec<u8>>,
        bar0: Mutex<Vec<u8>>,
        irqs: Mutex<BTreeMap<(u32, u32), Option<EventFd>>>,
        unmask: Mutex<Option<i32>>,
        failing: AtomicBool,
        hook: Mutex<Option<FailureHook>>,
        memfd: Option<Arc<std::fs::File>>,
        mig: Option<migrate_tests::FakeMigration>,
        iommu: Option<Arc<migrate_tests::FakeIommuLog>>,
        resets: std::sync::atomic::AtomicU32,
    }

    impl FakeBackend {
        fn new() -> Self {
            let mut cfg = vec![0u8; 256];
            cfg[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
            cfg[2..4].copy_from_slice(&0x0f5fu16.to_le_bytes());
            cfg[0x0b] = 0xff;
            cfg[0x10] = 0; // BAR0 32-bit memory
            cfg[0x18] = 0b1100; // BAR2 64-bit prefetchable
            cfg[0x34] = 0x40;
            cfg[0x3d] = 1;
            cfg[0x40] = CAP_ID_MSIX;
            cfg[0x41] = 0x50;
            cfg[0x50] = crate::configuration::CAP_ID_MSI;
            cfg[0x52] = 1 << 1; // Multiple Message Capable: 2 vectors, 32-bit, no masking
            cfg[0x42..0x44].copy_from_slice(&1u16.to_le_bytes());
            cfg[0x44..0x48].copy_from_slice(&0x800u32.to_le_bytes());
            cfg[0x48..0x4c].copy_from_slice(&0xc00u32.to_le_bytes());
            let memfd = {
                let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
                f.set_len(0x10000).unwrap();
                Arc::new(f)
            };
            Self {
                cfg: Mutex::new(cfg),
                bar0: Mutex::new(vec![0u8; 0x1000]),
                memfd: Some(memfd),
                ..Default::default()
            }
        }

        fn check(&self, what: &'static str) -> Result<(), VfioError> {
            if self.failing.load(Ordering::SeqCst) {
                if let Some(h) = self.hook.lock().unwrap().as_ref() {
                    h("peer closed the socket");
                }
                return Err(VfioError::Transport {
                    what,
                    source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                });
            }
            Ok(())
        }
    }

    impl VfioBackend for FakeBackend {
        fn kind(&self) -> &'static str {
            "vfio-user"
        }
        fn device_info(&self) -> Result<DeviceInfo, VfioError> {
            Ok(DeviceInfo {
                flags: 0b11,
                num_regions: 9,
                num_irqs: 5,
            })
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError> {
            let (size, flags, fd): (
                u64,
                u32,
                Option<Arc<dyn std::os::fd::AsRawFd + Send + Sync>>,
            ) = match index {
                0 => (0x1000, 3, None),
                2 => (0x10000, 7, self.memfd.clone().map(|f| f as _)),
                7 => (256, 3, None),
                _ => (0, 0, None),
            };
            Ok(RegionInfo {
                index,
                flags,
                size,
                offset: 0,
                mmap_fd: fd,
                sparse: Vec::new(),
            })
        }
        fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
            Ok(IrqInfo {
                index,
                flags: 1,
                count: match index {
                    VFIO_PCI_INTX_IRQ_INDEX => 1,
                    VFIO_PCI_MSI_IRQ_INDEX => 2,
                    VFIO_PCI_MSIX_IRQ_INDEX => 2,
                    _ => 0,
                },
            })
        }
        fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError> {
            self.check("region read")?;
            let src = match index {
                7 => self.cfg.lock().unwrap().clone(),
                0 => self.bar0.lock().unwrap().clone(),
                _ => {
                    return Err(VfioError::Invalid {
                        what: "region read",
                        reason: "no such region".into(),
                    })
                }
            };
            let o = offset as usize;
            data.copy_from_slice(&src[o..o + data.len()]);
            Ok(())
        }
        fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
            self.check("region write")?;
            let mut dst = match index {
                7 => self.cfg.lock().unwrap(),
                0 => self.bar0.lock().unwrap(),
                _ => {
                    return Err(VfioError::Invalid {
                        what: "region write",
                        reason: "no such region".into(),
                    })
                }
            };
            let o = offset as usize;
            dst[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn set_irq_eventfds(
            &self,
            index: u32,
            start: u32,
            fds: &[Option<&EventFd>],
        ) -> Result<(), VfioError> {
            let mut irqs = self.irqs.lock().unwrap();
            for (i, fd) in fds.iter().enumerate() {
                irqs.insert(
                    (index, start + i as u32),
                    fd.map(|f| f.try_clone().unwrap()),
                );
            }
            Ok(())
        }
        fn disable_irqs(&self, index: u32) -> Result<(), VfioError> {
            self.irqs.lock().unwrap().retain(|(i, _), _| *i != index);
            Ok(())
        }
        fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<(), VfioError> {
            *self.unmask.lock().unwrap() = Some(fd.as_raw_fd());
            Ok(())
        }
        fn dma_map(&self, _: u64, _: u64, _: DmaBacking<'_>, _: DmaProt) -> Result<(), VfioError> {
            Ok(())
        }
        fn dma_unmap(&self, _: u64, _: u64) -> Result<(), VfioError> {
            Ok(())
        }
        fn reset(&self) -> Result<(), VfioError> {
            self.resets.fetch_add(1, Ordering::SeqCst);
            if let Some(m) = &self.mig {
                m.reset();
            }
            Ok(())
        }
        fn set_failure_hook(&self, hook: Arc<dyn Fn(&str) + Send + Sync>) {
            *self.hook.lock().unwrap() = Some(hook);
        }
        fn migration(&self) -> Option<&dyn crate::vfio::mig_backend::MigrationBackend> {
            self.mig
                .as_ref()
                .map(|m| m as &dyn crate::vfio::mig_backend::MigrationBackend)
        }
        fn iommu_dirty_log(&self) -> Option<Arc<dyn crate::vfio::mig_backend::IommuDirtyLog>> {
            self.iommu.clone().map(|l| l as _)
        }
    }

    mod migrate_tests;

    use std::os::fd::AsRawFd;

    fn device() -> (Arc<FakeBackend>, Arc<FakeInterruptManager>, VfioPciDevice) {
        let backend = Arc::new(FakeBackend::new());
        let im = Arc::new(FakeInterruptManager::default());
        let dev = VfioPciDevice::new("dev0", backend.clone(), im.clone(), Some((1, 17))).unwrap();
        (backend, im, dev)
    }

    #[test]
    fn config_space_is_virtualised_and_bars_requested() {
        let (backend, _, mut dev) = device();
        assert_eq!(dev.config_read(0), 0x0f5f_1b36);
        assert_eq!(dev.config_read(2) >> 24, 0xff);
        assert_eq!((dev.config_read(15) >> 8) & 0xff, 1, "INTA#");
        // Only the emulated MSI-X and MSI capabilities are shown.
        let cap = (dev.config_read(13) & 0xfc) as usize;
        assert_eq!(dev.config_read(cap / 4) & 0xff, u32::from(CAP_ID_MSIX));
        let next = ((dev.config_read(cap / 4) >> 8) & 0xfc) as usize;
        assert_eq!(
            dev.config_read(next / 4) & 0xff,
            u32::from(crate::configuration::CAP_ID_MSI)
        );
        assert_eq!(
            (dev.config_read(next / 4) >> 8) & 0xff,
            0,
            "no other capability"
        );
        // The expansion ROM is hidden.
        assert_eq!(dev.config_read(12), 0);
        let bars = dev.bar_requests();
        assert_eq!(bars.len(), 2);
        assert_eq!((bars[0].index, bars[0].size), (0, 0x1000));
        assert!(bars[0].mapped.is_empty(), "BAR0 has no mmap fd");
        assert_eq!((bars[1].index, bars[1].size), (2, 0x10000));
        assert!(matches!(
            bars[1].kind,
            BarKind::Mem64 { prefetchable: true }
        ));
        assert_eq!(bars[1].mapped.len(), 1);
        assert_eq!(
            (bars[1].mapped[0].bar_offset, bars[1].mapped[0].len),
            (0, 0x10000)
        );
        // Sizing BAR2 the guest's way.
        dev.set_bar(2, 0xd000_0000).unwrap();
        dev.config_write(6, 0, &u32::MAX.to_le_bytes());
        dev.config_write(7, 0, &u32::MAX.to_le_bytes());
        assert_eq!(dev.config_read(6) & !0xf, !(0x10000u32 - 1));
        // Command register writes reach the device.
        dev.config_write(1, 0, &0x6u16.to_le_bytes());
        assert_eq!(backend.cfg.lock().unwrap()[4], 0x6);
        // INTx: the irqfd and the unmask (resample) eventfd went to the device.
        assert!(backend
            .irqs
            .lock()
            .unwrap()
            .contains_key(&(VFIO_PCI_INTX_IRQ_INDEX, 0)));
        assert!(backend.unmask.lock().unwrap().is_some());
    }

    /// The MSI capability's register index in the guest's view.
    fn msi_reg(dev: &mut VfioPciDevice) -> usize {
        let mut cap = (dev.config_read(13) & 0xfc) as usize;
        while dev.config_read(cap / 4) & 0xff != u32::from(crate::configuration::CAP_ID_MSI) {
            cap = ((dev.config_read(cap / 4) >> 8) & 0xfc) as usize;
            assert_ne!(cap, 0, "no MSI capability");
        }
        cap / 4
    }

    #[test]
    fn msi_vectors_masking_pending_and_back_to_intx() {
        let (backend, im, mut dev) = device();
        let r = msi_reg(&mut dev);
        let control = (dev.config_read(r) >> 16) as u16;
        assert_eq!(control & 0x0e, 1 << 1, "2 vectors capable");
        assert_ne!(control & (1 << 7), 0, "64-bit");
        assert_ne!(control & (1 << 8), 0, "per-vector masking (emulated)");
        dev.config_write(r + 1, 0, &0xfee0_0000u32.to_le_bytes());
        dev.config_write(r + 2, 0, &0u32.to_le_bytes());
        dev.config_write(r + 3, 0, &0x60u32.to_le_bytes());
        dev.config_write(r + 4, 0, &0b10u32.to_le_bytes()); // vector 1 masked
                                                            // Enable with 2 vectors (MME = 1).
        dev.config_write(r, 2, &((1u16 << 4) | 1).to_le_bytes());
        let signal = |v: u32| {
            let irqs = backend.irqs.lock().unwrap();
            irqs[&(VFIO_PCI_MSI_IRQ_INDEX, v)]
                .as_ref()
                .unwrap()
                .write(1)
                .unwrap();
        };
        assert!(
            !backend
                .irqs
                .lock()
                .unwrap()
                .contains_key(&(VFIO_PCI_INTX_IRQ_INDEX, 0)),
            "INTx is off while MSI is on"
        );
        // MSI-X took the first two GSIs; MSI vectors are the next two.
        signal(0);
        assert_eq!(im.fired(2), 1, "vector 0 reaches KVM directly");
        signal(1);
        assert_eq!(im.fired(3), 0, "masked vector 1 is held");
        assert_eq!(dev.config_read(r + 5), 0b10, "pending bit of vector 1");
        dev.config_write(r + 4, 0, &0u32.to_le_bytes());
        assert_eq!(im.fired(3), 1, "delivered on unmask");
        assert_eq!(dev.config_read(r + 5), 0);
        signal(1);
        assert_eq!(im.fired(3), 1);
        // Routes: vector v carries data | v.
        let routes = im.routes.lock().unwrap().clone();
        let gsis: Vec<_> = routes.values().copied().collect();
        assert!(
            gsis.contains(&(0xfee0_0000, 0x60)) && gsis.contains(&(0xfee0_0000, 0x61)),
            "{routes:?}"
        );
        // Disable: MSI off on the device, INTx back.
        dev.config_write(r, 2, &(1u16 << 4).to_le_bytes());
        let irqs = backend.irqs.lock().unwrap();
        assert!(!irqs.keys().any(|(i, _)| *i == VFIO_PCI_MSI_IRQ_INDEX));
        assert!(irqs.contains_key(&(VFIO_PCI_INTX_IRQ_INDEX, 0)));
    }

    #[test]
    fn trapped_accesses_msix_and_a_dead_device() {
        let (backend, im, mut dev) = device();
        dev.set_bar(0, 0xc000_0000).unwrap();
        backend.bar0.lock().unwrap()[0..4].copy_from_slice(&0x4454_4b53u32.to_le_bytes());
        let mut b = [0u8; 4];
        dev.read(0xc000_0000, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4454_4b53);
        dev.write(0xc000_0000, 0x10, &7u32.to_le_bytes());
        assert_eq!(backend.bar0.lock().unwrap()[0x10], 7);
        // MSI-X table writes are emulated, not forwarded.
        dev.write(0xc000_0000, 0x800, &0xfee0_0000u32.to_le_bytes());
        dev.write(0xc000_0000, 0x808, &0x41u32.to_le_bytes());
        assert_eq!(backend.bar0.lock().unwrap()[0x800], 0);
        let mut e = [0u8; 4];
        dev.read(0xc000_0000, 0x808, &mut e);
        assert_eq!(u32::from_le_bytes(e), 0x41);
        // Enable MSI-X: INTx is turned off on the device, vectors get eventfds: vector 0 is
        // unmasked (its irqfd), vector 1 masked (a parking eventfd).
        let cap = (dev.config_read(13) & 0xfc) as usize / 4;
        dev.write(0xc000_0000, 0x80c, &0u32.to_le_bytes()); // unmask vector 0
        dev.config_write(cap, 2, &0x8000u16.to_le_bytes());
        // What the device signals on each vector's eventfd: vector 0 reaches KVM directly,
        // vector 1 does not.
        let signal = |v: u32| {
            let irqs = backend.irqs.lock().unwrap();
            irqs[&(VFIO_PCI_MSIX_IRQ_INDEX, v)]
                .as_ref()
                .unwrap()
                .write(1)
                .unwrap();
        };
        assert!(!backend
            .irqs
            .lock()
            .unwrap()
            .contains_key(&(VFIO_PCI_INTX_IRQ_INDEX, 0)));
        signal(0);
        assert_eq!(im.fired(0), 1);
        signal(1);
        assert_eq!(im.fired(1), 0);
        // What the device signalled on masked vector 1 shows in the PBA, and is delivered on
        // unmask.
        let mut pba = [0u8; 8];
        dev.read(0xc000_0000, 0xc00, &mut pba);
        assert_eq!(pba[0], 0b10);
        dev.write(0xc000_0000, 0x810, &0xfee0_0000u32.to_le_bytes());
        dev.write(0xc000_0000, 0x818, &0x42u32.to_le_bytes());
        dev.write(0xc000_0000, 0x81c, &0u32.to_le_bytes());
        assert_eq!(im.fired(1), 1, "the pending vector was delivered on unmask");
        signal(1);
        assert_eq!(im.fired(1), 1, "vector 1 now reaches KVM directly");
        // Disable MSI-X: back to INTx.
        dev.config_write(cap, 2, &0u16.to_le_bytes());
        {
            let irqs = backend.irqs.lock().unwrap();
            assert!(irqs.contains_key(&(VFIO_PCI_INTX_IRQ_INDEX, 0)));
            assert!(!irqs.keys().any(|(i, _)| *i == VFIO_PCI_MSIX_IRQ_INDEX));
        }
        // The peer dies: reads are all-ones, writes dropped, the VMM goes on.
        backend.failing.store(true, Ordering::SeqCst);
        let mut b = [0u8; 4];
        dev.read(0xc000_0000, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(dev.failed());
        dev.read(0xc000_0000, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        let counters: BTreeMap<_, _> = dev.counters().into_iter().collect();
        assert_eq!(counters["failed"], 1);
        assert!(counters["mmio_errors"] >= 1);
        // Snapshots are refused with a clear error (this device has no migration).
        let e = migration::Snapshottable::snapshot(&mut dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("passthrough"), "{e}");
    }

    #[test]
    fn carve_keeps_page_aligned_pieces_around_the_msix_pages() {
        let a = SparseArea {
            offset: 0,
            size: 0x4000,
        };
        assert_eq!(
            carve(a, &[(0x1000, 0x2000)]),
            [
                SparseArea {
                    offset: 0,
                    size: 0x1000
                },
                SparseArea {
                    offset: 0x2000,
                    size: 0x2000
                }
            ]
        );
        assert_eq!(carve(a, &[(0, 0x4000)]), []);
        assert_eq!(carve(a, &[]), [a]);
    }

    #[test]
    fn msix_capability_is_found_and_bounded() {
        let mut cfg = vec![0u8; 256];
        cfg[0x34] = 0x40;
        cfg[0x40] = 0x01; // power management, next 0x50
        cfg[0x41] = 0x50;
        cfg[0x50] = CAP_ID_MSIX;
        cfg[0x52..0x54].copy_from_slice(&1u16.to_le_bytes()); // 2 vectors
        cfg[0x54..0x58].copy_from_slice(&0x800u32.to_le_bytes());
        cfg[0x58..0x5c].copy_from_slice(&0xc00u32.to_le_bytes());
        assert_eq!(find_msix(&cfg), Some((2, 0, 0x800, 0, 0xc00)));
        // A loop in the list ends; a pointer into the header is refused.
        cfg[0x41] = 0x40;
        assert_eq!(find_msix(&cfg), None);
        cfg[0x34] = 0x10;
        assert_eq!(find_msix(&cfg), None);
    }
}
