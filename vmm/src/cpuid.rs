//! Per-vCPU CPUID: KVM's supported CPUID with skiff's topology, then an optional CPU template.
//!
//! Topology: one socket, `num_cpus` cores, one thread per core; vCPU `i` has APIC ID `i`. This
//! matches the MADT built by [`crate::acpi`] (processor UID == APIC ID == vCPU index).
//!
//! Call [`vcpu_cpuid`] once per vCPU with the result of `Kvm::get_supported_cpuid` and hand the
//! result to `VcpuFd::set_cpuid2`. KVM's paravirtual leaves (0x4000_0000 and up) are passed
//! through as KVM reports them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::cpu_template::{CpuTemplate, CpuTemplateError};

/// Errors computing a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The VM has no vCPU.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU index {vcpu_index} is out of range for {num_cpus} vCPUs")]
    InvalidVcpuIndex {
        /// The vCPU index.
        vcpu_index: u32,
        /// The vCPU count.
        num_cpus: u32,
    },
    /// The resulting CPUID has more entries than KVM accepts.
    #[error("the vCPU's CPUID would have {0} entries, more than KVM accepts")]
    TooManyEntries(usize),
    /// The CPU template could not be applied.
    #[error(transparent)]
    Template(#[from] CpuTemplateError),
}

/// CPU vendor, from CPUID leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" or "HygonGenuine" (same topology leaves).
    Amd,
    /// Anything else, or no leaf 0.
    Other,
}

/// CPUID leaf 0 vendor string (EBX, EDX, ECX) of Intel.
pub const VENDOR_INTEL: &[u8; 12] = b"GenuineIntel";
/// CPUID leaf 0 vendor string of AMD.
pub const VENDOR_AMD: &[u8; 12] = b"AuthenticAMD";
/// CPUID leaf 0 vendor string of Hygon.
pub const VENDOR_HYGON: &[u8; 12] = b"HygonGenuine";

/// The vendor named by leaf 0 of `cpuid`.
pub fn cpu_vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0 && e.index == 0)
    else {
        return CpuVendor::Other;
    };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &vendor {
        v if v == VENDOR_INTEL => CpuVendor::Intel,
        v if v == VENDOR_AMD || v == VENDOR_HYGON => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

/// Leaf 1: version and feature information.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 0xB: extended topology enumeration.
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: V2 extended topology enumeration.
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0008: address sizes and (AMD) core count.
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000_001D: cache topology (AMD).
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
/// Leaf 0x8000_001E: extended APIC ID, core and node IDs (AMD).
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 EDX: HTT (more than one logical processor per package).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Extended topology level type: SMT.
const TOPOLOGY_LEVEL_SMT: u32 = 1;
/// Extended topology level type: core.
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// Cache level whose cache all cores of the package share.
const SHARED_CACHE_LEVEL: u32 = 3;

/// Number of bits needed to hold `n` distinct IDs (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - (n - 1).leading_zeros()
    }
}

/// Sets `reg[shift..shift+width)` to the low `width` bits of `value`.
fn set_field(reg: &mut u32, shift: u32, width: u32, value: u32) {
    let mask = field_max(width);
    *reg = (*reg & !(mask << shift)) | ((value & mask) << shift);
}

/// Largest value of a `width`-bit field: counts that do not fit saturate to it.
fn field_max(width: u32) -> u32 {
    ((1u64 << width) - 1) as u32
}

/// KVM paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_FEATURE_PV_SEND_IPI` (EAX bit 11 of [`KVM_CPUID_FEATURES`]).
pub const KVM_FEATURE_PV_SEND_IPI_BIT: u32 = 11;

/// Host quirks applied to KVM's supported CPUID before any per-vCPU computation.
///
/// On nested KVM built on PVM (`/sys/module/kvm_pvm` present, see shared/HOST.md) a Linux guest that
/// uses paravirtual IPIs hangs while bringing up its secondary CPUs (seen with QEMU as well, which
/// boots once `kvm-pv-ipi=off`), so the feature is hidden there. Returns what was changed.
pub fn apply_host_quirks(cpuid: &mut CpuId, pvm_host: bool) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if pvm_host {
        for e in cpuid.as_mut_slice().iter_mut() {
            if e.function == KVM_CPUID_FEATURES && e.eax & (1 << KVM_FEATURE_PV_SEND_IPI_BIT) != 0 {
                e.eax &= !(1 << KVM_FEATURE_PV_SEND_IPI_BIT);
                changed.push(
                    "KVM_FEATURE_PV_SEND_IPI hidden (PV IPIs hang SMP bring-up on PVM hosts)",
                );
            }
        }
    }
    changed
}

