//! `vfio`: the vfio-user test device `skiff-testdev` (1b36:0f5f) as the guest sees it through
//! skiff's passthrough: BAR sizing, registers, DMA into and out of guest RAM (data verified),
//! MSI-X and level-triggered INTx, MSI (`vfio.msi=1`, needs `skiff-testdev --msi`), direct access to its device memory (BAR 2), DMA remapping
//! through the virtio-iommu (`vfio.iommu=1`), and peer-to-peer writes between two devices
//! (`vfio.p2p=1`), or their refusal when the peer is configured `p2p=off` (`vfio.p2p_off=1`).
//!
//! The register contract is `tests/testdev/src/regs.rs`, included below (not copied). Every check
//! prints `vfio: <check> ok` (per-device checks append ` (BB:DD.F)`), the run ends with
//! `vfio: all ok` and `result: PASS`; a failed check prints `vfio: <check> FAIL (BB:DD.F) <why>`
//! and panics. See the README for the parameters and the full output.

#[allow(dead_code)]
#[rustfmt::skip]
#[path = "../../../../testdev/src/regs.rs"]
mod regs;

pub(super) mod bench;
mod dev;
mod irq;
pub(super) mod migrate;
mod p2p;
mod ram;
mod remap;

use dev::*;
use irq::*;
use p2p::*;
use ram::*;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::iommu::{self as iommu_scenario, map_range, IovaSpace};
use super::report::{fail, param_u64, param_vector};
use crate::acpi::viot::Viot;
use crate::acpi::{aml, Acpi};
use crate::arch::ioapic::{IoApic, Polarity, Trigger};
use crate::arch::{interrupts, lapic, paging, time};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::pci::msi::{self, Msi};
use crate::pci::msix::{self, Msix};
use crate::pci::{bar, capabilities, command, update_command, ConfigSpace, PciFunction};
use crate::println;
use crate::virtio::iommu::{self, Iommu, ResvMem, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};
use crate::virtio::Platform;

/// Default MSI-X vector of the first device (the n-th device uses this + n).
const MSIX_VECTOR: u8 = 0x38;
/// Default INTx vector of the first device (the n-th device uses this + n).
const INTX_VECTOR: u8 = 0x48;
/// Default MSI vector of the first device (the n-th device uses this + n).
const MSI_VECTOR: u8 = 0x58;
/// Default DMA length: odd, spans three pages.
const DEFAULT_LEN: u64 = 9029;
/// Default length of a peer-to-peer write.
const DEFAULT_P2P_LEN: u64 = 4660;
/// Where in the peer's device memory peer-to-peer writes land (unaligned on purpose).
const P2P_OFFSET: u64 = 0x2_0010;
/// Bytes checked on either side of every DMA target (they must stay untouched).
const GUARD: usize = 64;
/// Filler of guest buffers before the device writes them.
const SENTINEL: u8 = 0xA5;
/// Filler of device memory around peer-to-peer targets.
const MEM_SENTINEL: u32 = 0x5A5A_5A5A;
/// Length of the small commands of the interrupt and fault tests.
const SMALL_LEN: u32 = 256;
/// IOMMU domain of the first device behind the virtio-iommu (the n-th uses this + n when the
/// domain range allows it).
const FIRST_DOMAIN: u32 = 1;

/// Print `vfio: <check> ok[ (<bdf>)]`.
fn ok(check: &str, dev: Option<&Dev>) {
    match dev {
        Some(d) => println!("vfio: {} ok ({})", check, d.name),
        None => println!("vfio: {} ok", check),
    }
}

/// Print `vfio: <check> FAIL[ (<bdf>)] <why>` and fail the run with a panic naming the check.
fn bad(check: &str, dev: Option<&Dev>, why: impl core::fmt::Display) -> ! {
    let at = dev.map(|d| format!(" ({})", d.name)).unwrap_or_default();
    println!("vfio: {} FAIL{} {}", check, at, why);
    fail(format!("vfio: {check} failed{at}: {why}"))
}

