//! `vfio-bench`: the passthrough benchmark's guest side (run by `vmm/benches/passthrough.rs`).
//! Measures, with `rdtsc`, and prints figures only (it fails only when the hardware misbehaves:
//! a missing device, a failed command, a lost interrupt):
//!
//! 1. cost of one access, in batches: a guest RAM read (the floor), a read of the testdev's
//!    mapped device memory (BAR 2, no exit), a read of a virtio common-config register (emulated
//!    by skiff in-process), a virtio queue-notify write (an ioeventfd kick), and a read and a
//!    write of a testdev BAR 0 register (trapped: skiff → vfio-user server → reply);
//! 2. streams of commands, up to `vb.window` queued: device A's P2P_WRITE into device B's BAR 2
//!    (every command is a DMA_WRITE request skiff serves by a REGION_WRITE to B) and A's
//!    WRITE_PATTERN into guest RAM (direct, through the RAM memfd), 4 KiB and 64 KiB;
//! 3. interrupt latency: doorbell write → entry of the MSI-X handler, against polling
//!    `REG_COMPLETED` for the same 8-byte command;
//! 4. two `tsc-mark` lines, at the start and at the end (at least `vb.calib_ms` apart), so the
//!    host can measure the TSC rate against its wall clock (plus CPUID 0x15/0x16, when the host
//!    passes them).
//!
//! Output lines are `vfio-bench: <what> key=value ...` (cycles are TSC ticks), then
//! `vfio-bench: done` and `result: PASS`.

use super::*;
use crate::virtio::rng::Rng;
use crate::virtio::types;

/// Parameters (`vb.*` on the command line).
struct Bench {
    /// Accesses per batch.
    n: u64,
    /// Batches per kind of access (after one warm-up batch).
    batches: u64,
    /// Commands per 4 KiB stream.
    cmds_4k: u64,
    /// Commands per 64 KiB stream.
    cmds_64k: u64,
    /// Interrupts (and polled completions) measured.
    irqs: u64,
    /// Commands in flight at most (the device queues 16).
    window: u64,
    /// Wait for a command or an interrupt.
    timeout_ms: u64,
    /// MSI-X vector.
    vector: u8,
    /// The second `tsc-mark` comes at least this long after the first (at an assumed 5 GHz
    /// TSC, so longer on a slower one): the host's TSC-rate measurement spans at least this.
    calib_ms: u64,
}

fn bench_params(boot: &BootInfo) -> Bench {
    let p = |k: &str, d: u64| param_u64(boot, k, d);
    let b = Bench {
        n: p("vb.n", 200).max(1),
        batches: p("vb.batches", 10).max(1),
        cmds_4k: p("vb.cmds_4k", 200),
        cmds_64k: p("vb.cmds_64k", 100),
        irqs: p("vb.irqs", 200),
        window: p("vb.window", 8),
        timeout_ms: p("vb.timeout_ms", 10_000),
        vector: param_vector(boot, "vb.vector", MSIX_VECTOR),
        calib_ms: p("vb.calib_ms", 1000),
    };
    if b.window == 0 || b.window > regs::QUEUE_DEPTH as u64 {
        fail(format!(
            "vb.window={}: must be 1..={}",
            b.window,
            regs::QUEUE_DEPTH
        ));
    }
    b
}

/// Median, mean, min and max of `v` (sorted in place).
fn summary(v: &mut [u64]) -> (u64, u64, u64, u64) {
    v.sort_unstable();
    let n = v.len().max(1) as u64;
    let mean = v.iter().sum::<u64>() / n;
    (v[v.len() / 2], mean, v[0], v[v.len() - 1])
}

/// Time `b.batches` batches of `b.n` calls of `f` (after one warm-up batch); print the cycles
/// per call.
fn access(b: &Bench, what: &str, mut f: impl FnMut()) {
    let mut per = Vec::new();
    for i in 0..=b.batches {
        let t0 = time::rdtsc();
        for _ in 0..b.n {
            f();
        }
        let dt = time::rdtsc().wrapping_sub(t0);
        if i > 0 {
            per.push(dt / b.n);
        }
    }
    let (median, mean, min, max) = summary(&mut per);
    println!(
        "vfio-bench: access kind={} n={} batches={} median={} mean={} min={} max={}",
        what, b.n, b.batches, median, mean, min, max
    );
}

