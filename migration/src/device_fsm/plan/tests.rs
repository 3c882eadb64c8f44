//! Tests of the passthrough migration plan over every mix of 1, 2 and 3 devices.

use super::super::{is_direct_arc, source_abort_path};
use super::*;
use DeviceMigState::*;

const SC: MigrationCaps = MigrationCaps::STOP_COPY;
const P2P: MigrationCaps = MigrationCaps::P2P;
const PRE: MigrationCaps = MigrationCaps::PRE_COPY;

/// Every configuration of one device: flags (unmigratable ones included) × p2p=off × pre-copy off.
fn configs() -> Vec<(MigrationCaps, bool, bool)> {
    let flag_sets = [
        MigrationCaps::NONE,
        P2P,
        SC,
        SC | P2P,
        SC | PRE,
        SC | P2P | PRE,
    ];
    let mut out = Vec::new();
    for caps in flag_sets {
        for p2p_off in [false, true] {
            for pre_copy_off in [false, true] {
                out.push((caps, p2p_off, pre_copy_off));
            }
        }
    }
    out
}

/// Every VM of `n` devices built from [`configs`].
fn vms(n: usize) -> Vec<Vec<PassthroughMigInfo>> {
    let configs = configs();
    let mut vms = vec![Vec::new()];
    for slot in 0..n {
        let mut next = Vec::new();
        for vm in &vms {
            for &(caps, p2p_off, pre_copy_off) in &configs {
                let mut vm = vm.clone();
                vm.push(PassthroughMigInfo {
                    id: format!("dev{slot}"),
                    caps,
                    p2p_off,
                    pre_copy_off,
                });
                next.push(vm);
            }
        }
        vms = next;
    }
    vms
}

/// The refusal expected for `vm`, worked out from the rules independently of the planner.
fn expected_refusal(vm: &[PassthroughMigInfo]) -> Option<(String, &'static str)> {
    for info in vm {
        if !info.caps.contains(SC) {
            return Some((info.id.clone(), "hot-unplug it"));
        }
    }
    if vm.len() > 1 {
        for info in vm {
            if !info.caps.contains(P2P) && !info.p2p_off {
                return Some((info.id.clone(), "set p2p=off on it"));
            }
        }
    }
    None
}

/// Device states of a VM being walked through arcs, checking each arc and the P2P safety rule.
struct Walk<'a> {
    vm: &'a [PassthroughMigInfo],
    states: Vec<DeviceMigState>,
    /// Every state vector seen, for the abort checks.
    seen: Vec<Vec<DeviceMigState>>,
}

impl<'a> Walk<'a> {
    fn new(vm: &'a [PassthroughMigInfo]) -> Self {
        Self {
            vm,
            states: vec![Running; vm.len()],
            seen: vec![vec![Running; vm.len()]],
        }
    }

    /// Whether device `i` is outside the peer-DMA domain (alone, or `p2p=off`).
    fn isolated(&self, i: usize) -> bool {
        self.vm.len() == 1 || self.vm[i].p2p_off
    }

    /// No device of the peer-DMA domain may initiate peer DMA while another one is stopped.
    fn check_p2p_safety(&self, context: &str) {
        for (a, &sa) in self.states.iter().enumerate() {
            for (b, &sb) in self.states.iter().enumerate() {
                if a == b || self.isolated(a) || self.isolated(b) {
                    continue;
                }
                let stopped = matches!(sb, Stop | StopCopy | Resuming);
                assert!(
                    !stopped || sa.is_p2p_quiet(),
                    "{context}: device {a} in {sa} while device {b} is in {sb}"
                );
            }
        }
    }

    /// Apply one phase, checking every arc; returns nothing, panics with `context` on a fault.
    fn run(&mut self, phase: &[DeviceArc], context: &str) {
        for (k, arc) in phase.iter().enumerate() {
            let caps = self.vm[arc.device].caps;
            assert_eq!(arc.from, self.states[arc.device], "{context}: {arc}");
            assert!(is_direct_arc(caps, arc.from, arc.to), "{context}: {arc}");
            assert!(
                !(arc.from == StopCopy && matches!(arc.to, PreCopy | PreCopyP2p)),
                "{context}: {arc}"
            );
            // A multi-hop move never rests in a data-session state before its end.
            let more = phase[k + 1..].iter().any(|a| a.device == arc.device);
            assert!(
                !(more && arc.to.has_data_session()),
                "{context}: {arc} inside a move"
            );
            self.states[arc.device] = arc.to;
            self.check_p2p_safety(context);
            self.seen.push(self.states.clone());
        }
    }
}

