//! Save and restore one vCPU's KVM state as a versioned [`StateSection`] (id `cpuN`).
//!
//! The section holds CPUID, regs, sregs, FPU, mp_state, LAPIC, vCPU events, debug registers,
//! XCRs, the XSAVE area (sized by `KVM_CAP_XSAVE2` when the host has it, the legacy 4 KiB area
//! otherwise), every MSR KVM lets us read (the list comes from `KVM_GET_MSR_INDEX_LIST` plus the
//! feature MSR list; the saved indices are recorded with their values) and the TSC frequency.
//! Nested virtualization state is **not** saved: the host lacks `KVM_CAP_NESTED_STATE` (see
//! HOST.md); the section records that it is absent, and a section that claims to carry it is
//! refused. Which optional parts are present is recorded in a flags word ([`parts`]).
//!
//! The vCPU must be paused — not inside `KVM_RUN`, and not entering it — for the whole of
//! [`save_vcpu`] and [`restore_vcpu`]; in addition no other vCPU of the VM may run while
//! `KVM_{GET,SET}_VCPU_EVENTS` is issued. The caller guarantees this (`VcpuControl::pause`).
//!
//! KVM structs are stored as their raw bytes (x86_64 is little-endian, and skiff only runs
//! there), each with a length check on the way back in. A section is decoded and validated
//! completely before the first `SET` ioctl, so a malformed section never leaves a half-restored
//! vCPU behind.
//!
//! Time: `MSR_IA32_TSC` is saved with the other MSRs and restored first among them, so the guest's
//! TSC continues from the value it had when it was paused (KVM adjusts the TSC offset on a
//! host-initiated write); the TSC deadline MSR follows it and the LAPIC. The host has no
//! `KVM_CAP_TSC_CONTROL`, so a restore on a host with another TSC frequency cannot scale the TSC:
//! it is logged as a warning.

use std::mem::size_of;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use migration::codec::{StateReader, StateWriter};
use migration::{StateError, StateSection};
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Layout version of a `cpuN` section.
pub const VCPU_STATE_VERSION: u16 = 1;

/// Bits of the "parts present" flags word of a `cpuN` section.
pub mod parts {
    /// The XSAVE area came from `KVM_GET_XSAVE2` (it may be larger than 4 KiB).
    pub const XSAVE2: u32 = 1 << 0;
    /// XCRs were saved (`KVM_CAP_XCRS`).
    pub const XCRS: u32 = 1 << 1;
    /// Debug registers were saved (`KVM_CAP_DEBUGREGS`).
    pub const DEBUGREGS: u32 = 1 << 2;
    /// Nested virtualization state. Never set by this build (the host has no
    /// `KVM_CAP_NESTED_STATE`); a section with it is refused.
    pub const NESTED: u32 = 1 << 3;
    /// The TSC frequency was saved (`KVM_CAP_GET_TSC_KHZ`).
    pub const TSC_KHZ: u32 = 1 << 4;
    /// Every bit this build knows.
    pub const KNOWN: u32 = XSAVE2 | XCRS | DEBUGREGS | NESTED | TSC_KHZ;
}

const MSR_IA32_TSC: u32 = 0x10;
/// Legacy `struct kvm_xsave` size.
const XSAVE_LEGACY_LEN: usize = 4096;
/// A bound for XSAVE areas read from a section (AMX makes them ~11 KiB today).
const XSAVE_MAX_LEN: usize = 1 << 20;
/// A bound for the number of MSRs read from a section.
const MAX_MSRS: usize = 4096;

/// Errors while saving or restoring a vCPU. Each names the vCPU and the part that failed.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: {part} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u32,
        /// The ioctl (the part of the state).
        part: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped at an MSR.
    #[error("vCPU {index}: KVM_SET_MSRS rejected MSR {msr:#x} ({set} of {total} MSRs restored)")]
    MsrRejected {
        /// vCPU index.
        index: u32,
        /// The MSR KVM refused.
        msr: u32,
        /// MSRs restored before it.
        set: usize,
        /// MSRs in the section.
        total: usize,
    },
    /// The saved XSAVE area does not fit this host's.
    #[error(
        "vCPU {index}: the saved XSAVE area is {saved} bytes, this host's KVM takes {host} \
         (the guest used CPU state this host does not have)"
    )]
    XsaveSize {
        /// vCPU index.
        index: u32,
        /// Bytes in the section.
        saved: usize,
        /// Bytes this host uses.
        host: usize,
    },
    /// The section is for another vCPU.
    #[error("vCPU {index}: the section is the state of vCPU {found}")]
    WrongVcpu {
        /// vCPU being restored.
        index: u32,
        /// vCPU the section was saved from.
        found: u32,
    },
    /// The section holds a part this build or host cannot restore.
    #[error("vCPU {index}: cannot restore {what}")]
    Unsupported {
        /// vCPU index.
        index: u32,
        /// What.
        what: String,
    },
    /// A KVM list (CPUID, MSRs) could not be built.
    #[error("vCPU {index}: {what} has too many entries")]
    TooMany {
        /// vCPU index.
        index: u32,
        /// What.
        what: &'static str,
        /// The FAM wrapper's error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// The section is malformed or has another version.
    #[error(transparent)]
    State(#[from] StateError),
}

type Result<T> = std::result::Result<T, VcpuStateError>;

fn kvm_err(index: u32, part: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        index,
        part,
        source,
    }
}

