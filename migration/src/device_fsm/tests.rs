//! Tests of the device state machine against tables written by hand from the uAPI header's
//! arc list and the kernel's documented combination transitions.

use std::collections::BTreeSet;

use super::*;
use DeviceMigState::*;

const SC: MigrationCaps = MigrationCaps::STOP_COPY;
const P2P: MigrationCaps = MigrationCaps::P2P;
const PRE: MigrationCaps = MigrationCaps::PRE_COPY;

/// Parse a state by its uAPI name.
fn state(name: &str) -> DeviceMigState {
    DeviceMigState::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .unwrap_or_else(|| panic!("no state {name}"))
}

/// The four capability sets that can migrate.
fn migratable_caps() -> [MigrationCaps; 4] {
    [SC, SC | P2P, SC | PRE, SC | P2P | PRE]
}

/// The direct arcs of each capability set, by hand from the header (P2P states collapsed into
/// their non-P2P twins where P2P is missing, as the kernel requires of such drivers).
fn expected_arcs(caps: MigrationCaps) -> BTreeSet<(DeviceMigState, DeviceMigState)> {
    let base = "STOP>STOP_COPY STOP_COPY>STOP STOP>RESUMING RESUMING>STOP";
    let text = match (caps.p2p(), caps.pre_copy()) {
        (false, false) => format!("{base} RUNNING>STOP STOP>RUNNING"),
        (true, false) => format!(
            "{base} RUNNING>RUNNING_P2P RUNNING_P2P>RUNNING RUNNING_P2P>STOP STOP>RUNNING_P2P"
        ),
        (false, true) => format!(
            "{base} RUNNING>STOP STOP>RUNNING RUNNING>PRE_COPY PRE_COPY>RUNNING \
             PRE_COPY>STOP_COPY"
        ),
        (true, true) => format!(
            "{base} RUNNING>RUNNING_P2P RUNNING_P2P>RUNNING RUNNING_P2P>STOP STOP>RUNNING_P2P \
             RUNNING>PRE_COPY PRE_COPY>RUNNING PRE_COPY>PRE_COPY_P2P PRE_COPY_P2P>PRE_COPY \
             PRE_COPY_P2P>RUNNING_P2P RUNNING_P2P>PRE_COPY_P2P PRE_COPY_P2P>STOP_COPY"
        ),
    };
    text.split_whitespace()
        .map(|arc| {
            let (from, to) = arc.split_once('>').expect("arc");
            (state(from), state(to))
        })
        .collect()
}

