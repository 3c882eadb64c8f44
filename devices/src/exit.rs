//! The channel through which devices and vCPUs ask the control thread to end the VM.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM should stop. The first request wins; later ones are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff = 1,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse, KVM system reset).
    Reset = 2,
    /// A vCPU hit a fatal condition (triple fault, KVM internal error, failed KVM_RUN).
    VcpuError = 3,
}

impl ExitReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::PowerOff),
            2 => Some(Self::Reset),
            3 => Some(Self::VcpuError),
            _ => None,
        }
    }
}

/// An eventfd the control thread waits on, plus the reason of the first request.
pub struct VmExitEvent {
    fd: EventFd,
    reason: AtomicU8,
}

impl VmExitEvent {
    /// Create a new, unsignalled exit event.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK)?,
            reason: AtomicU8::new(0),
        })
    }

    /// Ask the control thread to stop the VM for `reason` (first caller wins).
    pub fn request(&self, reason: ExitReason) {
        if self
            .reason
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if let Err(e) = self.fd.write(1) {
                log::error!("cannot signal VM exit: {e}");
            }
        }
    }

    /// The reason recorded by the first [`VmExitEvent::request`], if any.
    pub fn reason(&self) -> Option<ExitReason> {
        ExitReason::from_u8(self.reason.load(Ordering::SeqCst))
    }

    /// The eventfd to poll.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let e = VmExitEvent::new().unwrap();
        assert_eq!(e.reason(), None);
        e.request(ExitReason::PowerOff);
        e.request(ExitReason::Reset);
        assert_eq!(e.reason(), Some(ExitReason::PowerOff));
        assert_eq!(e.eventfd().read().unwrap(), 1);
    }
}