/// [`ok`] when `cond`, else [`bad`].
fn expect(check: &str, dev: Option<&Dev>, cond: bool, why: impl core::fmt::Display) {
    if cond {
        ok(check, dev);
    } else {
        bad(check, dev, why);
    }
}

/// Parameters of the scenario.
struct Params {
    iommu: bool,
    p2p: bool,
    p2p_off: bool,
    p2p_off_reverse: bool,
    msix: bool,
    intx: bool,
    msi: bool,
    devices: Option<u64>,
    len: u32,
    p2p_len: u32,
    timeout_ms: u64,
    msix_vector: u8,
    intx_vector: u8,
    msi_vector: u8,
    gsis: Vec<u32>,
    mmio_flag: bool,
}

fn params(boot: &BootInfo) -> Params {
    let flag = |k: &str| param_u64(boot, k, 0) != 0;
    let len = param_u64(boot, "vfio.len", DEFAULT_LEN);
    if len == 0 || len > 256 * 1024 {
        fail(format!("vfio.len={len}: must be 1..=262144"));
    }
    let p2p_len = param_u64(boot, "vfio.p2p_len", DEFAULT_P2P_LEN);
    if p2p_len == 0 || P2P_OFFSET + p2p_len + GUARD as u64 > regs::DEVICE_MEMORY_SIZE {
        fail(format!(
            "vfio.p2p_len={p2p_len}: must be 1..={}",
            regs::DEVICE_MEMORY_SIZE - P2P_OFFSET - GUARD as u64
        ));
    }
    let gsis = match boot.param("vfio.gsi") {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| {
                g.parse::<u32>()
                    .unwrap_or_else(|_| fail(format!("vfio.gsi={list}: expected N[,N...]")))
            })
            .collect(),
    };
    let p = Params {
        iommu: flag("vfio.iommu"),
        p2p: flag("vfio.p2p"),
        p2p_off: flag("vfio.p2p_off"),
        p2p_off_reverse: param_u64(boot, "vfio.p2p_off_reverse", 1) != 0,
        msix: param_u64(boot, "vfio.msix", 1) != 0,
        intx: param_u64(boot, "vfio.intx", 1) != 0,
        msi: flag("vfio.msi"),
        devices: boot
            .param("vfio.devices")
            .map(|_| param_u64(boot, "vfio.devices", 0)),
        len: len as u32,
        p2p_len: p2p_len as u32,
        timeout_ms: param_u64(boot, "vfio.timeout_ms", 10_000),
        msix_vector: param_vector(boot, "vfio.vector", MSIX_VECTOR),
        intx_vector: param_vector(boot, "vfio.intx_vector", INTX_VECTOR),
        msi_vector: param_vector(boot, "vfio.msi_vector", MSI_VECTOR),
        gsis,
        mmio_flag: param_u64(boot, "vfio.mmio_flag", 1) != 0,
    };
    if p.p2p && p.p2p_off {
        fail("vfio.p2p=1 and vfio.p2p_off=1 exclude each other");
    }
    p
}