/// `k` commands `code` at `addr`/`len` on `d`, at most `b.window` in flight; returns the
/// cycles from the first doorbell to the last completion.
fn stream(b: &Bench, d: &Dev, check: &str, code: u32, addr: u64, len: u32, k: u64) -> u64 {
    d.wr(regs::REG_ADDR_LO, addr as u32);
    d.wr(regs::REG_ADDR_HI, (addr >> 32) as u32);
    d.wr(regs::REG_LEN, len);
    d.wr(regs::REG_SEED, 0xB0B0_0000 | len);
    let (c0, f0) = (d.rd(regs::REG_COMPLETED), d.rd(regs::REG_FAILED));
    let deadline = time::Deadline::after_ms(b.timeout_ms.saturating_mul(k.max(1)));
    let t0 = time::rdtsc();
    let (mut issued, mut done) = (0u64, 0u64);
    while done < k {
        while issued < k && issued - done < b.window {
            d.wr(regs::REG_DOORBELL, code);
            issued += 1;
        }
        done = u64::from(d.rd(regs::REG_COMPLETED).wrapping_sub(c0));
        let failed = d.rd(regs::REG_FAILED).wrapping_sub(f0);
        if failed != 0 {
            let e = d.rd(regs::REG_LAST_ERROR);
            bad(
                check,
                Some(d),
                format!(
                    "{failed} of {issued} {} commands failed: REG_LAST_ERROR {e} ({})",
                    cmd_name(code),
                    err_name(e)
                ),
            );
        }
        if deadline.expired() {
            bad(
                check,
                Some(d),
                format!(
                    "{done} of {k} {} commands completed in time",
                    cmd_name(code)
                ),
            );
        }
    }
    time::rdtsc().wrapping_sub(t0)
}

#[allow(unused_unsafe)] // `__cpuid` is safe from Rust 1.87 on, unsafe before.
fn cpuid(leaf: u32) -> (u32, u32, u32) {
    // SAFETY: CPUID is always available in long mode; it only reads.
    let r = unsafe { core::arch::x86_64::__cpuid(leaf) };
    (r.eax, r.ebx, r.ecx)
}

fn tsc_mark(i: u32) -> u64 {
    let t = time::rdtsc();
    println!("vfio-bench: tsc-mark {} tsc={}", i, t);
    t
}

