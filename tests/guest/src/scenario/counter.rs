//! `counter`: run forever, printing an increasing counter and a checksum of a memory region the
//! guest keeps rewriting, so tests can prove that pause stops the guest, that resume and restore
//! continue from the same value (no restart), and that guest memory survived (the guest checks
//! every page's previous contents before rewriting it).
//!
//! Output, every `counter.every` iterations (default 8): `counter: N checksum 0xXXXXXXXXXXXXXXXX`.
//! A page that does not hold what the guest last wrote there ends the run with
//! `counter: memory check FAIL at page P` and a panic.
//!
//! With `counter.blk=1` the guest first writes a pattern to sectors 0..8 of the first virtio-blk
//! disk (`counter: blk pattern written`) and then, every `counter.every` iterations, reads them
//! back through the device and verifies them (`counter: N blk ok`) — so a restored VM proves its
//! disk data and its virtio-blk queues survived.

use alloc::vec::Vec;

use crate::bootinfo::{BootInfo, MemoryKind};
use crate::dma;
use crate::scenario::report::{fail, or_fail, param_u64};
use crate::sync::RacyCell;
use crate::virtio::blk::{self, Blk, S_OK};
use crate::virtio::{types, Platform};

const BLK_LEN: usize = 8 * blk::SECTOR;

fn blk_pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(37) ^ ((i / blk::SECTOR) as u8) ^ 0x5C
}

/// Open the first virtio-blk disk and write the pattern to sectors 0..8.
fn blk_setup(boot: &BootInfo) -> (Blk, u64) {
    let mut p = Platform::discover(boot);
    let Some(&first) = p.virtio_devices(types::BLOCK).first() else {
        fail("counter.blk=1 but there is no virtio-blk device");
    };
    let t = or_fail(p.open(first));
    let mut b = or_fail(Blk::init(t, 0));
    let buf = dma::alloc(BLK_LEN, 4096);
    let data: Vec<u8> = (0..BLK_LEN).map(blk_pattern).collect();
    dma::write_bytes(buf, &data);
    let st = or_fail(b.write(0, buf, BLK_LEN as u32));
    if st != S_OK {
        fail(alloc::format!("counter: blk write status {st}"));
    }
    crate::println!("counter: blk pattern written");
    (b, buf)
}

/// Read sectors 0..8 back and verify them.
fn blk_verify(b: &mut Blk, buf: u64, n: u64) {
    dma::fill(buf, BLK_LEN, 0);
    let st = or_fail(b.read(0, buf, BLK_LEN as u32));
    let data = dma::read_bytes(buf, BLK_LEN);
    if st != S_OK || data.iter().enumerate().any(|(i, &v)| v != blk_pattern(i)) {
        crate::println!("counter: {n} blk FAIL (status {st})");
        panic!("virtio-blk data changed under the counter");
    }
    crate::println!("counter: {n} blk ok");
}

const PAGES: usize = 256;
const PAGE_WORDS: usize = 512; // 4 KiB of u64s

#[repr(C, align(4096))]
struct Region([[u64; PAGE_WORDS]; PAGES]);

static REGION: RacyCell<Region> = RacyCell::new(Region([[0; PAGE_WORDS]; PAGES]));

/// The word at `w` of a page written at iteration `i`.
fn pattern(i: u64, w: usize) -> u64 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .rotate_left((i % 61) as u32)
}

/// Checksum contribution of a page written at iteration `i` (position-dependent).
fn page_sum(i: u64, page: usize) -> u64 {
    (0..PAGE_WORDS).fold(0u64, |acc, w| {
        acc.wrapping_add(pattern(i, w).rotate_left(page as u32 % 64))
    })
}

/// Where `counter.fill_mb` starts writing (above the guest image, heap and DMA areas).
const FILL_START: u64 = 32 << 20;

/// Dirty `mb` MiB of RAM from [`FILL_START`] with a non-zero pattern (benchmarks of snapshot
/// throughput need real data, not holes). Refuses ranges outside the e820 RAM map.
fn fill_memory(boot: &BootInfo, mb: u64) {
    let end = FILL_START + (mb << 20);
    let in_ram = boot
        .memory_map
        .iter()
        .any(|e| e.kind == MemoryKind::Ram && e.addr <= FILL_START && e.addr + e.size >= end);
    if !in_ram || end > 1 << 32 {
        fail(alloc::format!(
            "counter.fill_mb={mb}: [{FILL_START:#x}, {end:#x}) is not RAM below 4 GiB"
        ));
    }
    let mut a = FILL_START;
    while a < end {
        // SAFETY: the range is RAM (checked against the e820 map), identity mapped, and used by
        // nothing else in this scenario.
        unsafe { core::ptr::write_volatile(a as *mut u64, a ^ 0x5a5a_5a5a_5a5a_5a5a) };
        a += 8;
    }
    crate::println!("counter: filled {mb} MiB");
}

/// Count, rewrite one page per iteration, keep the running checksum, print.
pub fn run(boot: &BootInfo) {
    let every = param_u64(boot, "counter.every", 8).max(1);
    let delay = param_u64(boot, "counter.delay_ms", 25);
    let limit = param_u64(boot, "counter.limit", 0);
    let mut disk = (param_u64(boot, "counter.blk", 0) != 0).then(|| blk_setup(boot));
    let fill_mb = param_u64(boot, "counter.fill_mb", 0);
    if fill_mb != 0 {
        fill_memory(boot, fill_mb);
    }
    // SAFETY: only the BSP runs this scenario; nothing else touches REGION.
    let region = unsafe { &mut *REGION.get() };
    // Which iteration last wrote each page (0 = never: all zero).
    let mut written_at = [0u64; PAGES];
    let mut checksum = 0u64;
    let mut n: u64 = 0;
    crate::println!("counter: start");
    loop {
        n += 1;
        let page = (n as usize) % PAGES;
        // Verify the page still holds what was written there.
        let prev = written_at[page];
        for (w, word) in region.0[page].iter().enumerate() {
            // SAFETY: reading our own static memory; volatile so the check really reads RAM.
            let v = unsafe { core::ptr::read_volatile(word) };
            let expect = if prev == 0 { 0 } else { pattern(prev, w) };
            if v != expect {
                crate::println!(
                    "counter: memory check FAIL at page {page} word {w} (iteration {n})"
                );
                panic!("guest memory changed under the counter");
            }
        }
        if prev != 0 {
            checksum = checksum.wrapping_sub(page_sum(prev, page));
        }
        for (w, word) in region.0[page].iter_mut().enumerate() {
            // SAFETY: writing our own static memory.
            unsafe { core::ptr::write_volatile(word, pattern(n, w)) };
        }
        written_at[page] = n;
        checksum = checksum.wrapping_add(page_sum(n, page));
        if n.is_multiple_of(every) {
            crate::println!("counter: {n} checksum {checksum:#018x}");
            if let Some((b, buf)) = disk.as_mut() {
                blk_verify(b, *buf, n);
            }
        }
        if limit != 0 && n >= limit {
            crate::println!("counter: reached the limit of {limit}");
            return;
        }
        crate::arch::time::delay_ms(delay);
    }
}
