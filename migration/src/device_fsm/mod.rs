//! The migration state machine of VFIO passthrough devices, and the plan that walks every
//! passthrough device of a VM through it during a live migration.
//!
//! This is pure: no KVM, no sockets, no I/O. The VMM's passthrough drivers (vfio-user and kernel
//! VFIO) execute the [`DeviceArc`]s computed here, one `SET_STATE` per arc.
//!
//! The device states, the migration capability flags and the legal arcs follow the Linux uAPI
//! (`enum vfio_device_mig_state` and `VFIO_DEVICE_FEATURE_MIGRATION` in
//! `include/uapi/linux/vfio.h`); the choice of path between two states follows the rules the
//! header states and the kernel's `vfio_mig_get_next_state()` implements: the shortest path,
//! no saving-group state as an interior step, `STOP_COPY` never back to a pre-copy state.
//!
//! The kernel accepts a distant target and walks the combination itself, but we always issue
//! single direct arcs: a vfio-user server only has to implement the direct arcs, so the same
//! plan drives both kinds of device, and a failure always names the one arc that failed.

mod plan;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;

use thiserror::Error;

pub use plan::{
    plan_device_migration, source_abort_plan, DeviceMigrationPlan, PassthroughMigInfo, PlanError,
    PlannedDevice, SourcePhases, TargetPhases,
};

/// A migration state of a VFIO device, with the uAPI's numeric values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceMigState {
    /// The device failed a transition and must be reset.
    Error = 0,
    /// Stopped: no DMA, no interrupts, internal state frozen.
    Stop = 1,
    /// Fully operational.
    Running = 2,
    /// Stopped, with the device state readable from the data session.
    StopCopy = 3,
    /// Stopped, loading a device state written into the data session.
    Resuming = 4,
    /// Running, but initiating no peer-to-peer DMA (needs [`MigrationCaps::P2P`]).
    RunningP2p = 5,
    /// Running while its state is streamed ahead (needs [`MigrationCaps::PRE_COPY`]).
    PreCopy = 6,
    /// [`DeviceMigState::PreCopy`] without initiating peer-to-peer DMA (needs both flags).
    PreCopyP2p = 7,
}

impl DeviceMigState {
    /// Every state, in numeric order.
    pub const ALL: [DeviceMigState; 8] = [
        Self::Error,
        Self::Stop,
        Self::Running,
        Self::StopCopy,
        Self::Resuming,
        Self::RunningP2p,
        Self::PreCopy,
        Self::PreCopyP2p,
    ];

    /// The state with the uAPI value `value`, if there is one.
    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(value).ok()?).copied()
    }

    /// The uAPI value of the state.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The uAPI's name of the state (`VFIO_DEVICE_STATE_` left off).
    pub fn name(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Stop => "STOP",
            Self::Running => "RUNNING",
            Self::StopCopy => "STOP_COPY",
            Self::Resuming => "RESUMING",
            Self::RunningP2p => "RUNNING_P2P",
            Self::PreCopy => "PRE_COPY",
            Self::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// Whether the state is in the saving group (one outgoing data session shared by all three).
    pub fn is_saving(self) -> bool {
        matches!(self, Self::PreCopy | Self::PreCopyP2p | Self::StopCopy)
    }

    /// Whether the state has a data session open (the saving group, or resuming).
    pub fn has_data_session(self) -> bool {
        self.is_saving() || self == Self::Resuming
    }

    /// Whether the device initiates no peer-to-peer DMA in this state (stopped or P2P-quiesced;
    /// ERROR is not counted as quiet, since nothing is known of a failed device).
    pub fn is_p2p_quiet(self) -> bool {
        matches!(
            self,
            Self::Stop | Self::StopCopy | Self::Resuming | Self::RunningP2p | Self::PreCopyP2p
        )
    }
}

impl fmt::Display for DeviceMigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The migration flags a device reports through `VFIO_DEVICE_FEATURE_MIGRATION`.
///
/// Bits this build does not know are kept in [`MigrationCaps::bits`] but ignored by the state
/// machine: the uAPI leaves other combinations to be defined in the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationCaps(u64);

impl MigrationCaps {
    /// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING; without it, no migration.
    pub const STOP_COPY: Self = Self(1 << 0);
    /// `VFIO_MIGRATION_P2P`: the RUNNING_P2P quiescent state.
    pub const P2P: Self = Self(1 << 1);
    /// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and PRE_COPY_P2P together with P2P).
    pub const PRE_COPY: Self = Self(1 << 2);
    /// No flag at all.
    pub const NONE: Self = Self(0);

    /// Flags as read from the device; unknown bits are kept.
    pub fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The flags as reported, unknown bits included.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the device can migrate at all (STOP_COPY is set).
    pub fn migratable(self) -> bool {
        self.contains(Self::STOP_COPY)
    }

    /// Whether the device has the P2P quiescent states.
    pub fn p2p(self) -> bool {
        self.migratable() && self.contains(Self::P2P)
    }