/// Run the scenario.
pub fn run(boot: &BootInfo) {
    let b = bench_params(boot);
    let mark0 = tsc_mark(0);
    let (max_leaf, _, _) = cpuid(0);
    let (d15, n15, hz15) = if max_leaf >= 0x15 {
        cpuid(0x15)
    } else {
        (0, 0, 0)
    };
    let mhz16 = if max_leaf >= 0x16 { cpuid(0x16).0 } else { 0 };
    println!(
        "vfio-bench: cpuid max_leaf={:#x} leaf15_denominator={} leaf15_numerator={} leaf15_crystal_hz={} leaf16_base_mhz={}",
        max_leaf, d15, n15, hz15, mhz16
    );

    let mut p = Platform::discover(boot);
    let cfg = p.cfg;
    let found: Vec<PciFunction> = p
        .functions
        .iter()
        .filter(|f| f.vendor == regs::VENDOR_ID && f.device == regs::DEVICE_ID)
        .copied()
        .collect();
    if found.is_empty() {
        bad("bench-devices", None, "no skiff-testdev found");
    }
    let devs: Vec<Dev> = found
        .iter()
        .map(|f| open(&mut p, *f, &[], false, mem_size(boot)))
        .collect();
    let a = &devs[0];
    let rng = p.virtio_devices(types::RNG).first().copied().map(|f| {
        let t = p.open(f).unwrap_or_else(|e| bad("bench-rng", None, e));
        Rng::init(t, None).unwrap_or_else(|e| bad("bench-rng", None, e))
    });
    println!(
        "vfio-bench: devices testdev={} a={} b={} virtio-rng={}",
        devs.len(),
        a.name,
        devs.get(1).map(|d| d.name.as_str()).unwrap_or("-"),
        rng.is_some() as u32
    );

    // 1. One access of each kind.
    let ram = dma::alloc(4096, 4096);
    access(&b, "ram-read", || {
        dma::read::<u32>(ram);
    });
    access(&b, "bar2-read", || {
        dma::read::<u32>(a.mem);
    });
    match &rng {
        Some(r) => {
            access(&b, "virtio-common-read", || {
                r.t.num_queues();
            });
            access(&b, "virtio-kick", || r.q.notify());
        }
        None => println!("vfio-bench: virtio rows skipped (no virtio-rng; run skiff with --rng)"),
    }
    access(&b, "testdev-reg-read", || {
        a.rd(regs::REG_MAGIC);
    });
    access(&b, "testdev-reg-write", || a.wr(regs::REG_SEED, 0x1234));
    let magic = a.rd(regs::REG_MAGIC);
    if magic != regs::MAGIC {
        bad(
            "bench-magic",
            Some(a),
            format!("REG_MAGIC reads {magic:#x}"),
        );
    }

    // 2. Command streams.
    let buf = dma::alloc(64 * 1024, 4096);
    for (len, k) in [(4096u32, b.cmds_4k), (65536, b.cmds_64k)] {
        if k == 0 {
            continue;
        }
        if let Some(peer) = devs.get(1) {
            let (pw0, w0) = (peer.rd(regs::REG_PEER_WRITES), a.rd(regs::REG_DMA_WRITTEN));
            let cycles = stream(&b, a, "bench-p2p", regs::CMD_P2P_WRITE, peer.mem, len, k);
            let (pw1, w1) = (peer.rd(regs::REG_PEER_WRITES), a.rd(regs::REG_DMA_WRITTEN));
            let seed = 0xB0B0_0000 | len;
            for i in [0, len / 2, len - 1] {
                let got = dma::read::<u8>(peer.mem + u64::from(i));
                if got != regs::pattern_byte(seed, i) {
                    bad(
                        "bench-p2p",
                        Some(peer),
                        format!("device memory byte {i} is {got:#04x} after the stream"),
                    );
                }
            }
            println!(
                "vfio-bench: dma kind=p2p len={} cmds={} cycles={} peer_writes={} dma_written={}",
                len,
                k,
                cycles,
                pw1.wrapping_sub(pw0),
                w1.wrapping_sub(w0)
            );
        }
        let w0 = a.rd(regs::REG_DMA_WRITTEN);
        let cycles = stream(&b, a, "bench-ram", regs::CMD_WRITE_PATTERN, buf, len, k);
        let w1 = a.rd(regs::REG_DMA_WRITTEN);
        let seed = 0xB0B0_0000 | len;
        for i in [0, len / 2, len - 1] {
            let got = dma::read::<u8>(buf + u64::from(i));
            if got != regs::pattern_byte(seed, i) {
                bad(
                    "bench-ram",
                    Some(a),
                    format!("guest byte {i} is {got:#04x} after the stream"),
                );
            }
        }
        println!(
            "vfio-bench: dma kind=ram len={} cmds={} cycles={} dma_written={}",
            len,
            k,
            cycles,
            w1.wrapping_sub(w0)
        );
    }
    if devs.len() < 2 {
        println!("vfio-bench: p2p rows skipped (one device; peer-to-peer needs two)");
    }

    // 3. Interrupt latency against polling.
    if b.irqs > 0 {
        irq_latency(&b, a, cfg);
    }

    let until = b.calib_ms.saturating_mul(time::ASSUMED_MAX_TSC_HZ / 1000);
    while time::rdtsc().wrapping_sub(mark0) < until {
        core::hint::spin_loop();
    }
    tsc_mark(1);
    let v = a.rd(regs::REG_VIOLATIONS);
    if v != 0 {
        bad("bench-violations", Some(a), format!("REG_VIOLATIONS {v}"));
    }
    println!("vfio-bench: done");
    println!("result: PASS");
}

