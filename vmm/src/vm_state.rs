//! Save and restore the VM-level KVM state as versioned sections: `irqchip` (PIC master, PIC
//! slave, IOAPIC), `pit` (`KVM_GET_PIT2`) and `clock` (kvmclock, `KVM_GET_CLOCK`).
//!
//! All vCPUs must be paused while these run. On restore the VM must already have its in-kernel
//! irqchip and PIT (created as for a fresh boot); restore them before the vCPUs.
//!
//! Clock: the saved kvmclock value is written back with `KVM_SET_CLOCK` **without**
//! `KVM_CLOCK_REALTIME`, so the guest's monotonic time continues from where it was paused — no
//! jump forward by the time the snapshot sat on disk (which could trip watchdogs and timers).
//! The cost is that the guest's wall clock lags by that time until it resynchronizes (NTP, or a
//! guest agent); Firecracker makes the same choice.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use migration::codec::{StateReader, StateWriter};
use migration::snapshot::{require_section, SnapshotError};
use migration::{StateError, StateSection};
use thiserror::Error;

use crate::vcpu_state::{get_pod, put_pod};

/// Section id of the interrupt controllers.
pub const IRQCHIP_SECTION: &str = "irqchip";
/// Section id of the PIT.
pub const PIT_SECTION: &str = "pit";
/// Section id of the kvmclock.
pub const CLOCK_SECTION: &str = "clock";
/// Layout version of the `irqchip` section.
pub const IRQCHIP_VERSION: u16 = 1;
/// Layout version of the `pit` section.
pub const PIT_VERSION: u16 = 1;
/// Layout version of the `clock` section.
pub const CLOCK_VERSION: u16 = 1;

/// The chips of `KVM_GET_IRQCHIP`, in section order.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Errors while saving or restoring VM-level state.
#[derive(Debug, Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("VM state: {part} failed: {source}")]
    Kvm {
        /// The ioctl (and chip).
        part: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A section is missing.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A section is malformed or has another version.
    #[error(transparent)]
    State(#[from] StateError),
}

type Result<T> = std::result::Result<T, VmStateError>;

fn kvm_err(part: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { part, source }
}

fn chip_name(chip: u32) -> &'static str {
    match chip {
        KVM_IRQCHIP_PIC_MASTER => "PIC master",
        KVM_IRQCHIP_PIC_SLAVE => "PIC slave",
        _ => "IOAPIC",
    }
}

/// Save the irqchip, PIT and clock of a VM whose vCPUs are all paused.
pub fn save_vm(vm: &VmFd) -> Result<Vec<StateSection>> {
    let mut w = StateWriter::new();
    for chip in CHIPS {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(|source| VmStateError::Kvm {
            part: match chip {
                KVM_IRQCHIP_PIC_MASTER => "KVM_GET_IRQCHIP (PIC master)",
                KVM_IRQCHIP_PIC_SLAVE => "KVM_GET_IRQCHIP (PIC slave)",
                _ => "KVM_GET_IRQCHIP (IOAPIC)",
            },
            source,
        })?;
        put_pod(&mut w, &c);
    }
    let irqchip = w.into_section(IRQCHIP_SECTION, IRQCHIP_VERSION);

    let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    let mut w = StateWriter::new();
    put_pod(&mut w, &pit);
    let pit = w.into_section(PIT_SECTION, PIT_VERSION);

    let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    let mut w = StateWriter::new();
    put_pod(&mut w, &clock);
    let clock = w.into_section(CLOCK_SECTION, CLOCK_VERSION);
    Ok(vec![irqchip, pit, clock])
}

/// The decoded VM-level state.
struct VmState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn decode(sections: &[StateSection]) -> Result<VmState> {
    let s = require_section(sections, IRQCHIP_SECTION)?;
    let mut r = StateReader::open(s, IRQCHIP_SECTION, IRQCHIP_VERSION)?;
    let mut chips = Vec::with_capacity(CHIPS.len());
    for chip in CHIPS {
        let c: kvm_irqchip = get_pod(&mut r, chip_name(chip))?;
        if c.chip_id != chip {
            return Err(r
                .malformed(format!(
                    "chip {} where the {} belongs",
                    c.chip_id,
                    chip_name(chip)
                ))
                .into());
        }
        chips.push(c);
    }
    r.finish()?;

    let s = require_section(sections, PIT_SECTION)?;
    let mut r = StateReader::open(s, PIT_SECTION, PIT_VERSION)?;
    let pit = get_pod(&mut r, "PIT state")?;
    r.finish()?;

    let s = require_section(sections, CLOCK_SECTION)?;
    let mut r = StateReader::open(s, CLOCK_SECTION, CLOCK_VERSION)?;
    let clock: kvm_clock_data = get_pod(&mut r, "clock")?;
    r.finish()?;
    Ok(VmState { chips, pit, clock })
}

/// How the guest's clock continues after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockMode {
    /// From the saved value (a snapshot: no jump by the time it sat on disk).
    #[default]
    Continue,
    /// Forward by the real time since the save, when the save recorded the host's realtime
    /// (`KVM_CLOCK_REALTIME`): a live migration's downtime passes for the guest too.
    Advance,
}

/// Restore irqchip, PIT and clock from `sections` (which may hold other sections too) into a VM
/// that has its in-kernel irqchip and PIT and whose vCPUs have not run (or are paused).
///
/// Every section is decoded and checked before the first ioctl.
pub fn restore_vm(vm: &VmFd, sections: &[StateSection]) -> Result<()> {
    restore_vm_with(vm, sections, ClockMode::Continue)
}

/// [`restore_vm`] with the clock handled as `mode` says.
pub fn restore_vm_with(vm: &VmFd, sections: &[StateSection], mode: ClockMode) -> Result<()> {
    let state = decode(sections)?;
    for c in &state.chips {
        vm.set_irqchip(c).map_err(|source| VmStateError::Kvm {
            part: match c.chip_id {
                KVM_IRQCHIP_PIC_MASTER => "KVM_SET_IRQCHIP (PIC master)",
                KVM_IRQCHIP_PIC_SLAVE => "KVM_SET_IRQCHIP (PIC slave)",
                _ => "KVM_SET_IRQCHIP (IOAPIC)",
            },
            source,
        })?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Continue: only the clock value, no KVM_CLOCK_REALTIME, so KVM does not advance the clock
    // by the wall time that passed since the save (see the module documentation). Advance: hand
    // back the saved realtime with KVM_CLOCK_REALTIME, so KVM adds the time that passed.
    let realtime = mode == ClockMode::Advance && state.clock.flags & KVM_CLOCK_REALTIME != 0;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: if realtime { KVM_CLOCK_REALTIME } else { 0 },
        realtime: if realtime { state.clock.realtime } else { 0 },
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}
