//! The interface every PCI function on a [`crate::PciBus`] implements.

use crate::configuration::BarMove;

/// A PCI function as seen by configuration accesses.
pub trait PciDevice: Send {
    /// Read 32-bit configuration register `reg_idx` (byte offset `reg_idx * 4`).
    fn config_read(&mut self, reg_idx: usize) -> u32;
    /// Write `data` (1, 2 or 4 bytes) at byte `offset` (0..=3) within register `reg_idx`.
    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]);
    /// A stable name for logs and state sections (e.g. `pci-host-bridge`, `virtio-blk0`).
    fn id(&self) -> String;
    /// The BAR move the last [`PciDevice::config_write`] caused, if any (taken: a second call
    /// returns `None`). The [`crate::PciBus`] asks after every write and reports moves to the
    /// handler installed with [`crate::PciBus::set_bar_move_handler`]. Devices without
    /// relocatable BARs keep the default.
    fn take_bar_move(&mut self) -> Option<BarMove> {
        None
    }
}
