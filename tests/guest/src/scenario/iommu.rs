//! `iommu`: DMA remapping through the virtio-iommu. The guest finds the IOMMU and its endpoints
//! in the ACPI VIOT table, brings the virtio-iommu up (MSI-X when it has it), probes and attaches
//! the virtio-blk behind it, maps every buffer of the blk device — its rings included — at IOVAs
//! that differ from their guest-physical addresses (one data buffer spans two MAP requests that
//! point at non-adjacent pages), and negotiates `VIRTIO_F_ACCESS_PLATFORM`. Then it does rounds
//! of write / flush / read-back through those mappings, and finally unmaps one buffer: requests
//! that use it must fail with IOERR and raise fault reports on the event queue, while requests
//! with valid mappings keep working.
//!
//! Parameters: `iommu.rounds=N` (default 3), `iommu.delay_ms=M` between rounds (default 0; the
//! snapshot test pauses the VM during that delay), `iommu.expect=TEXT` (sector 0 must start with
//! it), `iommu.ap_refusal=0` (do not require that FEATURES_OK is refused without
//! ACCESS_PLATFORM; skiff and QEMU both refuse it), `iommu.lenient=1` (accept QEMU 7.2's way with faulting DMA: the request
//! completes with OK, the access is dropped, and every 4-byte access is reported, with flags
//! holding only ADDRESS).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::report::{check, fail, or_fail, param_u64, skip};
use crate::acpi::viot::Viot;
use crate::acpi::Acpi;
use crate::arch::time::{self, Deadline};
use crate::arch::{interrupts, lapic};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::pci::msix::Msix;
use crate::pci::PciFunction;
use crate::println;
use crate::virtio::blk::{self, F_FLUSH, S_IOERR, S_OK, S_UNWRITTEN, T_FLUSH, T_IN, T_OUT};
use crate::virtio::iommu::{
    self, Fault, Iommu, ResvMem, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_MAPPING,
    MAP_F_READ, MAP_F_WRITE, RESV_MEM_T_MSI, S_OK as IOMMU_OK,
};
use crate::virtio::queue::{Buf, Used, Virtqueue};
use crate::virtio::{status, types, Platform, Transport, F_ACCESS_PLATFORM};

/// MSI-X vector of the virtio-blk request queue.
pub const VECTOR_BLK: u8 = 0x30;
/// MSI-X vector of the virtio-iommu request queue.
pub const VECTOR_IOMMU_REQ: u8 = 0x32;
/// MSI-X vector of the virtio-iommu event queue.
pub const VECTOR_IOMMU_EVT: u8 = 0x33;
/// The x86 MSI doorbell window the PROBE must report as RESV_MEM/MSI.
pub const MSI_WINDOW: (u64, u64) = (0xFEE0_0000, 0xFEEF_FFFF);
/// Where IOVAs are handed out from when the input range allows it (far above guest RAM, so no
/// IOVA equals the guest-physical address it maps).
pub const IOVA_BASE: u64 = 0x10_0000_0000;
/// Number of event buffers posted.
const EVENT_BUFFERS: usize = 8;
/// Bytes of the data buffers (8 sectors).
const DATA_LEN: usize = 4096;
/// How long to wait for a fault report.
const FAULT_TIMEOUT_MS: u64 = 5_000;

/// The virtio-iommu, brought up, and what the VIOT says about it.
pub struct Setup {
    /// PCI bus 0 and config access.
    pub p: Platform,
    /// The virtio-iommu.
    pub iommu: Iommu,
    /// Functions on bus 0 behind the IOMMU (the IOMMU itself excluded) with their endpoint ids.
    pub endpoints: Vec<(PciFunction, u32)>,
    /// Whether the IOMMU's queues interrupt through MSI-X (request: entry 0, event: entry 1).
    pub msix: bool,
}

