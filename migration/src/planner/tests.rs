//! Tests of the pre-copy planner against a simulated guest and link.

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A guest and a link: the guest dirties `dirty_rate` pages/s of its `ram` bytes (scaled down by
/// the throttle), the link carries `bandwidth` bytes/s; devices have `precopy` bytes of pre-copy
/// data, sent `precopy_per_iteration` at a time, and `stop_state` bytes of state after stop.
#[derive(Clone, Copy)]
struct Sim {
    ram: u64,
    bandwidth: u64,
    dirty_rate: u64,
    precopy: u64,
    precopy_per_iteration: u64,
    stop_state: u64,
}

impl Sim {
    fn new(ram: u64, bandwidth: u64, dirty_rate: u64) -> Self {
        Self {
            ram,
            bandwidth,
            dirty_rate,
            precopy: 0,
            precopy_per_iteration: 0,
            stop_state: 0,
        }
    }

    /// Run iterations until a final decision; returns every decision and the planner.
    fn run(self, config: PlannerConfig) -> (Vec<Decision>, Planner) {
        let mut planner = Planner::new(config, self.ram).unwrap();
        let ram_pages = self.ram / PAGE_SIZE;
        let mut to_send = ram_pages;
        let mut pending = self.precopy;
        let mut throttle = 0u64;
        let mut decisions = Vec::new();
        for _ in 0..1000 {
            let device = pending.min(self.precopy_per_iteration);
            pending -= device;
            let bytes = to_send * PAGE_SIZE + device;
            let secs = bytes as f64 / self.bandwidth as f64;
            let rate = self.dirty_rate as f64 * (100 - throttle) as f64 / 100.0;
            let dirtied = ((rate * secs) as u64).min(ram_pages);
            let d = planner.record(&IterationReport {
                bytes_sent: bytes,
                duration: Duration::from_secs_f64(secs),
                link_time: None,
                dirty_pages: dirtied,
                device_precopy_pending: pending,
                device_stop_state: self.stop_state,
            });
            decisions.push(d.clone());
            match d {
                Decision::Throttle(p) => throttle = u64::from(p),
                Decision::Iterate => {}
                _ => return (decisions, planner),
            }
            to_send = dirtied;
        }
        panic!("no final decision after 1000 iterations: {decisions:?}");
    }
}

fn switched(d: &[Decision]) -> Duration {
    match d.last() {
        Some(Decision::SwitchOver { expected_downtime }) => *expected_downtime,
        other => panic!("expected a switch-over, got {other:?} after {d:?}"),
    }
}

#[test]
fn converges_with_a_low_dirty_rate() {
    // 4 GiB at 1 GiB/s with 2000 pages/s dirtied: 8000 pages after the first pass, then ~31 MiB.
    let (d, p) = Sim::new(4 * GIB, GIB, 2000).run(PlannerConfig::default());
    let downtime = switched(&d);
    assert!(downtime <= Duration::from_millis(300), "{downtime:?}");
    assert!(d.len() <= 3, "{d:?}");
    assert!(!d.iter().any(|x| matches!(x, Decision::Throttle(_))));
    let progress = p.progress();
    assert_eq!(progress.phase, Phase::SwitchOver);
    assert_eq!(progress.iteration, d.len() as u32);
    assert_eq!(progress.bandwidth, GIB);
    assert_eq!(progress.throttle, 0);
    assert!(progress.bytes_sent >= 4 * GIB);
}

#[test]
fn switches_over_at_once_for_an_idle_guest() {
    let (d, p) = Sim::new(GIB, 100 * MIB, 0).run(PlannerConfig::default());
    assert_eq!(
        d,
        vec![Decision::SwitchOver {
            expected_downtime: Duration::ZERO
        }]
    );
    assert_eq!(p.progress().bytes_remaining, 0);
    // The decision is final: later reports change nothing.
    let mut p = p;
    let busy = IterationReport {
        bytes_sent: 1,
        duration: Duration::from_secs(1),
        dirty_pages: 1 << 20,
        ..IterationReport::default()
    };
    assert_eq!(p.record(&busy), d[0]);
    assert_eq!(p.progress().iteration, 1);
}

#[test]
fn throttles_with_a_high_dirty_rate() {
    // 1 GiB at 100 MiB/s; the guest dirties 40000 pages/s (156 MiB/s): only throttling converges.
    let config = PlannerConfig::default();
    let (d, p) = Sim::new(GIB, 100 * MIB, 40_000).run(config.clone());
    let throttles: Vec<u8> = d
        .iter()
        .filter_map(|x| match x {
            Decision::Throttle(t) => Some(*t),
            _ => None,
        })
        .collect();
    assert!(!throttles.is_empty(), "{d:?}");
    // Step by step, starting after `throttle_after` iterations.
    assert_eq!(throttles[0], config.throttle_step);
    assert!(throttles
        .windows(2)
        .all(|w| w[1] == w[0] + config.throttle_step));
    assert_eq!(
        d[..config.throttle_after as usize - 1],
        vec![Decision::Iterate; 2]
    );
    assert!(switched(&d) <= config.downtime_limit);
    assert_eq!(p.throttle(), *throttles.last().unwrap());
    assert!(p.progress().dirty_rate > 0);
}

#[test]
fn gives_up_when_max_throttle_is_not_enough() {
    // The link is too slow for even 1 % of this guest's dirty rate.
    let config = PlannerConfig {
        max_iterations: 20,
        ..PlannerConfig::default()
    };
    let (d, p) = Sim::new(GIB, 10 * MIB, 2_000_000).run(config);
    assert_eq!(d.len(), 20);
    let Some(Decision::GiveUp(reason)) = d.last() else {
        panic!("expected GiveUp, got {d:?}");
    };
    assert_eq!(p.throttle(), 99);
    assert_eq!(p.progress().phase, Phase::GaveUp);
    assert!(reason.contains("after 20 iterations"), "{reason}");
    assert!(reason.contains("99 % vCPU throttle"), "{reason}");
    assert!(reason.contains("limit of 300 ms"), "{reason}");
}

#[test]
fn device_state_counts_in_the_downtime_estimate() {
    // An idle guest whose devices save 100 MiB after stop: 1 s at 100 MiB/s.
    let mut sim = Sim::new(GIB, 100 * MIB, 0);
    sim.stop_state = 100 * MIB;
    let config = PlannerConfig {
        max_iterations: 5,
        ..PlannerConfig::default()
    };
    let (d, p) = sim.run(config.clone());
    assert!(matches!(d.last(), Some(Decision::GiveUp(_))), "{d:?}");
    let progress = p.progress();
    assert_eq!(progress.bytes_remaining, 100 * MIB);
    let expected = progress.expected_downtime.unwrap();
    assert!(expected > Duration::from_millis(900) && expected < Duration::from_millis(1100));

    // 10 MiB of device state fits (about 100 ms), and is in the estimate.
    sim.stop_state = 10 * MIB;
    let downtime = switched(&sim.run(config).0);
    assert!(downtime > Duration::from_millis(90) && downtime < Duration::from_millis(110));
}

#[test]
fn switch_over_waits_for_device_precopy() {
    // Idle RAM, but a device has 3 MiB of pre-copy data sent 1 MiB per iteration.
    let mut sim = Sim::new(64 * MIB, 100 * MIB, 0);
    sim.precopy = 3 * MIB;
    sim.precopy_per_iteration = MIB;
    let (d, _) = sim.run(PlannerConfig::default());
    assert_eq!(d.len(), 3, "{d:?}");
    assert_eq!(d[..2], [Decision::Iterate, Decision::Iterate]);
    switched(&d);

    // Bounded by the iteration limit: a device whose pre-copy data barely moves (but whose
    // pending bytes fit the downtime limit) does not hold the switch-over for ever.
    let config = PlannerConfig {
        max_iterations: 4,
        ..PlannerConfig::default()
    };
    sim.precopy = 8 * MIB;
    sim.precopy_per_iteration = 1;
    let (d, _) = sim.run(config);
    assert_eq!(d.len(), 4, "{d:?}");
    switched(&d);
}

#[test]
fn progress_before_any_iteration_and_bad_configs() {
    let p = Planner::new(PlannerConfig::default(), 8 * GIB).unwrap();
    let progress = p.progress();
    assert_eq!(progress.phase, Phase::Starting);
    assert_eq!(progress.bytes_remaining, 8 * GIB);
    assert_eq!(progress.bandwidth, 0);
    assert_eq!(progress.expected_downtime, None);

    for bad in [
        PlannerConfig {
            downtime_limit: Duration::ZERO,
            ..PlannerConfig::default()
        },
        PlannerConfig {
            max_iterations: 0,
            ..PlannerConfig::default()
        },
        PlannerConfig {
            max_iterations: 256,
            ..PlannerConfig::default()
        },
        PlannerConfig {
            max_throttle: 100,
            ..PlannerConfig::default()
        },
        PlannerConfig {
            throttle_step: 0,
            ..PlannerConfig::default()
        },
    ] {
        let err = Planner::new(bad, GIB).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("invalid migration planner configuration"));
    }
}

