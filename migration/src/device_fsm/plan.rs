//! The migration plan of a VM's passthrough devices: which arcs each side runs, in which phase.

use thiserror::Error;

use super::{device_arcs, DeviceArc, DeviceMigState, FsmError, MigrationCaps};

/// What the planner needs to know of one passthrough device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughMigInfo {
    /// The device's id in the VM.
    pub id: String,
    /// The flags the device reports through `VFIO_DEVICE_FEATURE_MIGRATION`.
    pub caps: MigrationCaps,
    /// The device was configured with `p2p=off` (a DMA space with guest RAM only).
    pub p2p_off: bool,
    /// Pre-copy is turned off for this device even if it supports it.
    pub pre_copy_off: bool,
}

/// How the plan treats one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDevice {
    /// The device's id in the VM.
    pub id: String,
    /// The device's migration flags.
    pub caps: MigrationCaps,
    /// The device streams its state ahead in PRE_COPY while the guest runs.
    pub pre_copy: bool,
    /// The device goes through a P2P quiescent state before anything is stopped.
    pub p2p_quiesce: bool,
}

/// The source's phases, each run in order, one arc after the other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePhases {
    /// RUNNING → PRE_COPY, run while the guest still runs.
    pub precopy_start: Vec<DeviceArc>,
    /// After every vCPU is paused: P2P-capable devices stop initiating peer-to-peer DMA.
    pub quiesce: Vec<DeviceArc>,
    /// After the whole quiesce phase: every device into STOP_COPY, its data then read out.
    pub stop_copy: Vec<DeviceArc>,
    /// STOP_COPY → STOP, once the data is drained and the target confirmed.
    pub finish: Vec<DeviceArc>,
}

/// The target's phases, each run in order; the vCPUs resume only after `running`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPhases {
    /// RUNNING → RESUMING via STOP: first every P2P-capable device to RUNNING_P2P, then each
    /// device on to RESUMING; all of it before the first device's data is written.
    pub prepare: Vec<DeviceArc>,
    /// RESUMING → STOP once the device's data is written (the device then checks it).
    pub loaded: Vec<DeviceArc>,
    /// STOP → RUNNING_P2P for P2P-capable devices, all of them before any device runs.
    pub quiesced: Vec<DeviceArc>,
    /// Every device to RUNNING.
    pub running: Vec<DeviceArc>,
}

/// The arcs of both sides for a VM's passthrough devices (each side plans from its own devices).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMigrationPlan {
    /// The devices, in the order given (the index in [`DeviceArc::device`]).
    pub devices: Vec<PlannedDevice>,
    /// What the source runs.
    pub source: SourcePhases,
    /// What the target runs.
    pub target: TargetPhases,
}

/// Why the passthrough devices of a VM cannot be migrated (or brought back).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// A device lacks `VFIO_MIGRATION_STOP_COPY`.
    #[error(
        "passthrough device {id} does not support migration (migration flags: {caps}); \
         hot-unplug it before migrating the VM"
    )]
    NoMigration {
        /// The device's id.
        id: String,
        /// Its migration flags.
        caps: MigrationCaps,
    },
    /// A device without the P2P quiescent state shares peer-to-peer DMA with other devices.
    #[error(
        "passthrough device {id} has no P2P quiescent state (VFIO_MIGRATION_P2P) and the VM has \
         {peers} other passthrough device(s) it may exchange peer-to-peer DMA with, so it cannot \
         be stopped safely; set p2p=off on it (or hot-unplug it) to migrate the VM"
    )]
    NeedsP2p {
        /// The device's id.
        id: String,
        /// How many other passthrough devices the VM has.
        peers: usize,
    },
    /// The state machine refused a move of a device (in the plan or the abort plan).
    #[error("passthrough device {id}: {source}")]
    Fsm {
        /// The device's id.
        id: String,
        /// The state machine's refusal.
        #[source]
        source: FsmError,
    },
    /// The abort plan got a different number of states than devices.
    #[error("{states} device states given for {devices} passthrough devices")]
    StateCount {
        /// Number of devices.
        devices: usize,
        /// Number of states.
        states: usize,
    },
}

/// Check that every device can be migrated together with its peers.
///
/// Peer-to-peer DMA is why the P2P states exist: a device that is already stopped must not
/// receive DMA from a peer that still runs, and a device that still runs must not DMA into a
/// peer that is already stopped. So every device first stops *initiating* peer DMA (the quiesce
/// phase, vCPUs paused) and only when all have done so is any of them stopped.
///
/// A device without that quiescent state is safe in two cases, each keeping it out of the
/// peer-DMA domain: it is the only passthrough device (there is no peer), or it was configured
/// `p2p=off`, which gives it a DMA space of its own holding guest RAM only and keeps its BARs
/// out of its peers' DMA spaces. It can then neither reach a stopped peer nor be reached by a
/// running one, and stopping it straight from RUNNING (or PRE_COPY) is safe. Any other device
/// without P2P is refused.
fn check_devices(infos: &[PassthroughMigInfo]) -> Result<(), PlanError> {
    if let Some(info) = infos.iter().find(|info| !info.caps.migratable()) {
        return Err(PlanError::NoMigration {
            id: info.id.clone(),
            caps: info.caps,
        });
    }
    if infos.len() > 1 {
        if let Some(info) = infos.iter().find(|info| !info.caps.p2p() && !info.p2p_off) {
            return Err(PlanError::NeedsP2p {
                id: info.id.clone(),
                peers: infos.len() - 1,
            });
        }
    }
    Ok(())
}