    /// Whether the device has the pre-copy states.
    pub fn pre_copy(self) -> bool {
        self.migratable() && self.contains(Self::PRE_COPY)
    }

    /// Whether a device with these flags has `state`; ERROR counts as not supported, since it
    /// can neither be requested nor left by a transition.
    pub fn supports(self, state: DeviceMigState) -> bool {
        use DeviceMigState::*;
        match state {
            Error => false,
            Running | Stop | StopCopy | Resuming => self.migratable(),
            RunningP2p => self.p2p(),
            PreCopy => self.pre_copy(),
            PreCopyP2p => self.p2p() && self.pre_copy(),
        }
    }
}

impl std::ops::BitOr for MigrationCaps {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for MigrationCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::STOP_COPY, "STOP_COPY"),
            (Self::P2P, "P2P"),
            (Self::PRE_COPY, "PRE_COPY"),
        ];
        let known: Vec<&str> = names
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect();
        if known.is_empty() {
            f.write_str("none")?;
        } else {
            f.write_str(&known.join("|"))?;
        }
        let unknown = self.0 & !(Self::STOP_COPY.0 | Self::P2P.0 | Self::PRE_COPY.0);
        if unknown != 0 {
            write!(f, " (+unknown {unknown:#x})")?;
        }
        Ok(())
    }
}

/// Why a device cannot be moved between two states.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FsmError {
    /// The device lacks `VFIO_MIGRATION_STOP_COPY`.
    #[error("the device does not support migration (migration flags: {0})")]
    NoMigration(MigrationCaps),
    /// A state the device's flags do not offer.
    #[error("{state} is not supported by a device with migration flags {caps}")]
    Unsupported {
        /// The state asked for or started from.
        state: DeviceMigState,
        /// The device's flags.
        caps: MigrationCaps,
    },
    /// ERROR was asked for as a target.
    #[error("ERROR cannot be requested as a device state")]
    ErrorTarget,
    /// The device is in ERROR; only a device reset leaves it.
    #[error("the device is in ERROR and must be reset")]
    InError,
    /// An arc the uAPI forbids (`STOP_COPY` back to a pre-copy state).
    #[error("{from} -> {to} is not permitted")]
    Blocked {
        /// Where the device is.
        from: DeviceMigState,
        /// Where it was asked to go.
        to: DeviceMigState,
    },
    /// A RESUMING session cannot be abandoned by transitions, only by a reset.
    #[error("leaving RESUMING without loading the data needs a device reset")]
    ResumingAbort,
    /// No legal path (not expected for any flag combination the uAPI defines).
    #[error("no legal path from {from} to {to}")]
    NoPath {
        /// Where the device is.
        from: DeviceMigState,
        /// Where it was asked to go.
        to: DeviceMigState,
    },
}

/// Whether `from → to` is a direct arc of the uAPI's state machine for a device with `caps`.
///
/// The arcs are the ones the header lists. Where P2P is not supported, the P2P states behave
/// as their non-P2P twins (RUNNING_P2P as RUNNING, PRE_COPY_P2P as PRE_COPY), so the arcs through
/// them collapse into RUNNING ⇄ STOP and PRE_COPY → STOP_COPY, which is what the kernel requires
/// of such drivers. Arcs touching a state `caps` does not offer are not arcs.
pub fn is_direct_arc(caps: MigrationCaps, from: DeviceMigState, to: DeviceMigState) -> bool {
    use DeviceMigState::*;
    if from == to || !caps.supports(from) || !caps.supports(to) {
        return false;
    }
    let p2p = caps.p2p();
    match (from, to) {
        // Always (STOP_COPY): the data sessions in and out of STOP.
        (Stop, StopCopy) | (StopCopy, Stop) | (Stop, Resuming) | (Resuming, Stop) => true,
        // P2P: RUNNING and STOP meet through RUNNING_P2P.
        (Running, RunningP2p) | (RunningP2p, Running) => true,
        (RunningP2p, Stop) | (Stop, RunningP2p) => true,
        // No P2P: RUNNING and STOP meet directly.
        (Running, Stop) | (Stop, Running) => !p2p,
        // PRE_COPY: a saving session while running.
        (Running, PreCopy) | (PreCopy, Running) => true,
        // PRE_COPY and P2P: the quiescent twin of PRE_COPY, the way into STOP_COPY.
        (PreCopy, PreCopyP2p) | (PreCopyP2p, PreCopy) => true,
        (RunningP2p, PreCopyP2p) | (PreCopyP2p, RunningP2p) => true,
        (PreCopyP2p, StopCopy) => true,
        // PRE_COPY without P2P: straight into STOP_COPY.
        (PreCopy, StopCopy) => !p2p,
        _ => false,
    }
}

/// Whether the path `from → … → to` may pass through `interior`.
///
/// The uAPI forbids saving-group states as interior steps. The one exception, which the
/// kernel's own table takes (PRE_COPY → PRE_COPY_P2P → STOP_COPY), is a move that stays inside
/// the saving group from start to end: it never leaves the open data session.
fn interior_allowed(in_session: bool, interior: DeviceMigState, to: DeviceMigState) -> bool {
    !interior.has_data_session() || (in_session && interior.is_saving() && to.is_saving())
}