fn feature_names(f: u64) -> String {
    let names = [
        (iommu::F_INPUT_RANGE, "input-range"),
        (iommu::F_DOMAIN_RANGE, "domain-range"),
        (iommu::F_MAP_UNMAP, "map-unmap"),
        (iommu::F_BYPASS, "bypass"),
        (iommu::F_PROBE, "probe"),
        (iommu::F_MMIO, "mmio"),
        (iommu::F_BYPASS_CONFIG, "bypass-config"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|&(_, n)| n)
        .collect();
    v.join(" ")
}

/// Mask every entry of `m`, point `entries[i].0` at vector `entries[i].1` on this CPU and enable
/// MSI-X (the entries are unmasked by [`unmask`] once the queues are routed).
fn msix_setup(t: &Transport, m: &Msix, entries: &[(u16, u8)]) {
    let bsp = lapic::id();
    for e in 0..m.entries {
        m.set_masked(e, true);
    }
    for &(e, v) in entries {
        m.program(e, v, bsp);
    }
    m.set_enabled(t.cfg, true);
}

fn unmask(m: &Msix, entries: &[(u16, u8)]) {
    for &(e, _) in entries {
        m.set_masked(e, false);
    }
}

/// Find the VIOT, its virtio-iommu and the endpoints behind it; bring the virtio-iommu up (MSI-X
/// when it has at least two entries), print its features and configuration, and turn `bypass`
/// off (when BYPASS_CONFIG is negotiated) so that unattached endpoints fault.
pub fn bring_up(boot: &BootInfo) -> Setup {
    let acpi = or_fail(Acpi::discover(boot.rsdp_addr));
    let Some(table) = acpi.find(b"VIOT") else {
        fail("no ACPI VIOT table");
    };
    check("viot-checksum", table.checksum_ok, "VIOT checksum is wrong");
    let viot = Viot::parse(table);
    println!(
        "viot: {} nodes, revision {}, {} bytes",
        viot.node_count,
        table.revision(),
        table.length
    );
    for n in &viot.nodes {
        println!("viot: {}", n);
    }
    check(
        "viot-parse",
        viot.errors.is_empty() && viot.nodes.len() == usize::from(viot.node_count),
        viot.errors.join("; "),
    );
    let iommus = viot.pci_iommus();
    let Some(&(node, segment, iommu_bdf)) = iommus.first() else {
        fail("the VIOT has no virtio-iommu PCI node");
    };
    if segment != 0 {
        fail(format!(
            "the virtio-iommu is in PCI segment {segment}; only segment 0 is scanned"
        ));
    }

    let mut p = Platform::discover(boot);
    let Some(&func) = p.functions.iter().find(|f| f.bdf == iommu_bdf) else {
        fail(format!(
            "no PCI function at {iommu_bdf}, where the VIOT puts the virtio-iommu"
        ));
    };
    check(
        "viot-iommu-is-virtio-iommu",
        func.vendor == 0x1af4 && crate::virtio::device_type(func.device) == Some(types::IOMMU),
        format!("{} is {:04x}:{:04x}", func.bdf, func.vendor, func.device),
    );
    let endpoints: Vec<(PciFunction, u32)> = p
        .functions
        .iter()
        .filter(|f| f.bdf != iommu_bdf)
        .filter_map(|f| viot.endpoint_of(node, 0, f.bdf).map(|ep| (*f, ep)))
        .collect();
    for (f, ep) in &endpoints {
        println!("viot: {} {} endpoint {:#x}", f.bdf, f.description(), ep);
    }
    check(
        "viot-endpoints",
        !endpoints.is_empty(),
        "no PCI function on bus 0 is behind the virtio-iommu",
    );

    let t = or_fail(p.open(func));
    let routes = [(0u16, VECTOR_IOMMU_REQ), (1u16, VECTOR_IOMMU_EVT)];
    let msix = t.msix.filter(|m| m.entries >= 2);
    if let Some(m) = &msix {
        msix_setup(&t, m, &routes);
    }
    let mut io = or_fail(Iommu::init(t, msix.map(|_| (0, 1)), EVENT_BUFFERS));
    if let Some(m) = &msix {
        unmask(m, &routes);
        interrupts::enable();
    }
    let c = io.config;
    println!(
        "iommu: features {:#x} ({})",
        io.features(),
        feature_names(io.features())
    );
    println!(
        "iommu: config page_size_mask {:#x} input {:#x}-{:#x} domains {}-{} probe_size {} bypass {}",
        c.page_size_mask,
        c.input_start,
        c.input_end,
        c.domain_start,
        c.domain_end,
        c.probe_size,
        c.bypass
    );
    check(
        "iommu-page-size-mask",
        c.page_size_mask != 0,
        "page_size_mask is 0",
    );
    if io.features() & iommu::F_BYPASS_CONFIG != 0 && c.bypass != 0 {
        let now = io.set_bypass(false);
        println!("iommu: bypass {} -> {}", c.bypass, now);
        check("bypass-off", now == 0, format!("bypass reads back {now}"));
    }
    Setup {
        p,
        iommu: io,
        endpoints,
        msix: msix.is_some(),
    }
}

/// Hands out IOVAs: granule-aligned, with an unmapped guard granule after every range, skipping
/// reserved regions.
pub(super) struct IovaSpace {
    next: u64,
    end: u64,
    granule: u64,
    reserved: Vec<(u64, u64)>,
}

impl IovaSpace {
    pub(super) fn new(c: &iommu::Config, reserved: &[ResvMem]) -> IovaSpace {
        let g = c.granule();
        let base = if c.input_start <= IOVA_BASE && IOVA_BASE.saturating_add(1 << 30) <= c.input_end
        {
            IOVA_BASE
        } else {
            c.input_start.next_multiple_of(g).max(g)
        };
        IovaSpace {
            next: base,
            end: c.input_end,
            granule: g,
            reserved: reserved.iter().map(|r| (r.start, r.end)).collect(),
        }
    }

    pub(super) fn alloc(&mut self, len: u64) -> Result<u64, String> {
        let size = len.max(1).next_multiple_of(self.granule);
        loop {
            let start = self.next;
            let last = start
                .checked_add(size - 1)
                .filter(|&l| l <= self.end)
                .ok_or("IOVA space exhausted")?;
            match self
                .reserved
                .iter()
                .find(|&&(s, e)| s <= last && start <= e)
            {
                Some(&(_, e)) => self.next = (e + 1).next_multiple_of(self.granule),
                None => {
                    self.next = last + 1 + self.granule;
                    return Ok(start);
                }
            }
        }
    }
}

/// MAP `pages` granules at `iova` to `gpa` (both granule-aligned) in `domain`.
pub(super) fn map_pages(
    io: &mut Iommu,
    domain: u32,
    iova: u64,
    gpa: u64,
    len: u64,
    flags: u32,
) -> Result<(), String> {
    let st = io.map(domain, iova, iova + len - 1, gpa, flags)?;
    if st != IOMMU_OK {
        return Err(format!(
            "MAP {iova:#x}-{:#x} -> {gpa:#x} answered {} ({})",
            iova + len - 1,
            st,
            iommu::status_name(st)
        ));
    }
    Ok(())
}

/// Map the granules covering `[gpa, gpa + len)` at a fresh IOVA range; returns the IOVA of `gpa`.
pub(super) fn map_range(
    io: &mut Iommu,
    space: &mut IovaSpace,
    domain: u32,
    gpa: u64,
    len: usize,
    flags: u32,
) -> Result<u64, String> {
    let g = space.granule;
    let first = gpa & !(g - 1);
    let span = (gpa + len as u64).next_multiple_of(g) - first;
    let iova = space.alloc(span)?;
    map_pages(io, domain, iova, first, span, flags)?;
    Ok(iova + (gpa - first))
}

/// A virtio-blk device behind the IOMMU: every address it is given is an IOVA.
struct IoBlk {
    t: Transport,
    q: Virtqueue,
    /// Header (16 bytes) at `hdr`, status byte at `hdr + 16`; the same page is mapped at
    /// `hdr_iova`.
    hdr: u64,
    hdr_iova: u64,
    vector: Option<u8>,
}

impl IoBlk {
    fn status(&self) -> u8 {
        dma::read::<u8>(self.hdr + 16)
    }

    /// Run one request whose data buffer (if any) is given by IOVA; returns (status, used).
    /// Fails on a timeout, on NEEDS_RESET, and (with MSI-X) when no interrupt came.
    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> Result<(u8, Used), String> {
        dma::write::<u32>(self.hdr, kind);
        dma::write::<u32>(self.hdr + 4, 0);
        dma::write::<u64>(self.hdr + 8, sector);
        dma::write::<u8>(self.hdr + 16, S_UNWRITTEN);
        let mut bufs: Vec<Buf> = Vec::with_capacity(3);
        bufs.push(Buf::out(self.hdr_iova, 16));
        bufs.extend(data);
        bufs.push(Buf::input(self.hdr_iova + 16, 1));
        let before = self.vector.map(interrupts::count);
        let head = self.q.submit(&bufs).ok_or("blk queue full")?;
        let deadline = Deadline::after_ms(blk::REQUEST_TIMEOUT_MS);
        let used = loop {
            if let Some(u) = self.q.poll() {
                if u.id == u32::from(head) {
                    break u;
                }
                continue;
            }
            let s = self.t.status();
            if s & status::NEEDS_RESET != 0 {
                return Err(format!(
                    "virtio-blk set DEVICE_NEEDS_RESET (status {s:#04x}) instead of completing request type {kind}"
                ));
            }
            if deadline.expired() {
                return Err(format!("virtio-blk request type {kind} timed out"));
            }
            time::delay_us(50);
        };
        if let (Some(v), Some(b)) = (self.vector, before) {
            if interrupts::wait_for(v, b, 2_000).is_none() {
                return Err(format!(
                    "virtio-blk completed request type {kind} without an MSI-X interrupt on {v:#04x}"
                ));
            }
        }
        Ok((self.status(), used))
    }

    fn rw(&mut self, kind: u32, sector: u64, iova: u64, len: usize) -> Result<u8, String> {
        let buf = if kind == T_IN {
            Buf::input(iova, len as u32)
        } else {
            Buf::out(iova, len as u32)
        };
        Ok(self.request(kind, sector, Some(buf))?.0)
    }
}

/// Byte `i` of the data written in round `round` (the host test computes the same).
pub fn pattern(round: u64, i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (round as u8).wrapping_mul(0x3B) ^ ((i >> 9) as u8) ^ 0x5A
}

/// One data buffer of [`DATA_LEN`] bytes at one IOVA, backed by two non-adjacent guest pages
/// (the second half of the buffer lies *below* the first in guest-physical memory).
struct SplitBuf {
    iova: u64,
    /// Guest-physical address of byte 0 and of byte `first_len`.
    gpa_a: u64,
    gpa_b: u64,
    first_len: usize,
}

impl SplitBuf {
    fn gpa(&self, i: usize) -> u64 {
        if i < self.first_len {
            self.gpa_a + i as u64
        } else {
            self.gpa_b + (i - self.first_len) as u64
        }
    }

    fn write(&self, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            dma::write::<u8>(self.gpa(i), b);
        }
    }

    fn read(&self) -> Vec<u8> {
        (0..DATA_LEN)
            .map(|i| dma::read::<u8>(self.gpa(i)))
            .collect()
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Everything the rounds use.
struct Bufs {
    split: SplitBuf,
    /// A plain (contiguously mapped) buffer.
    plain: u64,
    plain_iova: u64,
    /// One granule, mapped on its own: it is unmapped for the fault part.
    victim: u64,
    victim_iova: u64,
}

/// One round: write the round's pattern through the split buffer, flush, read it back through
/// the plain buffer and through the split buffer, and read sector 0 into `(s0, s0_iova)` (the
/// victim while it is mapped).
fn round(
    b: &mut IoBlk,
    bufs: &Bufs,
    k: u64,
    flush: bool,
    expect: Option<&str>,
    (s0, s0_iova): (u64, u64),
) -> Result<(), String> {
    let sector = 8 * k;
    let data: Vec<u8> = (0..DATA_LEN).map(|i| pattern(k, i)).collect();
    bufs.split.write(&data);
    let st = b.rw(T_OUT, sector, bufs.split.iova, DATA_LEN)?;
    if st != S_OK {
        return Err(format!(
            "round {k}: write through the split buffer: status {st}"
        ));
    }
    if flush {
        let (st, _) = b.request(T_FLUSH, 0, None)?;
        if st != S_OK {
            return Err(format!("round {k}: flush: status {st}"));
        }
    }
    dma::fill(bufs.plain, DATA_LEN, 0);
    let st = b.rw(T_IN, sector, bufs.plain_iova, DATA_LEN)?;
    let got = dma::read_bytes(bufs.plain, DATA_LEN);
    if st != S_OK {
        return Err(format!(
            "round {k}: read into the plain buffer: status {st}"
        ));
    }
    if let Some(i) = first_diff(&got, &data) {
        return Err(format!(
            "round {k}: read-back differs at byte {i}: {:#04x}, wrote {:#04x}",
            got[i], data[i]
        ));
    }
    bufs.split.write(&[0u8; DATA_LEN]);
    let st = b.rw(T_IN, sector, bufs.split.iova, DATA_LEN)?;
    let got = bufs.split.read();
    if st != S_OK {
        return Err(format!(
            "round {k}: read into the split buffer: status {st}"
        ));
    }
    if let Some(i) = first_diff(&got, &data) {
        return Err(format!(
            "round {k}: read through the split buffer differs at byte {i}: {:#04x}, expected {:#04x}",
            got[i], data[i]
        ));
    }
    dma::fill(s0, blk::SECTOR, 0);
    let st = b.rw(T_IN, 0, s0_iova, blk::SECTOR)?;
    if st != S_OK {
        return Err(format!("round {k}: read of sector 0: status {st}"));
    }
    if let Some(text) = expect {
        let s0 = dma::read_bytes(s0, blk::SECTOR);
        if !s0.starts_with(text.as_bytes()) {
            return Err(format!(
                "round {k}: sector 0 is {}, expected it to start with \"{text}\"",
                dma::hex(&s0[..16])
            ));
        }
    }
    println!("iommu: round {} ok sector {}", k, sector);
    Ok(())
}

/// Expect one fault report for `access` at `iova` by `endpoint` (with `lenient`, the flags need
/// only ADDRESS, and further reports are drained).
fn expect_fault(
    io: &mut Iommu,
    name: &str,
    endpoint: u32,
    iova: u64,
    access: u32,
    evt_before: Option<u32>,
    lenient: bool,
) {
    let f: Fault = match or_fail(io.wait_fault(FAULT_TIMEOUT_MS)) {
        Some(f) => f,
        None => {
            println!("check: {} FAIL no fault report on the event queue", name);
            fail(format!("{name}: no fault report"));
        }
    };
    let dir = if access == FAULT_F_WRITE {
        "write"
    } else {
        "read"
    };
    println!(
        "iommu: fault reason {} ({}) flags {:#x} endpoint {:#x} address {:#x} len {}",
        f.reason,
        if f.reason == FAULT_R_MAPPING {
            "mapping"
        } else {
            "other"
        },
        f.flags,
        f.endpoint,
        f.address,
        f.len
    );
    let want_flags = access | FAULT_F_ADDRESS;
    let mask = if lenient {
        FAULT_F_ADDRESS
    } else {
        FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS
    };
    check(
        name,
        f.reason == FAULT_R_MAPPING
            && f.flags & mask == want_flags & mask
            && f.endpoint == endpoint
            && f.address == iova
            && f.len as usize >= iommu::FAULT_SIZE
            && !f.reserved_nonzero,
        format!(
            "expected reason {FAULT_R_MAPPING} (mapping) flags {want_flags:#x} ({dir}|address) endpoint {endpoint:#x} address {iova:#x}, used length >= {}",
            iommu::FAULT_SIZE
        ),
    );
    if let Some(before) = evt_before {
        check(
            &format!("{name}-interrupt"),
            interrupts::wait_for(VECTOR_IOMMU_EVT, before, 2_000).is_some(),
            format!("no MSI-X interrupt on {VECTOR_IOMMU_EVT:#04x} for the fault report"),
        );
    }
    if lenient {
        let mut more = 0;
        while or_fail(io.wait_fault(500)).is_some() {
            more += 1;
        }
        println!(
            "iommu: {} more fault report(s) drained (iommu.lenient=1)",
            more
        );
    }
}

/// Check the status of a request that used an unmapped buffer.
fn check_fault_status(name: &str, st: u8, lenient: bool) {
    if lenient && st != S_IOERR {
        skip(name, format!("status {st}, iommu.lenient=1"));
    } else {
        check(
            name,
            st == S_IOERR,
            format!("status {st}, expected {S_IOERR} (IOERR)"),
        );
    }
}

/// Run the scenario; panic on the first failure.
pub fn run(boot: &BootInfo) {
    let rounds = param_u64(boot, "iommu.rounds", 3).max(1);
    let delay = param_u64(boot, "iommu.delay_ms", 0);
    let expect = boot.param("iommu.expect");
    let ap_refusal = param_u64(boot, "iommu.ap_refusal", 1) != 0;
    let lenient = param_u64(boot, "iommu.lenient", 0) != 0;

    let Setup {
        mut p,
        iommu: mut io,
        endpoints,
        msix: iommu_msix,
    } = bring_up(boot);
    let Some(&(blk_fn, ep)) = endpoints.iter().find(|(f, _)| {
        f.vendor == 0x1af4 && crate::virtio::device_type(f.device) == Some(types::BLOCK)
    }) else {
        fail("no virtio-blk behind the virtio-iommu (VIOT)");
    };
    println!("iommu: blk {} endpoint {:#x}", blk_fn.bdf, ep);

    // PROBE: the MSI doorbell must be a reserved MSI region, so MSI-X keeps working untranslated.
    let mut resv = Vec::new();
    if io.features() & iommu::F_PROBE != 0 {
        let (st, props) = or_fail(io.probe(ep));
        check(
            "probe",
            st == IOMMU_OK,
            format!("status {st} ({})", iommu::status_name(st)),
        );
        let (r, other) = iommu::parse_properties(&props);
        for m in &r {
            println!(
                "iommu: probe resv-mem {} {:#x}-{:#x}",
                if m.subtype == RESV_MEM_T_MSI {
                    "msi"
                } else {
                    "reserved"
                },
                m.start,
                m.end
            );
        }
        if other != 0 {
            println!("iommu: probe {} other properties", other);
        }
        check(
            "probe-msi-window",
            r.iter().any(|m| {
                m.subtype == RESV_MEM_T_MSI && m.start <= MSI_WINDOW.0 && m.end >= MSI_WINDOW.1
            }),
            format!(
                "no RESV_MEM/MSI property covering {:#x}-{:#x}",
                MSI_WINDOW.0, MSI_WINDOW.1
            ),
        );
        resv = r;
    } else {
        skip("probe", "VIRTIO_IOMMU_F_PROBE not offered");
    }

    let c = io.config;
    let domain = if (c.domain_start..=c.domain_end).contains(&7) {
        7
    } else {
        c.domain_start
    };
    let st = or_fail(io.attach(domain, ep));
    println!(
        "iommu: attach endpoint {:#x} to domain {}: {}",
        ep,
        domain,
        iommu::status_name(st)
    );
    check("attach", st == IOMMU_OK, format!("status {st}"));

    let mut space = IovaSpace::new(&c, &resv);
    let g = c.granule();
    let rw = MAP_F_READ | MAP_F_WRITE;

    // The blk function: it must refuse FEATURES_OK without ACCESS_PLATFORM.
    let blk_msix_entries = [(0u16, VECTOR_BLK)];
    let mut t = or_fail(p.open(blk_fn));
    let offered = t.device_features();
    check(
        "blk-offers-access-platform",
        offered & F_ACCESS_PLATFORM != 0,
        format!("device features {offered:#x} lack VIRTIO_F_ACCESS_PLATFORM (bit 33)"),
    );
    match t.negotiate(F_FLUSH) {
        Err(_) => println!("iommu: blk FEATURES_OK without ACCESS_PLATFORM refused"),
        Ok(_) => println!("iommu: blk FEATURES_OK without ACCESS_PLATFORM accepted"),
    }
    if ap_refusal {
        check(
            "blk-refuses-features-without-access-platform",
            t.features & F_ACCESS_PLATFORM == 0 && t.status() & status::FEATURES_OK == 0,
            "FEATURES_OK was accepted without VIRTIO_F_ACCESS_PLATFORM",
        );
    }
    let blk_msix = t.msix;
    if let Some(m) = &blk_msix {
        msix_setup(&t, m, &blk_msix_entries);
    }
    let features = or_fail(t.negotiate(F_FLUSH | F_ACCESS_PLATFORM));
    println!("iommu: blk features {:#x}", features);
    check(
        "blk-features-ok",
        features & F_ACCESS_PLATFORM != 0,
        "ACCESS_PLATFORM not accepted",
    );
    let capacity = t.device_config_u64(0);
    println!("iommu: blk capacity {}", capacity);
    let need = 8 * (rounds + 2) + 8;
    if capacity < need {
        fail(format!(
            "the disk has {capacity} sectors; {rounds} rounds need {need}"
        ));
    }

    // The rings, each mapped on its own at an IOVA (skiff translates them at DRIVER_OK).
    let mut rings: Vec<(u64, u64, usize)> = Vec::new();
    let q = or_fail(
        t.setup_queue_translated(0, 256, blk_msix.map(|_| 0), &mut |gpa, len| {
            let iova = map_range(&mut io, &mut space, domain, gpa, len, rw)?;
            rings.push((iova, gpa, len));
            Ok(iova)
        }),
    );
    for (name, (iova, gpa, len)) in ["desc", "avail", "used"].iter().zip(&rings) {
        println!(
            "iommu: blk queue 0 size {} {} ring iova {:#x} gpa {:#x} len {}",
            q.size, name, iova, gpa, len
        );
    }
    check(
        "ring-iovas-differ",
        rings.iter().all(|(iova, gpa, _)| iova != gpa),
        "a ring's IOVA equals its guest-physical address",
    );
    if let Some(cv) = blk_msix.map(|_| t.set_config_vector(crate::virtio::pci::NO_VECTOR)) {
        check(
            "blk-config-vector-none",
            cv == crate::virtio::pci::NO_VECTOR,
            format!("reads back {cv:#x}"),
        );
    }

    // Header + status page, the split buffer, the plain buffer and the victim.
    let hdr = dma::alloc(g as usize, g as usize);
    let hdr_iova = or_fail(map_range(&mut io, &mut space, domain, hdr, 32, rw));
    let three = dma::alloc(3 * g as usize, g as usize);
    let split_iova = or_fail(space.alloc(2 * g));
    // IOVA page 0 -> guest page 2, IOVA page 1 -> guest page 0: two MAP requests, non-adjacent
    // guest pages, the second below the first.
    or_fail(map_pages(&mut io, domain, split_iova, three + 2 * g, g, rw));
    or_fail(map_pages(&mut io, domain, split_iova + g, three, g, rw));
    let half = DATA_LEN / 2;
    let split = SplitBuf {
        iova: split_iova + g - half as u64,
        gpa_a: three + 3 * g - half as u64,
        gpa_b: three,
        first_len: half,
    };
    println!(
        "iommu: split buffer iova {:#x}+{:#x} = [iova {:#x} -> gpa {:#x}] + [iova {:#x} -> gpa {:#x}]",
        split.iova,
        DATA_LEN,
        split.iova,
        split.gpa_a,
        split_iova + g,
        split.gpa_b
    );
    let plain = dma::alloc(DATA_LEN, g as usize);
    let plain_iova = or_fail(map_range(&mut io, &mut space, domain, plain, DATA_LEN, rw));
    let victim = dma::alloc(g as usize, g as usize);
    let victim_iova = or_fail(map_range(
        &mut io, &mut space, domain, victim, g as usize, rw,
    ));
    println!(
        "iommu: buffers hdr iova {:#x} (gpa {:#x}) plain iova {:#x} (gpa {:#x}) victim iova {:#x} (gpa {:#x})",
        hdr_iova, hdr, plain_iova, plain, victim_iova, victim
    );
    let bufs = Bufs {
        split,
        plain,
        plain_iova,
        victim,
        victim_iova,
    };

    t.driver_ok();
    let s = t.status();
    check(
        "blk-driver-ok",
        s & status::DRIVER_OK != 0 && s & (status::NEEDS_RESET | status::FAILED) == 0,
        format!("device status {s:#04x}"),
    );
    let msix_on = blk_msix.is_some();
    if let Some(m) = &blk_msix {
        unmask(m, &blk_msix_entries);
        interrupts::enable();
    }
    let mut b = IoBlk {
        t,
        q,
        hdr,
        hdr_iova,
        vector: msix_on.then_some(VECTOR_BLK),
    };
    println!(
        "iommu: blk interrupts {}, iommu interrupts {}",
        if msix_on { "msi-x" } else { "polled" },
        if iommu_msix { "msi-x" } else { "polled" }
    );
    let flush = features & F_FLUSH != 0;

    // The rounds.
    for k in 1..=rounds {
        or_fail(round(
            &mut b,
            &bufs,
            k,
            flush,
            expect,
            (bufs.victim, bufs.victim_iova),
        ));
        if k == 1 && msix_on {
            check("blk-msix-through-the-msi-window", true, "");
        }
        if k < rounds && delay != 0 {
            time::delay_ms(delay);
        }
    }
    let stray = or_fail(io.poll_fault());
    check(
        "no-fault-before-unmap",
        stray.is_none(),
        format!("unexpected fault report {stray:?}"),
    );

    // Unmap the victim: requests using it must fail, and each must raise a fault report.
    let st = or_fail(io.unmap(domain, victim_iova, victim_iova + g - 1));
    println!(
        "iommu: unmapped victim iova {:#x}-{:#x} (gpa {:#x}): {}",
        victim_iova,
        victim_iova + g - 1,
        victim,
        iommu::status_name(st)
    );
    check("unmap-victim", st == IOMMU_OK, format!("status {st}"));
    let sector0 = dma::read_bytes(victim, blk::SECTOR);
    dma::fill(victim, g as usize, 0xAB);
    let evt_before = iommu_msix.then(|| interrupts::count(VECTOR_IOMMU_EVT));
    let st = or_fail(b.rw(T_IN, 0, victim_iova, blk::SECTOR));
    println!("iommu: read into the unmapped buffer: status {}", st);
    check_fault_status("read-into-unmapped-ioerr", st, lenient);
    check(
        "unmapped-buffer-untouched",
        dma::read_bytes(victim, g as usize)
            .iter()
            .all(|&x| x == 0xAB),
        "the device wrote to the old guest page after UNMAP",
    );
    expect_fault(
        &mut io,
        "fault-on-device-write",
        ep,
        victim_iova,
        FAULT_F_WRITE,
        evt_before,
        lenient,
    );
    let evt_before = iommu_msix.then(|| interrupts::count(VECTOR_IOMMU_EVT));
    let st = or_fail(b.rw(T_OUT, 2, victim_iova, blk::SECTOR));
    println!("iommu: write from the unmapped buffer: status {}", st);
    check_fault_status("write-from-unmapped-ioerr", st, lenient);
    expect_fault(
        &mut io,
        "fault-on-device-read",
        ep,
        victim_iova,
        FAULT_F_READ,
        evt_before,
        lenient,
    );

    // Valid mappings keep working; the victim IOVA works again once re-mapped elsewhere.
    or_fail(round(
        &mut b,
        &bufs,
        rounds + 1,
        flush,
        expect,
        (bufs.plain, bufs.plain_iova),
    ));
    println!("iommu: after the faults, requests with valid mappings ok");
    let fresh = dma::alloc(g as usize, g as usize);
    dma::fill(fresh, g as usize, 0xEE);
    or_fail(map_pages(&mut io, domain, victim_iova, fresh, g, rw));
    let st = or_fail(b.rw(T_IN, 0, victim_iova, blk::SECTOR));
    check("read-after-remap", st == S_OK, format!("status {st}"));
    let a = dma::read_bytes(fresh, blk::SECTOR);
    let old = dma::read_bytes(victim, blk::SECTOR);
    check(
        "remap-reaches-the-new-page",
        a == sector0 && old.iter().all(|&x| x == 0xAB),
        format!(
            "new page holds {}, sector 0 is {}",
            dma::hex(&a[..16]),
            dma::hex(&sector0[..16])
        ),
    );
    println!(
        "iommu: remapped victim iova {:#x} -> gpa {:#x} ok",
        victim_iova, fresh
    );
    let stray = or_fail(io.wait_fault(500));
    check(
        "no-extra-faults",
        stray.is_none(),
        format!("unexpected fault report {stray:?}"),
    );
    interrupts::disable();
    println!("result: PASS");
}
