//! `vfio-migrate`: skiff-testdev streams under live migration. One or two test devices run their
//! STREAM mode (`CMD_STREAM_START`): every period a device writes its next sequence number (u64)
//! into slot `seq % E` of a ring in guest RAM and, with a peer, into slot `seq % PEER_SLOTS` of the
//! first half of the other device's BAR 2 (peer-to-peer). The host migrates the VM meanwhile (the
//! guest does not know when); a write lost or left stale by the migration shows up as a slot that
//! does not hold the newest sequence number due there.
//!
//! 1. Setup like `vfio` (BARs, bus mastering; with `vfio_migrate.iommu=1` the devices sit behind
//!    the virtio-iommu and the ring and peer addresses are IOVAs mapped here). The rings are filled
//!    with [`UNTOUCHED`], each device's BAR 2 first half with zeros, then the streams start and
//!    `vfio-migrate: streaming devices=N` is printed (the host waits for it before migrating).
//! 2. For `vfio_migrate.seconds` (TSC, calibrated against the PIT like `dirty`): every second a
//!    progress line and a live check that tolerates the concurrent writer: a slot `k` of an area
//!    of `n` slots must hold the newest `v ≡ k (mod n)` below the writer's sequence number read
//!    before the scan (`s0`), or any `v ≡ k` in `[s0, s1]` (`s1` read after the scan, inclusive:
//!    the step in flight has written but not counted yet). A slot that fails is read once more
//!    at once (a torn 8-byte read of a write in progress is not a loss). Rings are checked
//!    whole, peer areas `vfio_migrate.live_slots` slots at a time (rotating).
//! 3. `CMD_STREAM_STOP`, wait until `STATUS_STREAMING` clears, read `S = REG_STREAM_SEQ` (the next
//!    sequence number not written), then the exact check: every slot holds the newest `v < S`
//!    due there, or its initial value if none is. Then the violation counters, the longest stall
//!    of the main loop, `vfio-migrate: ok seq dev0=S0 [dev1=S1]` and `result: PASS`, or
//!    `result: FAIL` (a panic, like every failing scenario).
//!
//! Parameters: `vfio_migrate.devices=N` (1 or 2, default 2; exactly that many test devices),
//! `vfio_migrate.iommu=1`, `vfio_migrate.peer=0` (no P2P), `vfio_migrate.ring=E` (entries, a
//! power of two up to 65536, default 512), `vfio_migrate.period_us` (default 200),
//! `vfio_migrate.seconds` (default 20), `vfio_migrate.live_slots` (default [`LIVE_SLOTS`]),
//! `vfio_migrate.tsc_hz` (instead of measuring it), `vfio_migrate.violations_ok=1` (violation
//! counters that went up do not fail the run), `vfio_migrate.mmio_flag=0` (as
//! `vfio.mmio_flag`), `vfio_migrate.remap_pages=N` and `vfio_migrate.remap_ms` (with
//! `vfio_migrate.iommu=1`: DMA writes through a window remapped to a fresh page each time, see
//! [`super::remap`]). See the README for the output lines.

use super::super::dirty::{us, Stall};
use super::remap::Remap;
use super::*;
use crate::arch::time::{calibrate_tsc_pit, rdtsc, ASSUMED_MAX_TSC_HZ};

/// Peer slots a stream writes: `peer + 8 * (seq % PEER_SLOTS)`, the first half of BAR 2.
const PEER_SLOTS: u64 = regs::DEVICE_MEMORY_SIZE / 16;
/// Initial value of every ring slot (never a sequence number).
const UNTOUCHED: u64 = u64::MAX;
/// Mismatch lines printed per area and check; the rest are only counted.
const MAX_FAIL_LINES: u64 = 4;
/// Peer slots a live check covers per peer area by default (a quarter: the whole area every
/// four checks; a full check of both areas would take most of a second here).
const LIVE_SLOTS: u64 = PEER_SLOTS / 4;
/// Slots checked between two TSC reads (the stall measure's resolution during checks).
const BLOCK: u64 = 64;
/// Wait for a stream command to complete (at an assumed 5 GHz TSC, so at least this).
const CMD_TIMEOUT_MS: u64 = 10_000;
/// The violation counters: register and name in the output line.
const VIOLATIONS: [(u64, &str); 5] = [
    (regs::REG_VIOLATIONS, "total"),
    (regs::REG_VIOL_DMA_STATE, "dma"),
    (regs::REG_VIOL_MMIO_STATE, "mmio"),
    (regs::REG_VIOL_LATE_PEER_WRITE, "late_peer"),
    (regs::REG_VIOL_P2P_STATE, "p2p"),
];

