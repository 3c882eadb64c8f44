//! Wiring of PCI devices into the VM: slot, BAR addresses, MMIO bus registration, ioeventfds,
//! interrupts (MSI-X through the shared [`KvmInterruptManager`], INTx pin A on a swizzled IOAPIC
//! pin) and guest BAR moves.
//!
//! INTx routing is fixed, like a motherboard's: pin `p` (0 = INTA#) of slot `s` is wired to GSI
//! `16 + (s + p) % 8` ([`intx_gsi`]); the DSDT's `_PRT` describes the same table for every slot.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::SharedBusDevice;
use devices::virtio::{AccessPlatform, VirtioDevice};
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
    /// ioeventfds registered, MSI-X vectors and INTx pin A set up. With `access` the device sits
    /// behind the virtual IOMMU (its DMA addresses are translated through it).
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        access: Option<Arc<dyn AccessPlatform>>,
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
        if let Some(access) = access {
            dev.set_access_platform(access);
        }
        dev.set_error_hook(Arc::new(|id: &str, reason: &str| {
            crate::events::emit(
                "device",
                "device-error",
                serde_json::json!({ "id": id, "reason": reason }),
            );
        }));

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

    /// One section per device, in plug order, with id `virtio-pci/<device id>`
    /// ([`VirtioPciDevice::section_id`]): transport state (status, features, queues, MSI-X, BARs)
    /// plus the device's own state (acked features, queue positions). Call after
    /// [`Self::pause`]; a device still running refuses. Two devices with the same id are refused.
    pub fn snapshot(&self) -> Result<Vec<StateSection>, StateError> {
        let mut sections: Vec<StateSection> = Vec::new();
        for e in self.shared.entries().iter() {
            let s = e
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .snapshot()?;
            if sections.iter().any(|o| o.id == s.id) {
                return Err(StateError::Malformed {
                    id: e.id.clone(),
                    reason: format!("two devices would save section {:?}", s.id),
                });
            }
            sections.push(s);
        }
        Ok(sections)
    }

    /// Restore each device from the section with its [`VirtioPciDevice::section_id`] and follow
    /// the BAR addresses the saved configuration space holds; sections of other components are
    /// ignored, devices without a section are left as they are. Meant for freshly built devices
    /// (same configuration, plugged in the same order) whose guest memory was already restored:
    /// devices that were active are re-activated but left **paused**; call [`Self::resume`] when
    /// the VM is to run. Stops at the first device whose section is refused.
    pub fn restore(&self, sections: &[StateSection]) -> Result<(), StateError> {
        let mut moves = Vec::new();
        for e in self.shared.entries().iter() {
            let mut d = e.device.lock().unwrap_or_else(|p| p.into_inner());
            let sid = d.section_id();
            let Some(section) = sections.iter().find(|s| s.id == sid) else {
                continue;
            };
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

    struct Dummy(&'static str);
    impl migration::Pausable for Dummy {}
    impl migration::Snapshottable for Dummy {
        fn id(&self) -> String {
            self.0.into()
        }
        fn snapshot(&mut self) -> Result<migration::StateSection, migration::StateError> {
            Ok(migration::StateSection {
                id: self.0.into(),
                version: 1,
                data: Vec::new(),
            })
        }
        fn restore(&mut self, _: &migration::StateSection) -> Result<(), migration::StateError> {
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
        let info = pd
            .add_virtio(Box::new(Dummy("dummy0")), mem.clone(), None)
            .unwrap();
        assert_eq!(info.slot, 1);
        // Small 64-bit BARs are placed in the 32-bit window (like firmware does).
        assert_eq!(info.bars, [(0, 0xc000_0000, 0x8000)]);
        let info2 = pd.add_virtio(Box::new(Dummy("dummy1")), mem, None).unwrap();
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
        assert_eq!(sections[0].id, "virtio-pci/dummy0");
        pd.restore(&sections).unwrap();
        pd.resume().unwrap();
        assert_eq!(pd.devices().len(), 2);
    }

    /// A VM with its PCI devices, for the snapshot test.
    struct TestVm {
        pci_bus: Arc<Mutex<PciBus>>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        pd: PciDevices,
    }

    const RNG_BAR: u64 = 0xc000_0000;
    // Ring addresses of queue 0 and the buffers posted on it.
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x1_1000;
    const USED: u64 = 0x1_2000;
    const BUF: u64 = 0x2_0000;
    const QSIZE: u16 = 16;

    fn rng_vm(kvm: &kvm_ioctls::Kvm) -> TestVm {
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
        let rng = devices::virtio::rng::Rng::new(devices::virtio::rng::RngConfig {
            id: "rng0".into(),
            iommu: false,
        });
        let info = pd.add_virtio(Box::new(rng), mem.clone(), None).unwrap();
        assert_eq!(info.bars, [(0, RNG_BAR, 0x8000)]);
        TestVm {
            pci_bus,
            mmio,
            mem,
            pd,
        }
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
        vm.pd.devices().remove(0).2
    }

    #[test]
    fn snapshot_and_restore_rng_on_real_vms() {
        use vm_memory::Bytes;
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: /dev/kvm is not available");
            return;
        };
        let vm1 = rng_vm(&kvm);
        drive_to_driver_ok(&vm1);
        assert!(rng_transport(&vm1).lock().unwrap().activated());
        post(&vm1.mem, 0);
        kick(&vm1);
        wait_used(&vm1.mem, 1);

        vm1.pd.pause().unwrap();
        // A request posted while paused stays pending.
        post(&vm1.mem, 1);
        kick(&vm1);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(used_idx(&vm1.mem), 1);
        let sections = vm1.pd.snapshot().unwrap();
        assert_eq!(sections.len(), 1);
        assert_eq!(sections[0].id, "virtio-pci/rng0");
        // Snapshotting twice while paused gives the same state.
        assert_eq!(vm1.pd.snapshot().unwrap(), sections);

        // A second VM with the same device, never driven; guest memory restored first.
        let vm2 = rng_vm(&kvm);
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
        assert!(vm2.pd.restore(&[short]).is_err());
        let mut future = sections[0].clone();
        future.version += 1;
        assert!(matches!(
            vm2.pd.restore(&[future]),
            Err(StateError::Version { .. })
        ));
        assert!(!rng_transport(&vm2).lock().unwrap().activated());
        vm2.pd.restore(&with_others).unwrap();

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
        assert_eq!(vm2.pd.snapshot().unwrap(), sections);
        // Restored paused: the pending request is not served before resume.
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(used_idx(&vm2.mem), 1);
        vm2.pd.resume().unwrap();
        wait_used(&vm2.mem, 2);
        let got: u32 = vm2.mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
        assert_eq!(got, 64);
        // The queue keeps going after resume, and the original VM resumes too.
        post(&vm2.mem, 2);
        kick(&vm2);
        wait_used(&vm2.mem, 3);
        vm1.pd.resume().unwrap();
        wait_used(&vm1.mem, 2);
    }
}
