//! Wiring of PCI devices into the VM: slot, BAR addresses, MMIO bus registration, ioeventfds,
//! interrupts (MSI-X through the shared [`KvmInterruptManager`], INTx pin A on a swizzled IOAPIC
//! pin) and guest BAR moves.
//!
//! INTx routing is fixed, like a motherboard's: pin `p` (0 = INTA#) of slot `s` is wired to GSI
//! `16 + (s + p) % 8` ([`intx_gsi`]); the DSDT's `_PRT` describes the same table for every slot.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::SharedBusDevice;
use devices::virtio::VirtioDevice;
use devices::{Bus, GuestMemoryMmap};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use migration::{Pausable, Snapshottable, StateError, StateSection};
use pci::virtio_pci::VIRTIO_BAR_INDEX;
use pci::{
    AllocError, BarAllocator, BarKind, BarMove, PciBus, PciBusError, VirtioPciDevice,
    VirtioPciError,
};
use thiserror::Error;

use crate::interrupts::KvmInterruptManager;

/// First GSI of the PCI INTx lines (IOAPIC pins 16..24).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of GSIs the INTx lines are spread over.
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI INTx pin `pin` (0 = INTA# .. 3 = INTD#) of slot `slot` is wired to.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}

/// Errors wiring a PCI device.
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
    /// The PCI bus refused the device.
    #[error("{id}: {source}")]
    Bus {
        /// Device id.
        id: String,
        /// The bus error.
        #[source]
        source: PciBusError,
    },
    /// Building the virtio-pci transport failed.
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    /// Registering the BAR on the MMIO bus failed.
    #[error("{id}: MMIO registration: {source}")]
    Mmio {
        /// Device id.
        id: String,
        /// The bus error.
        #[source]
        source: devices::BusError,
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

/// Where a device ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciAddressInfo {
    /// Slot on bus 0 (function 0).
    pub slot: u8,
    /// `(index, address, size)` of each BAR.
    pub bars: Vec<(usize, u64, u64)>,
}

/// A BAR and where it is registered on the MMIO bus now.
#[derive(Debug, Clone, Copy)]
struct BarRegistration {
    index: usize,
    size: u64,
    kind: BarKind,
    registered: Option<u64>,
}

/// One plugged device.
struct Entry {
    id: String,
    slot: u8,
    device: Arc<Mutex<VirtioPciDevice>>,
    bars: Vec<BarRegistration>,
}

/// What the BAR-move handler needs, shared with it.
struct Shared {
    vm_fd: Arc<VmFd>,
    mmio_bus: Arc<Bus>,
    entries: Mutex<Vec<Entry>>,
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_ioeventfds(
        &self,
        dev: &VirtioPciDevice,
        base: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        for (fd, addr) in dev.ioeventfds(base) {
            self.vm_fd
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)?;
        }
        Ok(())
    }

    fn unregister_ioeventfds(&self, dev: &VirtioPciDevice, base: u64) {
        for (fd, addr) in dev.ioeventfds(base) {
            if let Err(e) =
                self.vm_fd
                    .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            {
                log::warn!(
                    "{}: cannot unregister the ioeventfd at {addr:#x}: {e}",
                    dev.device_id()
                );
            }
        }
    }

    /// Follow a guest BAR move: MMIO bus range and, for the virtio BAR, the ioeventfds.
    fn move_bar(&self, slot: u8, m: BarMove) {
        let mut entries = self.entries();
        let Some(entry) = entries.iter_mut().find(|e| e.slot == slot) else {
            return;
        };
        let Some(bar) = entry.bars.iter_mut().find(|b| b.index == m.index) else {
            return;
        };
        let dev = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        let has_notify = m.index == VIRTIO_BAR_INDEX;
        if let Some(old) = bar.registered.take() {
            if let Err(e) = self.mmio_bus.remove(old) {
                log::warn!("{}: BAR {} at {old:#x}: {e}", entry.id, m.index);
            }
            if has_notify {
                self.unregister_ioeventfds(&dev, old);
            }
        }
        // Address 0 is how guests park a BAR they are not using.
        if m.new_addr == 0 {
            return;
        }
        let bus_dev: SharedBusDevice = entry.device.clone();
        if let Err(e) = self.mmio_bus.insert(bus_dev, m.new_addr, bar.size) {
            log::warn!(
                "{}: BAR {} cannot move to {:#x}: {e}; it does not decode until moved again",
                entry.id,
                m.index,
                m.new_addr
            );
            return;
        }
        bar.registered = Some(m.new_addr);
        if has_notify {
            if let Err(e) = self.register_ioeventfds(&dev, m.new_addr) {
                log::error!(
                    "{}: cannot register ioeventfds at {:#x}: {e}; notifications take the slow path",
                    entry.id,
                    m.new_addr
                );
                self.unregister_ioeventfds(&dev, m.new_addr);
            }
        }
        log::info!(
            "{}: BAR {} moved from {:#x} to {:#x}",
            entry.id,
            m.index,
            m.old_addr,
            m.new_addr
        );
    }
}