/// Print `vfio-migrate: FAIL <why>` and fail the run (setup problems only: data mismatches are
/// counted and reported at the end).
fn die(why: impl core::fmt::Display) -> ! {
    println!("vfio-migrate: FAIL {}", why);
    fail(format!("vfio-migrate: {why}"))
}

/// Parameters of the scenario.
struct Prm {
    devices: usize,
    iommu: bool,
    peer: bool,
    entries: u64,
    period_us: u32,
    seconds: u64,
    live_slots: u64,
    tsc_hz: u64,
    violations_ok: bool,
    mmio_flag: bool,
    remap_pages: u64,
    remap_ms: u64,
}

fn params(boot: &BootInfo) -> Prm {
    let p = |k: &str, d: u64| param_u64(boot, k, d);
    let prm = Prm {
        devices: p("vfio_migrate.devices", 2) as usize,
        iommu: p("vfio_migrate.iommu", 0) != 0,
        peer: p("vfio_migrate.peer", 1) != 0,
        entries: p("vfio_migrate.ring", 512),
        period_us: p("vfio_migrate.period_us", 200).min(u64::from(u32::MAX)) as u32,
        seconds: p("vfio_migrate.seconds", 20),
        live_slots: p("vfio_migrate.live_slots", LIVE_SLOTS).min(PEER_SLOTS),
        tsc_hz: p("vfio_migrate.tsc_hz", 0),
        violations_ok: p("vfio_migrate.violations_ok", 0) != 0,
        mmio_flag: p("vfio_migrate.mmio_flag", 1) != 0,
        remap_pages: p("vfio_migrate.remap_pages", 0),
        remap_ms: p("vfio_migrate.remap_ms", 20),
    };
    if prm.remap_pages != 0 && !prm.iommu {
        die("vfio_migrate.remap_pages needs vfio_migrate.iommu=1");
    }
    if prm.remap_pages > 1 << 20 {
        die(format_args!(
            "vfio_migrate.remap_pages={}: at most {}",
            prm.remap_pages,
            1 << 20
        ));
    }
    if !(1..=2).contains(&prm.devices) {
        die(format_args!(
            "vfio_migrate.devices={}: must be 1 or 2",
            prm.devices
        ));
    }
    if !prm.entries.is_power_of_two() || prm.entries > 65536 {
        die(format_args!(
            "vfio_migrate.ring={}: must be a power of two up to 65536",
            prm.entries
        ));
    }
    prm
}

/// One device's stream: where it writes, and its sequence number widened to 64 bits.
struct Stream {
    /// Guest-physical address of its ring.
    ring: u64,
    /// The ring's DMA address (IOVA behind the IOMMU).
    ring_dma: u64,
    /// The device whose BAR 2 it writes, and the DMA address of that BAR.
    peer: Option<(usize, u64)>,
    /// Sequence numbers written so far (`REG_STREAM_SEQ` widened).
    seq: u64,
    /// `REG_STREAM_SEQ` as last read.
    raw: u32,
    /// Violation counters before the stream started.
    viol0: [u32; 5],
}

impl Stream {
    /// Read `REG_STREAM_SEQ` and widen it; Err when it went backwards (the old value is kept).
    fn read_seq(&mut self, d: &Dev) -> Result<u64, String> {
        let raw = d.rd(regs::REG_STREAM_SEQ);
        let step = raw.wrapping_sub(self.raw);
        if step > 1 << 31 {
            return Err(format!(
                "REG_STREAM_SEQ went backwards from {} to {raw} (widened {})",
                self.raw, self.seq
            ));
        }
        self.raw = raw;
        self.seq += u64::from(step);
        Ok(self.seq)
    }
}

/// What the slots of a run hold: slot `k` holds `k + off`, or all hold the same value.
#[derive(Clone, Copy)]
enum Due {
    Plus(u64),
    Same(u64),
}