/// Check the source's phases of a planned `vm`; returns every state vector the source went
/// through.
fn check_source(vm: &[PassthroughMigInfo], plan: &DeviceMigrationPlan) -> Vec<Vec<DeviceMigState>> {
    let src = &plan.source;
    let mut walk = Walk::new(vm);
    walk.run(&src.precopy_start, "precopy_start");
    for (i, info) in vm.iter().enumerate() {
        let pre = info.caps.contains(PRE) && !info.pre_copy_off;
        assert_eq!(walk.states[i], if pre { PreCopy } else { Running });
        assert_eq!(plan.devices[i].pre_copy, pre);
    }
    assert!(src
        .precopy_start
        .iter()
        .all(|a| (a.from, a.to) == (Running, PreCopy)));

    walk.run(&src.quiesce, "quiesce");
    for (i, info) in vm.iter().enumerate() {
        let s = walk.states[i];
        if info.caps.contains(P2P) {
            assert!(
                matches!(s, RunningP2p | PreCopyP2p),
                "quiesce left {i} in {s}"
            );
        } else {
            assert!(matches!(s, Running | PreCopy), "quiesce moved {i} to {s}");
            assert!(src.quiesce.iter().all(|a| a.device != i));
        }
    }

    walk.run(&src.stop_copy, "stop_copy");
    assert!(walk.states.iter().all(|&s| s == StopCopy));
    walk.run(&src.finish, "finish");
    assert!(walk.states.iter().all(|&s| s == Stop));
    assert!(src
        .finish
        .iter()
        .all(|a| (a.from, a.to) == (StopCopy, Stop)));
    walk.seen
}

/// Check the target's phases of a planned `vm`.
fn check_target(vm: &[PassthroughMigInfo], plan: &DeviceMigrationPlan) {
    let dst = &plan.target;
    let mut walk = Walk::new(vm);
    walk.run(&dst.prepare, "prepare");
    assert!(walk.states.iter().all(|&s| s == Resuming));
    walk.run(&dst.loaded, "loaded");
    assert!(walk.states.iter().all(|&s| s == Stop));
    walk.run(&dst.quiesced, "quiesced");
    for (i, info) in vm.iter().enumerate() {
        let expected = if info.caps.contains(P2P) {
            RunningP2p
        } else {
            Stop
        };
        assert_eq!(walk.states[i], expected);
    }
    walk.run(&dst.running, "running");
    assert!(walk.states.iter().all(|&s| s == Running));
}

/// From every state vector the source can be in, both abort forms bring it back to RUNNING.
fn check_aborts(
    vm: &[PassthroughMigInfo],
    plan: &DeviceMigrationPlan,
    seen: &[Vec<DeviceMigState>],
) {
    for states in seen {
        for (i, &s) in states.iter().enumerate() {
            let arcs = source_abort_path(i, vm[i].caps, s).expect("abort path");
            let end = arcs.iter().fold(s, |at, arc| {
                assert_eq!(arc.from, at);
                assert!(is_direct_arc(vm[i].caps, arc.from, arc.to));
                arc.to
            });
            assert_eq!(end, Running);
        }
        let arcs = source_abort_plan(&plan.devices, states).expect("abort plan");
        let mut walk = Walk::new(vm);
        walk.states = states.clone();
        walk.run(&arcs, "abort");
        assert!(walk.states.iter().all(|&s| s == Running));
    }
}

/// Plan every VM of `n` devices and check it; returns (planned, refused).
fn check_all(n: usize) -> (usize, usize) {
    let (mut planned, mut refused) = (0, 0);
    for vm in vms(n) {
        let result = plan_device_migration(&vm);
        match (expected_refusal(&vm), result) {
            (Some((id, remedy)), Err(err)) => {
                let text = err.to_string();
                assert!(text.contains(&format!("device {id} ")), "{text}");
                assert!(text.contains(remedy), "{text}");
                refused += 1;
            }
            (None, Ok(plan)) => {
                assert_eq!(plan.devices.len(), vm.len());
                let seen = check_source(&vm, &plan);
                check_target(&vm, &plan);
                check_aborts(&vm, &plan, &seen);
                planned += 1;
            }
            (expected, got) => panic!("{vm:?}: expected refusal {expected:?}, got {got:?}"),
        }
    }
    (planned, refused)
}

#[test]
fn every_single_device_mix() {
    // 4 migratable flag sets × 4 option pairs plan; the 2 unmigratable sets × 4 refuse.
    assert_eq!(check_all(1), (16, 8));
}

#[test]
fn every_two_device_mix() {
    let (planned, refused) = check_all(2);
    assert_eq!(planned + refused, 24 * 24);
    // Migratable and (P2P or p2p=off): 2 P2P sets × 4 + 2 other sets × 2 = 12 per device.
    assert_eq!(planned, 12 * 12);
}

#[test]
fn every_three_device_mix() {
    let (planned, refused) = check_all(3);
    assert_eq!(planned + refused, 24 * 24 * 24);
    assert_eq!(planned, 12 * 12 * 12);
}