// KVM structs are copied to and from raw bytes with zerocopy's `IntoBytes` / `FromBytes`, which
// kvm-bindings derives on its state structs under its `serde` feature: the compiler proves there
// is no padding (every byte of a value is initialized) and that any bytes make a valid value, so
// this file needs no `unsafe` for it. vm-memory's `ByteValued` (rust-vmm's trait for the same job)
// is not used because kvm-bindings 0.14 does not implement it for these structs and the orphan rule
// forbids implementing a foreign trait for a foreign type here; a local newtype would need one
// hand-checked `unsafe impl` per struct, which is what zerocopy's derives replace.
//
// `kvm_fpu` is the one struct of the section kvm-bindings 0.14 derives nothing for: [`Fpu`]
// mirrors it (same layout, checked below), so its bytes in a section are the same as before.

/// `struct kvm_fpu`'s layout with zerocopy's traits derived (kvm-bindings 0.14 has none on it).
#[repr(C)]
#[derive(Clone, Copy, IntoBytes, FromBytes, Immutable)]
struct Fpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// From one field list: `From` conversions both ways between `kvm_fpu` and [`Fpu`] (each
/// destructures without `..`, so a field added to either breaks the build) and a compile-time
/// check that every field sits at the same offset.
macro_rules! mirror_kvm_fpu {
    ($($f:ident),* $(,)?) => {
        impl From<&kvm_fpu> for Fpu {
            fn from(f: &kvm_fpu) -> Self {
                let kvm_fpu { $($f),* } = *f;
                Self { $($f),* }
            }
        }

        impl From<Fpu> for kvm_fpu {
            fn from(f: Fpu) -> Self {
                let Fpu { $($f),* } = f;
                Self { $($f),* }
            }
        }

        const _: () = {
            assert!(size_of::<Fpu>() == size_of::<kvm_fpu>());
            $(assert!(std::mem::offset_of!(Fpu, $f) == std::mem::offset_of!(kvm_fpu, $f));)*
        };
    };
}

mirror_kvm_fpu!(
    fpr,
    fcw,
    fsw,
    ftwx,
    pad1,
    last_opcode,
    last_ip,
    last_dp,
    xmm,
    mxcsr,
    pad2,
);

// The section layout: a binding update that changes a struct's size changes the section format.
const _: () = {
    assert!(size_of::<kvm_regs>() == 144);
    assert!(size_of::<kvm_sregs>() == 312);
    assert!(size_of::<kvm_fpu>() == 416);
    assert!(size_of::<kvm_lapic_state>() == 1024);
    assert!(size_of::<kvm_vcpu_events>() == 64);
    assert!(size_of::<kvm_debugregs>() == 128);
    assert!(size_of::<kvm_xcrs>() == 392);
    assert!(size_of::<kvm_cpuid_entry2>() == 40);
    assert!(size_of::<kvm_bindings::kvm_irqchip>() == 520);
    assert!(size_of::<kvm_bindings::kvm_pit_state2>() == 112);
    assert!(size_of::<kvm_bindings::kvm_clock_data>() == 48);
};

/// Write a plain KVM struct as a length-prefixed byte string.
pub(crate) fn put_pod<T: IntoBytes + Immutable>(w: &mut StateWriter, v: &T) {
    w.bytes(v.as_bytes());
}

/// Read a plain KVM struct written by [`put_pod`]; its length must be exactly the struct's.
pub(crate) fn get_pod<T: FromBytes>(
    r: &mut StateReader<'_>,
    what: &str,
) -> std::result::Result<T, StateError> {
    let b = r.bytes(size_of::<T>())?;
    T::read_from_bytes(b).map_err(|_| {
        r.malformed(format!(
            "{what}: {} bytes, expected {}",
            b.len(),
            size_of::<T>()
        ))
    })
}

/// Section id of vCPU `index`.
pub fn section_id(index: u32) -> String {
    format!("cpu{index}")
}

/// The decoded state of one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u32,
    /// Optional parts present ([`parts`] bits).
    pub parts: u32,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (also inside the XSAVE area, which wins on restore).
    pub fpu: kvm_fpu,
    /// Multiprocessing state (`KVM_MP_STATE_*`).
    pub mp_state: u32,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers (when [`parts::DEBUGREGS`]).
    pub debugregs: kvm_debugregs,
    /// Extended control registers (when [`parts::XCRS`]).
    pub xcrs: kvm_xcrs,
    /// The XSAVE area, as 32-bit words (1024 of them for the legacy area).
    pub xsave: Vec<u32>,
    /// MSRs KVM let us read, `MSR_IA32_TSC` first.
    pub msrs: Vec<(u32, u64)>,
    /// TSC frequency in kHz (when [`parts::TSC_KHZ`]).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("parts", &self.parts)
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state)
            .field("msrs", &self.msrs.len())
            .field("xsave_bytes", &(self.xsave.len() * 4))
            .finish_non_exhaustive()
    }
}

