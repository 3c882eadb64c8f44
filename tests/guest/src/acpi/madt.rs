//! The Multiple APIC Description Table: CPUs and I/O APICs.

use alloc::vec::Vec;

use super::Table;

/// An I/O APIC entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    /// I/O APIC ID.
    pub id: u8,
    /// MMIO base.
    pub addr: u32,
    /// First GSI it handles.
    pub gsi_base: u32,
}

/// What the MADT says.
#[derive(Clone, Debug, Default)]
pub struct Madt {
    /// Local APIC MMIO base (offset 36, or the type 5 override).
    pub lapic_addr: u64,
    /// APIC IDs of all usable CPUs (enabled or online-capable), local APIC then x2APIC entries.
    pub apic_ids: Vec<u32>,
    /// Usable type 0 (local APIC) entries.
    pub lapic_entries: usize,
    /// Usable type 9 (local x2APIC) entries.
    pub x2apic_entries: usize,
    /// I/O APICs.
    pub ioapics: Vec<IoApic>,
}

const FLAG_ENABLED: u32 = 1 << 0;
const FLAG_ONLINE_CAPABLE: u32 = 1 << 1;
/// A CPU entry counts when it is enabled or online-capable.
const USABLE: u32 = FLAG_ENABLED | FLAG_ONLINE_CAPABLE;

impl Madt {
    /// Parse a MADT ("APIC") table.
    pub fn parse(t: &Table) -> Madt {
        let bytes = t.bytes();
        let mut m = Madt {
            lapic_addr: u64::from(t.field::<u32>(36).unwrap_or(0)),
            ..Madt::default()
        };
        let mut off = 44;
        while off + 2 <= bytes.len() {
            let kind = bytes[off];
            let len = bytes[off + 1] as usize;
            if len < 2 || off + len > bytes.len() {
                break;
            }
            let e = &bytes[off..off + len];
            let u32_at = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            match kind {
                0 if len >= 8 && u32_at(4) & USABLE != 0 => {
                    m.apic_ids.push(u32::from(e[3]));
                    m.lapic_entries += 1;
                }
                1 if len >= 12 => m.ioapics.push(IoApic {
                    id: e[2],
                    addr: u32_at(4),
                    gsi_base: u32_at(8),
                }),
                5 if len >= 12 => {
                    m.lapic_addr = u64::from(u32_at(4)) | (u64::from(u32_at(8)) << 32);
                }
                9 if len >= 16 && u32_at(8) & USABLE != 0 => {
                    m.apic_ids.push(u32_at(4));
                    m.x2apic_entries += 1;
                }
                _ => {}
            }
            off += len;
        }
        m
    }

    /// Number of usable CPUs.
    pub fn cpu_count(&self) -> usize {
        self.apic_ids.len()
    }
}