/// The first slot in `[from, to)` of the u64 slots at `base` that does not hold what `due`
/// says, or `to`. Loops as tight as possible: KVM's emulator runs the guest here instruction by
/// instruction (and a `repe scasq` as one).
fn first_bad(base: u64, from: u64, to: u64, due: Due) -> u64 {
    match due {
        Due::Same(v) => from + dma::scan(base + 8 * from, to - from, v),
        Due::Plus(off) => {
            let mut k = from;
            while k < to && dma::read::<u64>(base + 8 * k) == k.wrapping_add(off) {
                k += 1;
            }
            k
        }
    }
}

/// A slot's value in a live check (see [`Area::live`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Live {
    Ok,
    Newer,
    Bad,
}

/// Slots a stream writes: `n` u64 at guest-physical `base` (a ring, or a peer's BAR 2), held
/// by device `dev`, written by device `writer`.
#[derive(Clone, Copy)]
struct Area {
    what: &'static str,
    dev: usize,
    writer: usize,
    base: u64,
    n: u64,
    /// Value of a slot nothing was written to.
    untouched: u64,
}

impl Area {
    fn slot(&self, k: u64) -> u64 {
        dma::read::<u64>(self.base + 8 * k)
    }

    /// What slot `k` holds once sequence numbers `0..s` are written: the largest `v < s` with
    /// `v ≡ k (mod n)`, or the initial value.
    fn want(&self, k: u64, s: u64) -> u64 {
        if k >= s {
            self.untouched
        } else {
            k + (s - 1 - k) / self.n * self.n
        }
    }

    /// The two runs of slots `[0, r)` and `[r, n)` (`r = s % n`) with what they hold once
    /// `0..s` are written: within a run slot `k` holds `k + off`, or the initial value.
    fn runs(&self, s: u64) -> [(u64, u64, Due); 2] {
        let (laps, r) = (s / self.n, s % self.n);
        let rest = match laps {
            0 => Due::Same(self.untouched),
            l => Due::Plus((l - 1) * self.n),
        };
        [(0, r, Due::Plus(laps * self.n)), (r, self.n, rest)]
    }

    /// Check the slots in `[from, to)` against what `0..s` leave there, in blocks of
    /// [`BLOCK`] (reading the TSC between blocks); `bad(k, got)` for every slot that differs.
    fn check_range(
        &self,
        from: u64,
        to: u64,
        s: u64,
        stall: &mut Stall,
        mut bad: impl FnMut(u64, u64),
    ) {
        for (lo, hi, due) in self.runs(s) {
            let mut k = lo.max(from);
            let hi = hi.min(to);
            while k < hi {
                let end = hi.min(k + BLOCK);
                let at = first_bad(self.base, k, end, due);
                stall.tick();
                if at < end {
                    bad(at, self.slot(at));
                    k = at + 1;
                } else {
                    k = end;
                }
            }
        }
    }

    /// How `got` in slot `k` compares with a writer that had written `0..s0` before the scan:
    /// the newest value due ([`Live::Ok`]), a value due there at `s0` or later
    /// ([`Live::Newer`]: right if the writer's count read after the scan is at least that value:
    /// the step in flight writes before it counts), or neither.
    fn live(&self, k: u64, got: u64, s0: u64) -> Live {
        if got == self.want(k, s0) {
            Live::Ok
        } else if got != self.untouched && got % self.n == k && got >= s0 {
            Live::Newer
        } else {
            Live::Bad
        }
    }

    fn name(&self) -> String {
        if self.dev == self.writer {
            format!("{} dev={}", self.what, self.dev)
        } else {
            format!("{} dev={} from={}", self.what, self.dev, self.writer)
        }
    }
}

/// A slot value for the output (`untouched` for [`UNTOUCHED`]).
fn val(v: u64) -> String {
    if v == UNTOUCHED {
        String::from("untouched")
    } else {
        format!("{v}")
    }
}

/// Mismatches of one check of one area: the first few are printed, all are counted.
struct Tally {
    /// `live ` or empty.
    tag: &'static str,
    /// [`Area::name`].
    name: String,
    count: u64,
}

impl Tally {
    fn new(tag: &'static str, area: &Area) -> Tally {
        Tally {
            tag,
            name: area.name(),
            count: 0,
        }
    }

