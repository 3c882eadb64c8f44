//! `dirty-log`: a guest whose writes are known page by page, so a host test can check that the
//! VMM's dirty-page log reports exactly the pages the guest (and a device) wrote. (Formerly named
//! `dirty`; its output lines and `dirty.base=` keep that prefix. `dirty` is now the migration
//! workload in `dirty.rs`.)
//!
//! Interrupts stay disabled throughout; only the BSP runs. Set-up:
//!
//! * a region of [`REGION_PAGES`] pages at `dirty.base=` (default 40 MiB, outside the image; it
//!   must be RAM), a mailbox page and a buffer page above it with an untouched page between each;
//! * the first virtio-blk disk, polled (no interrupts), and a warm-up read of sector 0 into the
//!   buffer page;
//! * every page used later is written once now (region, mailbox, buffer, the ring pages, 16 KiB
//!   of stack), so later phases write data only, never first-touch state.
//!
//! Then it prints (all addresses `0x%x`, ranges `[start, end)`):
//!
//! ```text
//! dirty: image 0xS-0xE            # the loaded image incl. .bss, stacks and heap (locks, counters)
//! dirty: stack 0xS-0xE            # the part of the boot stack this scenario uses (inside the image)
//! dirty: rings 0xD 0xA 0xU        # descriptor table, available ring, used ring (one page each)
//! dirty: buffer 0xB               # one page, outside the image
//! dirty: region 0xR pages 64      # outside the image
//! dirty: mailbox 0xM              # one page, outside the image
//! dirty: ready
//! ```
//!
//! and polls the mailbox's first u64 (volatile reads and `pause`, never a write) for 1:
//!
//! * **1** — write region pages `i % 3 == 1`, read sector 1 into the buffer page through the blk
//!   (the device writes the buffer and the used ring), print `dirty: buffer <first 16 bytes hex>`,
//!   `dirty: round 1 done` and `dirty: round 1 pages i,j,...`; poll for 2;
//! * **2** — write region pages `i % 5 == 0`, no I/O, print `dirty: round 2 done` and
//!   `dirty: round 2 pages ...`; poll for 3;
//! * **3** — print `dirty: end` and power off.
//!
//! Any other mailbox value: `result: FAIL` and a panic.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::report::{fail, or_fail, param_u64};
use crate::bootinfo::{BootInfo, MemoryKind};
use crate::dma;
use crate::println;
use crate::virtio::blk::{Blk, S_OK};
use crate::virtio::{types, Platform};

/// Pages in the region.
pub const REGION_PAGES: u64 = 64;
const PAGE: u64 = 4096;
const DEFAULT_BASE: u64 = 40 << 20;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn rsp() -> u64 {
    let v: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) v, options(nomem, nostack)) };
    v
}

/// Write 16 KiB of stack (and return the lowest stack address used), so the pages the rounds'
/// calls use later have been written before.
#[inline(never)]
fn touch_stack() -> u64 {
    let mut a = [0u8; 16 * 1024];
    for i in (0..a.len()).step_by(64) {
        // SAFETY: writing our own local array.
        unsafe { core::ptr::write_volatile(&mut a[i], i as u8) };
    }
    core::hint::black_box(&a);
    (a.as_ptr() as u64).min(rsp())
}

fn write_page(addr: u64, value: u64) {
    dma::write::<u64>(addr, value);
    dma::write::<u64>(addr + PAGE / 2, !value);
}

/// Read a page's first word and write it back (a write that changes nothing).
fn rewrite(addr: u64) {
    let page = addr & !(PAGE - 1);
    let v = dma::read::<u64>(page);
    dma::write::<u64>(page, v);
}

fn wait_mailbox(mailbox: u64, want: u64) {
    loop {
        let v = dma::read::<u64>(mailbox);
        if v == want {
            return;
        }
        if v != want - 1 {
            fail(format!(
                "dirty: mailbox holds {v}, expected {} or {want}",
                want - 1
            ));
        }
        core::hint::spin_loop();
    }
}

