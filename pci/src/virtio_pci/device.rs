//! [`VirtioPciDevice`]: configuration space, BAR dispatch, feature negotiation and activation.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::BusDevice;
use devices::legacy::{LogLimiter, StateReader, StateWriter};
use devices::virtio::{
    features, status, AccessPlatform, ActivatedQueue, DmaAccess, ErrorHook, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType,
};
use devices::GuestMemoryMmap;
use migration::{Pausable, Snapshottable, StateError, StateSection};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_config::{CommonConfig, CommonWrite};
use super::interrupt::{IntxState, VirtioPciInterrupt};
use super::*;
use crate::configuration::{
    BarKind, BarMove, ConfigSpaceSize, PciConfigError, PciConfiguration, PciHeader,
    CAP_ID_VENDOR_SPECIFIC, COMMAND_INTX_DISABLE, COMMAND_STATUS_REG,
};
use crate::device::PciDevice;
use crate::interrupt::InterruptManager;
use crate::msix::{MsixConfig, MSIX_CAP_WRITABLE_MASK};

/// Version of the virtio-pci transport state section.
pub const VIRTIO_PCI_STATE_VERSION: u16 = 2;
/// Prefix of a virtio-pci device's state section id (followed by the device id).
pub const VIRTIO_PCI_SECTION_PREFIX: &str = "virtio-pci/";

/// Errors building a [`VirtioPciDevice`].
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The device has more queues than the BAR layout allows.
    #[error("{id}: {queues} queues exceed the virtio-pci maximum of {max}")]
    TooManyQueues {
        /// Device id.
        id: String,
        /// Its queue count.
        queues: usize,
        /// The maximum.
        max: usize,
    },
    /// Allocating MSI vectors or the INTx line failed.
    #[error("{id}: interrupt set-up: {source}")]
    Interrupts {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating a queue ioeventfd failed.
    #[error("{id}: ioeventfd: {source}")]
    EventFd {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Building the configuration space (BAR, capabilities) failed.
    #[error("{id}: configuration space: {source}")]
    Config {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: PciConfigError,
    },
}

/// A virtio device behind the virtio-pci modern transport.
///
/// Share it as `Arc<Mutex<VirtioPciDevice>>`: the same object is the [`PciDevice`] on the PCI bus
/// and the [`BusDevice`] registered on the MMIO bus at BAR 0's address.
pub struct VirtioPciDevice {
    pub(super) id: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    pub(super) config: PciConfiguration,
    common: CommonConfig,
    msix: Arc<Mutex<MsixConfig>>,
    msix_cap_reg: usize,
    pub(super) intx: Arc<IntxState>,
    intx_gsi: Option<u32>,
    pub(super) resamplefd: Option<EventFd>,
    interrupt: Arc<VirtioPciInterrupt>,
    pub(super) ioeventfds: Vec<EventFd>,
    activated: bool,
    pending_bar_move: Option<BarMove>,
    bad_access: LogLimiter,
    access: Option<Arc<dyn AccessPlatform>>,
    error_hook: Option<ErrorHook>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("id", &self.id)
            .field("status", &self.common.status)
            .field("activated", &self.activated)
            .finish()
    }
}

/// A virtio vendor capability (`virtio_pci_cap`), plus `notify_off_multiplier` for NOTIFY.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let len = if multiplier.is_some() { 20 } else { 16 };
    let mut cap = vec![
        CAP_ID_VENDOR_SPECIFIC,
        0,
        len,
        cfg_type,
        VIRTIO_BAR_INDEX as u8,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        cap.extend_from_slice(&m.to_le_bytes());
    }
    cap
}

/// The guest-physical addresses of a split virtqueue's rings given at device addresses `desc`,
/// `driver` (avail) and `device` (used): each ring must be mapped contiguously. The translation
/// is taken once, at activation, as other VMMs do; a driver that remaps a live ring is not
/// followed.
fn ring_addresses(
    access: &dyn AccessPlatform,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
) -> Result<(GuestAddress, GuestAddress, GuestAddress), String> {
    let n = u64::from(size);
    // virtio 1.x 2.7: descriptor table 16 bytes per entry; avail ring flags + idx + ring +
    // used_event; used ring flags + idx + 8-byte elements + avail_event.
    let ring = |what: &str, addr: u64, len: u64, dir: DmaAccess| {
        access
            .translate_contiguous(addr, len, dir)
            .map_err(|e| format!("{what} ring: {e}"))
    };
    Ok((
        ring("descriptor", desc, 16 * n, DmaAccess::Read)?,
        ring("available", driver, 6 + 2 * n, DmaAccess::Read)?,
        ring("used", device, 6 + 8 * n, DmaAccess::Write)?,
    ))
}

