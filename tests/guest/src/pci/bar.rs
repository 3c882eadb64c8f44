//! Base address registers: decode, size, and assign when the firmware/VMM left one unassigned.
//!
//! The guest identity-maps only the low 4 GiB, so a memory BAR that is 0 or above 4 GiB is
//! (re)assigned from a 32-bit window: by default from 0xC000_0000 upwards, skipping every BAR
//! already assigned on bus 0 and everything from 0xFEC0_0000 (I/O APIC, LAPIC, ...) up.

use alloc::vec::Vec;

use super::{command, read_command, write_command, Bdf, ConfigSpace, PciFunction};

/// A decoded BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Index 0..6 (the low half's index for a 64-bit BAR).
    pub index: u8,
    /// Base address (0 if unassigned).
    pub addr: u64,
    /// Size in bytes (0 if the BAR is not implemented).
    pub size: u64,
    /// I/O space BAR.
    pub io: bool,
    /// 64-bit memory BAR (occupies `index` and `index + 1`).
    pub is64: bool,
}

fn reg(index: u8) -> u16 {
    0x10 + 4 * u16::from(index)
}

/// Decode and size BAR `index` (memory/IO decoding is switched off while sizing).
pub fn read(cfg: &dyn ConfigSpace, bdf: Bdf, index: u8) -> Bar {
    let r = reg(index);
    let low = cfg.read32(bdf, r);
    let io = low & 1 != 0;
    let is64 = !io && (low >> 1) & 3 == 2 && index < 5;
    let high = if is64 { cfg.read32(bdf, r + 4) } else { 0 };

    let cmd = read_command(cfg, bdf);
    write_command(cfg, bdf, cmd & !(command::MEMORY | command::IO));
    cfg.write32(bdf, r, u32::MAX);
    let size_low = cfg.read32(bdf, r);
    cfg.write32(bdf, r, low);
    let size_high = if is64 {
        cfg.write32(bdf, r + 4, u32::MAX);
        let v = cfg.read32(bdf, r + 4);
        cfg.write32(bdf, r + 4, high);
        v
    } else {
        u32::MAX
    };
    write_command(cfg, bdf, cmd);

    let (addr, mask) = if io {
        (
            u64::from(low & !3),
            u64::from(size_low & !3) | 0xFFFF_FFFF_0000_0000,
        )
    } else {
        (
            (u64::from(high) << 32) | u64::from(low & !0xF),
            (u64::from(size_high) << 32) | u64::from(size_low & !0xF),
        )
    };
    let size = if mask == 0xFFFF_FFFF_0000_0000 || mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    Bar {
        index,
        addr,
        size,
        io,
        is64,
    }
}

/// Write a memory BAR's base address (memory decoding off while the halves are inconsistent).
pub fn write_addr(cfg: &dyn ConfigSpace, bdf: Bdf, bar: &Bar, addr: u64) {
    let r = reg(bar.index);
    let cmd = read_command(cfg, bdf);
    write_command(cfg, bdf, cmd & !command::MEMORY);
    let flags = cfg.read32(bdf, r) & 0xF;
    cfg.write32(bdf, r, (addr as u32 & !0xF) | flags);
    if bar.is64 {
        cfg.write32(bdf, r + 4, (addr >> 32) as u32);
    }
    write_command(cfg, bdf, cmd);
}

/// Start of the default window for BARs the guest assigns itself.
pub const ASSIGN_WINDOW_START: u64 = 0xC000_0000;
/// End (exclusive) of that window.
pub const ASSIGN_WINDOW_END: u64 = 0xFEC0_0000;

/// Every assigned memory BAR range `[start, end)` of the given functions below 4 GiB.
pub fn used_ranges(cfg: &dyn ConfigSpace, functions: &[PciFunction]) -> Vec<(u64, u64)> {
    let mut used = Vec::new();
    for f in functions {
        if f.header_type != 0 {
            continue;
        }
        let mut i = 0;
        while i < 6 {
            let b = read(cfg, f.bdf, i);
            if !b.io && b.size != 0 && b.addr != 0 {
                used.push((b.addr, b.addr + b.size));
            }
            i += if b.is64 { 2 } else { 1 };
        }
    }
    used
}

/// Make sure memory BAR `index` of `bdf` has an address below 4 GiB, assigning one from
/// [`ASSIGN_WINDOW_START`]..[`ASSIGN_WINDOW_END`] (avoiding `used`, which is extended) if it is
/// 0 or above 4 GiB. Returns the BAR as it is now, and whether it was (re)assigned.
pub fn ensure_assigned(
    cfg: &dyn ConfigSpace,
    bdf: Bdf,
    index: u8,
    used: &mut Vec<(u64, u64)>,
) -> Result<(Bar, bool), &'static str> {
    let bar = read(cfg, bdf, index);
    if bar.io {
        return Err("BAR is an I/O BAR");
    }
    if bar.size == 0 {
        return Err("BAR is not implemented");
    }
    if bar.addr != 0 && bar.addr + bar.size <= 1 << 32 {
        return Ok((bar, false));
    }
    let size = bar.size.max(4096);
    let mut at = ASSIGN_WINDOW_START.next_multiple_of(size);
    while at + size <= ASSIGN_WINDOW_END {
        match used.iter().find(|&&(s, e)| s < at + size && at < e) {
            Some(&(_, end)) => at = end.next_multiple_of(size),
            None => {
                write_addr(cfg, bdf, &bar, at);
                used.push((at, at + size));
                return Ok((read(cfg, bdf, index), true));
            }
        }
    }
    Err("no room for the BAR in the 32-bit window")
}
