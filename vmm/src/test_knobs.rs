//! Test-only knobs: behaviour a test needs to prove that a safeguard matters, by turning it off.
//! Each is off by default, set through an environment variable, and refused — skiff does not
//! start — unless the build has the `test-knobs` feature (the test suite's builds do; release
//! builds from `cargo build --release` do not).
//!
//! - `SKIFF_TEST_SKIP_P2P_GRACE=1`: stopping the VM skips the P2P grace step (every passthrough
//!   device to RUNNING_P2P before any is stopped) and stops each passthrough device only when
//!   its state is read, one after the other — what a VMM without the grace step does — so a
//!   test can show that the test device's violation counters catch the peer writes then lost.
//! - `SKIFF_TEST_DROP_RESUMED=1`: a migration target runs the VM after the source's commit but
//!   never answers RESUMED — a lost final answer — so a test can show the source then stays
//!   paused instead of running a second copy of the VM.
//! - `SKIFF_TEST_MIGRATION_HOLD=POINT[:TIMES][@SECONDS][,...]`: a migration stops at each
//!   named point (`config`: a target, CONFIG received, before its answer; `switchover`: a
//!   source, vCPUs paused, before the last dirty pages and the state are sent; `commit`: a
//!   source, READY received, before the commit; `restore`: a target, the whole stream
//!   received, before the state is restored; `resumed`: a target, the commit received and
//!   the VM resumed, before RESUMED is answered) and waits there until it is cancelled, its
//!   peer goes away, or `SECONDS` (default [`HOLD_LIMIT`]) pass — so a test can kill or cancel a
//!   migration in that phase. `TIMES` (default: every migration) is how many migrations hold
//!   there. A hold emits the event `migration` / `hold` with the point.
//! - `SKIFF_TEST_NO_CLOCK_REALTIME=1`: the saved kvmclock lacks `KVM_CLOCK_REALTIME`, as on a
//!   host without it, so a test can show that a migration still advances the guest's clock by
//!   the downtime (skiff's own realtime reading, see `vm_state`).
//! - `SKIFF_TEST_FORBIDDEN_SYSCALL=KIND` (a thread kind: control, vcpu, api, device-worker,
//!   passthrough, migration): each thread of that kind makes a syscall no seccomp filter allows
//!   right after installing its filter, so a test can show the violation is caught and reported.
//!   `KIND:ioctl` makes it an ioctl request its kind's filter refuses instead (vcpu,
//!   device-worker and api filter ioctls by request).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The environment variable that skips the P2P grace step.
pub const SKIP_P2P_GRACE_VAR: &str = "SKIFF_TEST_SKIP_P2P_GRACE";

static SKIP_P2P_GRACE: AtomicBool = AtomicBool::new(false);

/// The environment variable that makes a migration target keep RESUMED to itself.
pub const DROP_RESUMED_VAR: &str = "SKIFF_TEST_DROP_RESUMED";

static DROP_RESUMED: AtomicBool = AtomicBool::new(false);

/// The environment variable that saves the kvmclock as a host without `KVM_CLOCK_REALTIME`.
pub const NO_CLOCK_REALTIME_VAR: &str = "SKIFF_TEST_NO_CLOCK_REALTIME";

static NO_CLOCK_REALTIME: AtomicBool = AtomicBool::new(false);

/// Whether the saved kvmclock leaves out `KVM_CLOCK_REALTIME` (never, unless a test asked).
pub fn no_clock_realtime() -> bool {
    NO_CLOCK_REALTIME.load(Ordering::Relaxed)
}

/// Whether a migration target leaves out its RESUMED answer (never, unless a test asked).
pub fn drop_resumed() -> bool {
    DROP_RESUMED.load(Ordering::Relaxed)
}

/// The environment variable that makes migrations stop at a point (see the module docs).
pub const MIGRATION_HOLD_VAR: &str = "SKIFF_TEST_MIGRATION_HOLD";

/// How long a migration holds at most (then it goes on).
pub const HOLD_LIMIT: Duration = Duration::from_secs(300);

/// A point where [`MIGRATION_HOLD_VAR`] can hold a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPoint {
    /// Target: the source's CONFIG arrived; ACCEPT or REFUSE not sent yet.
    Config,
    /// Source: vCPUs paused; the last dirty pages and the state not sent yet.
    Switchover,
    /// Source: the target's READY arrived; the commit not sent yet.
    Commit,
    /// Target: the whole stream arrived; the state not restored yet.
    Restore,
    /// Target: the commit arrived and the VM runs; RESUMED not answered yet.
    Resumed,
}