/// The expected paths of each capability set, by hand: `FROM>TO: STATE STATE …` (the states
/// after each arc), `FROM>TO: blocked` for the refused STOP_COPY → pre-copy moves. Pairs of
/// supported states not listed are `from == to` (empty path).
fn expected_paths(caps: MigrationCaps) -> &'static str {
    match (caps.p2p(), caps.pre_copy()) {
        (false, false) => {
            "RUNNING>STOP: STOP | RUNNING>STOP_COPY: STOP STOP_COPY | RUNNING>RESUMING: STOP RESUMING |
             STOP>RUNNING: RUNNING | STOP>STOP_COPY: STOP_COPY | STOP>RESUMING: RESUMING |
             STOP_COPY>STOP: STOP | STOP_COPY>RUNNING: STOP RUNNING | STOP_COPY>RESUMING: STOP RESUMING |
             RESUMING>STOP: STOP | RESUMING>RUNNING: STOP RUNNING | RESUMING>STOP_COPY: STOP STOP_COPY"
        }
        (true, false) => {
            "RUNNING>RUNNING_P2P: RUNNING_P2P | RUNNING>STOP: RUNNING_P2P STOP |
             RUNNING>STOP_COPY: RUNNING_P2P STOP STOP_COPY | RUNNING>RESUMING: RUNNING_P2P STOP RESUMING |
             RUNNING_P2P>RUNNING: RUNNING | RUNNING_P2P>STOP: STOP | RUNNING_P2P>STOP_COPY: STOP STOP_COPY |
             RUNNING_P2P>RESUMING: STOP RESUMING |
             STOP>RUNNING: RUNNING_P2P RUNNING | STOP>RUNNING_P2P: RUNNING_P2P | STOP>STOP_COPY: STOP_COPY |
             STOP>RESUMING: RESUMING |
             STOP_COPY>STOP: STOP | STOP_COPY>RUNNING_P2P: STOP RUNNING_P2P |
             STOP_COPY>RUNNING: STOP RUNNING_P2P RUNNING | STOP_COPY>RESUMING: STOP RESUMING |
             RESUMING>STOP: STOP | RESUMING>RUNNING_P2P: STOP RUNNING_P2P |
             RESUMING>RUNNING: STOP RUNNING_P2P RUNNING | RESUMING>STOP_COPY: STOP STOP_COPY"
        }
        (false, true) => {
            "RUNNING>STOP: STOP | RUNNING>STOP_COPY: STOP STOP_COPY | RUNNING>RESUMING: STOP RESUMING |
             RUNNING>PRE_COPY: PRE_COPY |
             STOP>RUNNING: RUNNING | STOP>STOP_COPY: STOP_COPY | STOP>RESUMING: RESUMING |
             STOP>PRE_COPY: RUNNING PRE_COPY |
             STOP_COPY>STOP: STOP | STOP_COPY>RUNNING: STOP RUNNING | STOP_COPY>RESUMING: STOP RESUMING |
             STOP_COPY>PRE_COPY: blocked |
             RESUMING>STOP: STOP | RESUMING>RUNNING: STOP RUNNING | RESUMING>STOP_COPY: STOP STOP_COPY |
             RESUMING>PRE_COPY: STOP RUNNING PRE_COPY |
             PRE_COPY>RUNNING: RUNNING | PRE_COPY>STOP: RUNNING STOP | PRE_COPY>STOP_COPY: STOP_COPY |
             PRE_COPY>RESUMING: RUNNING STOP RESUMING"
        }
        (true, true) => {
            "RUNNING>RUNNING_P2P: RUNNING_P2P | RUNNING>STOP: RUNNING_P2P STOP |
             RUNNING>STOP_COPY: RUNNING_P2P STOP STOP_COPY | RUNNING>RESUMING: RUNNING_P2P STOP RESUMING |
             RUNNING>PRE_COPY: PRE_COPY | RUNNING>PRE_COPY_P2P: RUNNING_P2P PRE_COPY_P2P |
             RUNNING_P2P>RUNNING: RUNNING | RUNNING_P2P>STOP: STOP | RUNNING_P2P>STOP_COPY: STOP STOP_COPY |
             RUNNING_P2P>RESUMING: STOP RESUMING | RUNNING_P2P>PRE_COPY: RUNNING PRE_COPY |
             RUNNING_P2P>PRE_COPY_P2P: PRE_COPY_P2P |
             STOP>RUNNING: RUNNING_P2P RUNNING | STOP>RUNNING_P2P: RUNNING_P2P | STOP>STOP_COPY: STOP_COPY |
             STOP>RESUMING: RESUMING | STOP>PRE_COPY: RUNNING_P2P RUNNING PRE_COPY |
             STOP>PRE_COPY_P2P: RUNNING_P2P PRE_COPY_P2P |
             STOP_COPY>STOP: STOP | STOP_COPY>RUNNING_P2P: STOP RUNNING_P2P |
             STOP_COPY>RUNNING: STOP RUNNING_P2P RUNNING | STOP_COPY>RESUMING: STOP RESUMING |
             STOP_COPY>PRE_COPY: blocked | STOP_COPY>PRE_COPY_P2P: blocked |
             RESUMING>STOP: STOP | RESUMING>RUNNING_P2P: STOP RUNNING_P2P |
             RESUMING>RUNNING: STOP RUNNING_P2P RUNNING | RESUMING>STOP_COPY: STOP STOP_COPY |
             RESUMING>PRE_COPY: STOP RUNNING_P2P RUNNING PRE_COPY |
             RESUMING>PRE_COPY_P2P: STOP RUNNING_P2P PRE_COPY_P2P |
             PRE_COPY>RUNNING: RUNNING | PRE_COPY>RUNNING_P2P: RUNNING RUNNING_P2P |
             PRE_COPY>STOP: RUNNING RUNNING_P2P STOP | PRE_COPY>STOP_COPY: PRE_COPY_P2P STOP_COPY |
             PRE_COPY>RESUMING: RUNNING RUNNING_P2P STOP RESUMING | PRE_COPY>PRE_COPY_P2P: PRE_COPY_P2P |
             PRE_COPY_P2P>RUNNING_P2P: RUNNING_P2P | PRE_COPY_P2P>RUNNING: RUNNING_P2P RUNNING |
             PRE_COPY_P2P>STOP: RUNNING_P2P STOP | PRE_COPY_P2P>STOP_COPY: STOP_COPY |
             PRE_COPY_P2P>RESUMING: RUNNING_P2P STOP RESUMING | PRE_COPY_P2P>PRE_COPY: PRE_COPY"
        }
    }
}

/// What `path` should answer for a pair of states.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Path(Vec<DeviceMigState>),
    Blocked,
}

