//! `vfio`: the vfio-user test device `skiff-testdev` (1b36:0f5f) as the guest sees it through
//! skiff's passthrough: BAR sizing, registers, DMA into and out of guest RAM (data verified),
//! MSI-X and level-triggered INTx, direct access to its device memory (BAR 2), DMA remapping
//! through the virtio-iommu (`vfio.iommu=1`), and peer-to-peer writes between two devices
//! (`vfio.p2p=1`), or their refusal when the peer is configured `p2p=off` (`vfio.p2p_off=1`).
//!
//! The register contract is `tests/testdev/src/regs.rs`, included below (not copied). Every check
//! prints `vfio: <check> ok` (per-device checks append ` (BB:DD.F)`), the run ends with
//! `vfio: all ok` and `result: PASS`; a failed check prints `vfio: <check> FAIL (BB:DD.F) <why>`
//! and panics. See the README for the parameters and the full output.

#[allow(dead_code)]
#[path = "../../../testdev/src/regs.rs"]
mod regs;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::iommu::{self as iommu_scenario, map_range, IovaSpace};
use super::report::{fail, param_u64, param_vector};
use crate::acpi::{aml, Acpi};
use crate::arch::ioapic::{IoApic, Polarity, Trigger};
use crate::arch::{interrupts, lapic, paging, time};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::pci::msix::{self, Msix};
use crate::pci::{bar, capabilities, command, update_command, ConfigSpace, PciFunction};
use crate::println;
use crate::virtio::iommu::{self, Iommu, ResvMem, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};
use crate::virtio::Platform;

/// Default MSI-X vector of the first device (the n-th device uses this + n).
const MSIX_VECTOR: u8 = 0x38;
/// Default INTx vector of the first device (the n-th device uses this + n).
const INTX_VECTOR: u8 = 0x48;
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

fn err_name(e: u32) -> &'static str {
    match e {
        regs::ERR_NONE => "NONE",
        regs::ERR_BAD_COMMAND => "BAD_COMMAND",
        regs::ERR_BAD_LEN => "BAD_LEN",
        regs::ERR_DMA => "DMA",
        regs::ERR_QUEUE_FULL => "QUEUE_FULL",
        _ => "?",
    }
}

fn cmd_name(c: u32) -> &'static str {
    match c {
        regs::CMD_WRITE_PATTERN => "WRITE_PATTERN",
        regs::CMD_COPY => "COPY",
        regs::CMD_READ_CHECKSUM => "READ_CHECKSUM",
        regs::CMD_P2P_WRITE => "P2P_WRITE",
        _ => "command",
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// `REG_COMPLETED` went up by one.
    Completed,
    /// `REG_FAILED` went up by one; `REG_LAST_ERROR`.
    Failed(u32),
}

/// A command's parameters.
#[derive(Clone, Copy, Debug)]
struct Cmd {
    code: u32,
    addr: u64,
    addr2: u64,
    len: u32,
    seed: u32,
}

impl Cmd {
    fn new(code: u32, addr: u64, len: u32) -> Cmd {
        Cmd {
            code,
            addr,
            addr2: 0,
            len,
            seed: 0,
        }
    }
}

/// Counters sampled before a command, to see how it ended.
#[derive(Clone, Copy, Debug)]
struct Started {
    completed: u32,
    failed: u32,
}

/// The DMA context of a device behind the virtio-iommu.
#[derive(Clone, Copy, Debug)]
struct Translated {
    endpoint: u32,
    domain: u32,
}

/// One skiff-testdev function.
struct Dev {
    func: PciFunction,
    /// `BB:DD.F`.
    name: String,
    /// BAR 0 (registers) address.
    regs: u64,
    /// BAR 2 (device memory) address.
    mem: u64,
    msix: Msix,
    /// Behind the virtio-iommu: every DMA address it is given is an IOVA.
    iommu: Option<Translated>,
}

impl Dev {
    fn rd(&self, reg: u64) -> u32 {
        dma::read::<u32>(self.regs + reg)
    }

    fn wr(&self, reg: u64, value: u32) {
        dma::write::<u32>(self.regs + reg, value);
    }

    fn bdf_index(&self, all: &[Dev]) -> usize {
        all.iter()
            .position(|d| d.func.bdf == self.func.bdf)
            .unwrap_or(0)
    }

    /// Write the parameters and ring the doorbell.
    fn start(&self, c: &Cmd) -> Started {
        let s = Started {
            completed: self.rd(regs::REG_COMPLETED),
            failed: self.rd(regs::REG_FAILED),
        };
        self.wr(regs::REG_ADDR_LO, c.addr as u32);
        self.wr(regs::REG_ADDR_HI, (c.addr >> 32) as u32);
        self.wr(regs::REG_ADDR2_LO, c.addr2 as u32);
        self.wr(regs::REG_ADDR2_HI, (c.addr2 >> 32) as u32);
        self.wr(regs::REG_LEN, c.len);
        self.wr(regs::REG_SEED, c.seed);
        self.wr(regs::REG_DOORBELL, c.code);
        s
    }