    fn add(&mut self, k: u64, got: u64, want: impl core::fmt::Display, extra: &str) {
        if self.count < MAX_FAIL_LINES {
            println!(
                "vfio-migrate: FAIL {}{} slot={} got={} want={}{}",
                self.tag,
                self.name,
                k,
                val(got),
                want,
                extra
            );
        }
        self.count += 1;
    }

    /// Print the count line when anything mismatched; returns the count.
    fn close(self) -> u64 {
        if self.count != 0 {
            println!(
                "vfio-migrate: FAIL {}{} mismatches={}",
                self.tag, self.name, self.count
            );
        }
        self.count
    }
}

/// Find, open and (with `iommu`) attach the test devices.
fn setup_devices(boot: &BootInfo, prm: &Prm) -> (Vec<Dev>, Option<IommuCtx>) {
    let found = find_devices(boot, "vfio-migrate");
    if found.len() != prm.devices {
        die(format_args!(
            "found {} test device(s), vfio_migrate.devices={}",
            found.len(),
            prm.devices
        ));
    }
    if !prm.iommu {
        refuse_translated(boot, &found, "vfio_migrate.iommu=1");
    }
    let (mut p, endpoints, io) = if prm.iommu {
        let s = iommu_scenario::bring_up(boot);
        (s.p, s.endpoints, Some(s.iommu))
    } else {
        (Platform::discover(boot), Vec::new(), None)
    };
    let mut devs: Vec<Dev> = found
        .iter()
        .map(|f| open(&mut p, *f, &endpoints, prm.iommu, mem_size(boot)))
        .collect();
    let ctx = io.map(|io| attach_all(io, &mut devs, prm.mmio_flag));
    (devs, ctx)
}

/// Run a command polled: Err with the details when it fails or does not complete.
pub(super) fn command(d: &Dev, code: u32) -> Result<(), String> {
    let (c0, f0) = (d.rd(regs::REG_COMPLETED), d.rd(regs::REG_FAILED));
    d.wr(regs::REG_DOORBELL, code);
    let deadline = time::Deadline::after_ms(CMD_TIMEOUT_MS);
    loop {
        let (c, f) = (d.rd(regs::REG_COMPLETED), d.rd(regs::REG_FAILED));
        if f != f0 {
            let e = d.rd(regs::REG_LAST_ERROR);
            return Err(format!(
                "command {code} failed: REG_LAST_ERROR {e} ({})",
                err_name(e)
            ));
        }
        if c != c0 {
            return Ok(());
        }
        if deadline.expired() {
            return Err(format!(
                "command {code} did not complete (status {:#x})",
                d.rd(regs::REG_STATUS)
            ));
        }
        time::delay_us(50);
    }
}

/// Allocate and map the rings, zero the BAR 2 halves, program and start every stream.
fn start_streams(devs: &[Dev], ctx: &mut Option<IommuCtx>, prm: &Prm) -> Vec<Stream> {
    let rw = MAP_F_READ | MAP_F_WRITE;
    let bytes = (prm.entries * 8) as usize;
    let mut streams = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let ring = dma::alloc(bytes, 4096);
        dma::fill_u64(ring, prm.entries, UNTOUCHED);
        dma::fill_u64(d.mem, PEER_SLOTS, 0);
        let ring_dma = dma_addr(d, ctx, ring, bytes, rw)
            .unwrap_or_else(|e| die(format_args!("map ring of dev={i}: {e}")));
        let peer = (prm.peer && devs.len() == 2).then(|| {
            let j = 1 - i;
            let a = peer_addr(d, &devs[j], ctx, 0, (PEER_SLOTS * 8) as u32)
                .unwrap_or_else(|e| die(format_args!("map dev={j} bar2 for dev={i}: {e}")));
            (j, a)
        });
        let viol0 = VIOLATIONS.map(|(r, _)| d.rd(r));
        streams.push(Stream {
            ring,
            ring_dma,
            peer,
            seq: 0,
            raw: 0,
            viol0,
        });
    }
    for (i, (d, s)) in devs.iter().zip(&streams).enumerate() {
        let (peer_dev, peer_dma) = s.peer.unwrap_or((i, 0));
        println!(
            "vfio-migrate: dev={} {} ring gpa {:#x} dma {:#x} entries {} peer {} {:#x} period_us {}",
            i,
            d.name,
            s.ring,
            s.ring_dma,
            prm.entries,
            if s.peer.is_some() { peer_dev as i64 } else { -1 },
            peer_dma,
            prm.period_us
        );
        d.wr(regs::REG_STREAM_RING_LO, s.ring_dma as u32);
        d.wr(regs::REG_STREAM_RING_HI, (s.ring_dma >> 32) as u32);
        d.wr(regs::REG_STREAM_RING_ENTRIES, prm.entries as u32);
        d.wr(regs::REG_STREAM_PEER_LO, peer_dma as u32);
        d.wr(regs::REG_STREAM_PEER_HI, (peer_dma >> 32) as u32);
        d.wr(regs::REG_STREAM_PERIOD_US, prm.period_us);
    }
    for (i, d) in devs.iter().enumerate() {
        command(d, regs::CMD_STREAM_START)
            .unwrap_or_else(|e| die(format_args!("stream start dev={i}: {e}")));
    }
    streams
}

