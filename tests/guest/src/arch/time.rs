//! Crude time keeping with the TSC.
//!
//! The TSC frequency is never calibrated (that would need CPUID, which this host does not pass
//! through faithfully). Instead every delay assumes the fastest plausible TSC
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
