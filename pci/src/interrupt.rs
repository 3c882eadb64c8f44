//! What PCI devices need from the VMM to raise interrupts: MSI vectors (a GSI with an irqfd whose
//! route the device reprograms when the guest rewrites an MSI-X table entry) and level-triggered
//! INTx lines (an irqfd with a resample fd).
//!
//! The VMM implements [`InterruptManager`] over KVM (`vmm::interrupts::KvmInterruptManager`); unit
//! tests use a fake that records what the device asked for.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// One MSI vector: a GSI routed (once programmed) to an MSI message, and the irqfd bound to it.
#[derive(Debug)]
pub struct MsiVector {
    /// The GSI the irqfd is bound to.
    pub gsi: u32,
    /// Writing 1 to it injects the GSI's MSI route (no VMM round trip).
    pub irqfd: EventFd,
}

/// A level-triggered INTx line: an irqfd registered with a resample fd.
///
/// Writing the irqfd asserts the line; KVM de-asserts it when the guest acknowledges the interrupt
/// (EOI) and then signals the resample fd, after which the device re-asserts the line if its
/// interrupt is still pending.
#[derive(Debug)]
pub struct IntxLine {
    /// The GSI (IOAPIC pin) the line is wired to.
    pub gsi: u32,
    /// Writing 1 asserts the line.
    pub irqfd: EventFd,
    /// Signalled by KVM after the guest's EOI de-asserted the line.
    pub resamplefd: EventFd,
}

/// Interrupt resources the VMM hands to PCI devices.
pub trait InterruptManager: Send + Sync {
    /// Allocate a fresh GSI for an MSI vector with its irqfd already registered. The GSI has no
    /// route until [`InterruptManager::update_msi`] programs one.
    fn allocate_msi(&self) -> io::Result<MsiVector>;
    /// Route `gsi` to the MSI message (`address`, `data`).
    fn update_msi(&self, gsi: u32, address: u64, data: u32) -> io::Result<()>;
    /// An irqfd with resample on `gsi`, so that the IOAPIC pin behaves as level-triggered.
    fn intx_irqfd(&self, gsi: u32) -> io::Result<IntxLine>;
}

#[cfg(test)]
pub(crate) mod fake {
    //! A recording [`InterruptManager`] for unit tests.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// Records allocations and route updates; keeps a clone of every irqfd so tests can count
    /// interrupts.
    #[derive(Default)]
    pub(crate) struct FakeInterruptManager {
        pub(crate) irqfds: Mutex<Vec<EventFd>>,
        pub(crate) routes: Mutex<BTreeMap<u32, (u64, u32)>>,
        pub(crate) route_updates: Mutex<usize>,
        pub(crate) intx: Mutex<Vec<(EventFd, EventFd)>>,
    }

    impl FakeInterruptManager {
        /// Interrupts written to vector `i`'s irqfd since the last call.
        pub(crate) fn fired(&self, i: usize) -> u64 {
            self.irqfds.lock().unwrap()[i].read().unwrap_or(0)
        }

        /// Interrupts written to the INTx irqfd since the last call.
        pub(crate) fn intx_fired(&self) -> u64 {
            self.intx.lock().unwrap()[0].0.read().unwrap_or(0)
        }

        pub(crate) fn updates(&self) -> usize {
            *self.route_updates.lock().unwrap()
        }

        pub(crate) fn route(&self, gsi: u32) -> Option<(u64, u32)> {
            self.routes.lock().unwrap().get(&gsi).copied()
        }
    }

    impl InterruptManager for FakeInterruptManager {
        fn allocate_msi(&self) -> io::Result<MsiVector> {
            let fd = EventFd::new(EFD_NONBLOCK)?;
            let mut fds = self.irqfds.lock().unwrap();
            let gsi = 24 + fds.len() as u32;
            fds.push(fd.try_clone()?);
            Ok(MsiVector { gsi, irqfd: fd })
        }

        fn update_msi(&self, gsi: u32, address: u64, data: u32) -> io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, (address, data));
            *self.route_updates.lock().unwrap() += 1;
            Ok(())
        }

        fn intx_irqfd(&self, gsi: u32) -> io::Result<IntxLine> {
            let irqfd = EventFd::new(EFD_NONBLOCK)?;
            let resamplefd = EventFd::new(EFD_NONBLOCK)?;
            self.intx
                .lock()
                .unwrap()
                .push((irqfd.try_clone()?, resamplefd.try_clone()?));
            Ok(IntxLine {
                gsi,
                irqfd,
                resamplefd,
            })
        }
    }
}