/// Check that a move from `cur` to `target` may be asked for at all.
fn check_move(
    caps: MigrationCaps,
    cur: DeviceMigState,
    target: DeviceMigState,
) -> Result<(), FsmError> {
    use DeviceMigState::*;
    if !caps.migratable() {
        return Err(FsmError::NoMigration(caps));
    }
    if target == Error {
        return Err(FsmError::ErrorTarget);
    }
    if cur == Error {
        return Err(FsmError::InError);
    }
    for state in [cur, target] {
        if !caps.supports(state) {
            return Err(FsmError::Unsupported { state, caps });
        }
    }
    if cur == StopCopy && matches!(target, PreCopy | PreCopyP2p) {
        return Err(FsmError::Blocked {
            from: cur,
            to: target,
        });
    }
    Ok(())
}

/// The states after each arc of the legal path from `from` to `to` (empty when `from == to`).
///
/// The path is the shortest one made of [`is_direct_arc`] arcs in which no state with a data
/// session is an interior step (except a move kept inside the saving group, as the kernel does).
pub fn path(
    caps: MigrationCaps,
    from: DeviceMigState,
    to: DeviceMigState,
) -> Result<Vec<DeviceMigState>, FsmError> {
    check_move(caps, from, to)?;
    if from == to {
        return Ok(Vec::new());
    }
    // Breadth-first over (state, still inside the starting saving session); 16 nodes at most.
    let node =
        |state: DeviceMigState, in_session: bool| state as usize * 2 + usize::from(in_session);
    let mut previous: [Option<usize>; 16] = [None; 16];
    let start = node(from, from.is_saving());
    let mut queue = VecDeque::from([(from, from.is_saving())]);
    let mut seen = [false; 16];
    seen[start] = true;
    while let Some((state, in_session)) = queue.pop_front() {
        for next in DeviceMigState::ALL {
            if !is_direct_arc(caps, state, next) {
                continue;
            }
            let here = node(state, in_session);
            if next == to {
                return Ok(unwind(&previous, here, start, to));
            }
            if !interior_allowed(in_session, next, to) {
                continue;
            }
            let next_session = in_session && next.is_saving();
            let there = node(next, next_session);
            if !seen[there] {
                seen[there] = true;
                previous[there] = Some(here);
                queue.push_back((next, next_session));
            }
        }
    }
    Err(FsmError::NoPath { from, to })
}

/// Rebuild the path that reached `to` from node `last`, back to `start`.
fn unwind(
    previous: &[Option<usize>; 16],
    last: usize,
    start: usize,
    to: DeviceMigState,
) -> Vec<DeviceMigState> {
    let mut states = vec![to];
    let mut at = last;
    while at != start {
        states.push(DeviceMigState::ALL[at / 2]);
        match previous[at] {
            Some(before) => at = before,
            None => break,
        }
    }
    states.reverse();
    states
}

/// The next state on the legal path from `cur` to `target` (`cur` itself when already there),
/// as the kernel's `vfio_mig_get_next_state()` chooses it.
pub fn next_state(
    caps: MigrationCaps,
    cur: DeviceMigState,
    target: DeviceMigState,
) -> Result<DeviceMigState, FsmError> {
    Ok(path(caps, cur, target)?.first().copied().unwrap_or(cur))
}

/// One direct arc for one passthrough device (its index in the VM's registry order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceArc {
    /// Index of the device in the slice the plan was made from.
    pub device: usize,
    /// The state the device is in before the arc.
    pub from: DeviceMigState,
    /// The state the arc moves it to.
    pub to: DeviceMigState,
}

impl fmt::Display for DeviceArc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}: {} -> {}", self.device, self.from, self.to)
    }
}

/// The legal path from `from` to `to` as direct arcs for device `device`.
pub fn device_arcs(
    device: usize,
    caps: MigrationCaps,
    from: DeviceMigState,
    to: DeviceMigState,
) -> Result<Vec<DeviceArc>, FsmError> {
    let mut at = from;
    Ok(path(caps, from, to)?
        .into_iter()
        .map(|next| {
            let arc = DeviceArc {
                device,
                from: at,
                to: next,
            };
            at = next;
            arc
        })
        .collect())
}

/// The arcs that bring source device `device` from `current` back to RUNNING after a failed or
/// cancelled migration (e.g. STOP_COPY → STOP → RUNNING_P2P → RUNNING with P2P).
///
/// A device in RESUMING or ERROR has no such path: the caller resets it instead, as it does when
/// one of these arcs fails. Use [`source_abort_plan`] to order the arcs of several devices.
pub fn source_abort_path(
    device: usize,
    caps: MigrationCaps,
    current: DeviceMigState,
) -> Result<Vec<DeviceArc>, FsmError> {
    if current == DeviceMigState::Resuming && caps.migratable() {
        return Err(FsmError::ResumingAbort);
    }
    device_arcs(device, caps, current, DeviceMigState::Running)
}
