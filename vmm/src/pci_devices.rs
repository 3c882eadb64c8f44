//! Wiring of PCI functions into the VM, whatever they are ([`PciFunction`]): slot, BAR addresses,
//! bus registration of the trapped BAR ranges (MMIO or port I/O), KVM memory slots for the
//! mapped BAR areas, ioeventfds, INTx resampling and guest BAR moves.
//!
//! INTx routing is fixed, like a motherboard's: pin `p` (0 = INTA#) of slot `s` is wired to GSI
//! `16 + (s + p) % 8` ([`intx_gsi`]); the DSDT's `_PRT` describes the same table for every slot.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::SharedBusDevice;
use devices::Bus;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{
    AllocError, BarAllocator, BarKind, BarMove, MappedArea, PciBus, PciBusError, PciFunction,
    PciFunctionError,
};
use thiserror::Error;

use crate::config::PciAddress;
use crate::interrupts::KvmInterruptManager;

/// First GSI of the PCI INTx lines (IOAPIC pins 16..24).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of GSIs the INTx lines are spread over.
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI INTx pin `pin` (0 = INTA# .. 3 = INTD#) of slot `slot` is wired to.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}

/// A PCI function shared between the PCI bus, the MMIO/PIO bus and the component registry.
pub type SharedPciFunction = Arc<Mutex<dyn PciFunction>>;

/// Errors wiring a PCI function.
#[derive(Debug, Error)]
pub enum PciDevicesError {
    /// A PCI window is invalid or exhausted.
    #[error("{id}: BAR allocation: {source}")]
    Alloc {
        /// Device id.
        id: String,
        /// The allocator's error.
        #[source]
        source: AllocError,
    },
    /// The PCI bus refused the function.
    #[error("{id}: {source}")]
    Bus {
        /// Device id.
        id: String,
        /// The bus error.
        #[source]
        source: PciBusError,
    },
    /// The function refused its BAR address.
    #[error(transparent)]
    Function(#[from] PciFunctionError),
    /// Registering a BAR on the MMIO or I/O bus failed.
    #[error("{id}: BAR registration: {source}")]
    Register {
        /// Device id.
        id: String,
        /// The bus error.
        #[source]
        source: devices::BusError,
    },
    /// A mapped BAR area is not usable (unaligned, outside its BAR, cannot be mapped).
    #[error("{id}: BAR {index} mapped area: {reason}")]
    MappedArea {
        /// Device id.
        id: String,
        /// BAR index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("{id}: {what}: {source}")]
    Kvm {
        /// Device id.
        id: String,
        /// The operation.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The PCI windows given to [`PciDevices::new`] are invalid.
    #[error("PCI windows: {0}")]
    Windows(AllocError),
}

/// Where a function ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciAddressInfo {
    /// Slot on bus 0 (function 0).
    pub slot: u8,
    /// `(index, address, size)` of each BAR.
    pub bars: Vec<(usize, u64, u64)>,
}

/// A mapped area of a BAR: its host mapping and the KVM slot that puts it in the guest.
struct MappedRegion {
    area: MappedArea,
    host_addr: u64,
    kvm_slot: u32,
}

/// A BAR and where it is registered now.
struct BarRegistration {
    index: usize,
    size: u64,
    kind: BarKind,
    allocated: u64,
    registered: Option<u64>,
    mapped: Vec<MappedRegion>,
}

/// One plugged function.
struct Entry {
    id: String,
    kind: &'static str,
    slot: u8,
    device: SharedPciFunction,
    bars: Vec<BarRegistration>,
}

/// Where a BAR decodes now, readable without locking any device (the passthrough DMA path
/// routes peer-to-peer accesses with it from a device's DMA thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWindow {
    /// Guest physical start.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Slot of the function.
    pub slot: u8,
    /// BAR index.
    pub index: usize,
    /// I/O space rather than memory.
    pub io: bool,
}

/// The BAR windows of every function, kept current across guest BAR moves.
pub type BarWindows = Arc<std::sync::RwLock<Vec<BarWindow>>>;

/// KVM memory slot numbers for mapped BAR areas (RAM uses the ones below `first`).
struct SlotNumbers {
    next: u32,
    free: Vec<u32>,
}

/// What the BAR-move handler needs, shared with it.
struct Shared {
    vm_fd: Arc<VmFd>,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    entries: Mutex<Vec<Entry>>,
    slots: Mutex<SlotNumbers>,
    windows: BarWindows,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        lock(&self.entries)
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio_bus,
            _ => &self.mmio_bus,
        }
    }

    fn set_kvm_slot(
        &self,
        region: &MappedRegion,
        gpa: u64,
        len: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot: region.kvm_slot,
            flags: if region.area.writable {
                0
            } else {
                KVM_MEM_READONLY
            },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: region.host_addr,
        };
        // SAFETY: `host_addr` is a live mapping of `area.len` bytes owned by this entry until it
        // is unmapped in `Drop for PciDevices`, after the slot was deleted (len 0); slot numbers
        // are unique (SlotNumbers) and the guest range lies inside the function's BAR, which the
        // allocator keeps apart from RAM and other BARs.
        unsafe { self.vm_fd.set_user_memory_region(r) }
    }

    /// Record (or, with `base` None, forget) where BAR `index` of `slot` decodes.
    fn set_window(&self, slot: u8, bar: &BarRegistration, base: Option<u64>) {
        let mut w = self.windows.write().unwrap_or_else(|e| e.into_inner());
        w.retain(|x| !(x.slot == slot && x.index == bar.index));
        if let Some(start) = base {
            w.push(BarWindow {
                start,
                len: bar.size,
                slot,
                index: bar.index,
                io: bar.kind == BarKind::Io,
            });
        }
    }

    /// Put a BAR at `base`: the trapped range on its bus, each mapped area in its KVM slot, the
    /// ioeventfds. On failure what was done is undone and the BAR does not decode.
    fn register_bar(
        &self,
        id: &str,
        device: &SharedPciFunction,
        bar: &BarRegistration,
        base: u64,
    ) -> Result<(), PciDevicesError> {
        let bus_dev: SharedBusDevice = device.clone();
        self.bus(bar.kind)
            .insert(bus_dev, base, bar.size)
            .map_err(|source| PciDevicesError::Register {
                id: id.to_string(),
                source,
            })?;
        let mut done = 0;
        let mut result = Ok(());
        for region in &bar.mapped {
            let at = base + region.area.bar_offset;
            if let Err(source) = self.set_kvm_slot(region, at, region.area.len) {
                result = Err(PciDevicesError::Kvm {
                    id: id.to_string(),
                    what: "KVM_SET_USER_MEMORY_REGION (BAR area)",
                    source,
                });
                break;
            }
            done += 1;
        }
        if result.is_ok() {
            let dev = lock(device);
            for e in dev.ioeventfds(bar.index, base) {
                let addr = match bar.kind {
                    BarKind::Io => IoEventAddress::Pio(e.addr),
                    _ => IoEventAddress::Mmio(e.addr),
                };
                if let Err(source) = self.vm_fd.register_ioevent(e.fd, &addr, NoDatamatch) {
                    result = Err(PciDevicesError::Kvm {
                        id: id.to_string(),
                        what: "KVM_IOEVENTFD",
                        source,
                    });
                    break;
                }
            }
        }
        if result.is_err() {
            self.unregister_bar(id, device, bar, base, done);
        }
        result
    }

    /// Undo [`Self::register_bar`] for the BAR at `base` (the first `mapped` areas are mapped).
    fn unregister_bar(
        &self,
        id: &str,
        device: &SharedPciFunction,
        bar: &BarRegistration,
        base: u64,
        mapped: usize,
    ) {
        let _ = self.bus(bar.kind).remove(base);
        for region in &bar.mapped[..mapped.min(bar.mapped.len())] {
            if let Err(e) = self.set_kvm_slot(region, base + region.area.bar_offset, 0) {
                log::warn!("{id}: BAR {} cannot unmap an area: {e}", bar.index);
            }
        }
        let dev = lock(device);
        for e in dev.ioeventfds(bar.index, base) {
            let addr = match bar.kind {
                BarKind::Io => IoEventAddress::Pio(e.addr),
                _ => IoEventAddress::Mmio(e.addr),
            };
            // Not registered (a failed registration) is fine.
            let _ = self.vm_fd.unregister_ioevent(e.fd, &addr, NoDatamatch);
        }
    }

    /// Follow a guest BAR move: bus range, mapped areas and ioeventfds.
    fn move_bar(&self, slot: u8, m: BarMove) {
        let mut entries = self.entries();
        let Some(entry) = entries.iter_mut().find(|e| e.slot == slot) else {
            return;
        };
        let Some(bar) = entry.bars.iter_mut().find(|b| b.index == m.index) else {
            return;
        };
        if let Some(old) = bar.registered.take() {
            self.unregister_bar(&entry.id, &entry.device, bar, old, bar.mapped.len());
            self.set_window(slot, bar, None);
        }
        // Address 0 is how guests park a BAR they are not using.
        if m.new_addr == 0 {
            return;
        }
        if let Err(e) = self.register_bar(&entry.id, &entry.device, bar, m.new_addr) {
            log::warn!(
                "BAR {} cannot move to {:#x}: {e}; it does not decode until moved again",
                m.index,
                m.new_addr
            );
            return;
        }
        bar.registered = Some(m.new_addr);
        self.set_window(slot, bar, Some(m.new_addr));
        log::info!(
            "{}: BAR {} moved from {:#x} to {:#x}",
            entry.id,
            m.index,
            m.old_addr,
            m.new_addr
        );
    }
}