/// The hand-written table of `caps`, keyed by (from, to).
fn expected_table(
    caps: MigrationCaps,
) -> std::collections::BTreeMap<(DeviceMigState, DeviceMigState), Expected> {
    let mut table = std::collections::BTreeMap::new();
    for entry in expected_paths(caps).split('|') {
        let (pair, result) = entry.split_once(':').expect("entry");
        let (from, to) = pair.trim().split_once('>').expect("pair");
        let expected = match result.trim() {
            "blocked" => Expected::Blocked,
            states => Expected::Path(states.split_whitespace().map(state).collect()),
        };
        assert!(table.insert((state(from), state(to)), expected).is_none());
    }
    table
}

/// The states each capability set offers, by hand from the `VFIO_DEVICE_FEATURE_MIGRATION` text.
fn expected_states(caps: MigrationCaps) -> Vec<DeviceMigState> {
    let mut states = vec![Stop, Running, StopCopy, Resuming];
    if caps.contains(P2P) {
        states.push(RunningP2p);
    }
    if caps.contains(PRE) {
        states.push(PreCopy);
    }
    if caps.contains(P2P | PRE) {
        states.push(PreCopyP2p);
    }
    states
}

#[test]
fn numeric_values_and_names_follow_the_uapi() {
    let expected = [
        (0, "ERROR"),
        (1, "STOP"),
        (2, "RUNNING"),
        (3, "STOP_COPY"),
        (4, "RESUMING"),
        (5, "RUNNING_P2P"),
        (6, "PRE_COPY"),
        (7, "PRE_COPY_P2P"),
    ];
    for (value, name) in expected {
        let s = DeviceMigState::from_u32(value).expect("known value");
        assert_eq!(s.as_u32(), value);
        assert_eq!(s.to_string(), name);
    }
    assert_eq!(DeviceMigState::from_u32(8), None);
    assert_eq!(DeviceMigState::from_u32(u32::MAX), None);
}

#[test]
fn caps_keep_unknown_bits_and_ignore_them() {
    assert_eq!((SC.bits(), P2P.bits(), PRE.bits()), (1, 2, 4));
    let odd = MigrationCaps::from_bits(0x1_0000_0009);
    assert_eq!(odd.bits(), 0x1_0000_0009);
    assert!(odd.migratable() && !odd.p2p() && !odd.pre_copy());
    assert_eq!(odd.to_string(), "STOP_COPY (+unknown 0x100000008)");
    assert_eq!(MigrationCaps::NONE.to_string(), "none");
    for from in DeviceMigState::ALL {
        for to in DeviceMigState::ALL {
            assert_eq!(is_direct_arc(odd, from, to), is_direct_arc(SC, from, to));
            assert_eq!(path(odd, from, to).is_ok(), path(SC, from, to).is_ok());
        }
    }
    // P2P or PRE_COPY without STOP_COPY means no migration at all.
    for caps in [MigrationCaps::NONE, P2P, PRE, P2P | PRE] {
        assert!(!caps.p2p() && !caps.pre_copy());
        for from in DeviceMigState::ALL {
            assert!(!caps.supports(from));
            for to in DeviceMigState::ALL {
                assert!(!is_direct_arc(caps, from, to));
                assert_eq!(path(caps, from, to), Err(FsmError::NoMigration(caps)));
            }
        }
    }
}

#[test]
fn supported_states_follow_the_flags() {
    for caps in migratable_caps() {
        let expected = expected_states(caps);
        for s in DeviceMigState::ALL {
            assert_eq!(caps.supports(s), expected.contains(&s), "{caps} {s}");
        }
    }
}

#[test]
fn direct_arcs_are_exactly_the_headers() {
    for caps in migratable_caps() {
        let expected = expected_arcs(caps);
        for from in DeviceMigState::ALL {
            for to in DeviceMigState::ALL {
                assert_eq!(
                    is_direct_arc(caps, from, to),
                    expected.contains(&(from, to)),
                    "{caps}: {from} -> {to}"
                );
            }
        }
    }
}

/// Check the shape of a path: single direct arcs, no data-session state in the interior unless
/// the whole move stays in the saving group, never STOP_COPY → a pre-copy state.
fn check_shape(caps: MigrationCaps, from: DeviceMigState, steps: &[DeviceMigState]) {
    let all_saving = from.is_saving() && steps.iter().all(|s| s.is_saving());
    let mut at = from;
    for (i, &next) in steps.iter().enumerate() {
        assert!(is_direct_arc(caps, at, next), "{caps}: {at} -> {next}");
        assert!(!(at == StopCopy && matches!(next, PreCopy | PreCopyP2p)));
        let interior = i + 1 < steps.len();
        if interior && next.has_data_session() {
            assert!(
                all_saving,
                "{caps}: {from} path {steps:?} has {next} inside"
            );
        }
        at = next;
    }
}

