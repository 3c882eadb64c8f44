//! `clock`: set up kvmclock as a Linux guest does and print the guest's wall-clock time, so a
//! test can compare it with the host's — after a live migration it must have moved on by the
//! real downtime, neither frozen nor jumped back.
//!
//! The guest checks KVM's CPUID signature and `KVM_FEATURE_CLOCKSOURCE2`, enables the vCPU's
//! time structure (`MSR_KVM_SYSTEM_TIME_NEW`, a `pvclock_vcpu_time_info`) and asks once for the
//! wall clock at kvmclock zero (`MSR_KVM_WALL_CLOCK_NEW`, a `pvclock_wall_clock`), as described
//! in Linux's `Documentation/virt/kvm/x86/msr.rst`. Wall-clock time is then that base plus the
//! kvmclock (`system_time` + the scaled TSC delta since `tsc_timestamp`).
//!
//! Output, every `clock.every_ms` milliseconds of kvmclock time (default 250):
//! `clock: <unix_ms> uptime_ms <kvmclock_ms>`. The guest itself fails (`clock: FAIL ...`) if
//! the kvmclock ever goes backwards. Without kvmclock it prints `clock: no kvmclock` and fails.

use crate::arch::time::rdtsc;
use crate::bootinfo::BootInfo;
use crate::scenario::report::{fail, param_u64};
use crate::sync::RacyCell;

/// `MSR_KVM_WALL_CLOCK_NEW`: the guest physical address of a [`WallClock`] KVM fills once.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`: the guest physical address of a [`VcpuTime`] | 1 (enable).
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// KVM's CPUID leaves start here ("KVMKVMKVM\0\0\0").
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// `KVM_FEATURE_CLOCKSOURCE2` in EAX of leaf `0x40000001`: the `_NEW` MSRs above exist.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// `struct pvclock_vcpu_time_info` (32 bytes; KVM updates it, `version` odd while it does).
#[repr(C, align(64))]
struct VcpuTime {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// `struct pvclock_wall_clock` (12 bytes): the wall-clock time at kvmclock zero.
#[repr(C, align(16))]
struct WallClock {
    version: u32,
    sec: u32,
    nsec: u32,
}

static VCPU_TIME: RacyCell<VcpuTime> = RacyCell::new(VcpuTime {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
});

static WALL_CLOCK: RacyCell<WallClock> = RacyCell::new(WallClock {
    version: 0,
    sec: 0,
    nsec: 0,
});

#[allow(unused_unsafe)] // `__cpuid` is safe from Rust 1.87 on, unsafe before.
fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    // SAFETY: CPUID is always available in long mode; it only reads.
    let r = unsafe { core::arch::x86_64::__cpuid(leaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called for the kvmclock MSRs, after CPUID said KVM offers them; the values
    // are addresses of this module's statics (identity mapped: virtual = physical).
    unsafe {
        core::arch::asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags)
        );
    }
}

/// Whether KVM offers kvmclock with the `_NEW` MSRs.
fn has_kvmclock() -> bool {
    let (_, b, c, d) = cpuid(KVM_CPUID_SIGNATURE);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    if &sig != b"KVMKVMKVM\0\0\0" {
        return false;
    }
    let (features, _, _, _) = cpuid(KVM_CPUID_SIGNATURE + 1);
    features & KVM_FEATURE_CLOCKSOURCE2 != 0
}

/// Scale a TSC delta to nanoseconds as pvclock says: shift, then multiply by `mul / 2^32`.
fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let delta = if shift < 0 {
        delta >> (-shift as u32)
    } else {
        delta << (shift as u32)
    };
    ((u128::from(delta) * u128::from(mul)) >> 32) as u64
}

/// The kvmclock now, in nanoseconds (a consistent read of the structure KVM updates).
fn kvmclock_ns() -> u64 {
    let t = VCPU_TIME.get();
    loop {
        // SAFETY: `t` points to a static KVM writes while this vCPU is out of the guest; the
        // version protocol (odd while updating, changed after) makes the copy consistent.
        unsafe {
            let v1 = core::ptr::read_volatile(&(*t).version);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let tsc_timestamp = core::ptr::read_volatile(&(*t).tsc_timestamp);
            let system_time = core::ptr::read_volatile(&(*t).system_time);
            let mul = core::ptr::read_volatile(&(*t).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&(*t).tsc_shift);
            let tsc = rdtsc();
            core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
            let v2 = core::ptr::read_volatile(&(*t).version);
            if v1 & 1 == 0 && v1 == v2 {
                return system_time.wrapping_add(scale_delta(
                    tsc.wrapping_sub(tsc_timestamp),
                    mul,
                    shift,
                ));
            }
        }
        core::hint::spin_loop();
    }
}

/// The wall-clock time at kvmclock zero, in nanoseconds since the Unix epoch.
fn wall_clock_base_ns() -> u64 {
    let w = WALL_CLOCK.get();
    wrmsr(MSR_KVM_WALL_CLOCK_NEW, w as u64);
    loop {
        // SAFETY: as in `kvmclock_ns`: a static KVM filled during the WRMSR, version-protected.
        unsafe {
            let v1 = core::ptr::read_volatile(&(*w).version);
            let sec = core::ptr::read_volatile(&(*w).sec);
            let nsec = core::ptr::read_volatile(&(*w).nsec);
            let v2 = core::ptr::read_volatile(&(*w).version);
            if v1 & 1 == 0 && v1 == v2 {
                return u64::from(sec) * 1_000_000_000 + u64::from(nsec);
            }
        }
        core::hint::spin_loop();
    }
}

/// Enable kvmclock, then print the wall clock every `clock.every_ms` ms, forever (or
/// `clock.limit` lines).
pub fn run(boot: &BootInfo) {
    let every_ms = param_u64(boot, "clock.every_ms", 250).max(1);
    let limit = param_u64(boot, "clock.limit", 0);
    if !has_kvmclock() {
        crate::println!("clock: no kvmclock");
        fail("clock: KVM does not offer kvmclock (KVM_FEATURE_CLOCKSOURCE2)");
    }
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, VCPU_TIME.get() as u64 | 1);
    let base = wall_clock_base_ns();
    crate::println!(
        "clock: kvmclock on, wall clock base {} s",
        base / 1_000_000_000
    );
    let mut last = kvmclock_ns();
    let mut lines = 0u64;
    loop {
        let now = kvmclock_ns();
        if now < last {
            crate::println!("clock: FAIL kvmclock went back from {last} ns to {now} ns");
            fail("the kvmclock went backwards");
        }
        last = now;
        crate::println!(
            "clock: {} uptime_ms {}",
            (base + now) / 1_000_000,
            now / 1_000_000
        );
        lines += 1;
        if limit != 0 && lines >= limit {
            return;
        }
        let until = now + every_ms * 1_000_000;
        while kvmclock_ns() < until {
            core::hint::spin_loop();
        }
    }
}