/// Write the region pages selected by `pick`; returns their indices.
fn write_round(region: u64, round: u64, pick: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut written = Vec::with_capacity(REGION_PAGES as usize);
    for i in 0..REGION_PAGES {
        if pick(i) {
            written.push(i);
        }
    }
    // Allocate before writing so no heap growth happens in between (noise, but in the image).
    for &i in &written {
        write_page(region + i * PAGE, (round << 32) | i);
    }
    written
}

fn list(pages: &[u64]) -> String {
    let v: Vec<String> = pages.iter().map(|p| format!("{p}")).collect();
    v.join(",")
}

/// Run the protocol.
pub fn run(boot: &BootInfo) {
    crate::arch::interrupts::disable();
    let base = param_u64(boot, "dirty.base", DEFAULT_BASE);
    if !base.is_multiple_of(PAGE) {
        fail(format!("dirty.base={base:#x} is not page aligned"));
    }
    let region = base;
    let mailbox = region + (REGION_PAGES + 1) * PAGE;
    let buffer = mailbox + 2 * PAGE;
    let end = buffer + PAGE;
    // Linker symbols: only their addresses are taken.
    let (img_start, img_end) = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    if region < img_end && end > img_start {
        fail(format!(
            "dirty.base={base:#x}: [{region:#x}, {end:#x}) overlaps the image"
        ));
    }
    let in_ram = boot
        .memory_map
        .iter()
        .any(|e| e.kind == MemoryKind::Ram && e.addr <= region && e.addr + e.size >= end);
    if !in_ram || end > 1 << 32 {
        fail(format!(
            "dirty: [{region:#x}, {end:#x}) is not RAM below 4 GiB"
        ));
    }

    let mut p = Platform::discover(boot);
    let Some(&first) = p.virtio_devices(types::BLOCK).first() else {
        fail("dirty: no virtio-blk device");
    };
    let t = or_fail(p.open(first));
    let mut b = or_fail(Blk::init(t, 0));
    let st = or_fail(b.read(0, buffer, 512));
    if st != S_OK {
        fail(format!("dirty: warm-up read status {st}"));
    }

    // Pre-touch everything the rounds will write.
    for i in 0..REGION_PAGES {
        write_page(region + i * PAGE, 0);
    }
    dma::write::<u64>(mailbox, 0);
    write_page(buffer, 0);
    let [(desc, _), (avail, _), (used, _)] = b.q.regions();
    for r in [desc, avail, used] {
        rewrite(r);
    }
    rewrite(b.header_addr());
    let stack_top = (rsp() + 2 * PAGE).next_multiple_of(PAGE);
    let stack_low = touch_stack() & !(PAGE - 1);
    let stack_low = stack_low.saturating_sub(PAGE);

    println!("dirty: image {img_start:#x}-{img_end:#x}");
    println!("dirty: stack {stack_low:#x}-{stack_top:#x}");
    println!("dirty: rings {desc:#x} {avail:#x} {used:#x}");
    println!("dirty: buffer {buffer:#x}");
    println!("dirty: region {region:#x} pages {REGION_PAGES}");
    println!("dirty: mailbox {mailbox:#x}");
    println!("dirty: ready");

    wait_mailbox(mailbox, 1);
    let r1 = write_round(region, 1, |i| i % 3 == 1);
    let st = or_fail(b.read(1, buffer, 512));
    if st != S_OK {
        fail(format!("dirty: round 1 read status {st}"));
    }
    println!("dirty: buffer {}", dma::hex(&dma::read_bytes(buffer, 16)));
    println!("dirty: round 1 done");
    println!("dirty: round 1 pages {}", list(&r1));

    wait_mailbox(mailbox, 2);
    let r2 = write_round(region, 2, |i| i % 5 == 0);
    println!("dirty: round 2 done");
    println!("dirty: round 2 pages {}", list(&r2));

    wait_mailbox(mailbox, 3);
    println!("dirty: end");
}
