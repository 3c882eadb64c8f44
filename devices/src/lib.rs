//! skiff's device layer: the PIO/MMIO bus, VM exit requests and the legacy devices.
//!
//! This crate must not know about PCI transport details or VFIO.

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod virtio;

#[cfg(test)]
mod test_skip;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitReason, VmExitEvent};

/// Guest memory as devices see it: mmap'ed regions with a dirty bitmap (VMM-side writes are
/// tracked for migration).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