/// The VM's PCI devices (other than the host bridge).
pub struct PciDevices {
    pci_bus: Arc<Mutex<PciBus>>,
    allocator: BarAllocator,
    interrupts: Arc<KvmInterruptManager>,
    shared: Arc<Shared>,
}

impl PciDevices {
    /// Manage devices on `pci_bus`, with BARs in the `(start, size)` windows `mmio32` and
    /// `mmio64` and I/O BARs above 0x1000, registered on `mmio_bus`. Installs the bus's BAR-move
    /// handler. `vm_fd` must have its irqchip.
    pub fn new(
        vm_fd: Arc<VmFd>,
        pci_bus: Arc<Mutex<PciBus>>,
        mmio_bus: Arc<Bus>,
        mmio32: (u64, u64),
        mmio64: (u64, u64),
    ) -> Result<Self, PciDevicesError> {
        let allocator = BarAllocator::new(mmio32, mmio64).map_err(PciDevicesError::Windows)?;
        let shared = Arc::new(Shared {
            vm_fd: vm_fd.clone(),
            mmio_bus,
            entries: Mutex::new(Vec::new()),
        });
        let handler_shared = shared.clone();
        pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_bar_move_handler(Box::new(move |slot, m| handler_shared.move_bar(slot, m)));
        Ok(Self {
            pci_bus,
            allocator,
            interrupts: Arc::new(KvmInterruptManager::new(vm_fd)),
            shared,
        })
    }

    /// The VM's interrupt manager (shared with any other PCI device, e.g. VFIO).
    pub fn interrupt_manager(&self) -> Arc<KvmInterruptManager> {
        self.interrupts.clone()
    }

    /// Plug `device` behind virtio-pci into the lowest free slot: BARs allocated and registered,
    /// ioeventfds registered, MSI-X vectors and INTx pin A set up.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<PciAddressInfo, PciDevicesError> {
        let id = device.id().to_string();
        let slot = self
            .pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free_slot()
            .ok_or_else(|| PciDevicesError::Bus {
                id: id.clone(),
                source: PciBusError::NoFreeSlot,
            })?;
        let mut dev = VirtioPciDevice::new(
            device,
            mem,
            self.interrupts.clone(),
            Some((1, intx_gsi(slot, 0))),
        )?;