/// Computes the CPUID of vCPU `vcpu_index` of `num_cpus` from KVM's supported CPUID, then applies
/// `template` (if any) on top.
///
/// Topology: one socket of `num_cpus` single-threaded cores; the APIC ID is the vCPU index.
///
/// * leaf 1: EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package, EDX.HTT when
///   `num_cpus > 1`, ECX bit 31 (hypervisor present);
/// * leaf 4, every subleaf describing a cache: EAX[31:26] cores per package − 1, EAX[25:14]
///   threads sharing the cache − 1 (all cores share the L3, nothing else is shared);
/// * leaves 0xB and 0x1F (when KVM reports them): SMT level, core level, invalid level, with the
///   x2APIC ID in EDX;
/// * AMD: leaf 0x8000_0008 ECX (core count, APIC ID size), leaf 0x8000_001D cache sharing and
///   leaf 0x8000_001E (extended APIC ID, core ID, one node).
pub fn vcpu_cpuid(
    supported: &CpuId,
    vcpu_index: u32,
    num_cpus: u32,
    template: Option<&CpuTemplate>,
) -> Result<CpuId, CpuidError> {
    if num_cpus == 0 {
        return Err(CpuidError::NoCpus);
    }
    if vcpu_index >= num_cpus {
        return Err(CpuidError::InvalidVcpuIndex {
            vcpu_index,
            num_cpus,
        });
    }
    let vendor = cpu_vendor(supported);
    let apic_id = vcpu_index;
    let core_bits = id_bits(num_cpus);

    let mut entries: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    let mut topology_done = [false; 2];
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                set_field(&mut e.ebx, 24, 8, apic_id);
                set_field(&mut e.ebx, 16, 8, num_cpus.min(field_max(8)));
                if num_cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            // Cache type 0 means "no more caches": its other fields are meaningless, keep them.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                set_field(&mut e.eax, 26, 6, (num_cpus - 1).min(field_max(6)));
                let sharing = cache_sharing(e.eax, num_cpus).min(field_max(12));
                set_field(&mut e.eax, 14, 12, sharing);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // KVM reports the host's levels; replace them all with ours, once.
                let done = &mut topology_done[usize::from(e.function == LEAF_EXT_TOPOLOGY_V2)];
                if !*done {
                    *done = true;
                    entries.extend(extended_topology(e.function, apic_id, num_cpus));
                }
                continue;
            }
            LEAF_AMD_SIZES if vendor == CpuVendor::Amd => {
                // ECX[15:12] APIC ID bits of the core ID, ECX[7:0] number of cores − 1.
                set_field(&mut e.ecx, 12, 4, core_bits);
                set_field(&mut e.ecx, 0, 8, (num_cpus - 1).min(field_max(8)));
            }
            LEAF_AMD_CACHE_TOPOLOGY if vendor == CpuVendor::Amd && e.eax & 0x1f != 0 => {
                let sharing = cache_sharing(e.eax, num_cpus).min(field_max(12));
                set_field(&mut e.eax, 14, 12, sharing);
            }
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = apic_id;
                // EBX[15:8] threads per core − 1 = 0, EBX[7:0] core ID.
                set_field(&mut e.ebx, 8, 8, 0);
                set_field(&mut e.ebx, 0, 8, vcpu_index);
                // ECX[10:8] nodes per processor − 1 = 0, ECX[7:0] node ID = 0.
                set_field(&mut e.ecx, 0, 11, 0);
            }
            _ => {}
        }
        entries.push(e);
    }

    let mut cpuid =
        CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(entries.len()))?;
    if let Some(template) = template {
        template.apply(&mut cpuid)?;
    }
    Ok(cpuid)
}

/// Threads sharing a cache − 1, for a leaf 4 / 0x8000_001D EAX: all vCPUs share the L3, every
/// other cache belongs to one single-threaded core.
fn cache_sharing(eax: u32, num_cpus: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    if level == SHARED_CACHE_LEVEL {
        num_cpus - 1
    } else {
        0
    }
}