#[test]
fn unknown_bandwidth_keeps_iterating() {
    // An iteration that took no measurable time gives no bandwidth: never switch blindly.
    let mut p = Planner::new(PlannerConfig::default(), GIB).unwrap();
    let d = p.record(&IterationReport {
        bytes_sent: GIB,
        duration: Duration::ZERO,
        dirty_pages: 10,
        ..IterationReport::default()
    });
    assert_eq!(d, Decision::Iterate);
    assert_eq!(p.expected_downtime(), None);
}

/// An iteration that sent little and spent most of its time scanning memory: the bandwidth is
/// measured over the time spent writing, not over the whole iteration.
#[test]
fn bandwidth_is_measured_over_the_link_time() {
    let mut p = Planner::new(PlannerConfig::default(), GIB).unwrap();
    p.record(&IterationReport {
        bytes_sent: 1 << 20,
        duration: Duration::from_secs(1),
        link_time: Some(Duration::from_millis(10)),
        dirty_pages: 1,
        ..IterationReport::default()
    });
    let bw = p.progress().bandwidth;
    assert!(((100 << 20) - 1..=(100 << 20) + 1).contains(&bw), "{bw}");
    // A link time longer than the iteration (clock noise) counts as the iteration.
    let mut p = Planner::new(PlannerConfig::default(), GIB).unwrap();
    p.record(&IterationReport {
        bytes_sent: 1 << 20,
        duration: Duration::from_secs(1),
        link_time: Some(Duration::from_secs(2)),
        dirty_pages: 1,
        ..IterationReport::default()
    });
    assert_eq!(p.progress().bandwidth, 1 << 20);
}