/// Append the arcs that move device `index` from `states[index]` to `to`, and record its state.
fn push_move(
    phase: &mut Vec<DeviceArc>,
    devices: &[PlannedDevice],
    states: &mut [DeviceMigState],
    index: usize,
    to: DeviceMigState,
) -> Result<(), PlanError> {
    let device = &devices[index];
    let arcs =
        device_arcs(index, device.caps, states[index], to).map_err(|source| PlanError::Fsm {
            id: device.id.clone(),
            source,
        })?;
    phase.extend(arcs);
    states[index] = to;
    Ok(())
}

/// The source's phases: every device starts RUNNING.
fn plan_source(devices: &[PlannedDevice]) -> Result<SourcePhases, PlanError> {
    use DeviceMigState::*;
    let mut phases = SourcePhases::default();
    let mut states = vec![Running; devices.len()];
    for (i, device) in devices.iter().enumerate() {
        if device.pre_copy {
            push_move(&mut phases.precopy_start, devices, &mut states, i, PreCopy)?;
        }
    }
    for (i, device) in devices.iter().enumerate() {
        if device.p2p_quiesce {
            let quiet = if states[i] == PreCopy {
                PreCopyP2p
            } else {
                RunningP2p
            };
            push_move(&mut phases.quiesce, devices, &mut states, i, quiet)?;
        }
    }
    for i in 0..devices.len() {
        push_move(&mut phases.stop_copy, devices, &mut states, i, StopCopy)?;
    }
    for i in 0..devices.len() {
        push_move(&mut phases.finish, devices, &mut states, i, Stop)?;
    }
    Ok(phases)
}

/// The target's phases: every device starts RUNNING (freshly opened or reset).
fn plan_target(devices: &[PlannedDevice]) -> Result<TargetPhases, PlanError> {
    use DeviceMigState::*;
    let mut phases = TargetPhases::default();
    let mut states = vec![Running; devices.len()];
    // A fresh device should not initiate DMA, but the same rule as on the source costs nothing:
    // every P2P-capable device is quiesced before any device is stopped.
    for (i, device) in devices.iter().enumerate() {
        if device.p2p_quiesce {
            push_move(&mut phases.prepare, devices, &mut states, i, RunningP2p)?;
        }
    }
    for i in 0..devices.len() {
        push_move(&mut phases.prepare, devices, &mut states, i, Resuming)?;
    }
    for i in 0..devices.len() {
        push_move(&mut phases.loaded, devices, &mut states, i, Stop)?;
    }
    for (i, device) in devices.iter().enumerate() {
        if device.p2p_quiesce {
            push_move(&mut phases.quiesced, devices, &mut states, i, RunningP2p)?;
        }
    }
    for i in 0..devices.len() {
        push_move(&mut phases.running, devices, &mut states, i, Running)?;
    }
    Ok(phases)
}

/// Plan the migration of a VM's passthrough devices, given in registry order.
///
/// Refuses devices that cannot migrate, and devices without the P2P quiescent state that share
/// peer-to-peer DMA with other devices (see the error texts for the remedies).
pub fn plan_device_migration(
    infos: &[PassthroughMigInfo],
) -> Result<DeviceMigrationPlan, PlanError> {
    check_devices(infos)?;
    let devices: Vec<PlannedDevice> = infos
        .iter()
        .map(|info| PlannedDevice {
            id: info.id.clone(),
            caps: info.caps,
            pre_copy: info.caps.pre_copy() && !info.pre_copy_off,
            p2p_quiesce: info.caps.p2p(),
        })
        .collect();
    let source = plan_source(&devices)?;
    let target = plan_target(&devices)?;
    Ok(DeviceMigrationPlan {
        devices,
        source,
        target,
    })
}

/// The arcs that bring every source device from `current` (one state per device, as in the
/// plan) back to RUNNING after a failed or cancelled migration.
///
/// Like the target's resume, P2P-capable devices are first all brought to RUNNING_P2P (able to
/// receive peer DMA, initiating none) and only then to RUNNING; a device without P2P is alone
/// or outside the peer-DMA domain and goes straight to RUNNING. A device in RESUMING or ERROR
/// makes this fail with its id: the caller resets that device (or all) instead.
pub fn source_abort_plan(
    devices: &[PlannedDevice],
    current: &[DeviceMigState],
) -> Result<Vec<DeviceArc>, PlanError> {
    use DeviceMigState::*;
    if devices.len() != current.len() {
        return Err(PlanError::StateCount {
            devices: devices.len(),
            states: current.len(),
        });
    }
    let mut states = current.to_vec();
    let mut arcs = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        if states[i] == Resuming {
            return Err(PlanError::Fsm {
                id: device.id.clone(),
                source: FsmError::ResumingAbort,
            });
        }
        let running_now = matches!(states[i], Running | PreCopy);
        let to = if device.p2p_quiesce && !running_now {
            RunningP2p
        } else {
            Running
        };
        push_move(&mut arcs, devices, &mut states, i, to)?;
    }
    for i in 0..devices.len() {
        push_move(&mut arcs, devices, &mut states, i, Running)?;
    }
    Ok(arcs)
}

#[cfg(test)]
mod tests;