/// Subleaves 0 (SMT), 1 (core) and 2 (invalid) of leaf 0xB or 0x1F.
fn extended_topology(function: u32, x2apic_id: u32, num_cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let level = |index: u32, shift: u32, count: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        // EAX[4:0]: shift of the x2APIC ID to the next level's ID.
        eax: shift,
        // EBX[15:0]: logical processors at this level.
        ebx: count.min(field_max(16)),
        // ECX[15:8]: level type, ECX[7:0]: level number (== subleaf).
        ecx: (level_type << 8) | index,
        edx: x2apic_id,
        ..Default::default()
    };
    [
        level(0, 0, 1, TOPOLOGY_LEVEL_SMT),
        level(1, id_bits(num_cpus), num_cpus, TOPOLOGY_LEVEL_CORE),
        level(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_regs(vendor: &[u8; 12]) -> (u32, u32, u32) {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        (word(0), word(4), word(8))
    }

    /// A synthetic KVM_GET_SUPPORTED_CPUID result of a host with SMT (2 threads/core, 8 cores).
    fn supported(vendor: &[u8; 12]) -> CpuId {
        let (ebx, edx, ecx) = vendor_regs(vendor);
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        // Leaf 4 EAX: type | level << 5 | self-init | host sharing bits | host cores − 1.
        let cache = |ty: u32, level: u32, sharing: u32| {
            ty | (level << 5) | (1 << 8) | (sharing << 14) | (7 << 26)
        };
        CpuId::from_entries(&[
            entry(0, 0, 0, [0x1f, ebx, ecx, edx]),
            // EBX: APIC ID 0x0e, 16 logical, CLFLUSH 8, brand 0; no HTT in EDX.
            entry(1, 0, 0, [0x000906ea, 0x0e10_0800, 0x7ffa_3203, 0x078b_fbff]),
            entry(4, 0, sig, [cache(1, 1, 1), 0x01c0_003f, 0x3f, 0]),
            entry(4, 1, sig, [cache(3, 2, 1), 0x01c0_003f, 0x3ff, 0]),
            entry(4, 2, sig, [cache(3, 3, 15), 0x03c0_003f, 0x3fff, 0]),
            entry(4, 3, sig, [0, 0, 0, 0]),
            entry(0xb, 0, sig, [1, 2, 0x100, 0x0e]),
            entry(0xb, 1, sig, [4, 16, 0x201, 0x0e]),
            entry(0xb, 2, sig, [0, 0, 0x2, 0x0e]),
            entry(0x1f, 0, sig, [1, 2, 0x100, 0x0e]),
            entry(0x1f, 1, sig, [4, 16, 0x201, 0x0e]),
            entry(
                0x4000_0000,
                0,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, 0, [0x0100_7afb, 0, 0, 0]),
            entry(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            // ECX: APIC ID size 7, 15 cores (AMD semantics); Intel leaves ECX 0.
            entry(0x8000_0008, 0, 0, [0x3030, 0, 0x700f, 0]),
        ])
        .unwrap()
    }

    fn supported_amd() -> CpuId {
        let mut c = supported(VENDOR_AMD);
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        c.push(entry(
            0x8000_001d,
            0,
            sig,
            [0x121 | (1 << 14), 0x3f, 0x3f, 0],
        ))
        .unwrap();
        c.push(entry(
            0x8000_001d,
            1,
            sig,
            [0x163 | (15 << 14), 0x3f, 0x3fff, 0],
        ))
        .unwrap();
        c.push(entry(0x8000_001e, 0, 0, [0x0e, 0x0107, 0x0100, 0]))
            .unwrap();
        c
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        find(cpuid, function, index).unwrap_or_else(|| panic!("no leaf {function:#x}/{index}"))
    }

    fn check_topology(c: &CpuId, vcpu: u32, n: u32) {
        let leaf1 = get(c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, vcpu, "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, n, "logical processors");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT != 0, n > 1, "HTT");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0, "hypervisor bit");
        assert_eq!(leaf1.eax, 0x000906ea);

        for index in 0..3 {
            let eax = get(c, 4, index).eax;
            assert_eq!(eax >> 26, n - 1, "leaf 4.{index} cores − 1");
            let sharing = (eax >> 14) & 0xfff;
            let level = (eax >> 5) & 7;
            let expected = if level == 3 { n - 1 } else { 0 };
            assert_eq!(sharing, expected, "leaf 4.{index} sharing");
            assert_eq!(
                eax & 0x3fff,
                get(&supported(VENDOR_INTEL), 4, index).eax & 0x3fff
            );
        }
        assert_eq!(get(c, 4, 3).eax, 0, "null cache subleaf untouched");

        let shift = match n {
            1 => 0,
            4 => 2,
            _ => unreachable!(),
        };
        for function in [0xb, 0x1f] {
            let levels: Vec<_> = c
                .as_slice()
                .iter()
                .filter(|e| e.function == function)
                .collect();
            assert_eq!(levels.len(), 3, "leaf {function:#x} subleaves");
            for (i, e) in levels.iter().enumerate() {
                assert_eq!(e.index, i as u32);
                assert_eq!(e.edx, vcpu, "x2APIC ID");
                assert_eq!(e.ecx & 0xff, i as u32, "level number");
                assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            }
            assert_eq!(
                (levels[0].eax, levels[0].ebx, levels[0].ecx >> 8),
                (0, 1, 1),
                "SMT"
            );
            assert_eq!(
                (levels[1].eax, levels[1].ebx, levels[1].ecx >> 8),
                (shift, n, 2),
                "core"
            );
            assert_eq!(
                (levels[2].eax, levels[2].ebx, levels[2].ecx >> 8),
                (0, 0, 0),
                "invalid"
            );
        }

        // KVM's paravirtual leaves pass through.
        assert_eq!(
            get(c, 0x4000_0000, 0),
            get(&supported(VENDOR_INTEL), 0x4000_0000, 0)
        );
        assert_eq!(
            get(c, 0x4000_0001, 0),
            get(&supported(VENDOR_INTEL), 0x4000_0001, 0)
        );
    }

    #[test]
    fn intel_topology() {
        let s = supported(VENDOR_INTEL);
        assert_eq!(cpu_vendor(&s), CpuVendor::Intel);
        for (vcpu, n) in [(0, 4), (3, 4), (0, 1)] {
            let c = vcpu_cpuid(&s, vcpu, n, None).unwrap();
            check_topology(&c, vcpu, n);
            // Intel: leaf 0x8000_0008 ECX is not touched.
            assert_eq!(get(&c, 0x8000_0008, 0), get(&s, 0x8000_0008, 0));
            assert_eq!(
                c.as_slice().len(),
                s.as_slice().len() + 1,
                "0x1F gained a subleaf"
            );
        }
    }

    #[test]
    fn amd_topology() {
        let s = supported_amd();
        assert_eq!(cpu_vendor(&s), CpuVendor::Amd);
        for (vcpu, n) in [(0, 4), (3, 4), (0, 1)] {
            let c = vcpu_cpuid(&s, vcpu, n, None).unwrap();
            check_topology(&c, vcpu, n);
            let ecx = get(&c, 0x8000_0008, 0).ecx;
            assert_eq!(ecx & 0xff, n - 1, "NC");
            assert_eq!((ecx >> 12) & 0xf, if n == 4 { 2 } else { 0 }, "ApicIdSize");
            assert_eq!(get(&c, 0x8000_0008, 0).eax, 0x3030);

            assert_eq!((get(&c, 0x8000_001d, 0).eax >> 14) & 0xfff, 0, "L1 private");
            assert_eq!(
                (get(&c, 0x8000_001d, 1).eax >> 14) & 0xfff,
                n - 1,
                "L3 shared"
            );
            assert_eq!(get(&c, 0x8000_001d, 1).eax & 0x3fff, 0x163);

            let ext = get(&c, 0x8000_001e, 0);
            assert_eq!(ext.eax, vcpu, "extended APIC ID");
            assert_eq!(ext.ebx & 0xffff, vcpu, "core ID, one thread per core");
            assert_eq!(ext.ecx & 0x7ff, 0, "node 0 of 1");
        }
    }

    #[test]
    fn hygon_is_amd_and_unknown_vendor_is_other() {
        assert_eq!(cpu_vendor(&supported(VENDOR_HYGON)), CpuVendor::Amd);
        let other = supported(b"VirtualCPU  ");
        assert_eq!(cpu_vendor(&other), CpuVendor::Other);
        let c = vcpu_cpuid(&other, 1, 2, None).unwrap();
        assert_eq!(get(&c, 0x8000_0008, 0), get(&other, 0x8000_0008, 0));
        assert_eq!(cpu_vendor(&CpuId::new(0).unwrap()), CpuVendor::Other);
    }

    #[test]
    fn topology_leaves_are_only_added_when_supported() {
        let mut s = supported(VENDOR_INTEL);
        s.retain(|e| e.function != 0x1f);
        let c = vcpu_cpuid(&s, 1, 2, None).unwrap();
        assert!(find(&c, 0x1f, 0).is_none());
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(find(&c, 0x8000_001e, 0).is_none());
    }

    #[test]
    fn large_vm_fields_saturate() {
        let s = supported(VENDOR_INTEL);
        let c = vcpu_cpuid(&s, 299, 300, None).unwrap();
        let leaf1 = get(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 299 & 0xff, "8-bit initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 0xff, "logical count saturates");
        assert_eq!(get(&c, 4, 0).eax >> 26, 63, "cores − 1 saturates");
        assert_eq!(get(&c, 0xb, 1).edx, 299, "full x2APIC ID");
        assert_eq!(get(&c, 0xb, 1).eax, 9);
        assert_eq!(get(&c, 0xb, 1).ebx, 300);
    }

    #[test]
    fn invalid_arguments() {
        let s = supported(VENDOR_INTEL);
        assert!(matches!(
            vcpu_cpuid(&s, 0, 0, None),
            Err(CpuidError::NoCpus)
        ));
        assert!(matches!(
            vcpu_cpuid(&s, 4, 4, None),
            Err(CpuidError::InvalidVcpuIndex {
                vcpu_index: 4,
                num_cpus: 4
            })
        ));
    }

    #[test]
    fn template_is_applied_last() {
        let s = supported(VENDOR_INTEL);
        // Clear the hypervisor bit and force the APIC ID byte of leaf 1 EBX to 0xAA; clear the
        // SMT level's EBX of leaf 0xB (which vcpu_cpuid synthesised).
        let t = CpuTemplate::from_json(
            r#"{"cpuid_modifiers": [
                {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                    {"register": "ecx", "bitmap": "0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
                    {"register": "ebx", "bitmap": "0b10101010xxxxxxxxxxxxxxxxxxxxxxxx"}
                ]},
                {"leaf": "0xb", "subleaf": "0x0", "flags": 1, "modifiers": [
                    {"register": "ebx", "bitmap": "0b00000000000000000000000000000000"}
                ]}
            ]}"#,
        )
        .unwrap();
        let c = vcpu_cpuid(&s, 3, 4, Some(&t)).unwrap();
        let leaf1 = get(&c, 1, 0);
        assert_eq!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ebx >> 24, 0xaa);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "x bits keep skiff's value");
        assert_eq!(leaf1.ecx & !LEAF1_ECX_HYPERVISOR, 0x7ffa_3203);
        assert_eq!(get(&c, 0xb, 0).ebx, 0);
        assert_eq!(get(&c, 0xb, 1).ebx, 4);
    }

    #[test]
    fn template_naming_a_missing_leaf_fails() {
        let s = supported(VENDOR_INTEL);
        let t = CpuTemplate::from_json(
            r#"{"cpuid_modifiers": [{"leaf": "0x8000001e", "modifiers": []}]}"#,
        )
        .unwrap();
        let err = vcpu_cpuid(&s, 0, 1, Some(&t)).unwrap_err();
        assert!(matches!(
            err,
            CpuidError::Template(CpuTemplateError::LeafNotPresent {
                leaf: 0x8000_001e,
                subleaf: 0
            })
        ));
        assert!(err.to_string().contains("0x8000001e"), "{err}");
    }

    #[test]
    fn with_kvm_supported_cpuid() {
        use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
        let Some(kvm) = crate::testing::require_kvm() else {
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        let num_cpus = 2;
        for vcpu_index in 0..num_cpus {
            let cpuid = vcpu_cpuid(&supported, vcpu_index, num_cpus, None).unwrap();
            let leaf1 = get(&cpuid, 1, 0);
            assert_eq!(leaf1.ebx >> 24, vcpu_index);
            assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
            if let Some(b) = find(&cpuid, 0xb, 1) {
                assert_eq!((b.eax, b.ebx, b.edx), (1, 2, vcpu_index));
            }
            // KVM accepts it.
            let vcpu = vm.create_vcpu(u64::from(vcpu_index)).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
        }
    }

    #[test]
    fn pvm_quirk_hides_pv_ipi_only_on_pvm_hosts() {
        let mut c = supported(VENDOR_INTEL);
        let before = get(&c, KVM_CPUID_FEATURES, 0);
        assert_ne!(before.eax & (1 << KVM_FEATURE_PV_SEND_IPI_BIT), 0);
        assert!(apply_host_quirks(&mut c, false).is_empty());
        assert_eq!(get(&c, KVM_CPUID_FEATURES, 0), before);
        assert_eq!(apply_host_quirks(&mut c, true).len(), 1);
        let after = get(&c, KVM_CPUID_FEATURES, 0);
        assert_eq!(after.eax, before.eax & !(1 << KVM_FEATURE_PV_SEND_IPI_BIT));
        assert_eq!(
            (after.ebx, after.ecx, after.edx),
            (before.ebx, before.ecx, before.edx)
        );
    }
}
