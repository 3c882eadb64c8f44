//! `counter`: run forever, printing an increasing counter and a checksum of a memory region the
//! guest keeps rewriting, so tests can prove that pause stops the guest, that resume and restore
//! continue from the same value (no restart), and that guest memory survived (the guest checks
//! every page's previous contents before rewriting it).
//!
//! Output, every `counter.every` iterations (default 8): `counter: N checksum 0xXXXXXXXXXXXXXXXX`.
//! A page that does not hold what the guest last wrote there ends the run with
//! `counter: memory check FAIL at page P` and a panic.

use crate::bootinfo::BootInfo;
use crate::scenario::report::param_u64;
use crate::sync::RacyCell;

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

/// Count, rewrite one page per iteration, keep the running checksum, print.
pub fn run(boot: &BootInfo) {
    let every = param_u64(boot, "counter.every", 8).max(1);
    let delay = param_u64(boot, "counter.delay_ms", 25);
    let limit = param_u64(boot, "counter.limit", 0);
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
        }
        if limit != 0 && n >= limit {
            crate::println!("counter: reached the limit of {limit}");
            return;
        }
        crate::arch::time::delay_ms(delay);
    }
}