/// The areas the streams write: each ring, and each peer's BAR 2 first half.
fn areas(devs: &[Dev], streams: &[Stream], entries: u64) -> Vec<Area> {
    let mut v = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        v.push(Area {
            what: "ring",
            dev: i,
            writer: i,
            base: s.ring,
            n: entries,
            untouched: UNTOUCHED,
        });
        if let Some((j, _)) = s.peer {
            v.push(Area {
                what: "peer",
                dev: j,
                writer: i,
                base: devs[j].mem,
                n: PEER_SLOTS,
                untouched: 0,
            });
        }
    }
    v
}

/// Read every stream's sequence number (a trapped register read each: the TSC is read after
/// each, so the round trips do not add up to one gap); a backwards step is a failure.
fn read_seqs(run: &mut Run) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, (d, s)) in run.devs.iter().zip(run.streams.iter_mut()).enumerate() {
        let seq = s.read_seq(d).unwrap_or_else(|e| {
            println!("vfio-migrate: FAIL seq dev={} {}", i, e);
            run.fails += 1;
            s.seq
        });
        run.stall.tick();
        v.push(seq);
    }
    v
}

/// The state of the run loop.
struct Run<'a> {
    devs: &'a [Dev],
    streams: Vec<Stream>,
    areas: Vec<Area>,
    stall: Stall,
    /// Where the next live check of each area starts (peer areas are checked in chunks).
    cursor: Vec<u64>,
    live_slots: u64,
    /// Mismatches and other failures found so far.
    fails: u64,
    /// The virtio-iommu (`vfio_migrate.iommu=1`).
    ctx: Option<IommuCtx>,
    /// The remapping writers (`vfio_migrate.remap_pages`), and whether one failed.
    remap: Option<Remap>,
    remap_failed: bool,
}

