//! [`PciFunction`]: what every device on the PCI bus implements, whatever is behind it — the
//! virtio-pci transport today, a VFIO passthrough device next.
//!
//! A function is its configuration space ([`PciDevice`]), the accesses to the trapped parts of
//! its BARs ([`BusDevice`]), and its state ([`Migratable`]). On top of those it tells the VMM:
//! which BARs to allocate and which parts of them are host memory to map straight into the guest
//! ([`BarRequest`], [`MappedArea`]: how a passthrough BAR becomes a KVM memory slot), which
//! eventfds to register for MMIO notifications ([`PciFunction::ioeventfds`]), its INTx resample
//! fd, and its counters. Interrupt set-up (MSI-X vectors on the VM's GSI routes, INTx on a fixed
//! IOAPIC pin) is given to each function when it is built, through an
//! [`crate::InterruptManager`] and its `(pin, gsi)`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use devices::bus::BusDevice;
use migration::Migratable;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::configuration::{BarKind, PciConfigError};
use crate::device::PciDevice;

/// A part of a BAR backed by host memory that the VMM maps into the guest (a KVM memory slot),
/// so guest accesses to it never exit to the VMM.
#[derive(Clone)]
pub struct MappedArea {
    /// Offset of the area inside the BAR (page aligned).
    pub bar_offset: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// The file to map (a device region fd, a memfd, ...), shared with the function.
    pub fd: Arc<dyn AsRawFd + Send + Sync>,
    /// Offset of the area in `fd` (page aligned).
    pub fd_offset: u64,
    /// Whether the guest may write it (otherwise it is mapped read-only).
    pub writable: bool,
}

impl std::fmt::Debug for MappedArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArea")
            .field("bar_offset", &self.bar_offset)
            .field("len", &self.len)
            .field("fd", &self.fd.as_raw_fd())
            .field("fd_offset", &self.fd_offset)
            .field("writable", &self.writable)
            .finish()
    }
}

/// A BAR the VMM must allocate and program.
#[derive(Debug, Clone)]
pub struct BarRequest {
    /// BAR index (0..6; a 64-bit BAR takes two registers and is named by the first).
    pub index: usize,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Memory (32/64-bit, prefetchable) or I/O.
    pub kind: BarKind,
    /// Parts of the BAR mapped into the guest; every other byte is trapped and reaches the
    /// function's [`BusDevice`] methods.
    pub mapped: Vec<MappedArea>,
}

/// Errors a PCI function reports to the VMM.
#[derive(Debug, Error)]
pub enum PciFunctionError {
    /// Programming the configuration space failed (e.g. a BAR address that does not fit).
    #[error("{id}: {source}")]
    Config {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: PciConfigError,
    },
    /// A host resource of the function failed.
    #[error("{id}: {source}")]
    Io {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An eventfd KVM signals on a guest write to a BAR address, so the write never exits to the VMM.
#[derive(Debug)]
pub struct IoEventFd<'a> {
    /// The eventfd.
    pub fd: &'a EventFd,
    /// Guest physical address (inside the BAR as it is placed now).
    pub addr: u64,
}

/// Anything on the PCI bus other than the host bridge.
///
/// Share it as `Arc<Mutex<dyn PciFunction>>`: the same object is the [`PciDevice`] on the bus,
/// the [`BusDevice`] on the MMIO (or port I/O) bus for its trapped BAR ranges, and a component
/// of the VM for pause, snapshot and migration.
pub trait PciFunction: PciDevice + BusDevice + Migratable + Send {
    /// What it is, for `vm.info` (e.g. `virtio-blk`, `vfio-user`).
    fn kind(&self) -> &'static str;
    /// The BARs to allocate, each with its mapped areas.
    fn bar_requests(&self) -> Vec<BarRequest>;
    /// Program BAR `index` at `addr` (chosen by the VMM's allocator) before the guest runs.
    fn set_bar(&mut self, index: usize, addr: u64) -> Result<(), PciFunctionError>;
    /// The address BAR `index` decodes now (the guest may move it), if it is a BAR.
    fn bar_address(&self, index: usize) -> Option<u64>;
    /// The eventfds to register for BAR `index` placed at `bar_base`.
    fn ioeventfds(&self, _index: usize, _bar_base: u64) -> Vec<IoEventFd<'_>> {
        Vec::new()
    }
    /// The fd KVM signals after the guest acknowledged the INTx interrupt, when the function has
    /// INTx; when it is readable call [`PciFunction::handle_intx_resample`].
    fn intx_resample_fd(&self) -> Option<RawFd> {
        None
    }
    /// Consume the resample event and re-assert INTx if the function still has it pending.
    fn handle_intx_resample(&self) -> io::Result<()> {
        Ok(())
    }
    /// What `vm.info` shows about the function beyond its kind and address, as `(key, value)`
    /// (a passthrough device: its backend, socket or host device and IOMMU group).
    fn details(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// I/O counters for `vm.counters` as `(name, value)`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
