//! Edge interrupts raised by devices: an [`InterruptLine`] trait and its eventfd implementation.
//!
//! The VMM creates one [`EventFdTrigger`] per GSI and registers its eventfd with KVM as an irqfd
//! (`KVM_IRQFD`), so that raising the line never needs a round trip through the VMM. Because an
//! irqfd without a resample fd pulses the GSI, the interrupt is an edge: describe it as
//! edge-triggered, active-high in ACPI/MADT.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Something a device pulls to raise an edge interrupt.
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An [`InterruptLine`] (and a vm-superio [`vm_superio::Trigger`]) backed by an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger {
    fd: EventFd,
}

impl EventFdTrigger {
    /// A new non-blocking eventfd trigger.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Wrap an existing eventfd.
    pub fn from_eventfd(fd: EventFd) -> Self {
        Self { fd }
    }

    /// The eventfd to register as a KVM irqfd (or to read in tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }
}

impl InterruptLine for EventFdTrigger {
    fn trigger(&self) -> io::Result<()> {
        self.fd.write(1)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.fd.write(1)
    }
}

/// Adapts a shared [`InterruptLine`] to vm-superio's `Trigger`.
///
/// A failure to raise the interrupt is logged (rate-limited) and swallowed: a guest register access
/// must not fail because of it, and it keeps vm-superio's constructors infallible.
pub(crate) struct LineTrigger {
    line: Arc<dyn InterruptLine>,
    failures: AtomicU64,
}

impl LineTrigger {
    pub(crate) fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            line,
            failures: AtomicU64::new(0),
        }
    }
}

impl vm_superio::Trigger for LineTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        if let Err(e) = self.line.trigger() {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n.is_power_of_two() {
                log::warn!("cannot raise interrupt (failure #{n}): {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_counts_triggers() {
        let t = EventFdTrigger::new().unwrap();
        let c = t.try_clone().unwrap();
        InterruptLine::trigger(&t).unwrap();
        vm_superio::Trigger::trigger(&c).unwrap();
        assert_eq!(t.eventfd().read().unwrap(), 2);
        // Non-blocking: nothing pending now.
        assert!(t.eventfd().read().is_err());

        let lt = LineTrigger::new(Arc::new(c));
        vm_superio::Trigger::trigger(&lt).unwrap();
        assert_eq!(t.eventfd().read().unwrap(), 1);
    }
}