impl Run<'_> {
    /// A remapping round when one is due (a failure stops them).
    fn remap_tick(&mut self, now: u64) {
        let (Some(r), Some(c)) = (self.remap.as_mut(), self.ctx.as_mut()) else {
            return;
        };
        if self.remap_failed {
            return;
        }
        if let Err(e) = r.tick(self.devs, c, now) {
            println!("vfio-migrate: FAIL remap {}", e);
            self.fails += 1;
            self.remap_failed = true;
        }
    }

    /// Scan `count` slots of area `a` from `from` (wrapping) against the writer's `s0`: bad
    /// slots go to `t` (each re-read once first: a torn read of a write in progress is not a
    /// loss). Returns the largest newer value seen (and its slot), to be checked against the
    /// writer's count read after the scan (nothing is allocated per slot: the guest's heap
    /// never frees).
    fn scan(
        &mut self,
        a: usize,
        from: u64,
        count: u64,
        s0: u64,
        t: &mut Tally,
    ) -> Option<(u64, u64)> {
        let area = self.areas[a];
        let mut newest: Option<(u64, u64)> = None;
        let first = (from, (from + count).min(area.n));
        let wrapped = (0, (from + count).saturating_sub(area.n).min(from));
        for (lo, hi) in [first, wrapped] {
            area.check_range(lo, hi, s0, &mut self.stall, |k, got| {
                let mut class = area.live(k, got, s0);
                let mut now = got;
                if class == Live::Bad {
                    now = area.slot(k);
                    class = area.live(k, now, s0);
                }
                match class {
                    Live::Ok => {}
                    Live::Newer => {
                        if newest.is_none_or(|(_, v)| now > v) {
                            newest = Some((k, now));
                        }
                    }
                    Live::Bad => {
                        let extra = format!(" seq>={s0} first_read={}", val(got));
                        t.add(k, now, val(area.want(k, s0)), &extra);
                    }
                }
            });
        }
        newest
    }

    /// One live check of every area (peer areas: the next `live_slots` slots); returns the
    /// microseconds it took.
    fn live_check(&mut self, hz: u64) -> u64 {
        let t0 = rdtsc();
        let s0 = read_seqs(self);
        let mut pending = Vec::new();
        for a in 0..self.areas.len() {
            let area = self.areas[a];
            let count = if area.what == "peer" {
                self.live_slots
            } else {
                area.n
            };
            let from = self.cursor[a];
            self.cursor[a] = (from + count) % area.n;
            let mut t = Tally::new("live ", &area);
            let newest = self.scan(a, from, count, s0[area.writer], &mut t);
            pending.push((t, newest, area.writer));
        }
        // Whatever the scans saw was written before these reads.
        let s1 = read_seqs(self);
        for (mut t, newest, w) in pending {
            if let Some((k, got)) = newest.filter(|&(_, v)| v > s1[w]) {
                let extra = format!(" seq={}..{}", s0[w], s1[w]);
                t.add(k, got, format_args!("<={}", s1[w]), &extra);
            }
            self.fails += t.close();
        }
        us(rdtsc().wrapping_sub(t0), hz)
    }

    /// Every stream must still be running; a stopped one is a failure.
    fn check_streaming(&mut self) {
        for (i, d) in self.devs.iter().enumerate() {
            let st = d.rd(regs::REG_STATUS);
            self.stall.tick();
            if st & regs::STATUS_STREAMING == 0 {
                let e = d.rd(regs::REG_LAST_ERROR);
                println!(
                    "vfio-migrate: FAIL stream dev={} stopped: status {:#x}, REG_FAILED {}, REG_LAST_ERROR {} ({})",
                    i,
                    st,
                    d.rd(regs::REG_FAILED),
                    e,
                    err_name(e)
                );
                self.fails += 1;
            }
        }
    }

    /// Run for `seconds`: a progress line and a live check about every second.
    fn run_for(&mut self, seconds: u64, hz: u64) {
        let start = self.stall.tick();
        let stop = start.wrapping_add(seconds.saturating_mul(hz));
        let mut next = start.wrapping_add(hz);
        loop {
            let now = self.stall.tick();
            if now.wrapping_sub(stop) as i64 >= 0 {
                break;
            }
            if (now.wrapping_sub(next) as i64) < 0 {
                self.remap_tick(now);
                core::hint::spin_loop();
                continue;
            }
            self.check_streaming();
            let check_us = self.live_check(hz);
            let mut line = format!("vfio-migrate: t={} seq", now.wrapping_sub(start) / hz);
            for (i, s) in self.streams.iter().enumerate() {
                line.push_str(&format!(" {i}={}", s.seq));
            }
            if let Some(r) = &self.remap {
                line.push_str(&format!(" remap={}", r.done()));
            }
            line.push_str(&format!(
                " check_us={check_us} max_stall_us={} recent_stall_us={} tsc_backwards={} fails={}",
                us(self.stall.max, hz),
                us(self.stall.recent, hz),
                self.stall.backwards,
                self.fails
            ));
            self.stall.recent = 0;
            self.stall.print(&line);
            next = next.wrapping_add(hz);
            // Behind by more than a second (a stall, a slow check): restart the schedule.
            if self.stall.last.wrapping_sub(next) as i64 >= 0 {
                next = self.stall.last.wrapping_add(hz);
            }
        }
    }
}

