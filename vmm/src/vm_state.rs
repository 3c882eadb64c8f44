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
//!
//! A live migration ([`ClockMode::Advance`]) instead moves the kvmclock on by the real time that
//! passed between the save and the restore (the downtime), so the guest's wall clock (its boot
//! time plus the kvmclock) stays right: with `KVM_CLOCK_REALTIME` when the source's
//! `KVM_GET_CLOCK` paired the clock with the host's realtime (KVM then adds the difference on
//! `KVM_SET_CLOCK`), otherwise — a host without it, or a target whose KVM refuses the flag — with
//! the host realtime skiff itself read right after `KVM_GET_CLOCK` (saved since `clock`
//! version 2): the clock is set to the saved value plus the realtime elapsed since. That relies
//! on both hosts' realtime clocks agreeing (NTP), as KVM's own way does, and is off by the few
//! microseconds between the two reads. A version-1 section has no realtime: the clock continues.

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
/// Layout version of the `clock` section (2: `kvm_clock_data` and the host's realtime in ns).
pub const CLOCK_VERSION: u16 = 2;

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

    let mut clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    let host_realtime = realtime_ns();
    if crate::test_knobs::no_clock_realtime() {
        // What a host without KVM_CLOCK_REALTIME returns.
        clock.flags &= !KVM_CLOCK_REALTIME;
        clock.realtime = 0;
    }
    let mut w = StateWriter::new();
    put_pod(&mut w, &clock);
    w.u64(host_realtime);
    let clock = w.into_section(CLOCK_SECTION, CLOCK_VERSION);
    Ok(vec![irqchip, pit, clock])
}

/// The decoded VM-level state.
struct VmState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    /// The host's realtime (ns since the epoch) read right after `KVM_GET_CLOCK` (version 2).
    host_realtime: Option<u64>,
}

/// The host's realtime clock, in nanoseconds since the Unix epoch.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
    // Version 1 (no host realtime) is still read; any other is refused by `open`.
    let version = if s.version == 1 { 1 } else { CLOCK_VERSION };
    let mut r = StateReader::open(s, CLOCK_SECTION, version)?;
    let clock: kvm_clock_data = get_pod(&mut r, "clock")?;
    let host_realtime = if version >= 2 { Some(r.u64()?) } else { None };
    r.finish()?;
    Ok(VmState {
        chips,
        pit,
        clock,
        host_realtime,
    })
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
    /// Leave the kvmclock as KVM holds it: another part of the VM state is being restored.
    Keep,
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
    if mode == ClockMode::Keep {
        return Ok(());
    }
    restore_clock(vm, &state, mode)
}

/// The `KVM_SET_CLOCK` argument for `mode` (see the module documentation): `use_kvm_realtime`
/// lets KVM advance the clock by the saved realtime when the source paired one; `now` is the
/// host's realtime (ns) for skiff's own advance otherwise.
fn clock_to_set(
    state: &VmState,
    mode: ClockMode,
    use_kvm_realtime: bool,
    now: u64,
) -> kvm_clock_data {
    let saved = &state.clock;
    let (clock, flags, realtime) = match (mode, state.host_realtime) {
        (ClockMode::Continue | ClockMode::Keep, _) => (saved.clock, 0, 0),
        (ClockMode::Advance, _) if use_kvm_realtime && saved.flags & KVM_CLOCK_REALTIME != 0 => {
            (saved.clock, KVM_CLOCK_REALTIME, saved.realtime)
        }
        (ClockMode::Advance, Some(then)) => {
            (saved.clock.saturating_add(now.saturating_sub(then)), 0, 0)
        }
        (ClockMode::Advance, None) => (saved.clock, 0, 0),
    };
    kvm_clock_data {
        clock,
        flags,
        realtime,
        ..Default::default()
    }
}

/// Write the kvmclock back as `mode` says; when the target's KVM refuses `KVM_CLOCK_REALTIME`,
/// advance it by skiff's own realtime reading instead.
fn restore_clock(vm: &VmFd, state: &VmState, mode: ClockMode) -> Result<()> {
    let clock = clock_to_set(state, mode, true, realtime_ns());
    match vm.set_clock(&clock) {
        Err(e) if clock.flags & KVM_CLOCK_REALTIME != 0 && state.host_realtime.is_some() => {
            log::warn!("KVM_SET_CLOCK with KVM_CLOCK_REALTIME failed ({e}): advancing the kvmclock by skiff's own realtime reading");
            let clock = clock_to_set(state, mode, false, realtime_ns());
            vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        r => r.map_err(kvm_err("KVM_SET_CLOCK"))?,
    }
    if mode == ClockMode::Advance {
        let how = match (clock.flags & KVM_CLOCK_REALTIME != 0, state.host_realtime) {
            (true, _) => "by KVM (KVM_CLOCK_REALTIME)",
            (false, Some(_)) => {
                "by skiff's realtime reading (the source had no KVM_CLOCK_REALTIME)"
            }
            (false, None) => "not at all (a version-1 clock section has no realtime)",
        };
        log::info!("kvmclock restored and advanced {how}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(flags: u32, host_realtime: Option<u64>) -> VmState {
        VmState {
            chips: Vec::new(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 5_000,
                flags,
                realtime: 1_000_000,
                ..Default::default()
            },
            host_realtime,
        }
    }

    #[test]
    fn the_clock_advances_by_the_realtime_that_passed_only_for_a_migration() {
        let now = 1_000_000 + 2_000_000_000;
        // A snapshot restore continues from the saved value, whatever was saved.
        let c = clock_to_set(
            &state(KVM_CLOCK_REALTIME, Some(1_000_000)),
            ClockMode::Continue,
            true,
            now,
        );
        assert_eq!((c.clock, c.flags), (5_000, 0));
        // A migration with KVM's realtime pairing: KVM adds the difference.
        let c = clock_to_set(
            &state(KVM_CLOCK_REALTIME, Some(1_000_000)),
            ClockMode::Advance,
            true,
            now,
        );
        assert_eq!(
            (c.clock, c.flags, c.realtime),
            (5_000, KVM_CLOCK_REALTIME, 1_000_000)
        );
        // Without it (or refused by the target's KVM): skiff adds the 2 s itself.
        for (flags, use_kvm) in [(0, true), (KVM_CLOCK_REALTIME, false)] {
            let c = clock_to_set(
                &state(flags, Some(1_000_000)),
                ClockMode::Advance,
                use_kvm,
                now,
            );
            assert_eq!((c.clock, c.flags), (5_000 + 2_000_000_000, 0));
        }
        // A realtime in the future (clocks apart) never moves the clock back.
        let c = clock_to_set(&state(0, Some(now + 10)), ClockMode::Advance, true, now);
        assert_eq!(c.clock, 5_000);
        // A version-1 section without KVM's realtime: nothing to advance by.
        let c = clock_to_set(&state(0, None), ClockMode::Advance, true, now);
        assert_eq!((c.clock, c.flags), (5_000, 0));
    }
}
