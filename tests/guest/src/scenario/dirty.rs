//! `dirty`: a memory-dirtying workload for live-migration tests. The guest keeps rewriting a
//! working set at a chosen rate; every page says which page it is and which generation it holds,
//! so a page lost or left stale by a migration is caught the next time the guest touches it. The
//! guest also measures its own longest stall (a migration's downtime) with the TSC.
//!
//! Parameters (all optional):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `dirty.mib=N` | 64 | working set in MiB (`N * 256` pages) |
//! | `dirty.rate=P` | 0 | pages rewritten per second (0: as fast as the guest can) |
//! | `dirty.report_ms=N` | 500 | a progress line every N ms |
//! | `dirty.verify_every=N` | 10 | a full verification sweep every N progress lines (0: only at the end) |
//! | `dirty.seconds=N` | 0 | run N seconds, then a last sweep and power-off (0: forever) |
//! | `dirty.base=ADDR` | 16 MiB | where the generation table and the working set start (RAM, outside the image) |
//! | `dirty.tsc_hz=HZ` | PIT | the TSC rate, instead of measuring it against the PIT |
//!
//! Memory: at `dirty.base` a table of one u64 per page (the generation the page must hold),
//! rounded up to whole pages, then the working set. Both are ordinary guest RAM, so they migrate
//! like everything else; the guest's own counters live on its stack (also RAM).
//!
//! A page holding generation `g` of page `p`: word 0 = `p`, word 1 = `g`, word 2 = checksum of
//! words 3..512 (their wrapping sum), words 3..512 = `body_seed(p, g)` (a 64-bit hash of `p` and
//! `g`, so a page from another generation or another place differs in every word). The body is
//! written with `rep stosq` and checked with `repe scasq`: this host's KVM emulates guest
//! kernel code instruction by instruction, and one string instruction costs far less there than
//! 509 stores (or loads and compares) would. All
//! pages are first written with generation 0. Then pass `g = 1, 2, ...` visits every page once,
//! in a strided order that spreads consecutive writes across the working set, and for each page:
//! checks that the table says `g - 1`, checks the page (index, generation, every body word,
//! checksum), rewrites it with `g`, and sets the table entry to `g`.
//!
//! Stall measure: the TSC is read after every page written or verified, every pacing poll and
//! every byte printed; the longest gap between two consecutive reads is the longest time the guest
//! did not run (a pause, a migration's downtime), with a resolution of about one page's work.
//!
//! See `tests/guest/README.md` (`dirty` workload) for the output lines.

use alloc::format;