fn within(offset: u64, len: usize, start: u64, size: u64) -> bool {
    offset >= start
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= start + size)
}

/// The identity the guest sees for a virtio device of type `device_type`.
fn virtio_header(device_type: u32) -> PciHeader {
    let (class_code, subclass, prog_if) = class_code(device_type);
    PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
        revision_id: 1,
        class_code,
        subclass,
        prog_if,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        multifunction: false,
    }
}

/// Add BAR 0 and the virtio and MSI-X capabilities (for `num_queues` queues and `msix`) to
/// `config`; returns the MSI-X capability's register index.
fn add_transport_layout(
    config: &mut PciConfiguration,
    num_queues: usize,
    msix: &MsixConfig,
) -> Result<usize, PciConfigError> {
    config.add_bar(
        VIRTIO_BAR_INDEX,
        VIRTIO_BAR_SIZE,
        BarKind::Mem64 {
            prefetchable: false,
        },
        0,
    )?;
    let notify_len = (num_queues.max(1) as u64) * u64::from(NOTIFY_OFF_MULTIPLIER);
    for cap in [
        virtio_cap(
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_LEN,
            None,
        ),
        virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, None),
        virtio_cap(
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LEN,
            None,
        ),
        virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_len,
            Some(NOTIFY_OFF_MULTIPLIER),
        ),
    ] {
        config.add_capability(&cap)?;
    }
    let msix_cap = msix.capability(
        VIRTIO_BAR_INDEX as u8,
        MSIX_TABLE_OFFSET as u32,
        VIRTIO_BAR_INDEX as u8,
        MSIX_PBA_OFFSET as u32,
    );
    let msix_cap_reg = config.add_capability(&msix_cap)? / 4;
    config.set_writable_bits(msix_cap_reg, MSIX_CAP_WRITABLE_MASK);
    Ok(msix_cap_reg)
}

/// The INTx line for `intx` = `(pin, gsi)` from `interrupt_manager`, with the pin and line
/// registers of `config` set: `(gsi, irqfd, resamplefd)`, all `None` without INTx.
fn setup_intx(
    config: &mut PciConfiguration,
    interrupt_manager: &dyn InterruptManager,
    intx: Option<(u8, u32)>,
) -> io::Result<(Option<u32>, Option<EventFd>, Option<EventFd>)> {
    let Some((pin, gsi)) = intx else {
        return Ok((None, None, None));
    };
    let line = interrupt_manager.intx_irqfd(gsi)?;
    config.set_interrupt_pin(pin);
    // Like firmware: the line register names the GSI the _PRT routes the pin to.
    config.set_interrupt_line(u8::try_from(gsi).unwrap_or(0xff));
    Ok((Some(gsi), Some(line.irqfd), Some(line.resamplefd)))
}