    /// Poll `REG_COMPLETED`/`REG_FAILED` until the command started at `s` ends.
    fn finish(&self, check: &str, c: &Cmd, s: Started, timeout_ms: u64) -> Outcome {
        let deadline = time::Deadline::after_ms(timeout_ms);
        loop {
            let (done, failed) = (self.rd(regs::REG_COMPLETED), self.rd(regs::REG_FAILED));
            let (dd, df) = (
                done.wrapping_sub(s.completed),
                failed.wrapping_sub(s.failed),
            );
            match (dd, df) {
                (0, 0) => {}
                (1, 0) => return Outcome::Completed,
                (0, 1) => return Outcome::Failed(self.rd(regs::REG_LAST_ERROR)),
                _ => bad(
                    check,
                    Some(self),
                    format!(
                        "{}: completed went up by {dd} and failed by {df} for one command",
                        cmd_name(c.code)
                    ),
                ),
            }
            if deadline.expired() {
                bad(
                    check,
                    Some(self),
                    format!(
                        "{} at {:#x} len {} did not end within {timeout_ms} ms (status {:#x}, completed {done}, failed {failed})",
                        cmd_name(c.code),
                        c.addr,
                        c.len,
                        self.rd(regs::REG_STATUS)
                    ),
                );
            }
            time::delay_us(50);
        }
    }

    /// Run a command to its end (polled).
    fn run(&self, check: &str, c: &Cmd, timeout_ms: u64) -> Outcome {
        let s = self.start(c);
        self.finish(check, c, s, timeout_ms)
    }

    /// Run a command that must complete.
    fn run_ok(&self, check: &str, c: &Cmd, timeout_ms: u64) {
        if let Outcome::Failed(e) = self.run(check, c, timeout_ms) {
            bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} len {} failed: REG_LAST_ERROR {e} ({})",
                    cmd_name(c.code),
                    c.addr,
                    c.len,
                    err_name(e)
                ),
            );
        }
    }

    /// Run a command that must fail with ERR_DMA.
    fn run_dma_refused(&self, check: &str, c: &Cmd, timeout_ms: u64) {
        match self.run(check, c, timeout_ms) {
            Outcome::Failed(regs::ERR_DMA) => {}
            Outcome::Failed(e) => bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} failed with REG_LAST_ERROR {e} ({}), expected {} (DMA)",
                    cmd_name(c.code),
                    c.addr,
                    err_name(e),
                    regs::ERR_DMA
                ),
            ),
            Outcome::Completed => bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} completed; it must fail with REG_LAST_ERROR {} (DMA)",
                    cmd_name(c.code),
                    c.addr,
                    regs::ERR_DMA
                ),
            ),
        }
    }
}

/// The virtio-iommu and the IOVA allocator, with `vfio.iommu=1`.
struct IommuCtx {
    io: Iommu,
    space: IovaSpace,
    mmio_flag: u32,
}

/// Map `[gpa, gpa + len)` for `dev`: its IOVA behind the IOMMU, else `gpa` itself.
fn dma_addr(
    dev: &Dev,
    ctx: &mut Option<IommuCtx>,
    gpa: u64,
    len: usize,
    flags: u32,
) -> Result<u64, String> {
    match (dev.iommu, ctx.as_mut()) {
        (Some(t), Some(c)) => map_range(&mut c.io, &mut c.space, t.domain, gpa, len, flags),
        _ => Ok(gpa),
    }
}

/// A guest buffer with guard bytes: `len` bytes at `at`, [`GUARD`] untouched bytes before and
/// after, everything filled with [`SENTINEL`].
struct GuestBuf {
    base: u64,
    total: usize,
    at: u64,
    len: usize,
}

impl GuestBuf {
    fn new(len: usize, offset: usize) -> GuestBuf {
        let total = (offset + len + GUARD).next_multiple_of(4096);
        let base = dma::alloc(total, 4096);
        let b = GuestBuf {
            base,
            total,
            at: base + offset as u64,
            len,
        };
        b.reset();
        b
    }

    fn reset(&self) {
        dma::fill(self.base, self.total, SENTINEL);
    }

    /// First byte in `[at - GUARD, at)` or `[at + len, at + len + GUARD)` that is not the
    /// sentinel.
    fn guard_damage(&self) -> Option<u64> {
        let before = (self.at - self.base).min(GUARD as u64);
        (self.at - before..self.at)
            .chain(self.at + self.len as u64..self.at + (self.len + GUARD) as u64)
            .find(|&a| dma::read::<u8>(a) != SENTINEL)
    }

    /// First index where the contents differ from `want(i)`.
    fn first_diff(&self, want: impl Fn(u32) -> u8) -> Option<(usize, u8, u8)> {
        (0..self.len).find_map(|i| {
            let got = dma::read::<u8>(self.at + i as u64);
            let w = want(i as u32);
            (got != w).then_some((i, got, w))
        })
    }

    fn untouched(&self) -> bool {
        (0..self.total as u64).all(|i| dma::read::<u8>(self.base + i) == SENTINEL)
    }
}

/// Verify a buffer the device wrote with pattern `seed` (and the guards around it).
fn verify_pattern(check: &str, dev: &Dev, b: &GuestBuf, seed: u32) {
    if let Some((i, got, want)) = b.first_diff(|i| regs::pattern_byte(seed, i)) {
        bad(
            check,
            Some(dev),
            format!(
                "byte {i} of {} is {got:#04x}, pattern says {want:#04x}",
                b.len
            ),
        );
    }
    if let Some(a) = b.guard_damage() {
        bad(
            check,
            Some(dev),
            format!(
                "the device wrote outside the buffer: byte at offset {} from the start",
                a as i64 - b.at as i64
            ),
        );
    }
}

