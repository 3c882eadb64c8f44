//! skiff's device layer: the PIO/MMIO bus, VM exit requests and the legacy devices.
//!
//! This crate must not know about PCI transport details or VFIO.

pub mod bus;
pub mod exit;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitReason, VmExitEvent};