/// The VM's PCI functions (other than the host bridge).
pub struct PciDevices {
    pci_bus: Arc<Mutex<PciBus>>,
    allocator: BarAllocator,
    interrupts: Arc<KvmInterruptManager>,
    shared: Arc<Shared>,
}

impl PciDevices {
    /// Manage functions on `pci_bus`, with BARs in the `(start, size)` windows `mmio32` and
    /// `mmio64` and I/O BARs above 0x1000, registered on `mmio_bus` / `pio_bus`; mapped BAR
    /// areas use KVM memory slots from `first_kvm_slot` up. Installs the bus's BAR-move handler.
    /// `vm_fd` must have its irqchip.
    pub fn new(
        vm_fd: Arc<VmFd>,
        pci_bus: Arc<Mutex<PciBus>>,
        (mmio_bus, pio_bus): (Arc<Bus>, Arc<Bus>),
        mmio32: (u64, u64),
        mmio64: (u64, u64),
        first_kvm_slot: u32,
    ) -> Result<Self, PciDevicesError> {
        let allocator = BarAllocator::new(mmio32, mmio64).map_err(PciDevicesError::Windows)?;
        let shared = Arc::new(Shared {
            vm_fd: vm_fd.clone(),
            mmio_bus,
            pio_bus,
            entries: Mutex::new(Vec::new()),
            slots: Mutex::new(SlotNumbers {
                next: first_kvm_slot,
                free: Vec::new(),
            }),
            windows: Arc::new(std::sync::RwLock::new(Vec::new())),
        });
        let handler_shared = shared.clone();
        lock(&pci_bus)
            .set_bar_move_handler(Box::new(move |slot, m| handler_shared.move_bar(slot, m)));
        Ok(Self {
            pci_bus,
            allocator,
            interrupts: Arc::new(KvmInterruptManager::new(vm_fd)),
            shared,
        })
    }

