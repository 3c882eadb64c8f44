//! Crude time keeping with the TSC.
//!
//! Delays and timeouts never calibrate the TSC frequency (that would need CPUID, which this host
//! does not pass through faithfully, or a PIT measurement: see [`calibrate_tsc_pit`], used only by
//! the `dirty` workload's reports). Instead every delay assumes the fastest plausible TSC
//! ([`ASSUMED_MAX_TSC_HZ`]), so a delay or timeout lasts *at least* what was asked for — up to ~5x
//! longer on a 1 GHz TSC, which is fine for INIT/SIPI spacing and for failure timeouts.

/// Upper bound assumed for the TSC frequency.
pub const ASSUMED_MAX_TSC_HZ: u64 = 5_000_000_000;

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A point in the future, `ms` milliseconds (at least) from now.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// A deadline at least `ms` milliseconds away.
    pub fn after_ms(ms: u64) -> Self {
        Deadline(rdtsc().wrapping_add(ms.saturating_mul(ASSUMED_MAX_TSC_HZ / 1000)))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        (rdtsc().wrapping_sub(self.0) as i64) >= 0
    }
}

/// Spin for at least `us` microseconds.
pub fn delay_us(us: u64) {
    let end = rdtsc().wrapping_add(us.saturating_mul(ASSUMED_MAX_TSC_HZ / 1_000_000));
    while (rdtsc().wrapping_sub(end) as i64) < 0 {
        core::hint::spin_loop();
    }
}

/// Spin for at least `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    delay_us(ms.saturating_mul(1000));
}

/// PIT input clock (Hz).
pub const PIT_HZ: u64 = 1_193_182;

/// Measure the TSC rate against PIT channel 2 (gated through port 0x61, as Linux's `pit_calibrate`
/// does): program a one-shot countdown of `ms` milliseconds (mode 0, at most 54 ms), read the TSC
/// when it starts and when port 0x61 bit 5 (channel 2 OUT) goes high. Takes the median of `runs`
/// measurements. `None` when the PIT never reaches its terminal count (no PIT, no port 0x61) or
/// the result is implausible (below 100 MHz or above 20 GHz).
///
/// Channels 0/1 and the speaker are left alone (the speaker data bit stays clear); interrupts are
/// not needed.
pub fn calibrate_tsc_pit(ms: u64, runs: usize) -> Option<u64> {
    use super::port::{inb, outb};
    let ms = ms.clamp(1, 54);
    let count = PIT_HZ * ms / 1000;
    let mut results = alloc::vec::Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        // Gate low, speaker off; program channel 2: lobyte/hibyte, mode 0, binary.
        let ctl = inb(0x61) & !0x03;
        outb(0x61, ctl);
        outb(0x43, 0xB0);
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        // Gate high starts the countdown.
        outb(0x61, ctl | 0x01);
        let t0 = rdtsc();
        let give_up = Deadline::after_ms(ms * 20 + 100);
        let mut done = false;
        while !give_up.expired() {
            if inb(0x61) & 0x20 != 0 {
                done = true;
                break;
            }
        }
        let t1 = rdtsc();
        outb(0x61, ctl);
        if !done {
            return None;
        }
        results.push((t1 - t0) * 1000 / ms);
    }
    results.sort_unstable();
    let hz = results[results.len() / 2];
    (100_000_000..=20_000_000_000).contains(&hz).then_some(hz)
}