fn info(id: &str, caps: MigrationCaps, p2p_off: bool) -> PassthroughMigInfo {
    PassthroughMigInfo {
        id: id.to_string(),
        caps,
        p2p_off,
        pre_copy_off: false,
    }
}

/// Shorthand for an expected arc.
fn arc(device: usize, from: DeviceMigState, to: DeviceMigState) -> DeviceArc {
    DeviceArc { device, from, to }
}

#[test]
fn a_mixed_vm_gets_the_expected_arcs() {
    let vm = [
        info("gpu", SC | P2P | PRE, false),
        info("nic", SC | P2P, false),
        info("ssd", SC, true),
    ];
    let plan = plan_device_migration(&vm).expect("plan");
    let src = &plan.source;
    assert_eq!(src.precopy_start, [arc(0, Running, PreCopy)]);
    assert_eq!(
        src.quiesce,
        [arc(0, PreCopy, PreCopyP2p), arc(1, Running, RunningP2p)]
    );
    assert_eq!(
        src.stop_copy,
        [
            arc(0, PreCopyP2p, StopCopy),
            arc(1, RunningP2p, Stop),
            arc(1, Stop, StopCopy),
            arc(2, Running, Stop),
            arc(2, Stop, StopCopy),
        ]
    );
    assert_eq!(
        src.finish,
        (0..3).map(|i| arc(i, StopCopy, Stop)).collect::<Vec<_>>()
    );
    let dst = &plan.target;
    let prepare = [
        arc(0, Running, RunningP2p),
        arc(1, Running, RunningP2p),
        arc(0, RunningP2p, Stop),
        arc(0, Stop, Resuming),
        arc(1, RunningP2p, Stop),
        arc(1, Stop, Resuming),
        arc(2, Running, Stop),
        arc(2, Stop, Resuming),
    ];
    assert_eq!(dst.prepare, prepare);
    assert_eq!(
        dst.loaded,
        (0..3).map(|i| arc(i, Resuming, Stop)).collect::<Vec<_>>()
    );
    assert_eq!(
        dst.quiesced,
        [arc(0, Stop, RunningP2p), arc(1, Stop, RunningP2p)]
    );
    assert_eq!(
        dst.running,
        [
            arc(0, RunningP2p, Running),
            arc(1, RunningP2p, Running),
            arc(2, Stop, Running)
        ]
    );
}

#[test]
fn a_lone_device_without_p2p_needs_no_p2p_off() {
    let plan = plan_device_migration(&[info("solo", SC, false)]).expect("plan");
    assert!(plan.source.quiesce.is_empty());
    assert_eq!(
        plan.source.stop_copy,
        [arc(0, Running, Stop), arc(0, Stop, StopCopy)]
    );
    assert_eq!(plan.target.running, [arc(0, Stop, Running)]);
    assert_eq!(
        plan_device_migration(&[]),
        Ok(DeviceMigrationPlan::default())
    );
}

#[test]
fn refusals_name_the_device_and_the_remedy() {
    let err = plan_device_migration(&[info("a", SC | P2P, false), info("b", SC, false)])
        .expect_err("b has no P2P");
    assert_eq!(
        err,
        PlanError::NeedsP2p {
            id: "b".into(),
            peers: 1
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("device b ") && text.contains("set p2p=off on it"),
        "{text}"
    );

    let err = plan_device_migration(&[info("a", SC | P2P, false), info("old", P2P, true)])
        .expect_err("old cannot migrate");
    let text = err.to_string();
    assert!(
        text.contains("device old does not support migration"),
        "{text}"
    );
    assert!(text.contains("hot-unplug it"), "{text}");
}

#[test]
fn abort_plan_refuses_what_needs_a_reset() {
    let vm = [info("a", SC | P2P, false), info("b", SC | P2P, false)];
    let plan = plan_device_migration(&vm).expect("plan");
    let err = source_abort_plan(&plan.devices, &[Stop, Error]).expect_err("ERROR");
    assert!(matches!(err, PlanError::Fsm { ref id, source: FsmError::InError } if id == "b"));
    let err = source_abort_plan(&plan.devices, &[Resuming, Stop]).expect_err("RESUMING");
    assert!(matches!(err, PlanError::Fsm { ref id, source: FsmError::ResumingAbort } if id == "a"));
    let err = source_abort_plan(&plan.devices, &[Stop]).expect_err("count");
    assert_eq!(
        err,
        PlanError::StateCount {
            devices: 2,
            states: 1
        }
    );
    // Both quiesce before either runs again.
    let arcs = source_abort_plan(&plan.devices, &[StopCopy, Stop]).expect("abort");
    assert_eq!(
        arcs,
        [
            arc(0, StopCopy, Stop),
            arc(0, Stop, RunningP2p),
            arc(1, Stop, RunningP2p),
            arc(0, RunningP2p, Running),
            arc(1, RunningP2p, Running),
        ]
    );
}
