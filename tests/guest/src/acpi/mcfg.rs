//! The MCFG table: PCI Express ECAM windows.

use alloc::vec::Vec;

use super::Table;

/// One ECAM window ("configuration space base address allocation structure").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamWindow {
    /// Physical base (the address of bus `start_bus`).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// Parse the MCFG windows (16-byte entries from offset 44).
pub fn parse(t: &Table) -> Vec<EcamWindow> {
    let b = t.bytes();
    let mut v = Vec::new();
    let mut off = 44;
    while off + 16 <= b.len() {
        let e = &b[off..off + 16];
        v.push(EcamWindow {
            base: u64::from_le_bytes(e[0..8].try_into().unwrap_or_default()),
            segment: u16::from_le_bytes([e[8], e[9]]),
            start_bus: e[10],
            end_bus: e[11],
        });
        off += 16;
    }
    v
}
