//! KVM interrupt routing for PCI devices: [`KvmInterruptManager`] implements
//! [`pci::InterruptManager`] over the VM's GSI routing table.
//!
//! KVM keeps one routing table per VM and `KVM_SET_GSI_ROUTING` replaces all of it, so the manager
//! keeps the whole table: the default irqchip routes (GSI 0–15 to the PICs and the IOAPIC, 16–23 to
//! the IOAPIC only, as KVM sets them up) plus one MSI route per programmed vector. MSI GSIs are
//! handed out from 24 upward; each vector's irqfd is registered once, when it is allocated, and
//! follows its route as the table changes.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use pci::{InterruptManager, IntxLine, MsiVector};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Number of IOAPIC pins (GSIs 0..24 are wired to the irqchip).
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed to MSI vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// Exclusive upper bound of GSIs KVM accepts in a routing table.
pub const MAX_GSI: u32 = KVM_MAX_IRQ_ROUTES as u32;

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
    next_gsi: u32,
    msi: BTreeMap<u32, (u64, u32)>,
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
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    fn set_routing(&self, msi: &BTreeMap<u32, (u64, u32)>) -> io::Result<()> {
        let table = routing_table(msi);
        let routing = KvmIrqRouting::from_entries(&table)
            .map_err(|e| io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm_fd
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl InterruptManager for KvmInterruptManager {
    fn allocate_msi(&self) -> io::Result<MsiVector> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.next_gsi >= MAX_GSI {
            return Err(io::Error::other("no free GSI for an MSI vector"));
        }
        let gsi = s.next_gsi;
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        self.vm_fd
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        s.next_gsi += 1;
        Ok(MsiVector { gsi, irqfd })
    }

    fn update_msi(&self, gsi: u32, address: u64, data: u32) -> io::Result<()> {
        if !(FIRST_MSI_GSI..MAX_GSI).contains(&gsi) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSI {gsi} is not an MSI GSI"),
            ));
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
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

    fn intx_irqfd(&self, gsi: u32) -> io::Result<IntxLine> {
        if gsi >= IOAPIC_PINS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSI {gsi} is not an IOAPIC pin"),
            ));
        }
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        let resamplefd = EventFd::new(EFD_NONBLOCK)?;
        self.vm_fd
            .register_irqfd_with_resample(&irqfd, &resamplefd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(IntxLine {
            gsi,
            irqfd,
            resamplefd,
        })
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
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: /dev/kvm is not available");
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
    }
}