    /// The KVM VM the functions belong to.
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.shared.vm_fd.clone()
    }

    /// The VM's interrupt manager: functions take their MSI-X vectors and INTx line from it.
    pub fn interrupt_manager(&self) -> Arc<KvmInterruptManager> {
        self.interrupts.clone()
    }

    /// Plug `device` (built for `address`, with its interrupts from
    /// [`Self::interrupt_manager`] and INTx on [`intx_gsi`] of its slot): BARs allocated,
    /// programmed and registered, mapped areas put in KVM slots, ioeventfds registered.
    pub fn add(
        &mut self,
        id: &str,
        address: PciAddress,
        device: SharedPciFunction,
    ) -> Result<PciAddressInfo, PciDevicesError> {
        let slot = address.slot();
        let (kind, requests) = {
            let d = lock(&device);
            (d.kind(), d.bar_requests())
        };
        let mut bars: Vec<BarRegistration> = Vec::new();
        let result = self
            .place_bars(id, &device, requests, &mut bars)
            .and_then(|()| {
                lock(&self.pci_bus)
                    .add_device(Some(slot), device.clone())
                    .map(|_| ())
                    .map_err(|source| PciDevicesError::Bus {
                        id: id.to_string(),
                        source,
                    })
            });
        if let Err(e) = result {
            for b in &bars {
                if let Some(at) = b.registered {
                    self.shared
                        .unregister_bar(id, &device, b, at, b.mapped.len());
                }
                let _ = self.allocator.free(b.kind, b.allocated);
            }
            for b in bars {
                self.release_mapped(b.mapped);
            }
            return Err(e);
        }
        let info = PciAddressInfo {
            slot,
            bars: bars
                .iter()
                .map(|b| (b.index, b.registered.unwrap_or(0), b.size))
                .collect(),
        };
        for b in &bars {
            self.shared.set_window(slot, b, b.registered);
        }
        log::info!("{id}: {kind} at {address}, BARs {:x?}", info.bars);
        self.shared.entries().push(Entry {
            id: id.to_string(),
            kind,
            slot,
            device,
            bars,
        });
        Ok(info)
    }

    /// Allocate, map, program and register every requested BAR; `bars` holds what was done,
    /// also on failure (for the caller to undo).
    fn place_bars(
        &mut self,
        id: &str,
        device: &SharedPciFunction,
        requests: Vec<pci::BarRequest>,
        bars: &mut Vec<BarRegistration>,
    ) -> Result<(), PciDevicesError> {
        for req in requests {
            let addr = self
                .allocator
                .allocate(req.kind, req.size)
                .map_err(|source| PciDevicesError::Alloc {
                    id: id.to_string(),
                    source,
                })?;
            bars.push(BarRegistration {
                index: req.index,
                size: req.size,
                kind: req.kind,
                allocated: addr,
                registered: None,
                mapped: Vec::new(),
            });
            let bar = bars.last_mut().expect("just pushed");
            for area in req.mapped {
                let region = map_area(&self.shared, id, bar, area)?;
                bar.mapped.push(region);
            }
            lock(device).set_bar(req.index, addr)?;
            self.shared.register_bar(id, device, bar, addr)?;
            bar.registered = Some(addr);
        }
        Ok(())
    }
}

