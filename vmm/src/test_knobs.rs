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
//! - `SKIFF_TEST_FORBIDDEN_SYSCALL=KIND` (a thread kind: control, vcpu, api, device-worker,
//!   passthrough, migration): each thread of that kind makes a syscall no seccomp filter allows
//!   right after installing its filter, so a test can show the violation is caught and reported.
//!   `KIND:ioctl` makes it an ioctl request its kind's filter refuses instead (vcpu,
//!   device-worker and api filter ioctls by request).

use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that skips the P2P grace step.
pub const SKIP_P2P_GRACE_VAR: &str = "SKIFF_TEST_SKIP_P2P_GRACE";

static SKIP_P2P_GRACE: AtomicBool = AtomicBool::new(false);

/// The environment variable that makes a migration target keep RESUMED to itself.
pub const DROP_RESUMED_VAR: &str = "SKIFF_TEST_DROP_RESUMED";

static DROP_RESUMED: AtomicBool = AtomicBool::new(false);

/// Whether a migration target leaves out its RESUMED answer (never, unless a test asked).
pub fn drop_resumed() -> bool {
    DROP_RESUMED.load(Ordering::Relaxed)
}

/// Whether the P2P grace step is skipped (never, unless a test asked for it).
pub fn skip_p2p_grace() -> bool {
    SKIP_P2P_GRACE.load(Ordering::Relaxed)
}

/// The environment variable that makes one thread kind break its seccomp filter.
pub const FORBIDDEN_SYSCALL_VAR: &str = "SKIFF_TEST_FORBIDDEN_SYSCALL";

/// Read the knobs from the environment: `Err` names a knob this build refuses.
pub fn init_from_env() -> Result<(), String> {
    let skip = std::env::var(SKIP_P2P_GRACE_VAR).ok();
    if decide(
        SKIP_P2P_GRACE_VAR,
        skip.as_deref(),
        cfg!(feature = "test-knobs"),
    )? {
        log::warn!("TEST KNOB {SKIP_P2P_GRACE_VAR}=1: the P2P grace step is skipped; migrations of passthrough devices may lose peer writes");
        SKIP_P2P_GRACE.store(true, Ordering::Relaxed);
    }
    let drop = std::env::var(DROP_RESUMED_VAR).ok();
    if decide(
        DROP_RESUMED_VAR,
        drop.as_deref(),
        cfg!(feature = "test-knobs"),
    )? {
        log::warn!("TEST KNOB {DROP_RESUMED_VAR}=1: an incoming migration never answers RESUMED");
        DROP_RESUMED.store(true, Ordering::Relaxed);
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
        return Err(format!(
            "{FORBIDDEN_SYSCALL_VAR} is a test knob and this build has none (build with --features vmm/test-knobs)"
        ));
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
        (Some("1"), false) => Err(format!(
            "{var} is a test knob and this build has none (build with --features vmm/test-knobs)"
        )),
        (Some(v), _) => Err(format!("{var}={v:?}: expected 0 or 1")),
    }
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
