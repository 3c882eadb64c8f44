//! The pre-copy planner: a pure state machine that decides, after each RAM iteration, whether to
//! iterate again, throttle the vCPUs (auto-converge), switch over, or give up.
//!
//! The VMM feeds one [`IterationReport`] per iteration: the bytes sent and the time it took, the
//! pages dirtied meanwhile (the dirty set size after the iteration), and the devices' pending
//! pre-copy bytes and stop-state sizes ([`crate::Migratable::precopy_pending`],
//! [`crate::Migratable::stop_state_size`]). The planner keeps a smoothed bandwidth and the dirty
//! rate, and estimates the downtime of stopping now:
//!
//! ```text
//! expected downtime = (dirty pages × 4 KiB + device pre-copy pending + device stop state) / bandwidth
//! ```
//!
//! It switches over when that fits the downtime limit and the devices have no pre-copy data left
//! (or the iteration limit is reached while it fits). From iteration `throttle_after` on, every
//! iteration whose estimate is above the limit raises the vCPU throttle by `throttle_step` up to
//! `max_throttle`. When the iterations are exhausted and the estimate is still above the limit,
//! it gives up with the figures.

use std::time::Duration;

use thiserror::Error;

use crate::memory_file::PAGE_SIZE;

/// Weight of the newest bandwidth sample in the smoothed bandwidth.
const BANDWIDTH_WEIGHT: f64 = 0.5;

/// An invalid planner configuration.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid migration planner configuration: {0}")]
pub struct PlannerError(pub String);

/// Limits and auto-converge steps of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannerConfig {
    /// The longest acceptable pause of the guest.
    pub downtime_limit: Duration,
    /// The most RAM iterations (the full pass included).
    pub max_iterations: u32,
    /// The highest vCPU throttle, in percent (below 100).
    pub max_throttle: u8,
    /// How much the throttle grows per non-converging iteration, in percent.
    pub throttle_step: u8,
    /// The first iteration after which throttling may start.
    pub throttle_after: u32,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_iterations: 30,
            max_throttle: 99,
            throttle_step: 10,
            throttle_after: 3,
        }
    }
}

impl PlannerConfig {
    /// Check the limits.
    pub fn validate(&self) -> Result<(), PlannerError> {
        let bad = |s: &str| Err(PlannerError(s.to_string()));
        if self.downtime_limit.is_zero() {
            return bad("the downtime limit must be above 0");
        }
        if self.max_iterations == 0 || self.max_iterations > crate::stream::MAX_ITERATION + 1 {
            return bad("the iteration limit must be 1 to 255");
        }
        if self.max_throttle > 99 {
            return bad("the throttle limit must be below 100 %");
        }
        if self.throttle_step == 0 || self.throttle_step > 100 {
            return bad("the throttle step must be 1 to 100 %");
        }
        Ok(())
    }
}

/// What happened during one iteration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IterationReport {
    /// Bytes sent (RAM and device pre-copy data).
    pub bytes_sent: u64,
    /// Time the iteration took.
    pub duration: Duration,
    /// Of that, the time spent writing to the link (the busiest connection's); the bandwidth is
    /// measured over it when given, so an iteration that sent little (mostly scanning memory)
    /// does not make the link look slow. `None`: the whole duration.
    pub link_time: Option<Duration>,
    /// Pages dirtied during it: the dirty set size after the iteration.
    pub dirty_pages: u64,
    /// Device pre-copy bytes still pending.
    pub device_precopy_pending: u64,
    /// Bytes of device state saved after stop.
    pub device_stop_state: u64,
}

/// The planner's decision after an iteration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty pages again.
    Iterate,
    /// Set the vCPU throttle to this percentage, then iterate.
    Throttle(u8),
    /// Stop the guest and send the rest.
    SwitchOver {
        /// The estimated pause.
        expected_downtime: Duration,
    },
    /// Cancel the migration; the reason has the figures.
    GiveUp(String),
}

/// Where the migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No iteration reported yet.
    Starting,
    /// Iterating over dirty RAM while the guest runs.
    PreCopy,
    /// The planner decided to switch over.
    SwitchOver,
    /// The planner gave up.
    GaveUp,
}

/// A progress snapshot for `vm.migration-progress`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Iterations reported.
    pub iteration: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Bytes that stopping now would send: dirty RAM, device pre-copy and stop state.
    pub bytes_remaining: u64,
    /// Pages dirtied per second in the last iteration.
    pub dirty_rate: u64,
    /// Smoothed bandwidth in bytes per second (0 = not measured yet).
    pub bandwidth: u64,
    /// Estimated downtime of stopping now, once the bandwidth is known.
    pub expected_downtime: Option<Duration>,
    /// The vCPU throttle in percent.
    pub throttle: u8,
}