/// Run the scenario; panic on the first failure.
pub fn run(boot: &BootInfo) {
    let prm = params(boot);

    // 1. Find the devices.
    let found = find_devices(boot, "vfio");
    let names: Vec<String> = found.iter().map(|f| format!("{}", f.bdf)).collect();
    println!(
        "vfio: found {} device(s) at {}",
        found.len(),
        names.join(" ")
    );
    if let Some(n) = prm.devices {
        expect(
            "device-count",
            None,
            found.len() as u64 == n,
            format!("found {} device(s), vfio.devices={n}", found.len()),
        );
    }
    if (prm.p2p || prm.p2p_off) && found.len() < 2 {
        bad(
            "device-count",
            None,
            format!("peer-to-peer tests need two devices, found {}", found.len()),
        );
    }

    // Without vfio.iommu=1 no device may sit behind the virtio-iommu (its DMA would fault).
    if !prm.iommu {
        refuse_translated(boot, &found, "vfio.iommu=1");
    }

    // The virtio-iommu first (it brings its own Platform), else a plain one.
    let (mut p, mut ctx, endpoints, resv_src) = if prm.iommu {
        let s = iommu_scenario::bring_up(boot);
        (s.p, None::<IommuCtx>, s.endpoints, Some(s.iommu))
    } else {
        (Platform::discover(boot), None, Vec::new(), None)
    };
    let cfg = p.cfg;

    // 2. BARs, command register, identity registers, MSI-X capability.
    let mut devs: Vec<Dev> = found
        .iter()
        .map(|f| open(&mut p, *f, &endpoints, prm.iommu, mem_size(boot)))
        .collect();

    // The IOMMU: probe (reserved regions), one domain per device, attach.
    if let Some(io) = resv_src {
        ctx = Some(attach_all(io, &mut devs, prm.mmio_flag));
    }

    // 3. DMA (polled) and 5. device memory, per device.
    let mut bufs = Vec::new();
    for d in &devs {
        bufs.push(dma_tests(d, &mut ctx, &prm));
        bar2_test(d);
    }

    // 6. Faults behind the IOMMU.
    if ctx.is_some() {
        for (d, b) in devs.iter().zip(&bufs) {
            iommu_faults(d, &mut ctx, &prm, b);
        }
    }

    // 4. Interrupts.
    if prm.msix {
        for d in &devs {
            msix_test(d, cfg, &prm, &devs, &mut ctx);
        }
    } else {
        println!("vfio: msix skipped (vfio.msix=0)");
    }
    if prm.intx {
        let prt = Acpi::discover(boot.rsdp_addr)
            .ok()
            .and_then(|a| a.find(b"DSDT").map(aml::prt))
            .unwrap_or_default();
        for d in &devs {
            intx_test(d, cfg, &prm, &devs, &p, &prt, &mut ctx);
        }
    } else {
        println!("vfio: intx skipped (vfio.intx=0)");
    }
    if prm.msi {
        for d in &devs {
            msi_test(d, cfg, &prm, &devs, &mut ctx);
        }
    }

    // 7. Peer to peer.
    if prm.p2p {
        p2p(&devs[0], &devs[1], &mut ctx, &prm, "p2p-a-to-b");
        p2p(&devs[1], &devs[0], &mut ctx, &prm, "p2p-b-to-a");
    }
    if prm.p2p_off {
        p2p_refused(&devs[0], &devs[1], &mut ctx, &prm);
    }

    if let Some(c) = ctx.as_mut() {
        for d in &devs {
            if d.iommu.is_some() {
                drain_faults(c, d);
                break;
            }
        }
    }
    interrupts::disable();
    println!("vfio: all ok");
    println!("result: PASS");
}

/// The skiff-testdev functions on bus 0 (at least one, else a failure; `who` names the
/// scenario in the failure line).
fn find_devices(boot: &BootInfo, who: &str) -> Vec<PciFunction> {
    let found: Vec<PciFunction> = {
        let p = Platform::discover(boot);
        p.functions
            .iter()
            .filter(|f| f.vendor == regs::VENDOR_ID && f.device == regs::DEVICE_ID)
            .copied()
            .collect()
    };
    if found.is_empty() {
        let why = format!(
            "{who}: no skiff-testdev ({:04x}:{:04x}) found",
            regs::VENDOR_ID,
            regs::DEVICE_ID
        );
        println!("{}", why);
        fail(why);
    }
    found
}

/// Fail the run when one of `found` sits behind the virtio-iommu (its DMA at guest-physical
/// addresses would fault); `hint` names the parameter that asks for translated DMA.
fn refuse_translated(boot: &BootInfo, found: &[PciFunction], hint: &str) {
    let viot = Acpi::discover(boot.rsdp_addr)
        .ok()
        .and_then(|a| a.find(b"VIOT").map(Viot::parse));
    let Some(v) = viot else { return };
    for (node, segment, _) in v.pci_iommus() {
        for f in found {
            if let Some(ep) = v.endpoint_of(node, segment, f.bdf) {
                bad(
                    "iommu-config",
                    None,
                    format!(
                        "{} is behind the virtio-iommu (VIOT endpoint {ep:#x}); run with {hint}",
                        f.bdf
                    ),
                );
            }
        }
    }
}