impl HoldPoint {
    /// Every point, in the order a migration reaches them.
    pub const ALL: [HoldPoint; 5] = [
        HoldPoint::Config,
        HoldPoint::Switchover,
        HoldPoint::Commit,
        HoldPoint::Restore,
        HoldPoint::Resumed,
    ];

    /// The name used in the knob's value.
    pub fn name(self) -> &'static str {
        match self {
            HoldPoint::Config => "config",
            HoldPoint::Switchover => "switchover",
            HoldPoint::Commit => "commit",
            HoldPoint::Restore => "restore",
            HoldPoint::Resumed => "resumed",
        }
    }
}

/// One hold asked for: where, for how many more migrations (`None`: all), how long at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    point: HoldPoint,
    times: Option<u32>,
    limit: Duration,
}

/// The holds asked for.
static HOLDS: Mutex<Vec<Hold>> = Mutex::new(Vec::new());

/// How long this migration should hold at `point` at most, if it should (counts the hold).
pub fn take_hold(point: HoldPoint) -> Option<Duration> {
    let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
    let hold = holds.iter_mut().find(|h| h.point == point)?;
    match &mut hold.times {
        None => {}
        Some(0) => return None,
        Some(n) => *n -= 1,
    }
    Some(hold.limit)
}

/// The decision behind [`init_from_env`] for [`MIGRATION_HOLD_VAR`].
fn migration_holds(value: Option<&str>, built_with_knobs: bool) -> Result<Vec<Hold>, String> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    if !built_with_knobs {
        return Err(no_knobs(MIGRATION_HOLD_VAR));
    }
    let bad = |what: &str| {
        let points: Vec<_> = HoldPoint::ALL.iter().map(|p| p.name()).collect();
        format!(
            "{MIGRATION_HOLD_VAR}={v:?}: {what} (expected POINT[:TIMES][@SECONDS],... with POINT one of {})",
            points.join(", ")
        )
    };
    v.split(',')
        .map(|item| {
            let (rest, limit) = match item.split_once('@') {
                Some((r, s)) => (r, Duration::from_secs(s.parse().map_err(|_| bad(item))?)),
                None => (item, HOLD_LIMIT),
            };
            let (name, times) = match rest.split_once(':') {
                Some((n, t)) => (n, Some(t.parse::<u32>().map_err(|_| bad(item))?)),
                None => (rest, None),
            };
            let point = HoldPoint::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| bad(item))?;
            Ok(Hold {
                point,
                times,
                limit,
            })
        })
        .collect()
}

/// Whether the P2P grace step is skipped (never, unless a test asked for it).
pub fn skip_p2p_grace() -> bool {
    SKIP_P2P_GRACE.load(Ordering::Relaxed)
}

/// The environment variable that makes one thread kind break its seccomp filter.
pub const FORBIDDEN_SYSCALL_VAR: &str = "SKIFF_TEST_FORBIDDEN_SYSCALL";

/// Read the knobs from the environment: `Err` names a knob this build refuses.
pub fn init_from_env() -> Result<(), String> {
    let switches: [(&str, &AtomicBool, &str); 3] = [
        (
            SKIP_P2P_GRACE_VAR,
            &SKIP_P2P_GRACE,
            "the P2P grace step is skipped; migrations of passthrough devices may lose peer writes",
        ),
        (
            DROP_RESUMED_VAR,
            &DROP_RESUMED,
            "an incoming migration never answers RESUMED",
        ),
        (
            NO_CLOCK_REALTIME_VAR,
            &NO_CLOCK_REALTIME,
            "the kvmclock is saved without KVM_CLOCK_REALTIME",
        ),
    ];
    for (var, flag, what) in switches {
        let value = std::env::var(var).ok();
        if decide(var, value.as_deref(), cfg!(feature = "test-knobs"))? {
            log::warn!("TEST KNOB {var}=1: {what}");
            flag.store(true, Ordering::Relaxed);
        }
    }
    let holds = std::env::var(MIGRATION_HOLD_VAR).ok();
    let holds = migration_holds(holds.as_deref(), cfg!(feature = "test-knobs"))?;
    if !holds.is_empty() {
        log::warn!("TEST KNOB {MIGRATION_HOLD_VAR}: migrations hold at {holds:?}");
        *HOLDS.lock().unwrap_or_else(|e| e.into_inner()) = holds;
    }
    let forbidden = std::env::var(FORBIDDEN_SYSCALL_VAR).ok();
    if let Some((kind, ioctl)) =
        forbidden_syscall_kind(forbidden.as_deref(), cfg!(feature = "test-knobs"))?
    {
        log::warn!(
            "TEST KNOB {FORBIDDEN_SYSCALL_VAR}: {} threads will make a forbidden {}",
            kind.name(),
            if ioctl { "ioctl" } else { "syscall" }
        );
        sandbox::provoke_violation_in(kind, ioctl);
    }
    Ok(())
}