/// Doorbell → MSI-X handler entry, and doorbell → `REG_COMPLETED` seen by polling, for an
/// 8-byte WRITE_PATTERN into guest RAM.
fn irq_latency(b: &Bench, d: &Dev, cfg: &'static dyn ConfigSpace) {
    let v = b.vector;
    let m = &d.msix;
    for e in 0..m.entries {
        m.set_masked(e, true);
    }
    m.program(0, v, lapic::id());
    m.set_enabled(cfg, true);
    m.set_masked(0, false);
    let small = dma::alloc(64, 64);
    d.wr(regs::REG_ADDR_LO, small as u32);
    d.wr(regs::REG_ADDR_HI, (small >> 32) as u32);
    d.wr(regs::REG_LEN, 8);
    d.wr(regs::REG_SEED, 0x1A7);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);
    interrupts::enable();
    let f0 = d.rd(regs::REG_FAILED);
    let warm = 5;
    let mut lat = Vec::new();
    for i in 0..b.irqs + warm {
        let before = interrupts::count(v);
        let t0 = time::rdtsc();
        d.wr(regs::REG_DOORBELL, regs::CMD_WRITE_PATTERN);
        if interrupts::wait_for(v, before, b.timeout_ms).is_none() {
            bad(
                "bench-msix",
                Some(d),
                format!(
                    "no interrupt on vector {v:#04x} within {} ms (IRQ_STATUS {:#x})",
                    b.timeout_ms,
                    d.rd(regs::REG_IRQ_STATUS)
                ),
            );
        }
        let entry = interrupts::entry_tsc();
        if i >= warm {
            lat.push(entry.wrapping_sub(t0));
        }
    }
    let (med, mean, min, max) = summary(&mut lat);
    println!(
        "vfio-bench: irq kind=msix n={} median={} mean={} min={} max={}",
        b.irqs, med, mean, min, max
    );

    // Polled: no interrupt (also times the doorbell write alone: with an interrupt it would
    // include the handler, which runs as soon as the write returns).
    d.wr(regs::REG_IRQ_CONTROL, 0);
    let (mut lat, mut bell) = (Vec::new(), Vec::new());
    for i in 0..b.irqs + warm {
        let c0 = d.rd(regs::REG_COMPLETED);
        let deadline = time::Deadline::after_ms(b.timeout_ms);
        let t0 = time::rdtsc();
        d.wr(regs::REG_DOORBELL, regs::CMD_WRITE_PATTERN);
        let t1 = time::rdtsc();
        if i >= warm {
            bell.push(t1.wrapping_sub(t0));
        }
        while d.rd(regs::REG_COMPLETED) == c0 {
            if deadline.expired() {
                bad(
                    "bench-poll",
                    Some(d),
                    "the command did not complete in time",
                );
            }
        }
        let t1 = time::rdtsc();
        if i >= warm {
            lat.push(t1.wrapping_sub(t0));
        }
    }
    let (med, mean, min, max) = summary(&mut lat);
    println!(
        "vfio-bench: irq kind=poll n={} median={} mean={} min={} max={}",
        b.irqs, med, mean, min, max
    );
    let (med, mean, min, max) = summary(&mut bell);
    println!(
        "vfio-bench: irq kind=doorbell-write n={} median={} mean={} min={} max={}",
        b.irqs, med, mean, min, max
    );
    let f1 = d.rd(regs::REG_FAILED);
    if f1 != f0 {
        bad(
            "bench-irq",
            Some(d),
            format!("{} commands failed", f1.wrapping_sub(f0)),
        );
    }
    interrupts::disable();
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    m.set_masked(0, true);
    m.set_enabled(cfg, false);
}