use super::report::{fail, param_u64};
use crate::arch::time::{calibrate_tsc_pit, rdtsc, ASSUMED_MAX_TSC_HZ};
use crate::bootinfo::{BootInfo, MemoryKind};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Header words: index, generation, checksum.
const HEADER: u64 = 3;
const DEFAULT_BASE: u64 = 16 << 20;
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn rd(addr: u64) -> u64 {
    // SAFETY: every address passed is inside the table or working set, which `run` checked to be
    // RAM (identity mapped, 8-byte aligned) used by nothing else.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn wr(addr: u64, v: u64) {
    // SAFETY: as in `rd`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// The first body word of page `p` at generation `g` (splitmix64 of both).
fn body_seed(p: u64, g: u64) -> u64 {
    let mut z = (p << 40 ^ g).wrapping_add(STEP);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The body checksum of generation `g` of page `p`: the wrapping sum of the body words.
fn checksum(p: u64, g: u64) -> u64 {
    body_seed(p, g).wrapping_mul(WORDS - HEADER)
}

/// Write generation `g` of page `p` at `addr`: body first, then the header.
fn write_page(addr: u64, p: u64, g: u64) {
    crate::dma::fill_u64(addr + HEADER * 8, WORDS - HEADER, body_seed(p, g));
    wr(addr, p);
    wr(addr + 8, g);
    wr(addr + 16, checksum(p, g));
}

/// What is wrong with a page.
enum Bad {
    Gen(u64),
    Index(u64),
    Word { w: u64, expect: u64, found: u64 },
    Checksum { stored: u64, computed: u64 },
}

/// Check that the page at `addr` holds generation `g` of page `p`: header index and generation,
/// every body word, and the stored checksum against the body's (every body word being the seed,
/// the body's sum is `seed * 509`).
fn check_page(addr: u64, p: u64, g: u64) -> Result<(), Bad> {
    let found = rd(addr + 8);
    if found != g {
        return Err(Bad::Gen(found));
    }
    let index = rd(addr);
    if index != p {
        return Err(Bad::Index(index));
    }
    let seed = body_seed(p, g);
    let body = addr + HEADER * 8;
    let bad = crate::dma::scan(body, WORDS - HEADER, seed);
    if bad != WORDS - HEADER {
        return Err(Bad::Word {
            w: HEADER + bad,
            expect: seed,
            found: rd(body + bad * 8),
        });
    }
    let stored = rd(addr + 16);
    let computed = checksum(p, g);
    if stored != computed {
        return Err(Bad::Checksum { stored, computed });
    }
    Ok(())
}

/// Print the failure line for page `p` and panic.
fn page_fail(p: u64, g: u64, bad: Bad, when: &str) -> ! {
    let line = match bad {
        Bad::Gen(h) => format!("dirty: FAIL page {p} expected gen {g} found gen {h}"),
        Bad::Index(i) => format!("dirty: FAIL page {p} gen {g} holds index {i}"),
        Bad::Word { w, expect, found } => format!(
            "dirty: FAIL page {p} gen {g} word {w} expected {expect:#018x} found {found:#018x}"
        ),
        Bad::Checksum { stored, computed } => format!(
            "dirty: FAIL page {p} gen {g} checksum stored {stored:#018x} computed {computed:#018x}"
        ),
    };
    crate::println!("{line} ({when})");
    panic!("dirty: page {p} does not hold generation {g} ({when})");
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The longest gap between consecutive TSC reads (also used by `vfio-migrate`).
pub(super) struct Stall {
    /// The last TSC read.
    pub(super) last: u64,
    /// Longest gap since the workload started (ticks).
    pub(super) max: u64,
    /// Longest gap since the previous progress line (ticks).
    pub(super) recent: u64,
    /// Times the TSC read lower than before (not counted as gaps).
    pub(super) backwards: u64,
}

impl Stall {
    /// Start measuring now.
    pub(super) fn new() -> Self {
        Stall {
            last: rdtsc(),
            max: 0,
            recent: 0,
            backwards: 0,
        }
    }

    /// Read the TSC, account the gap since the previous read, return the TSC.
    pub(super) fn tick(&mut self) -> u64 {
        let now = rdtsc();
        if now >= self.last {
            let gap = now - self.last;
            self.max = self.max.max(gap);
            self.recent = self.recent.max(gap);
        } else {
            self.backwards += 1;
        }
        self.last = now;
        now
    }

    /// Print `line` and a newline one byte at a time, reading the TSC between bytes (printing is
    /// slow on an emulated UART; it must not look like a stall, nor hide one).
    pub(super) fn print(&mut self, line: &str) {
        for c in line.chars().chain(core::iter::once('\n')) {
            crate::print!("{c}");
            self.tick();
        }
    }
}

/// Ticks to microseconds.
pub(super) fn us(ticks: u64, hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(hz)) as u64
}

/// The workload's state (on the stack, i.e. in guest RAM).
struct Work {
    table: u64,
    pages_base: u64,
    pages: u64,
    stride: u64,
    /// Generation being written by the current pass.
    gen: u64,
    /// Position in the current pass (pages of this pass already rewritten).
    pos: u64,
    written: u64,
    sweeps: u64,
}

impl Work {
    fn page_addr(&self, p: u64) -> u64 {
        self.pages_base + p * PAGE
    }

    /// Check page `p` against the table, rewrite it with the current generation.
    fn step(&mut self) {
        let p = (self.pos * self.stride) % self.pages;
        let expect = rd(self.table + p * 8);
        if expect != self.gen - 1 {
            crate::println!(
                "dirty: FAIL table entry of page {p} says gen {expect}, expected gen {}",
                self.gen - 1
            );
            panic!("dirty: generation table changed under the guest");
        }
        let addr = self.page_addr(p);
        if let Err(bad) = check_page(addr, p, expect) {
            page_fail(p, expect, bad, "before rewrite");
        }
        write_page(addr, p, self.gen);
        wr(self.table + p * 8, self.gen);
        self.written += 1;
        self.pos += 1;
        if self.pos == self.pages {
            self.pos = 0;
            self.gen += 1;
        }
    }

    /// Verify every page against the table (which must say `gen` for exactly the `pos` pages
    /// already rewritten in this pass and `gen - 1` for the others).
    fn sweep(&mut self, stall: &mut Stall) {
        let mut newer = 0;
        for p in 0..self.pages {
            let g = rd(self.table + p * 8);
            if g == self.gen {
                newer += 1;
            } else if g != self.gen - 1 {
                crate::println!(
                    "dirty: FAIL table entry of page {p} says gen {g}, expected gen {} or {}",
                    self.gen - 1,
                    self.gen
                );
                panic!("dirty: generation table changed under the guest");
            }
            if let Err(bad) = check_page(self.page_addr(p), p, g) {
                page_fail(p, g, bad, "sweep");
            }
            stall.tick();
        }
        if newer != self.pos {
            crate::println!(
                "dirty: FAIL table holds {newer} pages at gen {}, expected {}",
                self.gen,
                self.pos
            );
            panic!("dirty: generation table changed under the guest");
        }
        self.sweeps += 1;
        stall.print(&format!(
            "dirty: verified {} pages ok sweep {} gen {}",
            self.pages, self.sweeps, self.gen
        ));
    }
}

/// Check the parameters and the memory, then run the workload.
pub fn run(boot: &BootInfo) {
    crate::arch::interrupts::disable();
    let mib = param_u64(boot, "dirty.mib", 64);
    let rate = param_u64(boot, "dirty.rate", 0);
    let report_ms = param_u64(boot, "dirty.report_ms", 500).max(1);
    let verify_every = param_u64(boot, "dirty.verify_every", 10);
    let seconds = param_u64(boot, "dirty.seconds", 0);
    let base = param_u64(boot, "dirty.base", DEFAULT_BASE);
    if mib == 0 {
        fail("dirty.mib=0: the working set must not be empty");
    }
    if !base.is_multiple_of(PAGE) {
        fail(format!("dirty.base={base:#x} is not page aligned"));
    }
    let pages = mib * 256;
    let table_bytes = (pages * 8).next_multiple_of(PAGE);
    let pages_base = base + table_bytes;
    let end = pages_base + pages * PAGE;
    // Linker symbols: only their addresses are taken.
    let (img_start, img_end) = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    if base < img_end && end > img_start {
        fail(format!(
            "dirty: [{base:#x}, {end:#x}) overlaps the image [{img_start:#x}, {img_end:#x})"
        ));
    }
    let in_ram = boot
        .memory_map
        .iter()
        .any(|e| e.kind == MemoryKind::Ram && e.addr <= base && e.addr + e.size >= end);
    if !in_ram || end > 1 << 32 {
        fail(format!(
            "dirty: [{base:#x}, {end:#x}) ({mib} MiB + table) is not RAM below 4 GiB"
        ));
    }

    let (hz, source) = match param_u64(boot, "dirty.tsc_hz", 0) {
        0 => match calibrate_tsc_pit(50, 3) {
            Some(hz) => (hz, "pit"),
            None => (ASSUMED_MAX_TSC_HZ, "assumed"),
        },
        hz => (hz, "param"),
    };
    crate::println!("dirty: tsc_hz {hz} source {source}");

    let mut stride = (pages * 5 / 13) | 1;
    while gcd(stride, pages) != 1 {
        stride += 2;
    }
    crate::println!(
        "dirty: start mib {mib} pages {pages} table {base:#x} pages_at {pages_base:#x} end {end:#x} stride {stride} rate {rate} report_ms {report_ms} verify_every {verify_every} seconds {seconds}"
    );

    let t_init = rdtsc();
    for p in 0..pages {
        write_page(pages_base + p * PAGE, p, 0);
        wr(base + p * 8, 0);
    }
    let init_ms = us(rdtsc().wrapping_sub(t_init), hz) / 1000;
    crate::println!("dirty: initialized {pages} pages in {init_ms} ms");

    let mut w = Work {
        table: base,
        pages_base,
        pages,
        stride,
        gen: 1,
        pos: 0,
        written: 0,
        sweeps: 0,
    };
    let report_ticks = (u128::from(hz) * u128::from(report_ms) / 1000).max(1) as u64;
    let page_ticks = hz.checked_div(rate).map_or(0, |t| t.max(1));
    // At most 100 ms of pacing backlog: after a stall the guest catches up only that much.
    let backlog = hz / 10;

    let mut stall = Stall::new();
    let start = stall.last;
    let stop = (seconds != 0).then(|| start.wrapping_add(seconds.saturating_mul(hz)));
    let mut next_report = start.wrapping_add(report_ticks);
    let mut due = start;
    let mut reports = 0u64;
    let mut last_report_tsc = start;
    let mut last_report_written = 0u64;
    stall.print("dirty: running");
    loop {
        let now = stall.tick();
        if stop.is_some_and(|s| now.wrapping_sub(s) as i64 >= 0) {
            break;
        }
        if now.wrapping_sub(next_report) as i64 >= 0 {
            reports += 1;
            let span = now.wrapping_sub(last_report_tsc).max(1);
            let done = w.written - last_report_written;
            let per_s = (u128::from(done) * u128::from(hz) / u128::from(span)) as u64;
            let line = format!(
                "dirty: gen {} pages_written {} rate {per_s}/s max_stall_us {} max_stall_ticks {} recent_stall_us {} report {reports} tsc_backwards {}",
                w.gen,
                w.written,
                us(stall.max, hz),
                stall.max,
                us(stall.recent, hz),
                stall.backwards,
            );
            stall.recent = 0;
            stall.print(&line);
            if verify_every != 0 && reports.is_multiple_of(verify_every) {
                w.sweep(&mut stall);
            }
            last_report_tsc = stall.last;
            last_report_written = w.written;
            next_report = next_report.wrapping_add(report_ticks);
            // Behind by more than one interval (a long stall or sweep): restart the schedule.
            if stall.last.wrapping_sub(next_report) as i64 >= 0 {
                next_report = stall.last.wrapping_add(report_ticks);
            }
            continue;
        }
        if page_ticks != 0 {
            if (now.wrapping_sub(due) as i64) < 0 {
                core::hint::spin_loop();
                continue;
            }
            if now.wrapping_sub(due) > backlog {
                due = now - backlog;
            }
            due = due.wrapping_add(page_ticks);
        }
        w.step();
    }
    let summary = format!(
        "dirty: end gen {} pages_written {} max_stall_us {} max_stall_ticks {} reports {reports} tsc_backwards {}",
        w.gen,
        w.written,
        us(stall.max, hz),
        stall.max,
        stall.backwards
    );
    stall.print(&summary);
    w.sweep(&mut stall);
    crate::println!("dirty: done");
    crate::println!("result: PASS");
}
