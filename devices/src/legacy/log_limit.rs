//! Rate limiting for log messages a guest can trigger repeatedly.

/// Decides whether the n-th occurrence of a guest-triggerable event is worth a log line.
///
/// The first [`LogLimiter::BURST`] occurrences are logged, then only occurrences whose count is a
/// power of two, so a guest hammering a register cannot flood the host log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    /// Occurrences always logged before thinning starts.
    pub const BURST: u64 = 10;

    /// A limiter that has seen nothing yet.
    pub const fn new() -> Self {
        Self { count: 0 }
    }

    /// Record one occurrence; `true` when it should be logged.
    pub fn allow(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= Self::BURST || self.count.is_power_of_two()
    }

    /// Occurrences recorded so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thins_out_after_burst() {
        let mut l = LogLimiter::new();
        let logged = (0..1000).filter(|_| l.allow()).count();
        // 10 in the burst, then 16, 32, 64, 128, 256, 512.
        assert_eq!(logged, 16);
        assert_eq!(l.count(), 1000);
    }
}