/// Size of this host's XSAVE area: `KVM_CAP_XSAVE2`'s answer, or `None` without it.
fn host_xsave2_len(kvm: &Kvm) -> Option<usize> {
    let n = kvm.check_extension_int(Cap::Xsave2);
    (n > 0).then(|| (n as usize).max(XSAVE_LEGACY_LEN))
}

/// The MSRs to save: KVM's list of saveable MSRs plus the feature MSRs, `MSR_IA32_TSC` first.
fn msr_indices(kvm: &Kvm, index: u32) -> Result<Vec<u32>> {
    let mut list = kvm
        .get_msr_index_list()
        .map_err(kvm_err(index, "KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    // Feature MSRs (e.g. IA32_ARCH_CAPABILITIES) are per-vCPU values too; the vCPU read below
    // keeps only those KVM lets us read on this host.
    if let Ok(features) = kvm.get_msr_feature_index_list() {
        list.extend_from_slice(features.as_slice());
    }
    list.sort_unstable();
    list.dedup();
    // TSC first: KVM derives the TSC offset from it, and the TSC deadline MSR is relative to it.
    if let Some(pos) = list.iter().position(|&m| m == MSR_IA32_TSC) {
        list.remove(pos);
        list.insert(0, MSR_IA32_TSC);
    }
    Ok(list)
}

/// Read `indices` in batches; an MSR KVM refuses is skipped (logged), the others are kept.
fn read_msrs(fd: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuStateError::TooMany {
            index,
            what: "the MSR list",
            source,
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(index, "KVM_GET_MSRS"))?
            .min(batch.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < batch.len() {
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            skipped.push(batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    if !skipped.is_empty() {
        log::debug!("vCPU {index}: MSRs not readable on this host, not saved: {skipped:x?}");
    }
    Ok(out)
}

impl VcpuState {
    /// Read the whole state of a paused vCPU.
    ///
    /// Order (as Firecracker does it): `KVM_GET_MP_STATE` first, because it runs
    /// `kvm_apic_accept_events()`, which may change vCPU and LAPIC state; `KVM_GET_LAPIC` may
    /// also update LAPIC state before returning it; `KVM_GET_VCPU_EVENTS` last, since the other
    /// GET ioctls may change what it reports (pending events).
    pub fn save(fd: &VcpuFd, index: u32, kvm: &Kvm) -> Result<Self> {
        let mp_state = fd
            .get_mp_state()
            .map_err(kvm_err(index, "KVM_GET_MP_STATE"))?
            .mp_state;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(index, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let regs = fd.get_regs().map_err(kvm_err(index, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(kvm_err(index, "KVM_GET_FPU"))?;
        let mut parts = 0;
        let xsave = match host_xsave2_len(kvm) {
            Some(len) => {
                let fam = (len - XSAVE_LEGACY_LEN).div_ceil(4);
                let mut xs = Xsave::new(fam).map_err(|source| VcpuStateError::TooMany {
                    index,
                    what: "the XSAVE area",
                    source,
                })?;
                // SAFETY: `xs` holds `len` bytes, the size KVM_CAP_XSAVE2 reports for this
                // process; nothing enables XSTATE features dynamically in skiff after that.
                unsafe { fd.get_xsave2(&mut xs) }.map_err(kvm_err(index, "KVM_GET_XSAVE2"))?;
                parts |= parts::XSAVE2;
                let x = xs.as_fam_struct_ref();
                let mut words = x.xsave.region.to_vec();
                words.extend_from_slice(xs.as_slice());
                words
            }
            None => fd
                .get_xsave()
                .map_err(kvm_err(index, "KVM_GET_XSAVE"))?
                .region
                .to_vec(),
        };
        let xcrs = if kvm.check_extension(Cap::Xcrs) {
            parts |= parts::XCRS;
            fd.get_xcrs().map_err(kvm_err(index, "KVM_GET_XCRS"))?
        } else {
            kvm_xcrs::default()
        };
        let debugregs = if kvm.check_extension(Cap::Debugregs) {
            parts |= parts::DEBUGREGS;
            fd.get_debug_regs()
                .map_err(kvm_err(index, "KVM_GET_DEBUGREGS"))?
        } else {
            kvm_debugregs::default()
        };
        let lapic = fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, index, &msr_indices(kvm, index)?)?;
        let tsc_khz = if kvm.check_extension(Cap::GetTscKhz) {
            parts |= parts::TSC_KHZ;
            fd.get_tsc_khz()
                .map_err(kvm_err(index, "KVM_GET_TSC_KHZ"))?
        } else {
            0
        };
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err(index, "KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            index,
            parts,
            cpuid,
            regs,
            sregs,
            fpu,
            mp_state,
            lapic,
            events,
            debugregs,
            xcrs,
            xsave,
            msrs,
            tsc_khz,
        })
    }

    /// Encode as section `cpuN`.
    pub fn to_section(&self) -> StateSection {
        let mut w = StateWriter::new();
        w.u32(self.index).u32(self.parts);
        w.u32(self.cpuid.len() as u32);
        for e in &self.cpuid {
            put_pod(&mut w, e);
        }
        put_pod(&mut w, &self.regs);
        put_pod(&mut w, &self.sregs);
        put_pod(&mut w, &Fpu::from(&self.fpu));
        w.u32(self.mp_state);
        put_pod(&mut w, &self.lapic);
        put_pod(&mut w, &self.events);
        put_pod(&mut w, &self.debugregs);
        put_pod(&mut w, &self.xcrs);
        w.u32_slice(&self.xsave);
        w.u32(self.msrs.len() as u32);
        for &(i, v) in &self.msrs {
            w.u32(i).u64(v);
        }
        w.u32(self.tsc_khz);
        w.into_section(&section_id(self.index), VCPU_STATE_VERSION)
    }

    /// Decode section `cpuN` for vCPU `index`, checking id, version, vCPU index and every length.
    pub fn from_section(section: &StateSection, index: u32) -> Result<Self> {
        let id = section_id(index);
        if section.id != id {
            // Name the vCPU the section belongs to when it is another vCPU's.
            if let Some(found) = section
                .id
                .strip_prefix("cpu")
                .and_then(|n| n.parse::<u32>().ok())
            {
                return Err(VcpuStateError::WrongVcpu { index, found });
            }
        }
        let mut r = StateReader::open(section, &id, VCPU_STATE_VERSION)?;
        let saved_index = r.u32()?;
        if saved_index != index {
            return Err(VcpuStateError::WrongVcpu {
                index,
                found: saved_index,
            });
        }
        let parts = r.u32()?;
        if parts & !parts::KNOWN != 0 {
            return Err(r
                .malformed(format!("unknown state parts {:#x}", parts & !parts::KNOWN))
                .into());
        }
        if parts & parts::NESTED != 0 {
            return Err(VcpuStateError::Unsupported {
                index,
                what: "nested virtualization state (KVM_CAP_NESTED_STATE)".into(),
            });
        }
        let n = r.u32()? as usize;
        if n > KVM_MAX_CPUID_ENTRIES {
            return Err(r.malformed(format!("{n} CPUID entries")).into());
        }
        let mut cpuid = Vec::with_capacity(n);
        for _ in 0..n {
            cpuid.push(get_pod(&mut r, "CPUID entry")?);
        }
        let regs = get_pod(&mut r, "regs")?;
        let sregs = get_pod(&mut r, "sregs")?;
        let fpu = get_pod::<Fpu>(&mut r, "fpu")?.into();
        let mp_state = r.u32()?;
        let lapic = get_pod(&mut r, "lapic")?;
        let events = get_pod(&mut r, "vcpu_events")?;
        let debugregs = get_pod(&mut r, "debugregs")?;
        let xcrs = get_pod(&mut r, "xcrs")?;
        let xsave = r.u32_slice(XSAVE_MAX_LEN / 4)?;
        if xsave.len() < XSAVE_LEGACY_LEN / 4 {
            return Err(r
                .malformed(format!("XSAVE area of {} bytes", xsave.len() * 4))
                .into());
        }
        let n = r.u32()? as usize;
        if n > MAX_MSRS {
            return Err(r.malformed(format!("{n} MSRs")).into());
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }
        let tsc_khz = r.u32()?;
        r.finish()?;
        Ok(Self {
            index,
            parts,
            cpuid,
            regs,
            sregs,
            fpu,
            mp_state,
            lapic,
            events,
            debugregs,
            xcrs,
            xsave,
            msrs,
            tsc_khz,
        })
    }

    /// Load this state into a paused vCPU (normally a fresh one that has not run).
    ///
    /// Order (Firecracker's, with its reasons):
    /// 1. CPUID first: KVM validates XCR0, MSRs and more against the guest CPUID.
    /// 2. mp_state early: some SET ioctls depend on whether the vCPU is the BSP and its state.
    /// 3. regs, then sregs (sregs also restore a pending interrupt and the APIC base MSR),
    ///    FPU, then the XSAVE area (a superset of the FPU state, so it wins), then XCRs.
    /// 4. debug registers.
    /// 5. LAPIC after sregs (they restore the APIC base) and before MSRs (the TSC deadline MSR
    ///    only restores when the LAPIC is configured).
    /// 6. MSRs, TSC first.
    /// 7. vCPU events last: SET_REGS clears pending exceptions, which SET_VCPU_EVENTS restores.
    pub fn restore(&self, fd: &VcpuFd, kvm: &Kvm) -> Result<()> {
        let index = self.index;
        // Check what the host can take before touching the vCPU.
        let host_xsave = host_xsave2_len(kvm);
        let saved_xsave = self.xsave.len() * 4;
        let host_len = host_xsave.unwrap_or(XSAVE_LEGACY_LEN);
        if saved_xsave > host_len {
            return Err(VcpuStateError::XsaveSize {
                index,
                saved: saved_xsave,
                host: host_len,
            });
        }
        if self.parts & parts::XCRS != 0 && !kvm.check_extension(Cap::Xcrs) {
            return Err(VcpuStateError::Unsupported {
                index,
                what: "XCRs: this host has no KVM_CAP_XCRS".into(),
            });
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| VcpuStateError::TooMany {
            index,
            what: "the CPUID",
            source,
        })?;
        let msrs: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(i, data)| kvm_msr_entry {
                index: i,
                data,
                ..Default::default()
            })
            .collect();

        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm_err(index, "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
        fd.set_fpu(&self.fpu)
            .map_err(kvm_err(index, "KVM_SET_FPU"))?;
        match host_xsave {
            Some(len) => {
                let fam = (len - XSAVE_LEGACY_LEN).div_ceil(4);
                let mut xs = Xsave::new(fam).map_err(|source| VcpuStateError::TooMany {
                    index,
                    what: "the XSAVE area",
                    source,
                })?;
                let (legacy, extra) = self.xsave.split_at(XSAVE_LEGACY_LEN / 4);
                // SAFETY: `as_mut_fam_struct` only hands out the header; its length field is
                // left untouched.
                unsafe { xs.as_mut_fam_struct() }
                    .xsave
                    .region
                    .copy_from_slice(legacy);
                // `extra` fits: saved_xsave <= len was checked above.
                xs.as_mut_slice()[..extra.len()].copy_from_slice(extra);
                // SAFETY: `xs` holds `len` bytes, the size KVM_CAP_XSAVE2 reports for this
                // process, which is what KVM_SET_XSAVE reads.
                unsafe { fd.set_xsave2(&xs) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
            }
            None => {
                let mut x = kvm_xsave::default();
                x.region
                    .copy_from_slice(&self.xsave[..XSAVE_LEGACY_LEN / 4]);
                // SAFETY: without KVM_CAP_XSAVE2, KVM_SET_XSAVE reads exactly the legacy
                // 4096-byte `struct kvm_xsave`.
                unsafe { fd.set_xsave(&x) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
            }
        }
        if self.parts & parts::XCRS != 0 {
            fd.set_xcrs(&self.xcrs)
                .map_err(kvm_err(index, "KVM_SET_XCRS"))?;
        }
        if self.parts & parts::DEBUGREGS != 0 {
            fd.set_debug_regs(&self.debugregs)
                .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&self.lapic)
            .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
        let mut set = 0;
        for batch in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let list = Msrs::from_entries(batch).map_err(|source| VcpuStateError::TooMany {
                index,
                what: "the MSR list",
                source,
            })?;
            let n = fd.set_msrs(&list).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
            if n < batch.len() {
                return Err(VcpuStateError::MsrRejected {
                    index,
                    msr: batch[n].index,
                    set: set + n,
                    total: msrs.len(),
                });
            }
            set += n;
        }
        if self.parts & parts::TSC_KHZ != 0 && kvm.check_extension(Cap::GetTscKhz) {
            if let Ok(host_khz) = fd.get_tsc_khz() {
                if host_khz.abs_diff(self.tsc_khz) > self.tsc_khz / 1000 {
                    log::warn!(
                        "vCPU {index}: the guest's TSC ran at {} kHz, this host's runs at {host_khz} kHz \
                         and KVM cannot scale it here (no KVM_CAP_TSC_CONTROL): guest time may drift",
                        self.tsc_khz
                    );
                }
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Save the state of paused vCPU `index` (owning `fd`) as section `cpuN`.
///
/// The vCPU must not be in `KVM_RUN`, and no vCPU of the VM may run, for the duration of the call.
pub fn save_vcpu(fd: &VcpuFd, index: u32, kvm: &Kvm) -> Result<StateSection> {
    Ok(VcpuState::save(fd, index, kvm)?.to_section())
}

/// Restore vCPU `index` (owning `fd`, paused, normally not run yet) from its section `cpuN`.
///
/// The section is validated completely (id, version, vCPU index, lengths, host support) before
/// the first ioctl. `kvm` tells the host's XSAVE area size.
pub fn restore_vcpu(fd: &VcpuFd, index: u32, kvm: &Kvm, section: &StateSection) -> Result<()> {
    VcpuState::from_section(section, index)?.restore(fd, kvm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_state::{restore_vm, save_vm, CLOCK_SECTION, IRQCHIP_SECTION, PIT_SECTION};
    use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2};
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::VmFd;
    use migration::snapshot::{find_section, SnapshotError};

    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const APIC_TASKPRI: usize = 0x80;
    const APIC_LVTT: usize = 0x320;

    fn new_vm(kvm: &Kvm, n: u32) -> (VmFd, Vec<VcpuFd>) {
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        let vcpus = (0..n)
            .map(|i| vm.create_vcpu(u64::from(i)).unwrap())
            .collect();
        (vm, vcpus)
    }

    fn set_reg32(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    }

    /// Give vCPU `i` distinctive registers, MSRs, LAPIC and debug registers.
    fn make_distinctive(kvm: &Kvm, fd: &VcpuFd, i: u32) {
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let cpuid = crate::cpuid::vcpu_cpuid(&supported, i, 2, None).unwrap();
        crate::vcpu::configure_common(fd, i, &cpuid).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1111_2222_3333_4444 + u64::from(i);
        regs.rbx = 0x5555_6666_7777_8888;
        regs.r15 = 0xfeed_face_0000_0000 | u64::from(i);
        regs.rsp = 0x8000;
        regs.rip = 0x1234 + u64::from(i);
        regs.rflags = 0x2 | 0x200 | 0x40;
        fd.set_regs(&regs).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.gdt.base = 0x1000 + u64::from(i);
        sregs.gdt.limit = 0x7f;
        sregs.idt.base = 0x2000;
        sregs.idt.limit = 0xfff;
        fd.set_sregs(&sregs).unwrap();
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_SYSENTER_ESP,
                // Canonical (bit 47 clear): some hosts' KVM canonicalizes SYSENTER_ESP writes,
                // turning 0xdead_beef_0000 into 0xffff_dead_beef_0000.
                data: 0x7ead_beef_0000 + u64::from(i),
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_KERNEL_GS_BASE,
                data: 0xffff_8880_0000_0000 | u64::from(i),
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(fd.set_msrs(&msrs).unwrap(), 2);
        let mut lapic = fd.get_lapic().unwrap();
        set_reg32(&mut lapic.regs, APIC_TASKPRI, 0x30 + i);
        set_reg32(&mut lapic.regs, APIC_LVTT, 0x0001_00ef); // masked, vector 0xef
        fd.set_lapic(&lapic).unwrap();
        let mut dr = fd.get_debug_regs().unwrap();
        dr.db = [0x1000, 0x2000, 0x3000 + u64::from(i), 0x4000];
        fd.set_debug_regs(&dr).unwrap();
    }

    /// The section with the values KVM changes by design blanked: the TSC keeps counting.
    fn comparable(s: &VcpuState) -> Vec<u8> {
        let mut s = s.clone();
        for (i, v) in &mut s.msrs {
            if *i == MSR_IA32_TSC {
                *v = 0;
            }
        }
        s.to_section().data
    }

    fn tsc(s: &VcpuState) -> u64 {
        s.msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC).unwrap().1
    }

    /// VM sections with the values KVM changes by design blanked: the PIT's count load times are
    /// host timestamps taken at KVM_SET_PIT2, and the clock keeps running (checked separately).
    fn comparable_vm(sections: &[StateSection]) -> Vec<StateSection> {
        let mut out = sections.to_vec();
        for s in &mut out {
            match s.id.as_str() {
                IRQCHIP_SECTION => {
                    // Pending-request bits change by design: the restored PIT keeps running and
                    // may raise IRQ 0 between the restore and the second save (seen under load).
                    let mut r = StateReader::from_bytes("irqchip", &s.data);
                    let mut w = StateWriter::new();
                    for _ in 0..3 {
                        let mut c: kvm_irqchip = get_pod(&mut r, "irqchip").unwrap();
                        // Chip 2 holds the IOAPIC member of the union, chips 0 and 1 the PIC one
                        // (writing a union field is safe).
                        if c.chip_id == KVM_IRQCHIP_IOAPIC {
                            c.chip.ioapic.irr = 0;
                        } else {
                            c.chip.pic.irr = 0;
                            c.chip.pic.last_irr = 0;
                        }
                        put_pod(&mut w, &c);
                    }
                    s.data = w.into_bytes();
                }
                PIT_SECTION => {
                    let mut r = StateReader::from_bytes("pit", &s.data);
                    let mut pit: kvm_pit_state2 = get_pod(&mut r, "pit").unwrap();
                    for c in &mut pit.channels {
                        c.count_load_time = 0;
                    }
                    let mut w = StateWriter::new();
                    put_pod(&mut w, &pit);
                    s.data = w.into_bytes();
                }
                CLOCK_SECTION => {
                    let mut r = StateReader::from_bytes("clock", &s.data);
                    let _: kvm_clock_data = get_pod(&mut r, "clock").unwrap();
                    // All of it: the value runs, and the flags (which of realtime/host TSC are
                    // valid, whether the TSC is stable) depend on KVM's master clock state.
                    let mut w = StateWriter::new();
                    put_pod(&mut w, &kvm_clock_data::default());
                    s.data = w.into_bytes();
                }
                _ => {}
            }
        }
        out
    }

    /// A state with distinctive values and no KVM behind it.
    fn synthetic_state() -> VcpuState {
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x1234,
            ftwx: 0xa5,
            last_opcode: 0x0bcd,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[7][15] = 0x77;
        fpu.xmm[15][0] = 0xee;
        VcpuState {
            index: 3,
            parts: parts::XCRS,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0x7,
                ebx: 0xdead_beef,
                ..Default::default()
            }],
            regs: kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            fpu,
            mp_state: 1,
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            xcrs: kvm_xcrs::default(),
            xsave: vec![0x5a5a_5a5a; XSAVE_LEGACY_LEN / 4],
            msrs: vec![(MSR_IA32_TSC, 42)],
            tsc_khz: 0,
        }
    }

    #[test]
    fn fpu_keeps_the_kvm_layout_in_the_section() {
        let state = synthetic_state();
        let section = state.to_section();
        // index, parts, CPUID count and entry, regs, sregs (each struct length-prefixed), then
        // the FPU as `struct kvm_fpu`'s 416 bytes.
        let at = 12 + (4 + 40) + (4 + 144) + (4 + 312);
        let d = &section.data;
        assert_eq!(&d[at..at + 4], &416u32.to_le_bytes());
        let fpu = &d[at + 4..at + 4 + 416];
        assert_eq!(fpu[7 * 16 + 15], 0x77);
        assert_eq!(&fpu[128..130], &0x037fu16.to_le_bytes());
        assert_eq!(&fpu[130..132], &0x1234u16.to_le_bytes());
        assert_eq!(fpu[132], 0xa5);
        assert_eq!(&fpu[134..136], &0x0bcdu16.to_le_bytes());
        assert_eq!(&fpu[136..144], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&fpu[144..152], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        assert_eq!(fpu[152 + 15 * 16], 0xee);
        assert_eq!(&fpu[408..412], &0x1f80u32.to_le_bytes());

        let back = VcpuState::from_section(&section, 3).unwrap();
        assert!(back.fpu == state.fpu);
        assert_eq!(back.regs.rip, state.regs.rip);
        assert_eq!(back.cpuid[0].ebx, 0xdead_beef);
        assert_eq!(back.to_section().data, section.data);
    }

    #[test]
    fn a_struct_of_the_wrong_length_is_malformed() {
        let mut w = StateWriter::new();
        w.bytes(&[0; 143]);
        let data = w.into_bytes();
        let mut r = StateReader::from_bytes("cpu0", &data);
        let err = get_pod::<kvm_regs>(&mut r, "regs").unwrap_err();
        assert!(
            matches!(&err, StateError::Malformed { reason, .. } if reason == "regs: 143 bytes, expected 144"),
            "{err}"
        );
    }

    #[test]
    fn save_restore_into_a_second_vm() {
        let Some(kvm) = crate::testing::require_kvm() else {
            return;
        };
        let (vm1, vcpus1) = new_vm(&kvm, 2);
        for (i, fd) in vcpus1.iter().enumerate() {
            make_distinctive(&kvm, fd, i as u32);
        }
        // Distinctive VM state: an IOAPIC redirection entry and a PIT channel.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm1.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip_id is KVM_IRQCHIP_IOAPIC, so the `ioapic` member is the live one.
        unsafe {
            ioapic.chip.ioapic.redirtbl[3].bits = 0x0001_0000_0000_0035;
            ioapic.chip.ioapic.id = 0;
        }
        vm1.set_irqchip(&ioapic).unwrap();
        let mut pit = vm1.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        vm1.set_pit2(&pit).unwrap();

        let vm_sections = save_vm(&vm1).unwrap();
        let saved: Vec<VcpuState> = vcpus1
            .iter()
            .enumerate()
            .map(|(i, fd)| VcpuState::save(fd, i as u32, &kvm).unwrap())
            .collect();
        let sections: Vec<StateSection> = saved.iter().map(|s| s.to_section()).collect();
        assert_eq!(sections[1].id, "cpu1");
        assert_eq!(saved[0].regs.rax, 0x1111_2222_3333_4444);
        assert_eq!(saved[0].parts & parts::NESTED, 0);
        assert!(saved[0].msrs.len() > 10, "{:?}", saved[0]);
        assert_eq!(saved[0].msrs[0].0, MSR_IA32_TSC);
        assert!(
            saved[1]
                .msrs
                .contains(&(MSR_IA32_SYSENTER_ESP, 0x7ead_beef_0001)),
            "{:x?}",
            saved[1].msrs.iter().find(|m| m.0 == MSR_IA32_SYSENTER_ESP)
        );

        // Through the state file format, as a snapshot does it.
        let mut all = vm_sections.clone();
        all.extend(sections.iter().cloned());
        let file = migration::snapshot::write_snapshot(Vec::new(), &all).unwrap();
        let all = migration::snapshot::SnapshotReader::read_all(&file[..]).unwrap();

        let (vm2, vcpus2) = new_vm(&kvm, 2);
        restore_vm(&vm2, &all).unwrap();
        for (i, fd) in vcpus2.iter().enumerate() {
            let s = find_section(&all, &section_id(i as u32)).unwrap();
            restore_vcpu(fd, i as u32, &kvm, s).unwrap();
        }

        let again: Vec<VcpuState> = vcpus2
            .iter()
            .enumerate()
            .map(|(i, fd)| VcpuState::save(fd, i as u32, &kvm).unwrap())
            .collect();
        for (a, b) in saved.iter().zip(&again) {
            let (ma, mb): (Vec<u32>, Vec<u32>) = (
                a.msrs.iter().map(|m| m.0).collect(),
                b.msrs.iter().map(|m| m.0).collect(),
            );
            assert_eq!(ma, mb, "vCPU {}: the same MSRs are saved", a.index);
            for (x, y) in a.msrs.iter().zip(&b.msrs) {
                if x.0 != MSR_IA32_TSC {
                    assert_eq!(x, y, "vCPU {}: MSR {:#x}", a.index, x.0);
                }
            }
            assert_eq!(
                a.lapic.as_bytes(),
                b.lapic.as_bytes(),
                "vCPU {}: LAPIC",
                a.index
            );
            assert_eq!(a.xsave, b.xsave, "vCPU {}: XSAVE", a.index);
            assert!(
                comparable(a) == comparable(b),
                "vCPU {}: sections differ",
                a.index
            );
            // Time continues: the TSC resumes from the saved value (plus the time the
            // restore and the second save took), it does not restart or jump far ahead.
            let khz = u64::from(a.tsc_khz.max(1_000_000));
            assert!(tsc(b) >= tsc(a), "TSC went back: {} -> {}", tsc(a), tsc(b));
            assert!(
                tsc(b) - tsc(a) < khz * 10_000,
                "TSC jumped by {}",
                tsc(b) - tsc(a)
            );
        }
        let vm_again = save_vm(&vm2).unwrap();
        assert_eq!(comparable_vm(&vm_sections), comparable_vm(&vm_again));
        let clock = |s: &[StateSection]| {
            let s = find_section(s, CLOCK_SECTION).unwrap();
            let mut r = StateReader::from_bytes("clock", &s.data);
            get_pod::<kvm_clock_data>(&mut r, "clock").unwrap().clock
        };
        let (c1, c2) = (clock(&vm_sections), clock(&vm_again));
        assert!(
            c2 >= c1 && c2 - c1 < 10_000_000_000,
            "kvmclock {c1} -> {c2}"
        );
    }

    #[test]
    fn restore_rejects_bad_sections() {
        let Some(kvm) = crate::testing::require_kvm() else {
            return;
        };
        let (vm, vcpus) = new_vm(&kvm, 2);
        make_distinctive(&kvm, &vcpus[0], 0);
        let good = save_vcpu(&vcpus[0], 0, &kvm).unwrap();
        let before = vcpus[1].get_regs().unwrap();

        let mut other_version = good.clone();
        other_version.version = VCPU_STATE_VERSION + 1;
        let err = restore_vcpu(&vcpus[0], 0, &kvm, &other_version).unwrap_err();
        assert!(
            matches!(
                err,
                VcpuStateError::State(StateError::Version {
                    found: 2,
                    supported: 1,
                    ..
                })
            ),
            "{err}"
        );

        for cut in [1, 100, good.data.len() / 2, good.data.len() - 1] {
            let mut truncated = good.clone();
            truncated.data.truncate(good.data.len() - cut);
            let err = restore_vcpu(&vcpus[0], 0, &kvm, &truncated).unwrap_err();
            assert!(
                matches!(err, VcpuStateError::State(StateError::Malformed { .. })),
                "cut {cut}: {err}"
            );
        }
        let mut longer = good.clone();
        longer.data.push(0);
        assert!(restore_vcpu(&vcpus[0], 0, &kvm, &longer).is_err());

        // cpu0's section offered to vCPU 1, as is and renamed.
        let err = restore_vcpu(&vcpus[1], 1, &kvm, &good).unwrap_err();
        assert!(
            matches!(err, VcpuStateError::WrongVcpu { index: 1, found: 0 }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "vCPU 1: the section is the state of vCPU 0"
        );
        let mut renamed = good.clone();
        renamed.id = section_id(1);
        let err = restore_vcpu(&vcpus[1], 1, &kvm, &renamed).unwrap_err();
        assert!(
            matches!(err, VcpuStateError::WrongVcpu { index: 1, found: 0 }),
            "{err}"
        );

        // Nested state is refused, unknown parts are malformed.
        for (bit, nested) in [(parts::NESTED, true), (1 << 20, false)] {
            let mut s = good.clone();
            let p = u32::from_le_bytes(s.data[4..8].try_into().unwrap()) | bit;
            s.data[4..8].copy_from_slice(&p.to_le_bytes());
            let err = restore_vcpu(&vcpus[0], 0, &kvm, &s).unwrap_err();
            assert_eq!(
                matches!(err, VcpuStateError::Unsupported { .. }),
                nested,
                "{err}"
            );
        }
        // None of these touched vCPU 1.
        assert_eq!(vcpus[1].get_regs().unwrap().as_bytes(), before.as_bytes());
        // The good one works.
        restore_vcpu(&vcpus[0], 0, &kvm, &good).unwrap();

        // VM sections: missing, wrong version, truncated.
        let vm_sections = save_vm(&vm).unwrap();
        let without_pit: Vec<StateSection> = vm_sections
            .iter()
            .filter(|s| s.id != PIT_SECTION)
            .cloned()
            .collect();
        let err = restore_vm(&vm, &without_pit).unwrap_err();
        assert!(
            matches!(&err, crate::vm_state::VmStateError::Snapshot(SnapshotError::MissingSection(id)) if id == "pit"),
            "{err}"
        );
        let mut bad = vm_sections.clone();
        bad[0].version = 9;
        assert!(restore_vm(&vm, &bad).is_err());
        let mut bad = vm_sections.clone();
        bad[0].data.truncate(600);
        assert!(restore_vm(&vm, &bad).is_err());
        let mut bad = vm_sections.clone();
        // Swap the PIC master's chip id.
        bad[0].data[4] = 1;
        assert!(restore_vm(&vm, &bad).is_err());
        restore_vm(&vm, &vm_sections).unwrap();
    }
}