/// Probe every translated device of `devs` (reserved regions), give each its own domain,
/// attach it, and return the IOMMU with an IOVA allocator that avoids the reserved regions
/// (`mmio_flag`: set `VIRTIO_IOMMU_MAP_F_MMIO` on peer mappings when the IOMMU offers it).
fn attach_all(mut io: Iommu, devs: &mut [Dev], mmio_flag: bool) -> IommuCtx {
    let mut resv: Vec<ResvMem> = Vec::new();
    let c = io.config;
    for (n, d) in devs.iter_mut().enumerate() {
        let Some(t) = d.iommu.as_mut() else { continue };
        if io.features() & iommu::F_PROBE != 0 {
            let (st, props) = io
                .probe(t.endpoint)
                .unwrap_or_else(|e| bad("iommu-probe", None, e));
            if st != iommu::S_OK {
                bad(
                    "iommu-probe",
                    None,
                    format!("PROBE of endpoint {:#x}: status {st}", t.endpoint),
                );
            }
            resv.extend(iommu::parse_properties(&props).0);
        }
        let want = FIRST_DOMAIN + n as u32;
        t.domain = if (c.domain_start..=c.domain_end).contains(&want) {
            want
        } else {
            c.domain_start.saturating_add(n as u32).min(c.domain_end)
        };
        let st = io
            .attach(t.domain, t.endpoint)
            .unwrap_or_else(|e| bad("iommu-attach", None, e));
        let (endpoint, domain) = (t.endpoint, t.domain);
        println!(
            "vfio: {} endpoint {:#x} attached to domain {}: {}",
            d.name,
            endpoint,
            domain,
            iommu::status_name(st)
        );
        expect(
            "iommu-attach",
            Some(d),
            st == iommu::S_OK,
            format!("ATTACH endpoint {endpoint:#x} to domain {domain}: status {st}"),
        );
    }
    let mmio_flag = if mmio_flag && io.features() & iommu::F_MMIO != 0 {
        MAP_F_MMIO
    } else {
        0
    };
    let space = IovaSpace::new(&c, &resv);
    IommuCtx {
        io,
        space,
        mmio_flag,
    }
}

/// The BAR 2 size every test device must report: `vfio.mem_size` (bytes; devices started with
/// `skiff-testdev --memory-mib`), [`regs::DEVICE_MEMORY_SIZE`] by default.
fn mem_size(boot: &BootInfo) -> u64 {
    param_u64(boot, "vfio.mem_size", regs::DEVICE_MEMORY_SIZE)
}