/// mmap `area` of BAR `bar` and take a KVM slot number for it.
fn map_area(
    shared: &Shared,
    id: &str,
    bar: &BarRegistration,
    area: MappedArea,
) -> Result<MappedRegion, PciDevicesError> {
    let bad = |reason: String| PciDevicesError::MappedArea {
        id: id.to_string(),
        index: bar.index,
        reason,
    };
    let page = 4096u64;
    if area.len == 0
        || !area.bar_offset.is_multiple_of(page)
        || !area.len.is_multiple_of(page)
        || !area.fd_offset.is_multiple_of(page)
        || area
            .bar_offset
            .checked_add(area.len)
            .is_none_or(|end| end > bar.size)
    {
        return Err(bad(format!(
                "offset {:#x} length {:#x} (file offset {:#x}) is not page aligned inside the {:#x}-byte BAR",
                area.bar_offset, area.len, area.fd_offset, bar.size
            )));
    }
    if bar.kind == BarKind::Io {
        return Err(bad("an I/O BAR cannot be mapped".into()));
    }
    let len = usize::try_from(area.len).map_err(|_| bad("too large".into()))?;
    let offset =
        libc::off_t::try_from(area.fd_offset).map_err(|_| bad("file offset too large".into()))?;
    let prot = libc::PROT_READ | if area.writable { libc::PROT_WRITE } else { 0 };
    // SAFETY: a new shared mapping chosen by the kernel (no fixed address), of a file the
    // function keeps open; the result is checked and unmapped in `release_mapped`.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            area.fd.as_raw_fd(),
            offset,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(bad(format!("mmap: {}", std::io::Error::last_os_error())));
    }
    let mut slots = lock(&shared.slots);
    let kvm_slot = slots.free.pop().unwrap_or_else(|| {
        slots.next += 1;
        slots.next - 1
    });
    Ok(MappedRegion {
        area,
        host_addr: host as u64,
        kvm_slot,
    })
}

impl PciDevices {
    /// Unmap mapped areas whose KVM slots were already deleted, and give their slot numbers back.
    fn release_mapped(&self, regions: Vec<MappedRegion>) {
        let mut slots = lock(&self.shared.slots);
        for r in regions {
            // SAFETY: `host_addr`/`len` are exactly the mapping made in `map_area`, which no KVM
            // slot refers to any more.
            unsafe { libc::munmap(r.host_addr as *mut libc::c_void, r.area.len as usize) };
            slots.free.push(r.kvm_slot);
        }
    }

    /// `(slot, pin, gsi)` of every plugged function's INTx line (pin 0 = INTA#).
    pub fn prt_entries(&self) -> Vec<(u8, u8, u32)> {
        self.shared
            .entries()
            .iter()
            .map(|e| (e.slot, 0, intx_gsi(e.slot, 0)))
            .collect()
    }

    /// `(id, kind, slot, function)` of every plugged function, in plug order.
    pub fn devices(&self) -> Vec<(String, &'static str, u8, SharedPciFunction)> {
        self.shared
            .entries()
            .iter()
            .map(|e| (e.id.clone(), e.kind, e.slot, e.device.clone()))
            .collect()
    }

    /// Where every BAR decodes now (kept current across guest BAR moves).
    pub fn bar_windows(&self) -> BarWindows {
        self.shared.windows.clone()
    }

    /// `(KVM slot, guest address, length)` of every mapped BAR area that decodes now.
    pub fn mapped_areas(&self) -> Vec<(u32, u64, u64)> {
        let mut out = Vec::new();
        for e in self.shared.entries().iter() {
            for b in &e.bars {
                let Some(base) = b.registered else { continue };
                for r in &b.mapped {
                    out.push((r.kvm_slot, base + r.area.bar_offset, r.area.len));
                }
            }
        }
        out
    }

    /// The INTx resample fds: when one is readable, call [`Self::handle_intx_resample`].
    pub fn intx_resample_fds(&self) -> Vec<RawFd> {
        self.shared
            .entries()
            .iter()
            .filter_map(|e| lock(&e.device).intx_resample_fd())
            .collect()
    }

    /// Re-assert the INTx line of every function whose interrupt is still pending after the
    /// guest's EOI (cheap: non-blocking reads).
    pub fn handle_intx_resample(&self) {
        resample_intx(&self.shared);
    }

    /// A handler the control loop calls when an INTx resample fd is readable (it keeps the
    /// function list alive on its own).
    pub fn intx_resample_handler(&self) -> Box<dyn FnMut() + Send> {
        let shared = self.shared.clone();
        Box::new(move || resample_intx(&shared))
    }

    /// After the functions' state was restored: follow the BAR addresses their restored
    /// configuration spaces hold.
    pub fn follow_restored_bars(&self) {
        let mut moves = Vec::new();
        for e in self.shared.entries().iter() {
            let d = lock(&e.device);
            for b in &e.bars {
                let new_addr = d.bar_address(b.index).unwrap_or(0);
                let old_addr = b.registered.unwrap_or(0);
                if new_addr != old_addr {
                    moves.push((
                        e.slot,
                        BarMove {
                            index: b.index,
                            old_addr,
                            new_addr,
                            size: b.size,
                            kind: b.kind,
                        },
                    ));
                }
            }
        }
        for (slot, m) in moves {
            self.shared.move_bar(slot, m);
        }
    }
}

impl Drop for PciDevices {
    fn drop(&mut self) {
        let entries: Vec<Entry> = self.shared.entries().drain(..).collect();
        for e in entries {
            for b in e.bars {
                if let Some(at) = b.registered {
                    self.shared
                        .unregister_bar(&e.id, &e.device, &b, at, b.mapped.len());
                }
                self.release_mapped(b.mapped);
            }
        }
    }
}