#[test]
fn paths_match_the_kernels_table_for_every_flag_set_and_pair() {
    for caps in migratable_caps() {
        let table = expected_table(caps);
        let supported = expected_states(caps);
        let mut checked = 0;
        for from in DeviceMigState::ALL {
            for to in DeviceMigState::ALL {
                let got = path(caps, from, to);
                let context = format!("{caps}: {from} -> {to}: {got:?}");
                if to == Error {
                    assert_eq!(got, Err(FsmError::ErrorTarget), "{context}");
                } else if from == Error {
                    assert_eq!(got, Err(FsmError::InError), "{context}");
                } else if !supported.contains(&from) || !supported.contains(&to) {
                    assert!(
                        matches!(got, Err(FsmError::Unsupported { .. })),
                        "{context}"
                    );
                } else if from == to {
                    assert_eq!(got, Ok(Vec::new()), "{context}");
                    assert_eq!(next_state(caps, from, to), Ok(from));
                } else {
                    match table.get(&(from, to)) {
                        Some(Expected::Blocked) => {
                            assert_eq!(got, Err(FsmError::Blocked { from, to }), "{context}")
                        }
                        Some(Expected::Path(expected)) => {
                            assert_eq!(got.as_ref(), Ok(expected), "{context}");
                            check_shape(caps, from, expected);
                            assert_eq!(next_state(caps, from, to), Ok(expected[0]));
                        }
                        None => panic!("table lacks {context}"),
                    }
                    checked += 1;
                }
            }
        }
        // Every ordered pair of distinct supported states is in the hand-written table.
        let n = supported.len();
        assert_eq!(checked, n * (n - 1), "{caps}");
        assert_eq!(table.len(), checked, "{caps}");
    }
}

/// Every legal path of at most `max` arcs from `from` to `to` (saving rule applied).
fn legal_paths(
    caps: MigrationCaps,
    from: DeviceMigState,
    to: DeviceMigState,
    max: usize,
) -> Vec<Vec<DeviceMigState>> {
    fn walk(
        caps: MigrationCaps,
        from: DeviceMigState,
        to: DeviceMigState,
        max: usize,
        so_far: &mut Vec<DeviceMigState>,
        out: &mut Vec<Vec<DeviceMigState>>,
    ) {
        let at = so_far.last().copied().unwrap_or(from);
        if at == to && !so_far.is_empty() {
            out.push(so_far.clone());
            return;
        }
        if so_far.len() == max {
            return;
        }
        if at != from && at.has_data_session() {
            let stays = from.is_saving() && so_far.iter().all(|s| s.is_saving()) && to.is_saving();
            if !stays {
                return;
            }
        }
        for next in DeviceMigState::ALL {
            if is_direct_arc(caps, at, next) && next != from && !so_far.contains(&next) {
                so_far.push(next);
                walk(caps, from, to, max, so_far, out);
                so_far.pop();
            }
        }
    }
    let mut out = Vec::new();
    walk(caps, from, to, max, &mut Vec::new(), &mut out);
    out
}

#[test]
fn the_shortest_legal_path_is_unique() {
    // The rules (shortest, no saving state inside) pin one path; ties would make the choice
    // depend on search order.
    for caps in migratable_caps() {
        for from in expected_states(caps) {
            for to in expected_states(caps) {
                let Ok(chosen) = path(caps, from, to) else {
                    continue;
                };
                if from == to {
                    continue;
                }
                let all = legal_paths(caps, from, to, 7);
                let shortest = all.iter().map(Vec::len).min().expect("some path");
                let ties: Vec<_> = all.iter().filter(|p| p.len() == shortest).collect();
                assert_eq!(ties, vec![&chosen], "{caps}: {from} -> {to}");
            }
        }
    }
}

#[test]
fn abort_paths_return_to_running() {
    for caps in migratable_caps() {
        for current in expected_states(caps) {
            let arcs = source_abort_path(3, caps, current);
            if current == Resuming {
                assert_eq!(arcs, Err(FsmError::ResumingAbort));
                continue;
            }
            let arcs = arcs.expect("abort path");
            let mut at = current;
            for arc in &arcs {
                assert_eq!((arc.device, arc.from), (3, at));
                assert!(is_direct_arc(caps, arc.from, arc.to));
                at = arc.to;
            }
            assert_eq!(at, Running, "{caps}: from {current}");
        }
        assert_eq!(source_abort_path(0, caps, Error), Err(FsmError::InError));
    }
    let hops: Vec<_> = source_abort_path(0, SC | P2P, StopCopy)
        .expect("path")
        .iter()
        .map(|a| a.to)
        .collect();
    assert_eq!(hops, [Stop, RunningP2p, Running]);
}
