//! KVM interrupt routing for PCI devices: [`KvmInterruptManager`] implements
//! [`pci::InterruptManager`] over the VM's GSI routing table.
//!
//! KVM keeps one routing table per VM and `KVM_SET_GSI_ROUTING` replaces all of it, so the manager
//! keeps the whole table: the default irqchip routes (GSI 0–15 to the PICs and the IOAPIC, 16–23 to
//! the IOAPIC only, as KVM sets them up) plus one MSI route per programmed vector. MSI GSIs are
//! handed out from 24 upward by rust-vmm's `vm-allocator` ([`IdAllocator`]: the lowest released
//! GSI first, then the next never used one); each vector's irqfd is registered once, when it is
//! allocated, and follows its route as the table changes. [`KvmInterruptManager::release_msi`]
//! gives a vector's GSI back.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use pci::{InterruptManager, IntxLine, MsiVector};
use thiserror::Error;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Number of IOAPIC pins (GSIs 0..24 are wired to the irqchip).
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed to MSI vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// Exclusive upper bound of GSIs KVM accepts in a routing table.
pub const MAX_GSI: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// Errors of [`KvmInterruptManager`]; [`InterruptManager`] reports them as [`io::Error`]s that
/// carry this error (and so its source).
#[derive(Debug, Error)]
pub enum InterruptError {
    /// Every MSI GSI is in use.
    #[error("no free GSI for an MSI vector (GSIs {FIRST_MSI_GSI}..{MAX_GSI})")]
    NoFreeGsi(#[source] vm_allocator::Error),
    /// vm-allocator refused to set up or release an MSI GSI.
    #[error("MSI GSI allocator")]
    GsiAllocator(#[source] vm_allocator::Error),
    /// The GSI is not one handed to MSI vectors.
    #[error("GSI {0} is not an MSI GSI")]
    NotMsiGsi(u32),
    /// The GSI is not allocated to an MSI vector.
    #[error("GSI {0} is not allocated to an MSI vector")]
    NotAllocated(u32),
    /// The GSI is not an IOAPIC pin.
    #[error("GSI {0} is not an IOAPIC pin")]
    NotIoapicPin(u32),
    /// The routing table does not fit KVM's routing table struct.
    #[error("GSI routing table")]
    RoutingTable(#[source] vmm_sys_util::fam::Error),
    /// An eventfd could not be created.
    #[error("creating an irqfd")]
    EventFd(#[source] io::Error),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl From<InterruptError> for io::Error {
    fn from(e: InterruptError) -> Self {
        let kind = match &e {
            InterruptError::NotMsiGsi(_)
            | InterruptError::NotAllocated(_)
            | InterruptError::NotIoapicPin(_) => io::ErrorKind::InvalidInput,
            InterruptError::EventFd(source) => source.kind(),
            InterruptError::Kvm { source, .. } => {
                io::Error::from_raw_os_error(source.errno()).kind()
            }
            InterruptError::NoFreeGsi(_)
            | InterruptError::GsiAllocator(_)
            | InterruptError::RoutingTable(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> InterruptError {
    move |source| InterruptError::Kvm { op, source }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = address as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    e
}

/// The routes KVM installs by default with an in-kernel irqchip: GSI 0–15 to PIC pins (master
/// 0–7, slave 8–15; not IRQ 2, the cascade) and every GSI 0–23 to the same IOAPIC pin.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            continue;
        }
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        routes.push(irqchip_route(gsi, chip, gsi % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

/// The whole routing table: the irqchip defaults plus one MSI route per entry of `msi`
/// (GSI → (address, data)).
pub fn routing_table(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
    let mut routes = default_irqchip_routes();
    routes.extend(msi.iter().map(|(&gsi, &(a, d))| msi_route(gsi, a, d)));
    routes
}

struct State {
    /// MSI GSIs; created on first use (its constructor is fallible, `new` is not).
    gsis: Option<IdAllocator>,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl State {
    fn gsis(&mut self) -> Result<&mut IdAllocator, InterruptError> {
        Ok(match &mut self.gsis {
            Some(g) => g,
            empty => empty.insert(
                IdAllocator::new(FIRST_MSI_GSI, MAX_GSI - 1)
                    .map_err(InterruptError::GsiAllocator)?,
            ),
        })
    }
}

/// [`InterruptManager`] over a KVM VM with an in-kernel irqchip; one per VM, shared by every PCI
/// device.
pub struct KvmInterruptManager {
    vm_fd: Arc<VmFd>,
    state: Mutex<State>,
}

impl KvmInterruptManager {
    /// A manager for `vm_fd`, which must already have its irqchip (`KVM_CREATE_IRQCHIP`).
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        Self {
            vm_fd,
            state: Mutex::new(State {
                gsis: None,
                msi: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_routing(&self, msi: &BTreeMap<u32, (u64, u32)>) -> Result<(), InterruptError> {
        let table = routing_table(msi);
        let routing = KvmIrqRouting::from_entries(&table).map_err(InterruptError::RoutingTable)?;
        self.vm_fd
            .set_gsi_routing(&routing)
            .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
    }

    fn try_allocate_msi(&self) -> Result<MsiVector, InterruptError> {
        let mut s = self.lock();
        let gsis = s.gsis()?;
        let gsi = gsis.allocate_id().map_err(InterruptError::NoFreeGsi)?;
        let registered = EventFd::new(EFD_NONBLOCK)
            .map_err(InterruptError::EventFd)
            .and_then(|irqfd| {
                self.vm_fd
                    .register_irqfd(&irqfd, gsi)
                    .map_err(kvm_err("KVM_IRQFD"))?;
                Ok(irqfd)
            });
        match registered {
            Ok(irqfd) => Ok(MsiVector { gsi, irqfd }),
            Err(e) => {
                // Give the GSI back: it was allocated just above, so this cannot fail.
                let _ = gsis.free_id(gsi);
                Err(e)
            }
        }
    }

    fn try_update_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), InterruptError> {
        if !(FIRST_MSI_GSI..MAX_GSI).contains(&gsi) {
            return Err(InterruptError::NotMsiGsi(gsi));
        }
        let mut s = self.lock();
        let old = s.msi.insert(gsi, (address, data));
        if let Err(e) = self.set_routing(&s.msi) {
            match old {
                Some(o) => s.msi.insert(gsi, o),
                None => s.msi.remove(&gsi),
            };
            return Err(e);
        }
        Ok(())
    }

    fn try_intx_irqfd(&self, gsi: u32) -> Result<IntxLine, InterruptError> {
        if gsi >= IOAPIC_PINS {
            return Err(InterruptError::NotIoapicPin(gsi));
        }
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let resamplefd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.vm_fd
            .register_irqfd_with_resample(&irqfd, &resamplefd, gsi)
            .map_err(kvm_err("KVM_IRQFD (resample)"))?;
        Ok(IntxLine {
            gsi,
            irqfd,
            resamplefd,
        })
    }

    /// Give back an MSI vector from [`InterruptManager::allocate_msi`]: unbind its irqfd, drop its
    /// route and free its GSI for the next allocation.
    ///
    /// When unbinding fails nothing changes (the vector stays allocated). The GSI is released even
    /// when KVM then refuses the smaller routing table: the stale route is inert (no irqfd points
    /// at it) and the next table update drops it; that error is still returned.
    pub fn release_msi(&self, vector: &MsiVector) -> Result<(), InterruptError> {
        let gsi = vector.gsi;
        let mut s = self.lock();
        if !s.gsis()?.is_allocated(gsi) {
            return Err(InterruptError::NotAllocated(gsi));
        }
        self.vm_fd
            .unregister_irqfd(&vector.irqfd, gsi)
            .map_err(kvm_err("KVM_IRQFD (deassign)"))?;
        s.gsis()?
            .free_id(gsi)
            .map_err(InterruptError::GsiAllocator)?;
        if s.msi.remove(&gsi).is_some() {
            self.set_routing(&s.msi)?;
        }
        Ok(())
    }
}

impl InterruptManager for KvmInterruptManager {
    fn allocate_msi(&self) -> io::Result<MsiVector> {
        Ok(self.try_allocate_msi()?)
    }

    fn update_msi(&self, gsi: u32, address: u64, data: u32) -> io::Result<()> {
        Ok(self.try_update_msi(gsi, address, data)?)
    }

    fn intx_irqfd(&self, gsi: u32) -> io::Result<IntxLine> {
        Ok(self.try_intx_irqfd(gsi)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        // SAFETY: the test only reads entries built as irqchip routes.
        let ic = unsafe { e.u.irqchip };
        (e.gsi, ic.irqchip, ic.pin)
    }

    #[test]
    fn default_table_matches_kvm() {
        let t = default_irqchip_routes();
        assert_eq!(t.len(), 15 + 24);
        assert!(t.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        let routes: Vec<_> = t.iter().map(chip).collect();
        assert!(routes.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(!routes.contains(&(2, KVM_IRQCHIP_PIC_MASTER, 2)));
        assert!(routes.contains(&(2, KVM_IRQCHIP_IOAPIC, 2)));
        assert!(routes.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(routes.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!routes
            .iter()
            .any(|r| r.0 >= 16 && r.1 != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn msi_routes_follow_the_defaults() {
        let mut msi = BTreeMap::new();
        msi.insert(25, (0x1_fee0_1000, 0x4041));
        msi.insert(24, (0xfee0_0000, 0x30));
        let t = routing_table(&msi);
        assert_eq!(t.len(), 39 + 2);
        let m: Vec<_> = t[39..]
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
                // SAFETY: built as MSI routes.
                let m = unsafe { e.u.msi };
                (e.gsi, m.address_lo, m.address_hi, m.data)
            })
            .collect();
        assert_eq!(
            m,
            [(24, 0xfee0_0000, 0, 0x30), (25, 0xfee0_1000, 1, 0x4041)]
        );
    }

    #[test]
    fn routes_on_a_real_vm() {
        let Some(kvm) = crate::testing::require_kvm() else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let im = KvmInterruptManager::new(vm);
        let a = im.allocate_msi().unwrap();
        let b = im.allocate_msi().unwrap();
        assert_eq!((a.gsi, b.gsi), (24, 25));
        im.update_msi(a.gsi, 0xfee0_0000, 0x30).unwrap();
        im.update_msi(b.gsi, 0xfee0_1000, 0x31).unwrap();
        im.update_msi(a.gsi, 0xfee0_2000, 0x32).unwrap();
        // Injecting through the irqfd works with a route in place.
        a.irqfd.write(1).unwrap();
        assert!(im.update_msi(3, 0, 0).is_err());
        let line = im.intx_irqfd(16).unwrap();
        line.irqfd.write(1).unwrap();
        // A second device sharing the pin.
        im.intx_irqfd(16).unwrap();
        assert!(im.intx_irqfd(24).is_err());

        // Released GSIs are handed out again, lowest first; the others keep theirs.
        let c = im.allocate_msi().unwrap();
        assert_eq!(c.gsi, 26);
        im.release_msi(&a).unwrap();
        im.release_msi(&c).unwrap();
        assert!(matches!(
            im.release_msi(&a),
            Err(InterruptError::NotAllocated(24))
        ));
        assert!(!im.lock().msi.contains_key(&24));
        let a2 = im.allocate_msi().unwrap();
        assert_eq!(a2.gsi, 24);
        im.update_msi(a2.gsi, 0xfee0_0000, 0x33).unwrap();
        a2.irqfd.write(1).unwrap();
        assert_eq!(im.allocate_msi().unwrap().gsi, 26);
        assert_eq!(im.allocate_msi().unwrap().gsi, 27);
    }

    #[test]
    fn msi_gsis_come_from_the_msi_range_and_are_reused() {
        let mut s = State {
            gsis: None,
            msi: BTreeMap::new(),
        };
        let gsis = s.gsis().unwrap();
        let all: Vec<u32> = (FIRST_MSI_GSI..MAX_GSI)
            .map(|_| gsis.allocate_id().unwrap())
            .collect();
        assert_eq!(all, (FIRST_MSI_GSI..MAX_GSI).collect::<Vec<_>>());
        let full = gsis.allocate_id().unwrap_err();
        assert_eq!(full, vm_allocator::Error::ResourceNotAvailable);
        let err: io::Error = InterruptError::NoFreeGsi(full).into();
        assert!(err.to_string().starts_with("no free GSI"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        gsis.free_id(300).unwrap();
        gsis.free_id(30).unwrap();
        assert_eq!(gsis.allocate_id(), Ok(30));
        assert_eq!(gsis.allocate_id(), Ok(300));
        assert!(gsis.free_id(FIRST_MSI_GSI - 1).is_err());
    }
}