/// Size and keep the BARs (BAR 2 must be `mem_size` bytes), enable decoding and bus mastering,
/// read MAGIC/VERSION, find MSI-X.
fn open(
    p: &mut Platform,
    f: PciFunction,
    endpoints: &[(PciFunction, u32)],
    iommu: bool,
    mem_size: u64,
) -> Dev {
    let cfg = p.cfg;
    let name = format!("{}", f.bdf);
    let mut dev = Dev {
        func: f,
        name,
        regs: 0,
        mem: 0,
        msix: Msix::parse(cfg, f.bdf, 0),
        iommu: None,
    };
    let b0 = bar::read(cfg, f.bdf, regs::REGS_BAR);
    let b2 = bar::read(cfg, f.bdf, regs::MEMORY_BAR);
    let kind = |b: &bar::Bar| {
        if b.io {
            "io"
        } else if b.is64 {
            "mem64"
        } else {
            "mem32"
        }
    };
    println!(
        "vfio: {} bar{} {} {:#x} size {:#x}, bar{} {} {:#x} size {:#x}",
        dev.name,
        regs::REGS_BAR,
        kind(&b0),
        b0.addr,
        b0.size,
        regs::MEMORY_BAR,
        kind(&b2),
        b2.addr,
        b2.size
    );
    expect(
        "bar-sizes",
        Some(&dev),
        !b0.io && b0.size == regs::REGS_BAR_SIZE && !b2.io && b2.is64 && b2.size == mem_size,
        format!(
            "bar{} {} size {:#x} (want memory, {:#x}), bar{} {} size {:#x} (want mem64, {:#x})",
            regs::REGS_BAR,
            kind(&b0),
            b0.size,
            regs::REGS_BAR_SIZE,
            regs::MEMORY_BAR,
            kind(&b2),
            b2.size,
            mem_size
        ),
    );
    // Keep what the VMM assigned; assign only an unassigned BAR; map a BAR above 4 GiB.
    let mut place = |b: bar::Bar| -> u64 {
        if b.addr == 0 {
            let (nb, _) = p
                .assign_bar(f.bdf, b.index)
                .unwrap_or_else(|e| bad("bar-sizes", None, e));
            println!(
                "vfio: {} bar{} was unassigned; assigned {:#x}",
                f.bdf, b.index, nb.addr
            );
            nb.addr
        } else {
            if b.addr + b.size > 1 << 32 {
                paging::map_mmio(b.addr, b.size)
                    .unwrap_or_else(|e| bad("bar-map", None, format!("{:#x}: {e}", b.addr)));
            }
            b.addr
        }
    };
    dev.regs = place(b0);
    dev.mem = place(b2);
    update_command(
        cfg,
        f.bdf,
        command::MEMORY | command::BUS_MASTER,
        command::IO,
    );
    let c = crate::pci::read_command(cfg, f.bdf);
    expect(
        "command-register",
        Some(&dev),
        c & (command::MEMORY | command::BUS_MASTER) == command::MEMORY | command::BUS_MASTER,
        format!("command register reads {c:#06x}"),
    );
    let (magic, version) = (dev.rd(regs::REG_MAGIC), dev.rd(regs::REG_VERSION));
    println!(
        "vfio: {} magic {:#010x} version {}",
        dev.name, magic, version
    );
    expect(
        "magic-version",
        Some(&dev),
        magic == regs::MAGIC && version == regs::VERSION,
        format!(
            "magic {magic:#x} version {version}, want {:#x} version {}",
            regs::MAGIC,
            regs::VERSION
        ),
    );
    // Quiet: no interrupts until a test asks, nothing pending.
    dev.wr(regs::REG_IRQ_CONTROL, 0);
    dev.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);

    let Some(&(cap, _)) = capabilities(cfg, f.bdf)
        .iter()
        .find(|&&(_, id)| id == msix::CAP_ID)
    else {
        bad("msix-capability", Some(&dev), "no MSI-X capability");
    };
    let mut m = Msix::parse(cfg, f.bdf, cap);
    let (regs_addr, mem_addr) = (dev.regs, dev.mem);
    m.resolve(|i| match i {
        regs::REGS_BAR => regs_addr,
        regs::MEMORY_BAR => mem_addr,
        _ => 0,
    });
    expect(
        "msix-capability",
        Some(&dev),
        m.entries == regs::MSIX_VECTORS
            && m.table_bar == regs::REGS_BAR
            && u64::from(m.table_offset) == regs::MSIX_TABLE_OFFSET
            && m.pba_bar == regs::REGS_BAR
            && u64::from(m.pba_offset) == regs::MSIX_PBA_OFFSET,
        format!(
            "{} entries, table bar {} +{:#x}, pba bar {} +{:#x}",
            m.entries, m.table_bar, m.table_offset, m.pba_bar, m.pba_offset
        ),
    );
    dev.msix = m;

    if iommu {
        match endpoints.iter().find(|(e, _)| e.bdf == f.bdf) {
            Some(&(_, endpoint)) => {
                println!(
                    "vfio: {} behind the virtio-iommu, endpoint {:#x}",
                    dev.name, endpoint
                );
                dev.iommu = Some(Translated {
                    endpoint,
                    domain: 0,
                });
            }
            None => bad(
                "iommu-attach",
                Some(&dev),
                "vfio.iommu=1 but the VIOT does not put this device behind the virtio-iommu",
            ),
        }
    }
    dev
}