/// The decision behind [`init_from_env`] for [`FORBIDDEN_SYSCALL_VAR`]: the thread kind, and
/// whether the violation is an ioctl.
fn forbidden_syscall_kind(
    value: Option<&str>,
    built_with_knobs: bool,
) -> Result<Option<(sandbox::ThreadKind, bool)>, String> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if !built_with_knobs {
        return Err(no_knobs(FORBIDDEN_SYSCALL_VAR));
    }
    let (name, ioctl) = match v.strip_suffix(":ioctl") {
        Some(name) => (name, true),
        None => (v, false),
    };
    sandbox::kind_by_name(name)
        .map(|k| Some((k, ioctl)))
        .ok_or_else(|| {
            let kinds: Vec<_> = sandbox::ThreadKind::ALL.iter().map(|k| k.name()).collect();
            format!(
                "{FORBIDDEN_SYSCALL_VAR}={v:?}: expected one of {} (optionally followed by :ioctl)",
                kinds.join(", ")
            )
        })
}

/// The decision behind [`init_from_env`] for the on/off knob `var` set to `value`.
fn decide(var: &str, value: Option<&str>, built_with_knobs: bool) -> Result<bool, String> {
    match (value, built_with_knobs) {
        (None, _) | (Some("0"), _) | (Some(""), _) => Ok(false),
        (Some("1"), true) => Ok(true),
        (Some("1"), false) => Err(no_knobs(var)),
        (Some(v), _) => Err(format!("{var}={v:?}: expected 0 or 1")),
    }
}

/// The refusal of knob `var` by a build without the `test-knobs` feature.
fn no_knobs(var: &str) -> String {
    format!("{var} is a test knob and this build has none (build with --features vmm/test-knobs)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_are_off_by_default_and_refused_without_the_feature() {
        let v = SKIP_P2P_GRACE_VAR;
        assert_eq!(decide(v, None, false), Ok(false));
        assert_eq!(decide(v, None, true), Ok(false));
        assert_eq!(decide(v, Some("0"), false), Ok(false));
        assert_eq!(decide(v, Some("1"), true), Ok(true));
        let e = decide(DROP_RESUMED_VAR, Some("1"), false).unwrap_err();
        assert!(
            e.contains("test-knobs") && e.contains(DROP_RESUMED_VAR),
            "{e}"
        );
        assert!(decide(v, Some("yes"), true).is_err());
    }

    #[test]
    fn the_migration_hold_knob_names_points_and_counts_and_needs_the_feature() {
        assert_eq!(migration_holds(None, false), Ok(Vec::new()));
        let hold = |point, times, secs| Hold {
            point,
            times,
            limit: Duration::from_secs(secs),
        };
        assert_eq!(
            migration_holds(Some("config"), true),
            Ok(vec![hold(HoldPoint::Config, None, HOLD_LIMIT.as_secs())])
        );
        assert_eq!(
            migration_holds(Some("switchover:2,commit:1,restore:1@3,resumed@3"), true),
            Ok(vec![
                hold(HoldPoint::Switchover, Some(2), HOLD_LIMIT.as_secs()),
                hold(HoldPoint::Commit, Some(1), HOLD_LIMIT.as_secs()),
                hold(HoldPoint::Restore, Some(1), 3),
                hold(HoldPoint::Resumed, None, 3),
            ])
        );
        assert!(migration_holds(Some("resumed@x"), true).is_err());
        let e = migration_holds(Some("config"), false).unwrap_err();
        assert!(e.contains("test-knobs"), "{e}");
        assert!(migration_holds(Some("precopy"), true).is_err());
        assert!(migration_holds(Some("commit:x"), true).is_err());
    }

    #[test]
    fn the_forbidden_syscall_knob_names_a_thread_kind_and_needs_the_feature() {
        assert_eq!(forbidden_syscall_kind(None, false), Ok(None));
        assert_eq!(
            forbidden_syscall_kind(Some("vcpu"), true),
            Ok(Some((sandbox::ThreadKind::Vcpu, false)))
        );
        assert_eq!(
            forbidden_syscall_kind(Some("api:ioctl"), true),
            Ok(Some((sandbox::ThreadKind::Api, true)))
        );
        assert!(forbidden_syscall_kind(Some("api:open"), true).is_err());
        let e = forbidden_syscall_kind(Some("vcpu"), false).unwrap_err();
        assert!(e.contains("test-knobs"), "{e}");
        let e = forbidden_syscall_kind(Some("gpu"), true).unwrap_err();
        assert!(e.contains("device-worker"), "{e}");
    }
}
