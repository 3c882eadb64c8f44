//! The VFIO v2 migration state machine, written from the comment block above
//! `enum vfio_device_mig_state` in the kernel's `include/uapi/linux/vfio.h` and the vfio-user
//! spec's "Direct State Transitions": which states a capability set offers, and which arcs are
//! *direct*.
//!
//! Our choice (on purpose, unlike the kernel): only direct arcs are accepted. The kernel also
//! accepts a multi-step target and walks the arcs itself; this device refuses such a request
//! with EINVAL and changes nothing, so that a client's own walking of the arcs is exercised.
//! A request for the current state is accepted as a no-op (the kernel does the same).

use crate::device::DeviceState;

/// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`: RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY).
pub const MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and PRE_COPY_P2P with P2P).
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;
/// Every capability.
pub const MIGRATION_ALL: u64 = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY;

/// The kernel's direct arcs when every optional state is supported.
const ARCS: [(DeviceState, DeviceState); 15] = {
    use DeviceState::*;
    [
        (RunningP2p, Stop),
        (StopCopy, Stop),
        (Resuming, Stop),
        (PreCopy, Running),
        (RunningP2p, Running),
        (PreCopyP2p, RunningP2p),
        (Running, RunningP2p),
        (Stop, RunningP2p),
        (Running, PreCopy),
        (RunningP2p, PreCopyP2p),
        (Stop, StopCopy),
        (PreCopy, PreCopyP2p),
        (PreCopyP2p, PreCopy),
        (PreCopyP2p, StopCopy),
        (Stop, Resuming),
    ]
};

/// Arcs that become direct when the P2P states are absent: the kernel skips over an
/// unsupported optional state (RUNNING -> RUNNING_P2P -> STOP is seen as RUNNING -> STOP, and
/// so on); the vfio-user spec lists exactly these for its P2P-less machine.
const ARCS_WITHOUT_P2P: [(DeviceState, DeviceState); 3] = {
    use DeviceState::*;
    [(Running, Stop), (Stop, Running), (PreCopy, StopCopy)]
};

impl DeviceState {
    /// Every state, in enum order.
    pub const ALL: [DeviceState; 8] = {
        use DeviceState::*;
        [
            Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
        ]
    };

    /// The state with the `enum vfio_device_mig_state` value `v`.
    pub fn from_u32(v: u32) -> Option<DeviceState> {
        Self::ALL.get(usize::try_from(v).ok()?).copied()
    }

    /// Whether `caps` (`VFIO_MIGRATION_*`) offers this state. RUNNING always; ERROR is never
    /// a valid target.
    pub fn supported(self, caps: u64) -> bool {
        use DeviceState::*;
        let stop_copy = caps & MIGRATION_STOP_COPY != 0;
        let p2p = stop_copy && caps & MIGRATION_P2P != 0;
        let pre = stop_copy && caps & MIGRATION_PRE_COPY != 0;
        match self {
            Running => true,
            Error => false,
            Stop | StopCopy | Resuming => stop_copy,
            RunningP2p => p2p,
            PreCopy => pre,
            PreCopyP2p => p2p && pre,
        }
    }

