//! MSI-X: capability, vector table and pending-bit array.
//!
//! A table entry is 16 bytes: message address low/high, message data, vector control (bit 0 =
//! mask). The guest sends every message to the xAPIC of one CPU: address `0xFEE0_0000 | dest << 12`
//! (physical destination, fixed delivery, edge), data = vector.

use super::{write16, Bdf, ConfigSpace};

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;

const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// The MSI-X capability of a function, with the table and PBA resolved to addresses.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    bdf: Bdf,
    /// Config-space offset of the capability.
    pub cap: u16,
    /// Number of table entries.
    pub entries: u16,
    /// BAR index of the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR index of the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
    /// Physical address of the table (0 until [`Msix::resolve`]).
    pub table: u64,
    /// Physical address of the PBA (0 until [`Msix::resolve`]).
    pub pba: u64,
}

impl Msix {
    /// Parse the capability at `cap`.
    pub fn parse(cfg: &dyn ConfigSpace, bdf: Bdf, cap: u16) -> Msix {
        let ctrl = cfg.read16(bdf, cap + 2);
        let table = cfg.read32(bdf, cap + 4);
        let pba = cfg.read32(bdf, cap + 8);
        Msix {
            bdf,
            cap,
            entries: (ctrl & 0x7FF) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
            table: 0,
            pba: 0,
        }
    }

    /// Fill in the table/PBA addresses from the base addresses of their BARs.
    pub fn resolve(&mut self, bar_addr: impl Fn(u8) -> u64) {
        self.table = bar_addr(self.table_bar) + u64::from(self.table_offset);
        self.pba = bar_addr(self.pba_bar) + u64::from(self.pba_offset);
    }

    fn control(&self, cfg: &dyn ConfigSpace) -> u16 {
        cfg.read16(self.bdf, self.cap + 2)
    }

    /// Enable or disable MSI-X (and clear the function mask).
    pub fn set_enabled(&self, cfg: &dyn ConfigSpace, on: bool) {
        let ctrl = self.control(cfg) & !(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        write16(
            cfg,
            self.bdf,
            self.cap + 2,
            if on { ctrl | CTRL_ENABLE } else { ctrl },
        );
    }

    /// Whether the enable bit reads back set.
    pub fn enabled(&self, cfg: &dyn ConfigSpace) -> bool {
        self.control(cfg) & CTRL_ENABLE != 0
    }

    fn entry_addr(&self, entry: u16) -> u64 {
        assert!(entry < self.entries, "MSI-X entry {entry} out of range");
        self.table + 16 * u64::from(entry)
    }

    fn write_entry(&self, entry: u16, word: u64, value: u32) {
        // SAFETY: the table lies in a BAR the caller resolved and enabled, identity mapped.
        unsafe { core::ptr::write_volatile((self.entry_addr(entry) + 4 * word) as *mut u32, value) }
    }

    fn read_entry(&self, entry: u16, word: u64) -> u32 {
        // SAFETY: as in `write_entry`.
        unsafe { core::ptr::read_volatile((self.entry_addr(entry) + 4 * word) as *const u32) }
    }

    /// Point `entry` at `vector` on the xAPIC `dest_apic`; the mask bit is left as it is.
    pub fn program(&self, entry: u16, vector: u8, dest_apic: u32) {
        self.write_entry(entry, 0, 0xFEE0_0000 | (dest_apic & 0xFF) << 12);
        self.write_entry(entry, 1, 0);
        self.write_entry(entry, 2, u32::from(vector));
    }

    /// Change only the message data (the vector) of `entry`.
    pub fn set_vector(&self, entry: u16, vector: u8) {
        self.write_entry(entry, 2, u32::from(vector));
    }

    /// Set or clear the per-vector mask bit.
    pub fn set_masked(&self, entry: u16, masked: bool) {
        let ctrl = self.read_entry(entry, 3);
        self.write_entry(entry, 3, if masked { ctrl | 1 } else { ctrl & !1 });
    }

    /// Whether the per-vector mask bit is set.
    pub fn masked(&self, entry: u16) -> bool {
        self.read_entry(entry, 3) & 1 != 0
    }

    /// The entry's message data as read back.
    pub fn data(&self, entry: u16) -> u32 {
        self.read_entry(entry, 2)
    }

    /// Whether the pending bit of `entry` is set in the PBA.
    pub fn pending(&self, entry: u16) -> bool {
        let qword = self.pba + 8 * u64::from(entry / 64);
        // SAFETY: the PBA lies in a BAR the caller resolved and enabled; 64-bit reads of it are
        // allowed (as two dwords here, which is also allowed).
        let lo = unsafe { core::ptr::read_volatile(qword as *const u32) };
        // SAFETY: as above.
        let hi = unsafe { core::ptr::read_volatile((qword + 4) as *const u32) };
        let bits = u64::from(lo) | (u64::from(hi) << 32);
        bits & (1 << (entry % 64)) != 0
    }
}