fn resample_intx(shared: &Shared) {
    for e in shared.entries().iter() {
        if let Err(err) = lock(&e.device).handle_intx_resample() {
            log::warn!("{}: INTx resample: {err}", e.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use devices::virtio::{
        AccessPlatform, ActivatedQueue, VirtioDevice, VirtioError, VirtioInterrupt,
    };
    use migration::{Snapshottable, StateError, StateSection};
    use pci::VirtioPciDevice;
    use vm_memory::GuestAddress;

    use pci::{MappedArea, PciFunction, PciFunctionError};

    /// A VM with an irqchip, its PCI bus and buses, and the function manager under test.
    fn new_pci_devices() -> Option<(Arc<Mutex<PciBus>>, Arc<Bus>, PciDevices)> {
        let kvm = crate::testing::require_kvm()?;
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let pci_bus = Arc::new(Mutex::new(PciBus::new()));
        let mmio = Arc::new(Bus::new());
        let pd = PciDevices::new(
            vm,
            pci_bus.clone(),
            (mmio.clone(), Arc::new(Bus::new())),
            (0xc000_0000, 0x2000_0000),
            (1 << 36, 1 << 30),
            1,
        )
        .unwrap();
        Some((pci_bus, mmio, pd))
    }

    /// Plug a virtio device behind virtio-pci at `slot`.
    fn plug(
        pd: &mut PciDevices,
        dev: Box<dyn VirtioDevice>,
        mem: &GuestMemoryMmap,
        slot: u8,
    ) -> (PciAddressInfo, Arc<Mutex<VirtioPciDevice>>) {
        let id = dev.id();
        let f = Arc::new(Mutex::new(
            VirtioPciDevice::new(
                dev,
                mem.clone(),
                pd.interrupt_manager(),
                Some((1, intx_gsi(slot, 0))),
            )
            .unwrap(),
        ));
        let info = pd
            .add(&id, PciAddress::new(slot).unwrap(), f.clone())
            .unwrap();
        (info, f)
    }

    fn pause(pd: &PciDevices) {
        for (_, _, _, d) in pd.devices() {
            d.lock().unwrap().pause().unwrap();
        }
    }

    fn resume(pd: &PciDevices) {
        for (_, _, _, d) in pd.devices() {
            d.lock().unwrap().resume().unwrap();
        }
    }

    fn snapshot(pd: &PciDevices) -> Vec<StateSection> {
        pd.devices()
            .into_iter()
            .map(|(_, _, _, d)| d.lock().unwrap().snapshot().unwrap())
            .collect()
    }

    /// Restore each function from its section, as the registry does, then follow the BARs.
    fn restore(pd: &PciDevices, sections: &[StateSection]) -> Result<(), StateError> {
        for (_, _, _, d) in pd.devices() {
            let mut d = d.lock().unwrap();
            let sid = Snapshottable::id(&*d);
            if let Some(s) = sections.iter().find(|s| s.id == sid) {
                d.restore(s)?;
            }
        }
        pd.follow_restored_bars();
        Ok(())
    }

    #[test]
    fn intx_swizzle() {
        assert_eq!(intx_gsi(0, 0), 16);
        assert_eq!(intx_gsi(1, 0), 17);
        assert_eq!(intx_gsi(7, 1), 16);
        assert_eq!(intx_gsi(8, 0), 16);
        assert_eq!(intx_gsi(31, 3), 18);
        for s in 0..32 {
            for p in 0..4 {
                assert!((16..24).contains(&intx_gsi(s, p)));
            }
        }
    }

    struct Dummy(&'static str);
    impl migration::Pausable for Dummy {}
    impl migration::Snapshottable for Dummy {
        fn id(&self) -> String {
            self.0.into()
        }
        fn snapshot(&mut self) -> Result<StateSection, StateError> {
            Ok(StateSection {
                id: self.0.into(),
                version: 1,
                data: Vec::new(),
            })
        }
        fn restore(&mut self, _: &StateSection) -> Result<(), StateError> {
            Ok(())
        }
    }
    impl migration::Migratable for Dummy {}
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            devices::virtio::device_type::RNG
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64]
        }
        fn avail_features(&self) -> u64 {
            devices::virtio::features::VIRTIO_F_VERSION_1
        }
        fn set_acked_features(&mut self, _features: u64) {}
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<dyn VirtioInterrupt>,
            _queues: Vec<ActivatedQueue>,
            _access: Option<Arc<dyn AccessPlatform>>,
        ) -> Result<(), VirtioError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// A function with one 64 KiB memory BAR whose second half is host memory (a memfd) mapped
    /// into the guest, like a passthrough BAR with a sparse-mmap area.
    struct MappedFn {
        config: pci::PciConfiguration,
        file: Arc<std::fs::File>,
        bar_move: Option<BarMove>,
        trapped: Arc<Mutex<Vec<u64>>>,
    }

    impl pci::PciDevice for MappedFn {
        fn config_read(&mut self, reg_idx: usize) -> u32 {
            self.config.read_reg(reg_idx)
        }
        fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
            if let Some(m) = self.config.write_reg(reg_idx, offset, data) {
                self.bar_move = Some(m);
            }
        }
        fn id(&self) -> String {
            "mapped0".into()
        }
        fn take_bar_move(&mut self) -> Option<BarMove> {
            self.bar_move.take()
        }
    }

    impl devices::bus::BusDevice for MappedFn {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            self.trapped.lock().unwrap().push(offset);
            data.fill(0x5a);
        }
        fn write(&mut self, _base: u64, offset: u64, _data: &[u8]) {
            self.trapped.lock().unwrap().push(offset);
        }
    }

    impl migration::Pausable for MappedFn {}
    impl Snapshottable for MappedFn {
        fn id(&self) -> String {
            "mapped0".into()
        }
        fn snapshot(&mut self) -> Result<StateSection, StateError> {
            Ok(StateSection {
                id: "mapped0".into(),
                version: 1,
                data: Vec::new(),
            })
        }
        fn restore(&mut self, _: &StateSection) -> Result<(), StateError> {
            Ok(())
        }
    }
    impl migration::Migratable for MappedFn {}

    impl PciFunction for MappedFn {
        fn kind(&self) -> &'static str {
            "mapped"
        }
        fn bar_requests(&self) -> Vec<pci::BarRequest> {
            vec![pci::BarRequest {
                index: 0,
                size: 0x10000,
                kind: BarKind::Mem64 { prefetchable: true },
                mapped: vec![MappedArea {
                    bar_offset: 0x8000,
                    len: 0x8000,
                    fd: self.file.clone(),
                    fd_offset: 0,
                    writable: true,
                }],
            }]
        }
        fn set_bar(&mut self, index: usize, addr: u64) -> Result<(), PciFunctionError> {
            self.config
                .set_bar_address(index, addr)
                .map_err(|source| PciFunctionError::Config {
                    id: "mapped0".into(),
                    source,
                })
        }
        fn bar_address(&self, index: usize) -> Option<u64> {
            self.config.bar_address(index)
        }
    }

    #[test]
    fn mapped_bar_areas_get_kvm_slots_and_follow_guest_moves() {
        let Some((pci_bus, mmio, mut pd)) = new_pci_devices() else {
            return;
        };
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(0x8000).unwrap();
        let header = pci::PciHeader {
            vendor_id: 0x1b36,
            device_id: 0x0f5f,
            revision_id: 0,
            class_code: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            multifunction: false,
        };
        let mut config = pci::PciConfiguration::new(&header, pci::ConfigSpaceSize::Legacy);
        let kind = BarKind::Mem64 { prefetchable: true };
        config.add_bar(0, 0x10000, kind, 0).unwrap();
        let trapped = Arc::new(Mutex::new(Vec::new()));
        let f = Arc::new(Mutex::new(MappedFn {
            config,
            file: Arc::new(file),
            bar_move: None,
            trapped: trapped.clone(),
        }));
        let info = pd.add("mapped0", PciAddress::new(3).unwrap(), f).unwrap();
        let base = info.bars[0].1;
        // The mapped half is a KVM slot after the RAM slots (first_kvm_slot = 1 here); the BAR
        // window is published for the DMA path.
        assert_eq!(pd.mapped_areas(), [(1, base + 0x8000, 0x8000)]);
        assert_eq!(pd.bar_windows().read().unwrap()[0].start, base);
        // The trapped half reaches the function through the MMIO bus.
        let mut b = [0u8; 4];
        mmio.read(base + 0x10, &mut b).unwrap();
        assert_eq!(b, [0x5a; 4]);
        assert_eq!(*trapped.lock().unwrap(), [0x10]);
        // The guest moves the BAR (64-bit: low then high dword): the slot and the trapped range
        // follow, the window too.
        let new_base = 0x20_0000_0000u64;
        {
            let bus = pci_bus.lock().unwrap();
            bus.config_write(0, 3, 0, 4, 0, &((new_base as u32) | 0xc).to_le_bytes());
            bus.config_write(0, 3, 0, 5, 0, &((new_base >> 32) as u32).to_le_bytes());
        }
        assert_eq!(pd.mapped_areas(), [(1, new_base + 0x8000, 0x8000)]);
        assert!(mmio.read(base + 0x10, &mut b).is_err());
        mmio.read(new_base + 0x20, &mut b).unwrap();
        assert_eq!(pd.bar_windows().read().unwrap()[0].start, new_base);
        // Parked at 0 (how guests disable a BAR): nothing decodes, no slot is mapped.
        {
            let bus = pci_bus.lock().unwrap();
            bus.config_write(0, 3, 0, 4, 0, &0xcu32.to_le_bytes());
            bus.config_write(0, 3, 0, 5, 0, &0u32.to_le_bytes());
        }
        assert!(pd.mapped_areas().is_empty());
        assert!(pd.bar_windows().read().unwrap().is_empty());
    }

    #[test]
    fn plug_and_move_on_a_real_vm() {
        let Some((pci_bus, mmio, mut pd)) = new_pci_devices() else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (info, _) = plug(&mut pd, Box::new(Dummy("dummy0")), &mem, 1);
        assert_eq!(info.slot, 1);
        // Small 64-bit BARs are placed in the 32-bit window (like firmware does).
        assert_eq!(info.bars, [(0, 0xc000_0000, 0x8000)]);
        let (info2, _) = plug(&mut pd, Box::new(Dummy("dummy1")), &mem, 2);
        assert_eq!(info2.slot, 2);
        assert_eq!(info2.bars, [(0, 0xc000_8000, 0x8000)]);
        assert_eq!(pd.prt_entries(), [(1, 0, 17), (2, 0, 18)]);
        assert_eq!(pd.intx_resample_fds().len(), 2);
        pd.handle_intx_resample();

        // Reads through the MMIO bus reach the device: num_queues.
        let mut b = [0u8; 2];
        mmio.read(0xc000_0000 + 0x12, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 1);
        // The guest moves BAR 0 of slot 1 above 4 GiB (upper half), through the bus.
        {
            let bus = pci_bus.lock().unwrap();
            bus.config_write(0, 1, 0, 5, 0, &0x20u32.to_le_bytes());
        }
        assert!(mmio.read(0xc000_0000 + 0x12, &mut b).is_err());
        mmio.read((0x20 << 32) + 0xc000_0000 + 0x12, &mut b)
            .unwrap();
        assert_eq!(u16::from_le_bytes(b), 1);
        // Moving it onto the other device's BAR fails softly; moving it elsewhere works.
        {
            let bus = pci_bus.lock().unwrap();
            bus.config_write(0, 1, 0, 5, 0, &0u32.to_le_bytes());
            bus.config_write(0, 1, 0, 4, 0, &0xc000_8004u32.to_le_bytes());
        }
        mmio.read(0xc000_8012, &mut b).unwrap();
        {
            let bus = pci_bus.lock().unwrap();
            bus.config_write(0, 1, 0, 4, 0, &0xc001_0004u32.to_le_bytes());
        }
        mmio.read(0xc001_0012, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 1);

        pause(&pd);
        let sections = snapshot(&pd);
        assert_eq!(sections.len(), 2);
        assert_eq!(sections[0].id, "virtio-pci/dummy0");
        restore(&pd, &sections).unwrap();
        resume(&pd);
        let kinds: Vec<_> = pd
            .devices()
            .iter()
            .map(|d| (d.0.clone(), d.1, d.2))
            .collect();
        assert_eq!(
            kinds,
            [
                ("dummy0".to_string(), "virtio-rng", 1),
                ("dummy1".to_string(), "virtio-rng", 2)
            ]
        );
    }

    /// A VM with its PCI devices, for the snapshot test.
    struct TestVm {
        pci_bus: Arc<Mutex<PciBus>>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        pd: PciDevices,
        rng: Arc<Mutex<VirtioPciDevice>>,
    }

    const RNG_BAR: u64 = 0xc000_0000;
    // Ring addresses of queue 0 and the buffers posted on it.
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x1_1000;
    const USED: u64 = 0x1_2000;
    const BUF: u64 = 0x2_0000;
    const QSIZE: u16 = 16;

    fn rng_vm() -> Option<TestVm> {
        let (pci_bus, mmio, mut pd) = new_pci_devices()?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rng = devices::virtio::rng::Rng::new(devices::virtio::rng::RngConfig {
            id: "rng0".into(),
            iommu: false,
        });
        let (info, rng) = plug(&mut pd, Box::new(rng), &mem, 1);
        assert_eq!(info.bars, [(0, RNG_BAR, 0x8000)]);
        Some(TestVm {
            pci_bus,
            mmio,
            mem,
            pd,
            rng,
        })
    }

    fn bar_write(vm: &TestVm, off: u64, v: u64, len: usize) {
        vm.mmio
            .write(RNG_BAR + off, &v.to_le_bytes()[..len])
            .unwrap();
    }

    fn bar_read(vm: &TestVm, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        vm.mmio.read(RNG_BAR + off, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        use vm_memory::Bytes;
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
    }

    /// Post a 64-byte device-writable buffer in descriptor `n` and make it available.
    fn post(mem: &GuestMemoryMmap, n: u16) {
        use vm_memory::Bytes;
        let d = DESC + 16 * u64::from(n);
        mem.write_obj(BUF + 0x100 * u64::from(n), GuestAddress(d))
            .unwrap();
        mem.write_obj(64u32, GuestAddress(d + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        mem.write_obj(n, GuestAddress(AVAIL + 4 + 2 * u64::from(n % QSIZE)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn wait_used(mem: &GuestMemoryMmap, n: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used_idx(mem) != n {
            assert!(
                std::time::Instant::now() < deadline,
                "used index {n} not reached"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Drive the rng like a guest driver: MSI-X on, features, queue 0, DRIVER_OK.
    fn drive_to_driver_ok(vm: &TestVm) {
        use devices::virtio::status::*;
        // Memory decoding + bus mastering, then MSI-X enable in the capability.
        {
            let bus = vm.pci_bus.lock().unwrap();
            bus.config_write(0, 1, 0, 1, 0, &0x6u16.to_le_bytes());
            let mut cap = (bus.config_read(0, 1, 0, 13) & 0xfc) as usize;
            while cap != 0 {
                let head = bus.config_read(0, 1, 0, cap / 4);
                if head & 0xff == 0x11 {
                    bus.config_write(0, 1, 0, cap / 4, 2, &0x8000u16.to_le_bytes());
                    break;
                }
                cap = ((head >> 8) & 0xfc) as usize;
            }
            assert_ne!(cap, 0, "no MSI-X capability");
        }
        // MSI-X table entry 1: the queue's vector.
        let entry = 0x4000 + 16;
        bar_write(vm, entry, 0xfee0_0000, 4);
        bar_write(vm, entry + 4, 0, 4);
        bar_write(vm, entry + 8, 0x41, 4);
        bar_write(vm, entry + 12, 0, 4);
        bar_write(vm, 0x14, u64::from(ACKNOWLEDGE), 1);
        bar_write(vm, 0x14, u64::from(ACKNOWLEDGE | DRIVER), 1);
        bar_write(vm, 0x08, 1, 4); // driver_feature_select: bits 32..63
        bar_write(vm, 0x0c, 1, 4); // VIRTIO_F_VERSION_1
        bar_write(vm, 0x14, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK), 1);
        assert_ne!(bar_read(vm, 0x14, 1) as u8 & FEATURES_OK, 0);
        bar_write(vm, 0x10, 0, 2); // msix_config: vector 0
        bar_write(vm, 0x16, 0, 2); // queue_select
        bar_write(vm, 0x18, u64::from(QSIZE), 2);
        bar_write(vm, 0x1a, 1, 2); // queue_msix_vector
        bar_write(vm, 0x20, DESC, 8);
        bar_write(vm, 0x28, AVAIL, 8);
        bar_write(vm, 0x30, USED, 8);
        bar_write(vm, 0x1c, 1, 2); // queue_enable
        bar_write(
            vm,
            0x14,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            1,
        );
    }

    fn kick(vm: &TestVm) {
        bar_write(vm, 0x3000, 0, 2);
    }

    fn rng_transport(vm: &TestVm) -> Arc<Mutex<VirtioPciDevice>> {
        vm.rng.clone()
    }

    #[test]
    fn snapshot_and_restore_rng_on_real_vms() {
        use vm_memory::Bytes;
        let Some(vm1) = rng_vm() else { return };
        drive_to_driver_ok(&vm1);
        assert!(rng_transport(&vm1).lock().unwrap().activated());
        post(&vm1.mem, 0);
        kick(&vm1);
        wait_used(&vm1.mem, 1);

        pause(&vm1.pd);
        // A request posted while paused stays pending.
        post(&vm1.mem, 1);
        kick(&vm1);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(used_idx(&vm1.mem), 1);
        let sections = snapshot(&vm1.pd);
        assert_eq!(sections.len(), 1);
        assert_eq!(sections[0].id, "virtio-pci/rng0");
        // Snapshotting twice while paused gives the same state.
        assert_eq!(snapshot(&vm1.pd), sections);

        // A second VM with the same device, never driven; guest memory restored first.
        let vm2 = rng_vm().expect("KVM worked for the first VM");
        let mut ram = vec![0u8; 1 << 20];
        vm1.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
        vm2.mem.write_slice(&ram, GuestAddress(0)).unwrap();
        assert!(!rng_transport(&vm2).lock().unwrap().activated());
        // Sections of other components are ignored; a foreign or truncated section is refused.
        let mut with_others = sections.clone();
        with_others.insert(
            0,
            StateSection {
                id: "rng0".into(),
                version: 1,
                data: vec![1, 2, 3],
            },
        );
        let mut short = sections[0].clone();
        short.data.truncate(short.data.len() - 3);
        assert!(restore(&vm2.pd, &[short]).is_err());
        let mut future = sections[0].clone();
        future.version += 1;
        assert!(matches!(
            restore(&vm2.pd, &[future]),
            Err(StateError::Version { .. })
        ));
        assert!(!rng_transport(&vm2).lock().unwrap().activated());
        restore(&vm2.pd, &with_others).unwrap();

        let dev2 = rng_transport(&vm2);
        assert!(dev2.lock().unwrap().activated());
        assert_eq!(
            bar_read(&vm2, 0x14, 1) as u8,
            devices::virtio::status::ACKNOWLEDGE
                | devices::virtio::status::DRIVER
                | devices::virtio::status::FEATURES_OK
                | devices::virtio::status::DRIVER_OK
        );
        bar_write(&vm2, 0x16, 0, 2);
        assert_eq!(bar_read(&vm2, 0x18, 2), u64::from(QSIZE));
        assert_eq!(bar_read(&vm2, 0x1a, 2), 1);
        assert_eq!(bar_read(&vm2, 0x1c, 2), 1);
        assert_eq!(bar_read(&vm2, 0x20, 8), DESC);
        assert_eq!(bar_read(&vm2, 0x4000 + 16, 4), 0xfee0_0000);
        assert_eq!(bar_read(&vm2, 0x4000 + 24, 4), 0x41);
        // Transport and device state (acked features, queue positions) are back: the restored
        // set saves exactly what was saved.
        assert_eq!(snapshot(&vm2.pd), sections);
        // Restored paused: the pending request is not served before resume.
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(used_idx(&vm2.mem), 1);
        resume(&vm2.pd);
        wait_used(&vm2.mem, 2);
        let got: u32 = vm2.mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
        assert_eq!(got, 64);
        // The queue keeps going after resume, and the original VM resumes too.
        post(&vm2.mem, 2);
        kick(&vm2);
        wait_used(&vm2.mem, 3);
        resume(&vm1.pd);
        wait_used(&vm1.mem, 2);
    }
}