/// The pre-copy planner (see the module doc).
#[derive(Debug, Clone)]
pub struct Planner {
    config: PlannerConfig,
    phase: Phase,
    iterations: u32,
    bytes_sent: u64,
    remaining: u64,
    bandwidth: Option<f64>,
    dirty_rate: f64,
    throttle: u8,
    last: Option<Decision>,
}

impl Planner {
    /// A planner for a guest with `ram_bytes` of RAM.
    pub fn new(config: PlannerConfig, ram_bytes: u64) -> Result<Self, PlannerError> {
        config.validate()?;
        Ok(Self {
            config,
            phase: Phase::Starting,
            iterations: 0,
            bytes_sent: 0,
            remaining: ram_bytes,
            bandwidth: None,
            dirty_rate: 0.0,
            throttle: 0,
            last: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// The vCPU throttle in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The estimated downtime of stopping now; `None` while the bandwidth is unknown.
    pub fn expected_downtime(&self) -> Option<Duration> {
        match self.bandwidth {
            _ if self.remaining == 0 => Some(Duration::ZERO),
            Some(bw) if bw > 0.0 => Some(Duration::from_secs_f64(self.remaining as f64 / bw)),
            _ => None,
        }
    }

    /// A progress snapshot.
    pub fn progress(&self) -> Progress {
        Progress {
            phase: self.phase,
            iteration: self.iterations,
            bytes_sent: self.bytes_sent,
            bytes_remaining: self.remaining,
            dirty_rate: self.dirty_rate as u64,
            bandwidth: self.bandwidth.unwrap_or(0.0) as u64,
            expected_downtime: self.expected_downtime(),
            throttle: self.throttle,
        }
    }

    fn measure(&mut self, r: &IterationReport) {
        self.iterations += 1;
        self.bytes_sent = self.bytes_sent.saturating_add(r.bytes_sent);
        let secs = r.duration.as_secs_f64();
        let link_secs = r.link_time.map_or(secs, |t| t.as_secs_f64().min(secs));
        if link_secs > 0.0 && r.bytes_sent > 0 {
            let sample = r.bytes_sent as f64 / link_secs;
            self.bandwidth = Some(match self.bandwidth {
                Some(bw) => bw * (1.0 - BANDWIDTH_WEIGHT) + sample * BANDWIDTH_WEIGHT,
                None => sample,
            });
        }
        if secs > 0.0 {
            self.dirty_rate = r.dirty_pages as f64 / secs;
        }
        self.remaining = r
            .dirty_pages
            .saturating_mul(PAGE_SIZE)
            .saturating_add(r.device_precopy_pending)
            .saturating_add(r.device_stop_state);
    }

    /// Take the report of the iteration that just ended and decide what comes next. After a
    /// switch-over or give-up decision, reports are ignored and that decision is returned again.
    pub fn record(&mut self, report: &IterationReport) -> Decision {
        if let Some(last @ (Decision::SwitchOver { .. } | Decision::GiveUp(_))) = &self.last {
            return last.clone();
        }
        self.measure(report);
        self.phase = Phase::PreCopy;
        let limit = self.config.downtime_limit;
        let expected = self.expected_downtime();
        let fits = expected.is_some_and(|d| d <= limit);
        let exhausted = self.iterations >= self.config.max_iterations;
        let decision = if fits && (report.device_precopy_pending == 0 || exhausted) {
            self.phase = Phase::SwitchOver;
            Decision::SwitchOver {
                expected_downtime: expected.unwrap_or_default(),
            }
        } else if exhausted {
            self.phase = Phase::GaveUp;
            Decision::GiveUp(self.give_up_reason(expected))
        } else if !fits
            && self.iterations >= self.config.throttle_after
            && self.throttle < self.config.max_throttle
        {
            self.throttle = self
                .throttle
                .saturating_add(self.config.throttle_step)
                .min(self.config.max_throttle);
            Decision::Throttle(self.throttle)
        } else {
            Decision::Iterate
        };
        self.last = Some(decision.clone());
        decision
    }

    fn give_up_reason(&self, expected: Option<Duration>) -> String {
        let downtime = match expected {
            Some(d) => format!("an expected downtime of {} ms", d.as_millis()),
            None => "an unknown downtime (no bandwidth measured)".to_string(),
        };
        format!(
            "migration cannot converge: after {} iterations at {} % vCPU throttle the guest dirties \
             {:.0} pages/s; stopping now would send {} bytes at {:.0} bytes/s, {downtime}, above \
             the limit of {} ms",
            self.iterations,
            self.throttle,
            self.dirty_rate,
            self.remaining,
            self.bandwidth.unwrap_or(0.0),
            self.config.downtime_limit.as_millis()
        )
    }
}

#[cfg(test)]
mod tests;