    /// The kernel's name (`VFIO_DEVICE_STATE_` left out): `RUNNING`, `STOP_COPY`, ...
    pub fn name(self) -> &'static str {
        use DeviceState::*;
        match self {
            Error => "ERROR",
            Stop => "STOP",
            Running => "RUNNING",
            StopCopy => "STOP_COPY",
            Resuming => "RESUMING",
            RunningP2p => "RUNNING_P2P",
            PreCopy => "PRE_COPY",
            PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The state named `name` as the kernel names it ([`DeviceState::name`]; case ignored).
    pub fn from_name(name: &str) -> Option<DeviceState> {
        Self::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY: the states that share a saving session.
    pub fn is_saving(self) -> bool {
        matches!(
            self,
            DeviceState::PreCopy | DeviceState::PreCopyP2p | DeviceState::StopCopy
        )
    }
}

/// Whether `from -> to` is a direct arc of the machine restricted to `caps`.
pub fn is_direct_arc(caps: u64, from: DeviceState, to: DeviceState) -> bool {
    if !from.supported(caps) || !to.supported(caps) || from == to {
        return false;
    }
    let arc = (from, to);
    ARCS.contains(&arc) || (caps & MIGRATION_P2P == 0 && ARCS_WITHOUT_P2P.contains(&arc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceState::*;

    /// The arcs written out by hand per capability set, from the header's list (and the
    /// vfio-user spec's P2P-less list), independently of the tables above.
    fn expected(caps: u64) -> Vec<(DeviceState, DeviceState)> {
        let stop = vec![
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
        ];
        let mut v = stop;
        match (caps & MIGRATION_P2P != 0, caps & MIGRATION_PRE_COPY != 0) {
            (false, false) => v.extend([(Running, Stop), (Stop, Running)]),
            (true, false) => v.extend([
                (Running, RunningP2p),
                (RunningP2p, Running),
                (RunningP2p, Stop),
                (Stop, RunningP2p),
            ]),
            (false, true) => v.extend([
                (Running, Stop),
                (Stop, Running),
                (Running, PreCopy),
                (PreCopy, Running),
                (PreCopy, StopCopy),
            ]),
            (true, true) => v.extend([
                (Running, RunningP2p),
                (RunningP2p, Running),
                (RunningP2p, Stop),
                (Stop, RunningP2p),
                (Running, PreCopy),
                (PreCopy, Running),
                (RunningP2p, PreCopyP2p),
                (PreCopyP2p, RunningP2p),
                (PreCopy, PreCopyP2p),
                (PreCopyP2p, PreCopy),
                (PreCopyP2p, StopCopy),
            ]),
        }
        v
    }

    #[test]
    fn every_direct_arc_and_nothing_else() {
        for extra in [
            0,
            MIGRATION_P2P,
            MIGRATION_PRE_COPY,
            MIGRATION_P2P | MIGRATION_PRE_COPY,
        ] {
            let caps = MIGRATION_STOP_COPY | extra;
            let want = expected(caps);
            for from in DeviceState::ALL {
                for to in DeviceState::ALL {
                    assert_eq!(
                        is_direct_arc(caps, from, to),
                        want.contains(&(from, to)),
                        "caps {caps:#x}: {from:?} -> {to:?}"
                    );
                }
            }
        }
        // Never: STOP_COPY -> PRE_COPY*, anything -> ERROR, ERROR -> anything.
        for to in [PreCopy, PreCopyP2p] {
            assert!(!is_direct_arc(MIGRATION_ALL, StopCopy, to));
        }
        for s in DeviceState::ALL {
            assert!(!is_direct_arc(MIGRATION_ALL, s, Error));
            assert!(!is_direct_arc(MIGRATION_ALL, Error, s));
        }
    }

    #[test]
    fn no_migration_means_no_arcs() {
        for caps in [0, MIGRATION_P2P, MIGRATION_PRE_COPY] {
            for from in DeviceState::ALL {
                for to in DeviceState::ALL {
                    assert!(!is_direct_arc(caps, from, to), "{caps:#x} {from:?} {to:?}");
                }
            }
        }
        assert!(Running.supported(0) && !Stop.supported(0));
    }

    #[test]
    fn state_values() {
        for (i, s) in DeviceState::ALL.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
            assert_eq!(DeviceState::from_u32(i as u32), Some(*s));
        }
        assert_eq!(DeviceState::from_u32(8), None);
        for s in DeviceState::ALL {
            assert_eq!(DeviceState::from_name(s.name()), Some(s));
        }
        assert_eq!(DeviceState::from_name("running_p2p"), Some(RunningP2p));
        assert_eq!(DeviceState::from_name("STOPPED"), None);
        assert_eq!(DeviceState::from_u32(u32::MAX), None);
    }
}