/// Parameters of the scenario.
struct Params {
    iommu: bool,
    p2p: bool,
    p2p_off: bool,
    msix: bool,
    intx: bool,
    devices: Option<u64>,
    len: u32,
    p2p_len: u32,
    timeout_ms: u64,
    msix_vector: u8,
    intx_vector: u8,
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
        msix: param_u64(boot, "vfio.msix", 1) != 0,
        intx: param_u64(boot, "vfio.intx", 1) != 0,
        devices: boot
            .param("vfio.devices")
            .map(|_| param_u64(boot, "vfio.devices", 0)),
        len: len as u32,
        p2p_len: p2p_len as u32,
        timeout_ms: param_u64(boot, "vfio.timeout_ms", 10_000),
        msix_vector: param_vector(boot, "vfio.vector", MSIX_VECTOR),
        intx_vector: param_vector(boot, "vfio.intx_vector", INTX_VECTOR),
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
    let found: Vec<PciFunction> = {
        let p = Platform::discover(boot);
        p.functions
            .iter()
            .filter(|f| f.vendor == regs::VENDOR_ID && f.device == regs::DEVICE_ID)
            .copied()
            .collect()
    };
    if found.is_empty() {
        println!(
            "vfio: no skiff-testdev ({:04x}:{:04x}) found",
            regs::VENDOR_ID,
            regs::DEVICE_ID
        );
        fail(format!(
            "vfio: no skiff-testdev ({:04x}:{:04x}) found",
            regs::VENDOR_ID,
            regs::DEVICE_ID
        ));
    }
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
        .map(|f| open(&mut p, *f, &endpoints, prm.iommu))
        .collect();