        let mut bars = Vec::new();
        for (index, size, kind) in dev.bar_requests() {
            let addr = match self.allocator.allocate(kind, size) {
                Ok(a) => a,
                Err(source) => {
                    self.free_bars(&bars);
                    return Err(PciDevicesError::Alloc { id, source });
                }
            };
            bars.push(BarRegistration {
                index,
                size,
                kind,
                registered: Some(addr),
            });
            dev.set_bar(index, addr)?;
        }
        let device = Arc::new(Mutex::new(dev));
        if let Err(e) = self.register(&id, &device, &bars) {
            self.free_bars(&bars);
            return Err(e);
        }
        let plugged = self
            .pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Some(slot), device.clone());
        if let Err(source) = plugged {
            self.unregister(&device, &bars);
            self.free_bars(&bars);
            return Err(PciDevicesError::Bus { id, source });
        }
        let info = PciAddressInfo {
            slot,
            bars: bars
                .iter()
                .map(|b| (b.index, b.registered.unwrap_or(0), b.size))
                .collect(),
        };
        log::info!("{id}: virtio-pci at 00:{slot:02x}.0, BARs {:x?}", info.bars);
        self.shared.entries().push(Entry {
            id,
            slot,
            device,
            bars,
        });
        Ok(info)
    }

    fn register(
        &self,
        id: &str,
        device: &Arc<Mutex<VirtioPciDevice>>,
        bars: &[BarRegistration],
    ) -> Result<(), PciDevicesError> {
        let dev = device.lock().unwrap_or_else(|e| e.into_inner());
        let mut done: Vec<BarRegistration> = Vec::new();
        for b in bars {
            let Some(addr) = b.registered else { continue };
            let bus_dev: SharedBusDevice = device.clone();
            let result = self
                .shared
                .mmio_bus
                .insert(bus_dev, addr, b.size)
                .map_err(|source| PciDevicesError::Mmio {
                    id: id.to_string(),
                    source,
                })
                .and_then(|()| {
                    if b.index != VIRTIO_BAR_INDEX {
                        return Ok(());
                    }
                    self.shared
                        .register_ioeventfds(&dev, addr)
                        .map_err(|source| {
                            self.shared.unregister_ioeventfds(&dev, addr);
                            let _ = self.shared.mmio_bus.remove(addr);
                            PciDevicesError::Kvm {
                                id: id.to_string(),
                                what: "KVM_IOEVENTFD",
                                source,
                            }
                        })
                });
            if let Err(e) = result {
                drop(dev);
                self.unregister(device, &done);
                return Err(e);
            }
            done.push(*b);
        }
        Ok(())
    }

    fn unregister(&self, device: &Arc<Mutex<VirtioPciDevice>>, bars: &[BarRegistration]) {
        let dev = device.lock().unwrap_or_else(|e| e.into_inner());
        for b in bars {
            if let Some(addr) = b.registered {
                let _ = self.shared.mmio_bus.remove(addr);
                if b.index == VIRTIO_BAR_INDEX {
                    self.shared.unregister_ioeventfds(&dev, addr);
                }
            }
        }
    }

    fn free_bars(&mut self, bars: &[BarRegistration]) {
        for b in bars {
            if let Some(addr) = b.registered {
                let _ = self.allocator.free(b.kind, addr);
            }
        }
    }

    /// `(slot, pin, gsi)` of every plugged device's INTx line (pin 0 = INTA#).
    pub fn prt_entries(&self) -> Vec<(u8, u8, u32)> {
        self.shared
            .entries()
            .iter()
            .map(|e| (e.slot, 0, intx_gsi(e.slot, 0)))
            .collect()
    }

    /// `(id, slot, device)` of every plugged device, in plug order.
    pub fn devices(&self) -> Vec<(String, u8, Arc<Mutex<VirtioPciDevice>>)> {
        self.shared
            .entries()
            .iter()
            .map(|e| (e.id.clone(), e.slot, e.device.clone()))
            .collect()
    }

    /// The INTx resample fds: when one is readable, call [`Self::handle_intx_resample`].
    pub fn intx_resample_fds(&self) -> Vec<RawFd> {
        self.shared
            .entries()
            .iter()
            .filter_map(|e| {
                let d = e.device.lock().unwrap_or_else(|p| p.into_inner());
                d.intx_resample_fd().map(|fd| fd.as_raw_fd())
            })
            .collect()
    }

    /// Re-assert the INTx line of every device whose interrupt is still pending after the
    /// guest's EOI (cheap: non-blocking reads).
    pub fn handle_intx_resample(&self) {
        resample_intx(&self.shared);
    }

    /// A handler the control loop calls when an INTx resample fd is readable (it keeps the device
    /// list alive on its own).
    pub fn intx_resample_handler(&self) -> Box<dyn FnMut() + Send> {
        let shared = self.shared.clone();
        Box::new(move || resample_intx(&shared))
    }

    /// Pause every device (in plug order); stops at the first failure.
    pub fn pause(&self) -> Result<(), StateError> {
        for e in self.shared.entries().iter() {
            e.device.lock().unwrap_or_else(|p| p.into_inner()).pause()?;
        }
        Ok(())
    }

    /// Resume every device.
    pub fn resume(&self) -> Result<(), StateError> {
        for e in self.shared.entries().iter() {
            e.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume()?;
        }
        Ok(())
    }

    /// The transport state section of every device (call while paused).
    pub fn snapshot(&self) -> Result<Vec<StateSection>, StateError> {
        self.shared
            .entries()
            .iter()
            .map(|e| {
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .snapshot()
            })
            .collect()
    }

    /// Restore each device from the section with its id, and follow the BAR addresses the saved
    /// configuration space holds. Devices without a section are left as they are.
    pub fn restore(&self, sections: &[StateSection]) -> Result<(), StateError> {
        let mut moves = Vec::new();
        for e in self.shared.entries().iter() {
            let Some(section) = sections.iter().find(|s| s.id == e.id) else {
                continue;
            };
            let mut d = e.device.lock().unwrap_or_else(|p| p.into_inner());
            d.restore(section)?;
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
        Ok(())
    }
}

fn resample_intx(shared: &Shared) {
    for e in shared.entries().iter() {
        let d = e.device.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = d.handle_intx_resample() {
            log::warn!("{}: INTx resample: {err}", e.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::{ActivatedQueue, VirtioError, VirtioInterrupt};
    use vm_memory::GuestAddress;

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

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn id(&self) -> &str {
            "dummy0"
        }
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
        ) -> Result<(), VirtioError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    #[test]
    fn plug_and_move_on_a_real_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: /dev/kvm is not available");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let pci_bus = Arc::new(Mutex::new(PciBus::new()));
        let mmio = Arc::new(Bus::new());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut pd = PciDevices::new(
            vm,
            pci_bus.clone(),
            mmio.clone(),
            (0xc000_0000, 0x2000_0000),
            (1 << 36, 1 << 30),
        )
        .unwrap();
        let info = pd.add_virtio(Box::new(Dummy), mem.clone()).unwrap();
        assert_eq!(info.slot, 1);
        // Small 64-bit BARs are placed in the 32-bit window (like firmware does).
        assert_eq!(info.bars, [(0, 0xc000_0000, 0x8000)]);
        let info2 = pd.add_virtio(Box::new(Dummy), mem).unwrap();
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

        pd.pause().unwrap();
        let sections = pd.snapshot().unwrap();
        assert_eq!(sections.len(), 2);
        pd.restore(&sections).unwrap();
        pd.resume().unwrap();
        assert_eq!(pd.devices().len(), 2);
    }
}