/// Stop every stream and wait until it is stopped; the sequence numbers written (`S`).
fn stop_streams(run: &mut Run) -> Vec<u64> {
    for (i, d) in run.devs.iter().enumerate() {
        if let Err(e) = command(d, regs::CMD_STREAM_STOP) {
            println!("vfio-migrate: FAIL stream stop dev={} {}", i, e);
            run.fails += 1;
        }
        let deadline = time::Deadline::after_ms(CMD_TIMEOUT_MS);
        while d.rd(regs::REG_STATUS) & regs::STATUS_STREAMING != 0 {
            if deadline.expired() {
                println!(
                    "vfio-migrate: FAIL stream dev={} still streaming after STOP",
                    i
                );
                run.fails += 1;
                break;
            }
            time::delay_us(100);
        }
    }
    read_seqs(run)
}

/// The exact check after the streams stopped: every slot of every area holds what `S` says.
fn final_check(run: &mut Run, s: &[u64]) {
    for area in run.areas.clone() {
        let mut t = Tally::new("", &area);
        let sw = s[area.writer];
        area.check_range(0, area.n, sw, &mut run.stall, |k, got| {
            t.add(k, got, val(area.want(k, sw)), "");
        });
        run.fails += t.close();
    }
    for (i, &si) in s.iter().enumerate() {
        if si == 0 {
            println!("vfio-migrate: FAIL stream dev={} wrote nothing (seq 0)", i);
            run.fails += 1;
        }
    }
}

/// Print every device's violation counters; true when one of them went up during the run.
fn violations(run: &Run) -> bool {
    let mut grew = false;
    for (i, (d, s)) in run.devs.iter().zip(&run.streams).enumerate() {
        let now = VIOLATIONS.map(|(r, _)| d.rd(r));
        let mut line = format!("vfio-migrate: violations dev={i}");
        for ((_, name), v) in VIOLATIONS.iter().zip(now) {
            line.push_str(&format!(" {name}={v}"));
        }
        println!("{}", line);
        grew |= now.iter().zip(s.viol0).any(|(&n, o)| n != o);
    }
    grew
}

/// Run the scenario.
pub fn run(boot: &BootInfo) {
    let prm = params(boot);
    let (devs, mut ctx) = setup_devices(boot, &prm);
    let (hz, source) = match prm.tsc_hz {
        0 => match calibrate_tsc_pit(50, 3) {
            Some(hz) => (hz, "pit"),
            None => (ASSUMED_MAX_TSC_HZ, "assumed"),
        },
        hz => (hz, "param"),
    };
    println!("vfio-migrate: tsc_hz {} source {}", hz, source);
    let streams = start_streams(&devs, &mut ctx, &prm);
    let areas = areas(&devs, &streams, prm.entries);
    let remap = match (prm.remap_pages, ctx.as_mut()) {
        (0, _) | (_, None) => None,
        (pages, Some(c)) => {
            let period = prm.remap_ms.saturating_mul(hz) / 1000;
            Some(Remap::new(&devs, c, pages, period, rdtsc()))
        }
    };
    let mut run = Run {
        devs: &devs,
        streams,
        cursor: alloc::vec![0; areas.len()],
        areas,
        stall: Stall::new(),
        live_slots: prm.live_slots,
        fails: 0,
        ctx,
        remap,
        remap_failed: false,
    };
    run.stall
        .print(&format!("vfio-migrate: streaming devices={}", devs.len()));
    run.run_for(prm.seconds, hz);
    let longest = us(run.stall.max, hz);
    let s = stop_streams(&mut run);
    let t0 = rdtsc();
    final_check(&mut run, &s);
    if let Some(r) = &run.remap {
        run.fails += r.check();
    }
    println!(
        "vfio-migrate: final check took {} us",
        us(rdtsc().wrapping_sub(t0), hz)
    );
    let grew = violations(&run);
    println!("vfio-migrate: longest stall {} us", longest);
    if run.fails != 0 {
        fail(format!(
            "vfio-migrate: {} failure(s), see the FAIL lines",
            run.fails
        ));
    }
    let seqs: Vec<String> = s
        .iter()
        .enumerate()
        .map(|(i, v)| format!("dev{i}={v}"))
        .collect();
    println!("vfio-migrate: ok seq {}", seqs.join(" "));
    if grew && !prm.violations_ok {
        fail("vfio-migrate: violation counters went up (vfio_migrate.violations_ok=0)");
    }
    println!("result: PASS");
}
