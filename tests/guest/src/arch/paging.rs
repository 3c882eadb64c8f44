//! Extending the boot identity map: the boot page tables cover only the low 4 GiB, so a device
//! region the VMM placed above 4 GiB (a 64-bit BAR in the high PCI window) is mapped here,
//! identity, uncached, with 2 MiB pages. Missing page-table levels are taken from the heap
//! (identity mapped, so a heap address is the table's physical address).

use core::arch::asm;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const LARGE: u64 = 2 << 20;

fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

fn entry(table: u64, index: u64) -> u64 {
    crate::dma::read::<u64>(table + 8 * index)
}

fn set_entry(table: u64, index: u64, value: u64) {
    crate::dma::write::<u64>(table + 8 * index, value);
}

/// The table an entry points to, allocating a zeroed one if the entry is empty. Fails if the
/// entry maps a large page (the boot tables never use 1 GiB pages above 4 GiB).
fn next_table(table: u64, index: u64) -> Result<u64, &'static str> {
    let e = entry(table, index);
    if e & PRESENT == 0 {
        let t = crate::dma::alloc(4096, 4096);
        set_entry(table, index, t | PRESENT | WRITABLE);
        return Ok(t);
    }
    if e & PAGE_SIZE_BIT != 0 {
        return Err("a large page is in the way");
    }
    Ok(e & ADDR_MASK)
}

/// Identity-map `[start, start + len)` uncached (for MMIO). Addresses below 4 GiB are already
/// mapped by the boot tables and left alone; the range must lie below 2^48.
pub fn map_mmio(start: u64, len: u64) -> Result<(), &'static str> {
    let end = start.checked_add(len).ok_or("range wraps")?;
    if end > 1 << 48 {
        return Err("range above the 48-bit address space");
    }
    let mut at = (start & !(LARGE - 1)).max(1 << 32);
    let mut changed = false;
    while at < end {
        let pml4 = cr3() & ADDR_MASK;
        let pdpt = next_table(pml4, (at >> 39) & 511)?;
        let pd = next_table(pdpt, (at >> 30) & 511)?;
        let i = (at >> 21) & 511;
        let want = at | PRESENT | WRITABLE | PAGE_SIZE_BIT | PWT | PCD;
        let e = entry(pd, i);
        if e & PRESENT == 0 {
            set_entry(pd, i, want);
            changed = true;
        } else if e != want {
            return Err("a different mapping is in the way");
        }
        at += LARGE;
    }
    if changed {
        // SAFETY: reloading CR3 with its own value only flushes the TLB.
        unsafe { asm!("mov cr3, {}", in(reg) cr3(), options(nostack)) };
    }
    Ok(())
}