    // The IOMMU: probe (reserved regions), one domain per device, attach.
    if let Some(mut io) = resv_src {
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
        let mmio_flag = if prm.mmio_flag && io.features() & iommu::F_MMIO != 0 {
            MAP_F_MMIO
        } else {
            0
        };
        let space = IovaSpace::new(&c, &resv);
        ctx = Some(IommuCtx {
            io,
            space,
            mmio_flag,
        });
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

    // 7. Peer to peer.
    if prm.p2p {
        p2p(&devs[0], &devs[1], &mut ctx, &prm, "p2p-a-to-b");
        p2p(&devs[1], &devs[0], &mut ctx, &prm, "p2p-b-to-a");
    }
    if prm.p2p_off {
        p2p_refused(&devs[0], &devs[1], &mut ctx, &prm);
    }

    if let Some(c) = ctx.as_mut() {
        let mut n = 0;
        while let Ok(Some(f)) = c.io.poll_fault() {
            if n < 8 {
                println!(
                    "vfio: iommu fault report reason {} flags {:#x} endpoint {:#x} address {:#x}",
                    f.reason, f.flags, f.endpoint, f.address
                );
            }
            n += 1;
        }
        println!("vfio: {} iommu fault report(s) in all", n);
    }
    interrupts::disable();
    println!("vfio: all ok");
    println!("result: PASS");
}

/// Size and keep the BARs, enable decoding and bus mastering, read MAGIC/VERSION, find MSI-X.
fn open(p: &mut Platform, f: PciFunction, endpoints: &[(PciFunction, u32)], iommu: bool) -> Dev {
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
        !b0.io
            && b0.size == regs::REGS_BAR_SIZE
            && !b2.io
            && b2.is64
            && b2.size == regs::DEVICE_MEMORY_SIZE,
        format!(
            "bar{} {} size {:#x} (want memory, {:#x}), bar{} {} size {:#x} (want mem64, {:#x})",
            regs::REGS_BAR,
            kind(&b0),
            b0.size,
            regs::REGS_BAR_SIZE,
            regs::MEMORY_BAR,
            kind(&b2),
            b2.size,
            regs::DEVICE_MEMORY_SIZE
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

/// The buffers of the DMA tests, kept for the fault tests: (buffer, its DMA address).
struct DmaBufs {
    a: GuestBuf,
    a_dma: u64,
}

/// WRITE_PATTERN, COPY and READ_CHECKSUM against guest RAM, polled, data verified.
fn dma_tests(d: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params) -> DmaBufs {
    let len = prm.len as usize;
    let rw = MAP_F_READ | MAP_F_WRITE;
    let a = GuestBuf::new(len, 0x18);
    let b = GuestBuf::new(len, 0x43);
    let c = GuestBuf::new(len, 0x7);
    let map = |ctx: &mut Option<IommuCtx>, g: &GuestBuf| {
        dma_addr(d, ctx, g.at, g.len, rw).unwrap_or_else(|e| bad("iommu-map", Some(d), e))
    };
    let (a_dma, b_dma, c_dma) = (map(ctx, &a), map(ctx, &b), map(ctx, &c));
    println!(
        "vfio: {} dma buffers ({} bytes) {}: {:#x} -> {:#x}, {:#x} -> {:#x}, {:#x} -> {:#x}",
        d.name,
        len,
        if d.iommu.is_some() {
            "gpa -> iova"
        } else {
            "gpa -> dma address"
        },
        a.at,
        a_dma,
        b.at,
        b_dma,
        c.at,
        c_dma
    );
    if d.iommu.is_some() {
        expect(
            "iommu-iovas-differ",
            Some(d),
            a_dma != a.at && b_dma != b.at && c_dma != c.at,
            "an IOVA equals its guest-physical address",
        );
    }
    let t = prm.timeout_ms;
    let seed = 0x5EED_0000 | u32::from(d.func.bdf.dev) << 8 | u32::from(d.func.bdf.func);

    // WRITE_PATTERN: the device writes guest RAM.
    let (w0, r0) = (d.rd(regs::REG_DMA_WRITTEN), d.rd(regs::REG_DMA_READ));
    let cmd = Cmd {
        seed,
        ..Cmd::new(regs::CMD_WRITE_PATTERN, a_dma, prm.len)
    };
    d.run_ok("dma-write-pattern", &cmd, t);
    verify_pattern("dma-write-pattern", d, &a, seed);
    ok("dma-write-pattern", Some(d));

    // COPY: the device reads guest RAM and writes it elsewhere.
    let cmd = Cmd {
        addr2: b_dma,
        ..Cmd::new(regs::CMD_COPY, a_dma, prm.len)
    };
    d.run_ok("dma-copy", &cmd, t);
    verify_pattern("dma-copy", d, &b, seed);
    ok("dma-copy", Some(d));

    // READ_CHECKSUM over data the guest wrote.
    let guest_byte = |i: u32| (i.wrapping_mul(131) ^ (i >> 7) ^ 0x3C) as u8;
    for i in 0..len {
        dma::write::<u8>(c.at + i as u64, guest_byte(i as u32));
    }
    let want = {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut chunk = [0u8; 256];
        let mut i = 0;
        while i < len {
            let n = (len - i).min(chunk.len());
            for (k, x) in chunk[..n].iter_mut().enumerate() {
                *x = guest_byte((i + k) as u32);
            }
            h = fnv1a64_continue(h, &chunk[..n]);
            i += n;
        }
        h
    };
    // The incremental form must agree with regs::fnv1a64 (checked on a small input).
    let probe: Vec<u8> = (0..300u32).map(guest_byte).collect();
    assert_eq!(
        fnv1a64_continue(0xcbf2_9ce4_8422_2325, &probe),
        regs::fnv1a64(&probe)
    );
    d.run_ok(
        "dma-read-checksum",
        &Cmd::new(regs::CMD_READ_CHECKSUM, c_dma, prm.len),
        t,
    );
    let got = u64::from(d.rd(regs::REG_RESULT_LO)) | u64::from(d.rd(regs::REG_RESULT_HI)) << 32;
    println!("vfio: {} checksum of {} bytes {:#018x}", d.name, len, got);
    expect(
        "dma-read-checksum",
        Some(d),
        got == want,
        format!("device says {got:#018x}, guest computed {want:#018x}"),
    );

    let (w1, r1) = (d.rd(regs::REG_DMA_WRITTEN), d.rd(regs::REG_DMA_READ));
    let (dw, dr) = (w1.wrapping_sub(w0), r1.wrapping_sub(r0));
    expect(
        "dma-counters",
        Some(d),
        dw == 2 * prm.len && dr == 2 * prm.len,
        format!(
            "DMA_WRITTEN went up by {dw}, DMA_READ by {dr}; expected {} each (pattern + copy, copy + checksum)",
            2 * prm.len
        ),
    );
    DmaBufs { a, a_dma }
}

/// FNV-1a 64 continued from `h` (regs::fnv1a64 starts from the offset basis).
fn fnv1a64_continue(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A u64 marker for page `page` of `d`'s device memory.
fn marker(d: &Dev, page: u64) -> u64 {
    0xD0D0_0000_0000_0000 | u64::from(d.func.bdf.dev) << 40 | page << 8 | 0x5A
}

/// The guest writes device memory (BAR 2) directly and reads it back.
fn bar2_test(d: &Dev) {
    let pages = regs::DEVICE_MEMORY_SIZE / 4096;
    let at = |page: u64| d.mem + page * 4096 + (page * 8) % 4096;
    for page in 0..pages {
        dma::write::<u64>(at(page), marker(d, page));
    }
    // Mixed widths in the first 64 bytes.
    for i in 0..16u64 {
        dma::write::<u8>(d.mem + i, 0xB0 + i as u8);
    }
    dma::write::<u16>(d.mem + 16, 0xBEEF);
    dma::write::<u16>(d.mem + 18, 0xCAFE);
    dma::write::<u32>(d.mem + 20, 0x1234_5678);
    dma::write::<u64>(d.mem + 24, 0x0123_4567_89AB_CDEF);
    let last = d.mem + regs::DEVICE_MEMORY_SIZE - 4;
    dma::write::<u32>(last, 0xE1D0_E1D0);

    for page in 1..pages {
        let got = dma::read::<u64>(at(page));
        if got != marker(d, page) {
            bad(
                "bar2-readwrite",
                Some(d),
                format!(
                    "u64 at +{:#x} reads {got:#x}, wrote {:#x}",
                    at(page) - d.mem,
                    marker(d, page)
                ),
            );
        }
    }
    let bytes: Vec<u8> = (0..16).map(|i| dma::read::<u8>(d.mem + i)).collect();
    let want: Vec<u8> = (0..16).map(|i| 0xB0 + i as u8).collect();
    let (h0, h1) = (dma::read::<u16>(d.mem + 16), dma::read::<u16>(d.mem + 18));
    let w = dma::read::<u32>(d.mem + 20);
    let q = dma::read::<u64>(d.mem + 24);
    let dw = dma::read::<u32>(d.mem + 16);
    let l = dma::read::<u32>(last);
    expect(
        "bar2-readwrite",
        Some(d),
        bytes == want
            && h0 == 0xBEEF
            && h1 == 0xCAFE
            && dw == 0xCAFE_BEEF
            && w == 0x1234_5678
            && q == 0x0123_4567_89AB_CDEF
            && l == 0xE1D0_E1D0,
        format!(
            "bytes {} u16 {h0:#x} {h1:#x} u32 {dw:#x} {w:#x} u64 {q:#x} last {l:#x}",
            dma::hex(&bytes)
        ),
    );
}

/// Behind the IOMMU: unmapped IOVAs, the GPA itself and an unmapped buffer are refused with
/// ERR_DMA (and REG_FAILED counts them); mapped IOVAs keep working.
fn iommu_faults(d: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params, bufs: &DmaBufs) {
    let (Some(tr), Some(c)) = (d.iommu, ctx.as_mut()) else {
        return;
    };
    let t = prm.timeout_ms;
    let g = c.io.config.granule();
    let rw = MAP_F_READ | MAP_F_WRITE;

    // An IOVA nobody mapped.
    let hole = c
        .space
        .alloc(g)
        .unwrap_or_else(|e| bad("iommu-unmapped-write-refused", Some(d), e));
    let f0 = d.rd(regs::REG_FAILED);
    let cmd = Cmd {
        seed: 7,
        ..Cmd::new(regs::CMD_WRITE_PATTERN, hole, SMALL_LEN)
    };
    d.run_dma_refused("iommu-unmapped-write-refused", &cmd, t);
    let f1 = d.rd(regs::REG_FAILED);
    let e = d.rd(regs::REG_LAST_ERROR);
    expect(
        "iommu-unmapped-write-refused",
        Some(d),
        f1 == f0.wrapping_add(1) && e == regs::ERR_DMA,
        format!("REG_FAILED {f0} -> {f1}, REG_LAST_ERROR {e}"),
    );
    d.run_dma_refused(
        "iommu-unmapped-read-refused",
        &Cmd::new(regs::CMD_READ_CHECKSUM, hole, SMALL_LEN),
        t,
    );
    ok("iommu-unmapped-read-refused", Some(d));

    // The guest-physical address is not an identity mapping (only when no IOVA we handed out
    // can equal it).
    let victim = GuestBuf::new(SMALL_LEN as usize, 0);
    if hole >= 1 << 32 && victim.base < 1 << 32 {
        d.run_dma_refused(
            "iommu-gpa-not-identity",
            &Cmd {
                seed: 9,
                ..Cmd::new(regs::CMD_WRITE_PATTERN, victim.at, SMALL_LEN)
            },
            t,
        );
        expect(
            "iommu-gpa-not-identity",
            Some(d),
            victim.untouched(),
            "the device wrote the guest page at its guest-physical address",
        );
    } else {
        println!(
            "vfio: iommu-gpa-not-identity skipped ({}) (IOVAs overlap guest-physical addresses)",
            d.name
        );
    }

    // Map, use, unmap: the device must follow the UNMAP.
    let iova = map_range(
        &mut c.io,
        &mut c.space,
        tr.domain,
        victim.base,
        victim.total,
        rw,
    )
    .unwrap_or_else(|e| bad("iommu-unmap-followed", Some(d), e));
    let cmd = Cmd {
        seed: 11,
        ..Cmd::new(regs::CMD_WRITE_PATTERN, iova, SMALL_LEN)
    };
    d.run_ok("iommu-unmap-followed", &cmd, t);
    verify_pattern("iommu-unmap-followed", d, &victim, 11);
    let span = (victim.total as u64).next_multiple_of(g);
    let st =
        c.io.unmap(tr.domain, iova, iova + span - 1)
            .unwrap_or_else(|e| bad("iommu-unmap-followed", Some(d), e));
    if st != iommu::S_OK {
        bad(
            "iommu-unmap-followed",
            Some(d),
            format!("UNMAP {iova:#x}+{span:#x}: status {st}"),
        );
    }
    victim.reset();
    d.run_dma_refused(
        "iommu-unmap-followed",
        &Cmd {
            seed: 13,
            ..Cmd::new(regs::CMD_WRITE_PATTERN, iova, SMALL_LEN)
        },
        t,
    );
    expect(
        "iommu-unmap-followed",
        Some(d),
        victim.untouched(),
        "the device wrote the guest page after its IOVA was unmapped",
    );

    // Still working at a mapped IOVA.
    bufs.a.reset();
    let cmd = Cmd {
        seed: 15,
        ..Cmd::new(regs::CMD_WRITE_PATTERN, bufs.a_dma, prm.len)
    };
    d.run_ok("iommu-works-after-faults", &cmd, t);
    verify_pattern("iommu-works-after-faults", d, &bufs.a, 15);
    ok("iommu-works-after-faults", Some(d));
}

/// A small WRITE_PATTERN into a fresh guest buffer (mapped for `d`), to raise an interrupt.
fn small_cmd(d: &Dev, ctx: &mut Option<IommuCtx>, seed: u32) -> (Cmd, GuestBuf) {
    let b = GuestBuf::new(SMALL_LEN as usize, 0);
    let addr = dma_addr(d, ctx, b.at, b.len, MAP_F_READ | MAP_F_WRITE)
        .unwrap_or_else(|e| bad("iommu-map", Some(d), e));
    (
        Cmd {
            seed,
            ..Cmd::new(regs::CMD_WRITE_PATTERN, addr, SMALL_LEN)
        },
        b,
    )
}

/// MSI-X vector 0 -> an IDT vector; a command with IRQ_CONTROL = DONE interrupts; IRQ_STATUS
/// clears; the next command interrupts again.
fn msix_test(
    d: &Dev,
    cfg: &'static dyn ConfigSpace,
    prm: &Params,
    all: &[Dev],
    ctx: &mut Option<IommuCtx>,
) {
    let v = prm
        .msix_vector
        .checked_add(d.bdf_index(all) as u8)
        .unwrap_or(prm.msix_vector);
    let m = &d.msix;
    for e in 0..m.entries {
        m.set_masked(e, true);
    }
    m.program(0, v, lapic::id());
    m.set_enabled(cfg, true);
    m.set_masked(0, false);
    expect(
        "msix-enabled",
        Some(d),
        m.enabled(cfg) && !m.masked(0) && m.data(0) == u32::from(v),
        format!(
            "enable {} entry 0 masked {} data {:#x}",
            m.enabled(cfg),
            m.masked(0),
            m.data(0)
        ),
    );
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);
    interrupts::enable();

    for (k, check) in ["msix-interrupt", "msix-second-interrupt"]
        .iter()
        .enumerate()
    {
        let (cmd, b) = small_cmd(d, ctx, 0x100 + k as u32);
        let before = interrupts::count(v);
        let s = d.start(&cmd);
        if interrupts::wait_for(v, before, prm.timeout_ms).is_none() {
            bad(
                check,
                Some(d),
                format!(
                    "no interrupt on vector {v:#04x} within {} ms (IRQ_STATUS {:#x}, completed {})",
                    prm.timeout_ms,
                    d.rd(regs::REG_IRQ_STATUS),
                    d.rd(regs::REG_COMPLETED)
                ),
            );
        }
        if d.finish(check, &cmd, s, prm.timeout_ms) != Outcome::Completed {
            bad(check, Some(d), "the command failed");
        }
        verify_pattern(check, d, &b, cmd.seed);
        let st = d.rd(regs::REG_IRQ_STATUS);
        if st & regs::IRQ_DONE == 0 {
            bad(
                check,
                Some(d),
                format!("IRQ_STATUS {st:#x} lacks IRQ_DONE after the interrupt"),
            );
        }
        println!("vfio: {} msix vector {:#04x} delivered", d.name, v);
        ok(check, Some(d));
        d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
        let st = d.rd(regs::REG_IRQ_STATUS);
        if k == 0 {
            expect(
                "msix-status-clear",
                Some(d),
                st & regs::IRQ_DONE == 0,
                format!("IRQ_STATUS reads {st:#x} after writing IRQ_DONE"),
            );
        }
    }
    d.wr(regs::REG_IRQ_CONTROL, 0);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    m.set_masked(0, true);
    m.set_enabled(cfg, false);
}

/// The GSI of `d`'s INTx: `vfio.gsi=` (per device, in BDF order), else the DSDT's static
/// `_PRT`, else the Interrupt Line register.
fn intx_gsi(
    d: &Dev,
    cfg: &dyn ConfigSpace,
    prm: &Params,
    index: usize,
    pin: u8,
    prt: &[aml::PrtEntry],
) -> (u32, &'static str) {
    if let Some(&g) = prm.gsis.get(index) {
        return (g, "vfio.gsi");
    }
    let bdf = d.func.bdf;
    if let Some(e) = prt.iter().find(|e| e.matches(bdf.dev, bdf.func, pin - 1)) {
        return (e.gsi as u32, "_PRT");
    }
    let line = cfg.read8(bdf, 0x3C);
    if line != 0 && line != 0xFF {
        return (u32::from(line), "interrupt line");
    }
    bad(
        "intx-gsi",
        Some(d),
        "no vfio.gsi=, no static _PRT entry for the device, and the Interrupt Line register is unset",
    )
}

/// INTx through the I/O APIC, level-triggered: the line stays asserted until IRQ_STATUS is
/// cleared (seen by unmasking the pin while the status is still set), goes down once it is,
/// and the next command raises it again.
#[allow(clippy::too_many_arguments)]
fn intx_test(
    d: &Dev,
    cfg: &'static dyn ConfigSpace,
    prm: &Params,
    all: &[Dev],
    p: &Platform,
    prt: &[aml::PrtEntry],
    ctx: &mut Option<IommuCtx>,
) {
    let index = d.bdf_index(all);
    let v = prm
        .intx_vector
        .checked_add(index as u8)
        .unwrap_or(prm.intx_vector);
    let bdf = d.func.bdf;
    d.msix.set_enabled(cfg, false);
    update_command(cfg, bdf, 0, command::INTX_DISABLE);
    let pin = cfg.read8(bdf, 0x3D);
    expect(
        "intx-pin",
        Some(d),
        pin == 1,
        format!("Interrupt Pin register {pin}, expected 1 (INTA#)"),
    );
    let (gsi, from) = intx_gsi(d, cfg, prm, index, pin, prt);
    println!(
        "vfio: {} intx pin INTA gsi {} (from {}) vector {:#04x} level active-low",
        d.name, gsi, from, v
    );
    let Some(madt) = &p.madt else {
        bad(
            "intx-interrupt",
            Some(d),
            "no MADT: cannot find the I/O APIC",
        );
    };
    let Some(ioapic) = madt
        .ioapics
        .iter()
        .map(|a| IoApic::new(u64::from(a.addr), a.gsi_base))
        .find(|a| a.serves(gsi))
    else {
        bad(
            "intx-interrupt",
            Some(d),
            format!("no I/O APIC in the MADT serves gsi {gsi}"),
        );
    };
    let t = prm.timeout_ms;
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);

    // Phase 1: the handler masks the pin (leaving the device's status alone).
    interrupts::disable();
    interrupts::set_status_clear(v, 0, 0);
    interrupts::set_mask_on_arrival(v, ioapic.base(), gsi - ioapic.gsi_base);
    ioapic.route(gsi, v, Trigger::Level, Polarity::Low, lapic::id());
    interrupts::enable();

    let (cmd, b) = small_cmd(d, ctx, 0x200);
    let before = interrupts::count(v);
    let s = d.start(&cmd);
    let Some(first) = interrupts::wait_for(v, before, t) else {
        bad(
            "intx-interrupt",
            Some(d),
            format!(
                "no interrupt on gsi {gsi} (vector {v:#04x}) within {t} ms; ioapic entry {:#x}, IRQ_STATUS {:#x}",
                ioapic.entry_low(gsi),
                d.rd(regs::REG_IRQ_STATUS)
            ),
        );
    };
    if d.finish("intx-interrupt", &cmd, s, t) != Outcome::Completed {
        bad("intx-interrupt", Some(d), "the command failed");
    }
    verify_pattern("intx-interrupt", d, &b, cmd.seed);
    let st = d.rd(regs::REG_IRQ_STATUS);
    expect(
        "intx-interrupt",
        Some(d),
        st & regs::IRQ_DONE != 0,
        format!("IRQ_STATUS {st:#x} lacks IRQ_DONE after the interrupt"),
    );

    // Phase 2: status still set -> unmasking the pin must interrupt again (level held).
    time::delay_ms(100);
    let now = interrupts::count(v);
    interrupts::disable();
    ioapic.unmask(gsi);
    interrupts::enable();
    if interrupts::wait_for(v, now, t).is_none() {
        bad(
            "intx-level-held",
            Some(d),
            format!(
                "IRQ_STATUS still {:#x}, pin unmasked, but no new interrupt within {t} ms (ioapic entry {:#x}): the line did not stay asserted",
                d.rd(regs::REG_IRQ_STATUS),
                ioapic.entry_low(gsi)
            ),
        );
    }
    ok("intx-level-held", Some(d));

    // Phase 3: clear IRQ_STATUS, unmask: the line must go down (a few spurious deliveries of
    // the old assertion are tolerated) and the remote IRR clear.
    interrupts::disable();
    interrupts::set_mask_on_arrival(v, 0, 0);
    interrupts::set_status_clear(v, d.regs + regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    interrupts::reset_status_seen(v);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    let st = d.rd(regs::REG_IRQ_STATUS);
    let base = interrupts::count(v);
    ioapic.unmask(gsi);
    interrupts::enable();
    expect(
        "intx-status-clear",
        Some(d),
        st & regs::IRQ_DONE == 0,
        format!("IRQ_STATUS reads {st:#x} after writing IRQ_DONE"),
    );
    let settled = settle(v);
    let extra = settled - base;
    let low = ioapic.entry_low(gsi);
    expect(
        "intx-deasserted",
        Some(d),
        extra <= 2 && low & (1 << 14) == 0,
        format!(
            "{extra} interrupt(s) after IRQ_STATUS was cleared (line stuck?), ioapic entry {low:#x}"
        ),
    );

    // Phase 4: the next command interrupts again; the handler clears IRQ_STATUS.
    let (cmd, b) = small_cmd(d, ctx, 0x201);
    let s = d.start(&cmd);
    if interrupts::wait_for(v, settled, t).is_none() {
        bad(
            "intx-next-command",
            Some(d),
            format!("no interrupt on gsi {gsi} for the next command within {t} ms"),
        );
    }
    if d.finish("intx-next-command", &cmd, s, t) != Outcome::Completed {
        bad("intx-next-command", Some(d), "the command failed");
    }
    verify_pattern("intx-next-command", d, &b, cmd.seed);
    let after = settle(v);
    let seen = interrupts::status_seen(v);
    let low = ioapic.entry_low(gsi);
    expect(
        "intx-next-command",
        Some(d),
        seen & regs::IRQ_DONE != 0 && after - settled <= 3 && low & (1 << 14) == 0,
        format!(
            "handler saw IRQ_STATUS bits {seen:#x}, {} interrupt(s), ioapic entry {low:#x}",
            after - settled
        ),
    );
    println!(
        "vfio: {} intx {} interrupt(s) in all ({} before the line was first held)",
        d.name,
        after - before,
        first - before
    );

    interrupts::disable();
    ioapic.mask(gsi);
    interrupts::set_status_clear(v, 0, 0);
    d.wr(regs::REG_IRQ_CONTROL, 0);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    update_command(cfg, bdf, command::INTX_DISABLE, 0);
    interrupts::enable();
}

/// Wait until `vector`'s count stops changing (300 ms steps, at most ~3 s); the final count.
fn settle(vector: u8) -> u32 {
    let deadline = time::Deadline::after_ms(3_000);
    let mut last = interrupts::count(vector);
    loop {
        time::delay_ms(300);
        let now = interrupts::count(vector);
        if now == last || deadline.expired() {
            return now;
        }
        last = now;
    }
}

/// Offsets of the 32-bit words covering `[off - GUARD, off + len + GUARD)`.
fn mem_words(off: u64, len: u32) -> impl Iterator<Item = u64> {
    let start = (off - GUARD as u64) & !3;
    let end = (off + u64::from(len) + GUARD as u64).next_multiple_of(4);
    (start..end).step_by(4)
}

/// Fill `[off - GUARD, off + len + GUARD)` of `d`'s device memory with [`MEM_SENTINEL`].
fn mem_fill(d: &Dev, off: u64, len: u32) {
    for o in mem_words(off, len) {
        dma::write::<u32>(d.mem + o, MEM_SENTINEL);
    }
}

/// First offset in the guard bands around `[off, off + len)` that lost the sentinel.
fn mem_guard_damage(d: &Dev, off: u64, len: u32) -> Option<u64> {
    let s = MEM_SENTINEL.to_le_bytes();
    (off - GUARD as u64..off)
        .chain(off + u64::from(len)..off + u64::from(len) + GUARD as u64)
        .find(|&o| dma::read::<u8>(d.mem + o) != s[(o % 4) as usize])
}

/// The address `src` must use to reach `dst`'s device memory at `off`: behind the IOMMU a
/// fresh IOVA mapped (MMIO) in `src`'s domain, else the guest-physical address. Err: the MAP
/// was refused (its status).
fn peer_addr(
    src: &Dev,
    dst: &Dev,
    ctx: &mut Option<IommuCtx>,
    off: u64,
    len: u32,
) -> Result<u64, String> {
    match (src.iommu, ctx.as_mut()) {
        (Some(t), Some(c)) => {
            let flags = MAP_F_READ | MAP_F_WRITE | c.mmio_flag;
            map_range(
                &mut c.io,
                &mut c.space,
                t.domain,
                dst.mem + off,
                len as usize,
                flags,
            )
        }
        _ => Ok(dst.mem + off),
    }
}

/// `src` P2P_WRITEs a pattern into `dst`'s device memory; the guest reads it there.
fn p2p(src: &Dev, dst: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params, check: &str) {
    let len = prm.p2p_len;
    let off = P2P_OFFSET;
    mem_fill(dst, off, len);
    let addr = peer_addr(src, dst, ctx, off, len).unwrap_or_else(|e| bad(check, Some(src), e));
    println!(
        "vfio: p2p {} -> {} bar{} +{:#x} at {} {:#x} len {}",
        src.name,
        dst.name,
        regs::MEMORY_BAR,
        off,
        if src.iommu.is_some() { "iova" } else { "gpa" },
        addr,
        len
    );
    let seed = 0x9292_0000 ^ u32::from(src.func.bdf.dev);
    let peer0 = dst.rd(regs::REG_PEER_WRITES);
    src.run_ok(
        check,
        &Cmd {
            seed,
            ..Cmd::new(regs::CMD_P2P_WRITE, addr, len)
        },
        prm.timeout_ms,
    );
    if let Some(i) = (0..len)
        .find(|&i| dma::read::<u8>(dst.mem + off + u64::from(i)) != regs::pattern_byte(seed, i))
    {
        bad(
            check,
            Some(dst),
            format!(
                "device memory byte {i} is {:#04x}, pattern says {:#04x}",
                dma::read::<u8>(dst.mem + off + u64::from(i)),
                regs::pattern_byte(seed, i)
            ),
        );
    }
    if let Some(o) = mem_guard_damage(dst, off, len) {
        bad(
            check,
            Some(dst),
            format!("the peer write reached device memory +{o:#x}, outside its range"),
        );
    }
    let peer1 = dst.rd(regs::REG_PEER_WRITES);
    expect(
        check,
        Some(src),
        peer1 != peer0,
        format!("the peer's REG_PEER_WRITES stayed at {peer0}"),
    );
}

/// The p2p=off peer (`b`): `a`'s P2P_WRITE into it fails with ERR_DMA and leaves it unchanged;
/// `b`'s P2P_WRITE into `a` fails too; both keep doing DMA to guest RAM.
fn p2p_refused(a: &Dev, b: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params) {
    let len = prm.p2p_len;
    let off = P2P_OFFSET;
    let t = prm.timeout_ms;
    for (src, dst, check, line) in [
        (
            a,
            b,
            "p2p-off-peer-refused",
            "vfio: p2p to a p2p=off peer refused",
        ),
        (
            b,
            a,
            "p2p-off-source-refused",
            "vfio: p2p from a p2p=off device refused",
        ),
    ] {
        mem_fill(dst, off, len);
        // Device memory just filled, as 32-bit words: the refused write must leave all of it.
        let addr = match peer_addr(src, dst, ctx, off, len) {
            Ok(a) => a,
            Err(e) => {
                // The IOMMU refused to map the peer's BAR: aim at an IOVA that is then unmapped.
                println!(
                    "vfio: map of {}'s bar{} for {} refused: {}",
                    dst.name,
                    regs::MEMORY_BAR,
                    src.name,
                    e
                );
                ctx.as_mut()
                    .map(|c| {
                        c.space
                            .alloc(u64::from(len))
                            .unwrap_or_else(|e| bad(check, Some(src), e))
                    })
                    .unwrap_or(dst.mem + off)
            }
        };
        println!(
            "vfio: p2p {} -> {} (p2p=off) at {:#x} len {}",
            src.name, dst.name, addr, len
        );
        let peer0 = dst.rd(regs::REG_PEER_WRITES);
        let f0 = src.rd(regs::REG_FAILED);
        src.run_dma_refused(
            check,
            &Cmd {
                seed: 0x0FF,
                ..Cmd::new(regs::CMD_P2P_WRITE, addr, len)
            },
            t,
        );
        let f1 = src.rd(regs::REG_FAILED);
        let changed = mem_words(off, len).find(|&o| dma::read::<u32>(dst.mem + o) != MEM_SENTINEL);
        let peer1 = dst.rd(regs::REG_PEER_WRITES);
        expect(
            check,
            Some(src),
            changed.is_none() && peer1 == peer0 && f1 == f0.wrapping_add(1),
            format!(
                "peer memory changed at +{:#x}, REG_PEER_WRITES {peer0} -> {peer1}, REG_FAILED {f0} -> {f1}",
                changed.unwrap_or(0)
            ),
        );
        println!("{}", line);
    }
    // Both still reach guest RAM.
    for d in [a, b] {
        let (cmd, buf) = small_cmd(d, ctx, 0x300);
        d.run_ok("p2p-off-dma-still-works", &cmd, t);
        verify_pattern("p2p-off-dma-still-works", d, &buf, cmd.seed);
        ok("p2p-off-dma-still-works", Some(d));
    }
}