impl VirtioPciDevice {
    /// Wrap `device`. MSI-X gets one vector per queue plus one for configuration changes, each
    /// with a GSI from `interrupt_manager`; `intx` is `(pin, gsi)` (pin 1 = INTA#) for the INTx
    /// fallback, `None` for an MSI-X-only device. BAR 0 starts at address 0: the VMM allocates
    /// the BARs its [`crate::PciFunction`] implementation lists and programs them.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt_manager: Arc<dyn InterruptManager>,
        intx: Option<(u8, u32)>,
    ) -> Result<Self, VirtioPciError> {
        let id = device.id();
        let queue_max_sizes = device.queue_max_sizes();
        let num_queues = queue_max_sizes.len();
        if num_queues > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues {
                id,
                queues: num_queues,
                max: MAX_QUEUES,
            });
        }
        let irq_err = |id: &str| {
            let id = id.to_string();
            move |source| VirtioPciError::Interrupts { id, source }
        };
        let num_vectors = num_queues as u16 + 1;
        let msix = MsixConfig::new(num_vectors, interrupt_manager.clone()).map_err(irq_err(&id))?;

        let mut config = PciConfiguration::new(
            &virtio_header(device.device_type()),
            ConfigSpaceSize::Legacy,
        );
        let msix_cap_reg =
            add_transport_layout(&mut config, num_queues, &msix).map_err(|source| {
                VirtioPciError::Config {
                    id: id.clone(),
                    source,
                }
            })?;
        let (intx_gsi, irqfd, resamplefd) =
            setup_intx(&mut config, interrupt_manager.as_ref(), intx).map_err(irq_err(&id))?;
        let intx = Arc::new(IntxState {
            isr: AtomicU8::new(0),
            disabled: AtomicBool::new(false),
            irqfd,
        });
        let ioeventfds = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| VirtioPciError::EventFd {
                id: id.clone(),
                source,
            })?;
        let common = CommonConfig::new(&queue_max_sizes, device.avail_features(), num_vectors);
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(VirtioPciInterrupt {
            msix: msix.clone(),
            vectors: common.vectors.clone(),
            intx: intx.clone(),
        });
        Ok(Self {
            id,
            device,
            mem,
            config,
            common,
            msix,
            msix_cap_reg,
            intx,
            intx_gsi,
            resamplefd,
            interrupt,
            ioeventfds,
            activated: false,
            pending_bar_move: None,
            bad_access: LogLimiter::new(),
            access: None,
            error_hook: None,
        })
    }

    /// Put the device behind an IOMMU: when the driver accepts `VIRTIO_F_ACCESS_PLATFORM` (which
    /// the device must offer), ring and buffer addresses are device addresses translated through
    /// `access`. A driver that refuses the feature cannot set FEATURES_OK, so it cannot bypass the
    /// IOMMU.
    pub fn set_access_platform(&mut self, access: Arc<dyn AccessPlatform>) {
        self.access = Some(access);
    }

    /// Report entering DEVICE_NEEDS_RESET (a failed activation here, a broken queue in the
    /// device) to `hook`.
    pub fn set_error_hook(&mut self, hook: ErrorHook) {
        self.device.set_error_hook(hook.clone());
        self.error_hook = Some(hook);
    }

    /// Whether the device sits behind an IOMMU (see [`Self::set_access_platform`]).
    pub fn behind_iommu(&self) -> bool {
        self.access.is_some()
    }

    /// The platform to translate through, when the driver accepted ACCESS_PLATFORM.
    fn negotiated_access(&self) -> Option<Arc<dyn AccessPlatform>> {
        if self.common.driver_features & features::VIRTIO_F_ACCESS_PLATFORM != 0 {
            self.access.clone()
        } else {
            None
        }
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.id
    }

    /// The wrapped virtio device (counters, type).
    pub fn virtio_device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The configuration space.
    pub fn configuration(&self) -> &PciConfiguration {
        &self.config
    }

    /// Whether the device was activated (the driver set DRIVER_OK and activation succeeded).
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The GSIs of the MSI-X vectors.
    pub fn msix_gsis(&self) -> Vec<u32> {
        self.lock_msix().gsis()
    }

    /// The INTx GSI, when the device has INTx.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx_gsi
    }

    fn lock_msix(&self) -> MutexGuard<'_, MsixConfig> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_bad(&mut self, what: std::fmt::Arguments<'_>) {
        if self.bad_access.allow() {
            log::warn!(
                "{}: ignoring {what} (occurrence {})",
                self.id,
                self.bad_access.count()
            );
        }
    }

    /// Reset the device and the transport (status 0).
    fn reset(&mut self) {
        if self.activated || self.common.status != 0 {
            self.device.reset();
        }
        self.activated = false;
        self.common.reset();
        self.intx.isr.store(0, Ordering::SeqCst);
        for fd in &self.ioeventfds {
            let _ = fd.read();
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            log::debug!("{}: driver reset", self.id);
            self.reset();
            return;
        }
        let old = self.common.status;
        let mut new = value | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let acked = self.common.driver_features;
            let offered = self.device.avail_features();
            let platform = features::VIRTIO_F_ACCESS_PLATFORM;
            if acked & !offered != 0 || acked & features::VIRTIO_F_VERSION_1 == 0 {
                self.log_bad(format_args!(
                    "FEATURES_OK with features {acked:#x} (offered {offered:#x})"
                ));
                new &= !status::FEATURES_OK;
            } else if self.access.is_some() && offered & platform != 0 && acked & platform == 0 {
                // Without ACCESS_PLATFORM the driver would DMA to guest-physical addresses,
                // bypassing the IOMMU the device sits behind (virtio 1.x 6.1: the device may
                // refuse).
                self.log_bad(format_args!(
                    "FEATURES_OK without VIRTIO_F_ACCESS_PLATFORM for a device behind the IOMMU \
                     (features {acked:#x})"
                ));
                new &= !status::FEATURES_OK;
            } else {
                self.device.set_acked_features(acked);
            }
        }
        self.common.status = new;
        if new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::DEVICE_NEEDS_RESET == 0
            && !self.activated
        {
            if let Err(reason) = self.activate(false) {
                log::error!("{}: activation failed: {reason}", self.id);
                if let Some(hook) = &self.error_hook {
                    hook(&self.id, &format!("activation failed: {reason}"));
                }
                self.common.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Config) {
                    log::error!("{}: cannot raise the config interrupt: {e}", self.id);
                }
            }
        }
    }

    /// Build the enabled queues from what the driver programmed. When `restoring`, the queues
    /// resume at the used index found in guest memory.
    fn build_queues(&self, restoring: bool) -> Result<Vec<ActivatedQueue>, String> {
        let event_idx = self.common.driver_features & features::VIRTIO_F_EVENT_IDX != 0;
        let access = self.negotiated_access();
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let bad = |e: virtio_queue::Error| format!("queue {i}: {e}");
            let mut queue = Queue::new(q.max_size).map_err(bad)?;
            queue.try_set_size(q.size).map_err(bad)?;
            let (desc, driver, device) = match &access {
                Some(platform) => {
                    ring_addresses(platform.as_ref(), q.size, q.desc, q.driver, q.device)
                        .map_err(|e| format!("queue {i}: {e}"))?
                }
                None => (
                    GuestAddress(q.desc),
                    GuestAddress(q.driver),
                    GuestAddress(q.device),
                ),
            };
            queue.try_set_desc_table_address(desc).map_err(bad)?;
            queue.try_set_avail_ring_address(driver).map_err(bad)?;
            queue.try_set_used_ring_address(device).map_err(bad)?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: rings at {:#x}/{:#x}/{:#x} (size {}) are not in guest memory",
                    q.desc, q.driver, q.device, q.size
                ));
            }
            if restoring {
                let used = queue
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(bad)?;
                queue.set_next_avail(used.0);
                queue.set_next_used(used.0);
            }
            let kick = self.ioeventfds[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: ioeventfd: {e}"))?;
            queues.push(ActivatedQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        Ok(queues)
    }

    fn activate(&mut self, restoring: bool) -> Result<(), String> {
        if self.common.status & status::FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let queues = self.build_queues(restoring)?;
        let n = queues.len();
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let access = self.negotiated_access();
        self.device
            .activate(self.mem.clone(), interrupt, queues, access)
            .map_err(|e| e.to_string())?;
        self.activated = true;
        log::info!(
            "{}: driver ready, activated with {n} queue(s), features {:#x}",
            self.id,
            self.common.driver_features
        );
        Ok(())
    }

    fn read_bar(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        if within(offset, len, COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            // A device that broke on its own (e.g. a garbage available index) says so here.
            if self.activated && self.device.needs_reset() {
                self.common.status |= status::DEVICE_NEEDS_RESET;
            }
            self.common.read(offset - COMMON_CFG_OFFSET, data);
        } else if within(offset, len, ISR_OFFSET, ISR_LEN) {
            data[0] = self.intx.isr.swap(0, Ordering::SeqCst);
        } else if within(offset, len, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(
            offset,
            len,
            MSIX_TABLE_OFFSET,
            self.lock_msix().table_size(),
        ) {
            self.lock_msix()
                .read_table(offset - MSIX_TABLE_OFFSET, data);
        } else if within(offset, len, MSIX_PBA_OFFSET, self.lock_msix().pba_size()) {
            self.lock_msix().read_pba(offset - MSIX_PBA_OFFSET, data);
        } else {
            data.fill(0);
            if !within(
                offset,
                len,
                NOTIFY_OFFSET,
                MSIX_TABLE_OFFSET - NOTIFY_OFFSET,
            ) {
                self.log_bad(format_args!("BAR read of {len} bytes at {offset:#x}"));
            }
        }
    }

    fn write_bar(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        if within(offset, len, COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            if let CommonWrite::Status(v) = self.common.write(offset - COMMON_CFG_OFFSET, data) {
                self.write_status(v);
            }
        } else if within(offset, len, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(
            offset,
            len,
            NOTIFY_OFFSET,
            self.ioeventfds.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
        ) {
            // Reached only when the ioeventfd is not registered with KVM.
            let q = ((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
            if let Err(e) = self.ioeventfds[q].write(1) {
                log::error!("{}: cannot signal queue {q}: {e}", self.id);
            }
        } else if within(
            offset,
            len,
            MSIX_TABLE_OFFSET,
            self.lock_msix().table_size(),
        ) {
            self.lock_msix()
                .write_table(offset - MSIX_TABLE_OFFSET, data);
        } else if within(offset, len, MSIX_PBA_OFFSET, self.lock_msix().pba_size()) {
            self.lock_msix().write_pba(offset - MSIX_PBA_OFFSET, data);
        } else {
            self.log_bad(format_args!("BAR write of {len} bytes at {offset:#x}"));
        }
    }

    fn sync_config_hooks(&mut self, reg_idx: usize) {
        if reg_idx == self.msix_cap_reg {
            let control = (self.config.read_reg(reg_idx) >> 16) as u16;
            self.lock_msix().set_message_control(control);
        }
        if reg_idx == COMMAND_STATUS_REG {
            let disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
            self.intx.disabled.store(disabled, Ordering::SeqCst);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if let Some(m) = self.config.write_reg(reg_idx, offset, data) {
            self.pending_bar_move = Some(m);
        }
        self.sync_config_hooks(reg_idx);
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn take_bar_move(&mut self) -> Option<BarMove> {
        self.pending_bar_move.take()
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.read_bar(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.write_bar(offset, data);
    }
}

/// Pausing the transport pauses the wrapped device (the transport itself has no activity).
impl Pausable for VirtioPciDevice {
    fn pause(&mut self) -> Result<(), StateError> {
        self.device.pause()
    }

    fn resume(&mut self) -> Result<(), StateError> {
        self.device.resume()
    }
}

/// Largest embedded device-state payload accepted on restore (64 MiB; real ones are a few KiB).
const MAX_DEVICE_STATE_LEN: usize = 64 << 20;

impl VirtioPciDevice {
    /// Id of this device's state section: [`VIRTIO_PCI_SECTION_PREFIX`] + the device id, so that
    /// it cannot collide with other components' sections (`serial0`, `cpu0`, ...).
    pub fn section_id(&self) -> String {
        format!("{VIRTIO_PCI_SECTION_PREFIX}{}", self.id)
    }

    fn save_transport(&self, w: &mut StateWriter) {
        self.config.save(w);
        self.lock_msix().save(w);
        self.common.save(w);
        w.u8(self.intx.isr.load(Ordering::SeqCst))
            .u8(u8::from(self.activated));
    }

    /// Load the configuration space, MSI-X and the common configuration from `r`; returns the
    /// saved ISR and "activated" flag without applying them.
    fn restore_transport(&mut self, r: &mut StateReader<'_>) -> Result<(u8, bool), StateError> {
        self.config.restore(r)?;
        self.lock_msix().restore(r)?;
        self.common.restore(r)?;
        let isr = r.u8()?;
        let activated = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(r.malformed(format!("activated flag {v}"))),
        };
        Ok((isr, activated))
    }

    /// Parse a whole version-2 payload into the live transport; the embedded device section is
    /// returned, not applied (`None` when the flag says the saved device had no state: sections
    /// written before every device had one).
    fn load_section(
        &mut self,
        r: &mut StateReader<'_>,
    ) -> Result<(u8, bool, Option<StateSection>), StateError> {
        let (isr, activated) = self.restore_transport(r)?;
        let device_state = match r.u8()? {
            0 => None,
            1 => {
                let id = std::str::from_utf8(r.bytes(migration::snapshot::MAX_ID_LEN)?)
                    .map_err(|_| r.malformed("device section id is not UTF-8"))?
                    .to_string();
                let version = r.u16()?;
                let data = r.bytes(MAX_DEVICE_STATE_LEN)?.to_vec();
                Some(StateSection { id, version, data })
            }
            v => return Err(r.malformed(format!("device state flag {v}"))),
        };
        Ok((isr, activated, device_state))
    }
}

/// The state of a virtio-pci device: the transport (configuration space with the BAR addresses,
/// MSI-X table, PBA and routes, common configuration with status, features and queue set-up, ISR,
/// whether the device was active) plus the wrapped device's own section
/// ([`Snapshottable::snapshot`] of the [`VirtioDevice`]: acked features, queue positions), in one
/// section with id [`VirtioPciDevice::section_id`].
///
/// Layout of version 2 (little endian): configuration space, MSI-X, common configuration (each
/// with its own version), `isr: u8`, `activated: u8` (0/1), `has_device_state: u8` (0/1), then
/// when 1 the device section: `id` (u32 length + UTF-8), `version: u16`, `data` (u32 length +
/// bytes). Every device has a section now, so the flag is always written as 1; a 0 in an older
/// snapshot means there is nothing to restore into the device.
///
/// [`Snapshottable::snapshot`] needs the device paused ([`Pausable::pause`]); devices refuse
/// otherwise. [`Snapshottable::restore`] is meant for a freshly built, never
/// activated device with the same configuration: it restores the transport, then the device's
/// section, pauses the device and, when the saved device was active, re-activates it. The device
/// stays **paused** (its worker does not touch guest memory) until [`Pausable::resume`]. Guest
/// memory must already hold the saved contents (queue rings are read on re-activation).
impl Snapshottable for VirtioPciDevice {
    fn id(&self) -> String {
        self.section_id()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let s = self.device.snapshot()?;
        if u32::try_from(s.data.len()).is_err() || s.data.len() > MAX_DEVICE_STATE_LEN {
            return Err(StateError::Malformed {
                id: self.id.clone(),
                reason: format!("device state of {} bytes is too large", s.data.len()),
            });
        }
        let mut w = StateWriter::new();
        self.save_transport(&mut w);
        w.u8(1).bytes(s.id.as_bytes()).u16(s.version).bytes(&s.data);
        Ok(w.into_section(&self.section_id(), VIRTIO_PCI_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let sid = self.section_id();
        let mut r = StateReader::open(section, &sid, VIRTIO_PCI_STATE_VERSION)?;
        // Keep the current transport state to put back if the section turns out malformed.
        let mut backup = StateWriter::new();
        self.save_transport(&mut backup);
        let backup = backup.into_bytes();
        let rollback = |dev: &mut Self| {
            let mut b = StateReader::from_bytes(&sid, &backup);
            if let Err(e) = dev.restore_transport(&mut b) {
                log::error!("{}: cannot roll back the transport state: {e}", dev.id);
            }
        };
        let loaded = self
            .load_section(&mut r)
            .and_then(|loaded| r.finish().map(|()| loaded));
        let (isr, activated, device_state) = match loaded {
            Ok(l) => l,
            Err(e) => {
                rollback(self);
                return Err(e);
            }
        };
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.intx.isr.store(isr, Ordering::SeqCst);
        self.sync_config_hooks(COMMAND_STATUS_REG);
        self.sync_config_hooks(self.msix_cap_reg);
        if self.common.status & status::FEATURES_OK != 0 {
            self.device.set_acked_features(self.common.driver_features);
        }
        if let Some(s) = &device_state {
            if let Err(e) = self.device.restore(s) {
                rollback(self);
                return Err(e);
            }
        }
        // The restored VM comes up paused: activation must not start serving queues.
        Pausable::pause(self)?;
        if activated {
            self.activate(true)
                .map_err(|reason| StateError::Malformed {
                    id: sid.clone(),
                    reason: format!("cannot re-activate: {reason}"),
                })?;
        }
        Ok(())
    }
}
