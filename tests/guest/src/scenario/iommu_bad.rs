//! `iommu-bad`: malformed and invalid requests on the virtio-iommu request queue. Each answer is
//! checked against the virtio 1.2/1.3 device requirements ("IOMMU Device / Device operations");
//! the spec sentence a case relies on is printed when it fails. Every case runs even after a failure;
//! the scenario ends with `result: PASS` only when all of them matched, and then shows that the
//! device still serves valid requests.
//!
//! Output per case: `iommu-bad: CASE -> status S (NAME) len L` (or `-> no status (used length
//! 0, buffer untouched)`, `-> no completion`), then `check: CASE ok`, `check: CASE FAIL ...` or
//! `check: CASE skipped (...)`. An answer the spec allows but does not recommend adds
//! `note: CASE ...`. `iommu_bad.skip=CASE,CASE` skips cases (for devices that break on them,
//! such as QEMU 7.2 on a chain without a tail). A device that sets DEVICE_NEEDS_RESET ends the run.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::iommu::{bring_up, Setup, MSI_WINDOW};
use super::report::{fail, or_fail, skip};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::println;
use crate::virtio::iommu::{
    encode_attach, encode_detach, encode_map, encode_probe, encode_unmap, parse_properties,
    status_name, Iommu, Part, Reply, ATTACH_F_BYPASS, F_BYPASS_CONFIG, F_PROBE, MAP_F_READ,
    MAP_F_WRITE, RESV_MEM_T_MSI, S_INVAL, S_NOENT, S_OK, S_RANGE,
};
use crate::virtio::types;

/// An endpoint id no VIOT node gives to any function.
const BAD_ENDPOINT: u32 = 0xFFFF_FF00;
/// A domain id that is never attached to.
const NO_DOMAIN: u32 = 4242;

/// What a case must get back.
#[derive(Clone, Copy)]
enum Expect {
    /// A status in `accept`; `prefer` (if set) is the one the spec recommends.
    Status {
        accept: &'static [u8],
        prefer: Option<u8>,
    },
    /// Any status but OK (the spec says the request fails without naming a status).
    Error { prefer: u8 },
    /// The buffers come back unwritten with a used length of 0.
    NoWrite,
    /// Either of the above (the spec has no rule; both are sensible).
    StatusOrNoWrite { accept: &'static [u8] },
}

const OK: Expect = Expect::Status {
    accept: &[S_OK],
    prefer: None,
};
const INVAL: Expect = Expect::Status {
    accept: &[S_INVAL],
    prefer: None,
};
const RANGE: Expect = Expect::Status {
    accept: &[S_RANGE],
    prefer: None,
};
const NOENT: Expect = Expect::Status {
    accept: &[S_NOENT],
    prefer: None,
};
/// DETACH with a missing domain or an endpoint not attached to it: "MAY set INVAL".
const DETACH_MAY_INVAL: Expect = Expect::Status {
    accept: &[S_INVAL, S_NOENT],
    prefer: Some(S_INVAL),
};

fn describe(r: &Reply) -> String {
    match r.used {
        None => "no completion".into(),
        Some(u) if u.len == 0 && r.untouched() => {
            "no status (used length 0, buffer untouched)".into()
        }
        Some(u) if u.len == 0 => "used length 0 but the buffer was written".into(),
        Some(u) => match r.status() {
            Some(s) => format!("status {} ({}) len {}", s, status_name(s), u.len),
            None => format!("no status, len {}", u.len),
        },
    }
}

fn names(accept: &[u8]) -> String {
    let v: Vec<&str> = accept.iter().map(|&s| status_name(s)).collect();
    v.join(" or ")
}

struct Runner {
    io: Iommu,
    failed: Vec<String>,
    notes: usize,
    skip: Vec<String>,
}

impl Runner {
    /// Send `parts`, print the outcome, judge it against `expect`. Returns the reply.
    fn case(&mut self, name: &str, parts: &[Part], expect: Expect, spec: &str) -> Reply {
        if self.skip.iter().any(|s| s == name) {
            skip(name, "iommu_bad.skip");
            return Reply {
                used: None,
                writable: Vec::new(),
            };
        }
        let r = or_fail(self.io.call(parts));
        println!("iommu-bad: {} -> {}", name, describe(&r));
        if self.io.needs_reset() {
            println!(
                "iommu-bad: {} -> device status {:#04x} (DEVICE_NEEDS_RESET)",
                name,
                self.io.t.status()
            );
            println!("check: {} FAIL the device needs a reset", name);
            fail(format!("{name}: the virtio-iommu set DEVICE_NEEDS_RESET"));
        }
        let no_write = r.used.is_some_and(|u| u.len == 0) && r.untouched();
        let status = r.status();
        let (ok, wanted, note) = match expect {
            Expect::Status { accept, prefer } => (
                status.is_some_and(|s| accept.contains(&s)),
                names(accept),
                prefer.filter(|&p| status.is_some_and(|s| s != p)),
            ),
            Expect::Error { prefer } => (
                status.is_some_and(|s| s != S_OK),
                "an error status".into(),
                Some(prefer).filter(|&p| status.is_some_and(|s| s != p && s != S_OK)),
            ),
            Expect::NoWrite => (
                no_write,
                "used length 0 with the buffer untouched".into(),
                None,
            ),
            Expect::StatusOrNoWrite { accept } => (
                no_write || status.is_some_and(|s| accept.contains(&s)),
                format!(
                    "{} or used length 0 with the buffer untouched",
                    names(accept)
                ),
                None,
            ),
        };
        if ok {
            println!("check: {} ok", name);
            if let Some(p) = note {
                self.notes += 1;
                println!(
                    "note: {}: answered {}; the spec suggests {} ({})",
                    name,
                    status_name(status.unwrap_or(0)),
                    status_name(p),
                    spec
                );
            }
        } else {
            println!(
                "check: {} FAIL got {}, expected {} (spec: {})",
                name,
                describe(&r),
                wanted,
                spec
            );
            self.failed.push(name.into());
        }
        r
    }

    /// A well-formed request with a 4-byte tail.
    fn simple(&mut self, name: &str, req: Vec<u8>, expect: Expect, spec: &str) -> Option<u8> {
        self.case(name, &[Part::Out(req), Part::In(4)], expect, spec)
            .status()
    }

    /// An extra check on a case that already printed its outcome.
    fn extra(&mut self, name: &str, ok: bool, detail: &str) {
        if self.skip.iter().any(|s| s == name) {
            skip(name, "iommu_bad.skip");
        } else if ok {
            println!("check: {} ok", name);
        } else {
            println!("check: {} FAIL {}", name, detail);
            self.failed.push(name.into());
        }
    }

    /// A setup step that must succeed for the later cases to mean anything.
    fn must(&mut self, what: &str, req: Vec<u8>) {
        let st = or_fail(self.io.simple(req));
        if st != S_OK {
            fail(format!("{what}: status {st} ({})", status_name(st)));
        }
    }
}

/// Run every case; panic at the end if any failed.
pub fn run(boot: &BootInfo) {
    let Setup {
        iommu: io,
        endpoints,
        ..
    } = bring_up(boot);
    let ep = endpoints
        .iter()
        .find(|(f, _)| {
            crate::virtio::device_type(f.device) == Some(types::BLOCK) && f.vendor == 0x1af4
        })
        .or(endpoints.first())
        .map(|&(_, e)| e)
        .unwrap_or_else(|| fail("no endpoint behind the virtio-iommu"));
    let second = endpoints.iter().map(|&(_, e)| e).find(|&e| e != ep);
    if endpoints.iter().any(|&(_, e)| e == BAD_ENDPOINT) {
        fail(format!(
            "endpoint {BAD_ENDPOINT:#x} exists; pick another unknown id"
        ));
    }
    let c = io.config;
    let g = c.granule();
    let features = io.features();
    println!(
        "iommu-bad: endpoint {:#x}{}, granule {:#x}",
        ep,
        match second {
            Some(e) => format!(" (second endpoint {e:#x})"),
            None => String::new(),
        },
        g
    );
    let mut r = Runner {
        io,
        failed: Vec::new(),
        notes: 0,
        skip: boot
            .param("iommu_bad.skip")
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    };
    let d: u32 = if (c.domain_start..=c.domain_end).contains(&1) {
        1
    } else {
        c.domain_start
    };
    let other_domain = |n: u32| -> u32 {
        let v = d.wrapping_add(n);
        if (c.domain_start..=c.domain_end).contains(&v) {
            v
        } else {
            c.domain_start.wrapping_add(n)
        }
    };
    let rw = MAP_F_READ | MAP_F_WRITE;
    let page = dma::alloc(4 * g as usize, g as usize);
    let base = c.input_start.max(0x4000_0000).next_multiple_of(g);
    if base.checked_add(64 * g).is_none_or(|e| e > c.input_end) {
        fail(format!(
            "input range {:#x}-{:#x} too small for the cases",
            c.input_start, c.input_end
        ));
    }
    let iova_a = base; // 2 granules mapped here
    let iova_b = base + 8 * g; // never mapped

    // 1. Unknown request type.
    let mut unknown = vec![0x42u8, 0, 0, 0];
    unknown.resize(20, 0);
    r.case(
        "unknown-type",
        &[Part::Out(unknown), Part::In(4)],
        Expect::NoWrite,
        "Device operations, device: if a request type is not recognized, the device SHOULD NOT write the buffer and SHOULD set the used length to zero",
    );

    // 2. A valid ATTACH, and one with a non-zero head.reserved (must be ignored).
    r.must("attach", encode_attach(d, ep, 0));
    println!("iommu-bad: attached endpoint {:#x} to domain {}", ep, d);
    let mut head_reserved = encode_attach(d, ep, 0);
    head_reserved[1..4].copy_from_slice(&[1, 2, 3]);
    r.simple(
        "head-reserved-ignored",
        head_reserved,
        OK,
        "Device operations, device: MUST ignore field reserved of struct virtio_iommu_req_head",
    );

    // 3. Requests shorter than their type; chains without a usable tail.
    let attach = encode_attach(other_domain(76), ep, 0);
    r.case(
        "truncated-attach",
        &[Part::Out(attach[..12].to_vec()), Part::In(4)],
        Expect::StatusOrNoWrite { accept: &[S_INVAL] },
        "Device operations: a request too small for its type cannot be parsed",
    );
    let map = encode_map(d, iova_b, iova_b + g - 1, page, rw);
    r.case(
        "truncated-map",
        &[Part::Out(map[..20].to_vec()), Part::In(4)],
        Expect::StatusOrNoWrite { accept: &[S_INVAL] },
        "Device operations: a request too small for its type cannot be parsed",
    );
    let d77 = other_domain(77);
    let attach77 = encode_attach(d77, ep, 0);
    r.case(
        "missing-tail",
        &[Part::Out(attach77.clone())],
        Expect::NoWrite,
        "Device operations: when the device cannot find the tail it returns the buffers without writing to them",
    );
    r.case(
        "short-tail",
        &[Part::Out(attach77.clone()), Part::In(3)],
        Expect::NoWrite,
        "Device operations: when the device cannot find the tail it returns the buffers without writing to them",
    );
    r.case(
        "readonly-tail",
        &[Part::Out(attach77), Part::OutTail(vec![0xEE; 4])],
        Expect::NoWrite,
        "Device operations: the tail is device-writable; without one the device cannot set status",
    );
    // None of those may have been executed: domain d77 must not exist.
    r.simple(
        "no-tail-requests-not-executed",
        encode_detach(d77, ep),
        DETACH_MAY_INVAL,
        "DETACH, device: the domain doesn't exist -> MAY set INVAL (OK would mean an unanswerable ATTACH was executed)",
    );
    r.must("re-attach", encode_attach(d, ep, 0));

    // 4. ATTACH errors.
    r.simple(
        "attach-unknown-endpoint",
        encode_attach(d, BAD_ENDPOINT, 0),
        NOENT,
        "ATTACH, device: endpoint doesn't exist -> MUST reject with NOENT",
    );
    let out_of_range = if c.domain_end < u32::MAX {
        Some(c.domain_end + 1)
    } else if c.domain_start > 0 {
        Some(c.domain_start - 1)
    } else {
        None
    };
    match out_of_range {
        Some(dom) => {
            r.simple(
                "attach-domain-out-of-range",
                encode_attach(dom, ep, 0),
                Expect::Status {
                    accept: &[S_RANGE, S_INVAL],
                    prefer: Some(S_RANGE),
                },
                "Device operations: domain outside domain_range (RANGE: out-of-range parameters)",
            );
            r.must("re-attach", encode_attach(d, ep, 0));
        }
        None => skip(
            "attach-domain-out-of-range",
            format!(
                "domain_range {}-{} covers every domain id",
                c.domain_start, c.domain_end
            ),
        ),
    }
    r.simple(
        "attach-unknown-flags",
        encode_attach(d, ep, 0x8000_0000),
        INVAL,
        "ATTACH, device: a flags bit it does not recognize -> MUST reject with INVAL",
    );
    let mut reserved = encode_attach(other_domain(9), ep, 0);
    reserved[16] = 1;
    r.simple(
        "attach-reserved-nonzero",
        reserved,
        INVAL,
        "ATTACH, device: reserved field of ATTACH not zero -> MUST reject with INVAL",
    );
    r.must("re-attach", encode_attach(d, ep, 0));
    if features & F_BYPASS_CONFIG != 0 {
        r.simple(
            "attach-bypass-flag-mismatch",
            encode_attach(d, ep, ATTACH_F_BYPASS),
            INVAL,
            "ATTACH, device: BYPASS flag not consistent with the existing domain -> SHOULD reject with INVAL",
        );
        r.must("re-attach", encode_attach(d, ep, 0));
    } else {
        skip(
            "attach-bypass-flag-mismatch",
            "BYPASS_CONFIG not negotiated",
        );
    }

    // 5. MAP errors.
    r.must("map", encode_map(d, iova_a, iova_a + 2 * g - 1, page, rw));
    println!(
        "iommu-bad: mapped iova {:#x}-{:#x} -> gpa {:#x} in domain {}",
        iova_a,
        iova_a + 2 * g - 1,
        page,
        d
    );
    r.simple(
        "map-unknown-flags",
        encode_map(d, iova_b, iova_b + g - 1, page, rw | 0x10),
        INVAL,
        "MAP, device: a flags bit it does not recognize -> MUST reject with INVAL",
    );
    let align = "MAP, device: virt_start, phys_start or virt_end + 1 not aligned on the page granularity -> SHOULD reject with RANGE";
    r.simple(
        "map-unaligned-start",
        encode_map(d, iova_b + g / 2, iova_b + 2 * g - 1, page, rw),
        RANGE,
        align,
    );
    r.simple(
        "map-unaligned-end",
        encode_map(d, iova_b, iova_b + g / 2 - 1, page, rw),
        RANGE,
        align,
    );
    r.simple(
        "map-unaligned-phys",
        encode_map(d, iova_b, iova_b + g - 1, page + g / 2, rw),
        RANGE,
        align,
    );
    r.simple(
        "map-one-byte",
        encode_map(d, iova_b, iova_b, page, rw),
        RANGE,
        align,
    );
    r.simple(
        "map-end-before-start",
        encode_map(d, iova_b + g, iova_b + g - 1, page, rw),
        Expect::Status {
            accept: &[S_INVAL, S_RANGE],
            prefer: None,
        },
        "MAP, driver: virt_end MUST be strictly greater than virt_start",
    );
    if c.input_end < u64::MAX - g {
        let past = (c.input_end + 1).next_multiple_of(g);
        r.simple(
            "map-outside-input-range",
            encode_map(d, past, past + g - 1, page, rw),
            Expect::Error { prefer: S_RANGE },
            "Device operations: any mapping request to virtual addresses outside of input_range fails",
        );
        r.simple(
            "map-straddling-input-end",
            encode_map(d, past - g, past + g - 1, page, rw),
            Expect::Error { prefer: S_RANGE },
            "Device operations: any mapping request to virtual addresses outside of input_range fails",
        );
    } else {
        skip(
            "map-outside-input-range",
            "input_range ends at the top of the 64-bit space",
        );
    }
    if c.input_start >= g {
        let below = c.input_start.next_multiple_of(g) - g;
        r.simple(
            "map-below-input-range",
            encode_map(d, below, below + g - 1, page, rw),
            Expect::Error { prefer: S_RANGE },
            "Device operations: any mapping request to virtual addresses outside of input_range fails",
        );
    }
    r.simple(
        "map-overlap",
        encode_map(d, iova_a + g, iova_a + 3 * g - 1, page, rw),
        INVAL,
        "MAP, device: a mapping already exists in the requested range -> SHOULD reject with INVAL",
    );
    let msi = MSI_WINDOW.0 & !(g - 1);
    if (c.input_start..=c.input_end).contains(&msi) {
        let st = r.simple(
            "map-over-msi-window",
            encode_map(d, msi, msi + g - 1, page, rw),
            Expect::Error { prefer: S_INVAL },
            "Property RESV_MEM, device: SHOULD reject a MAP request that overlaps a RESV_MEM region (the probe reports 0xfee00000-0xfeefffff as MSI)",
        );
        if st == Some(S_OK) {
            let _ = r.io.unmap(d, msi, msi + g - 1);
        }
    }
    r.simple(
        "map-unknown-domain",
        encode_map(NO_DOMAIN, iova_b, iova_b + g - 1, page, rw),
        NOENT,
        "MAP, device: domain does not exist -> SHOULD reject with NOENT",
    );

    // 6. UNMAP errors and semantics.
    r.simple(
        "unmap-split",
        encode_unmap(d, iova_a, iova_a + g - 1),
        RANGE,
        "UNMAP, device: the UNMAP would split a mapping -> SHOULD set RANGE and SHOULD NOT remove any mapping",
    );
    r.simple(
        "unmap-split-kept-the-mapping",
        encode_map(d, iova_a, iova_a + g - 1, page, rw),
        INVAL,
        "UNMAP, device: after a refused split the mapping is still there, so this MAP overlaps (INVAL)",
    );
    r.simple(
        "unmap-unknown-domain",
        encode_unmap(NO_DOMAIN, iova_a, iova_a + 2 * g - 1),
        NOENT,
        "UNMAP, device: domain does not exist -> SHOULD set NOENT",
    );
    r.simple(
        "unmap-nothing-mapped",
        encode_unmap(d, iova_b, iova_b + 16 * g - 1),
        OK,
        "UNMAP, device: a range not covered by any mapping -> remove nothing, OK (example 1)",
    );
    r.simple(
        "unmap-spilling-over",
        encode_unmap(d, iova_a - g, iova_a + 4 * g - 1),
        OK,
        "UNMAP, device: a range covering whole mappings and unmapped addresses -> remove them, OK (examples 6, 7)",
    );
    r.simple(
        "map-after-unmap",
        encode_map(d, iova_a, iova_a + g - 1, page, rw),
        OK,
        "UNMAP: the previous UNMAP removed the mapping, so the range is free",
    );

    // 7. PROBE errors.
    if features & F_PROBE != 0 {
        let size = c.probe_size;
        r.case(
            "probe-unknown-endpoint",
            &[Part::Out(encode_probe(BAD_ENDPOINT)), Part::In(size + 4)],
            NOENT,
            "PROBE, device: endpoint doesn't exist -> SHOULD reject with NOENT",
        );
        let small = r.case(
            "probe-small-buffer",
            &[Part::Out(encode_probe(ep)), Part::In(16)],
            INVAL,
            "PROBE, device: properties buffer smaller than probe_size -> SHOULD NOT write any property, SHOULD reject with INVAL",
        );
        let head = small.writable.get(..12).unwrap_or(&[]);
        let (props, other) = parse_properties(head);
        let untouched_or_empty =
            head.iter().all(|&b| b == 0xEE) || (props.is_empty() && other == 0);
        if small.used.is_some() {
            r.extra(
                "probe-small-buffer-no-property",
                untouched_or_empty,
                "the device wrote a property into a buffer smaller than probe_size",
            );
        }
        let mut probe = encode_probe(ep);
        for b in &mut probe[8..] {
            *b = 0xFF;
        }
        let rep = r.case(
            "probe-reserved-ignored",
            &[Part::Out(probe), Part::In(size + 4)],
            OK,
            "PROBE, device: MUST ignore field reserved of a PROBE request",
        );
        let (props, _) = parse_properties(rep.writable.get(..size as usize).unwrap_or(&[]));
        if rep.used.is_some() {
            r.extra(
                "probe-reserved-ignored-msi-property",
                props.iter().any(|p| p.subtype == RESV_MEM_T_MSI),
                "no RESV_MEM/MSI property in the answer",
            );
        }
    } else {
        skip("probe-unknown-endpoint", "PROBE not negotiated");
    }

    // 8. DETACH errors, domain lifetime.
    r.simple(
        "detach-unknown-endpoint",
        encode_detach(d, BAD_ENDPOINT),
        NOENT,
        "DETACH, device: endpoint doesn't exist -> MUST reject with NOENT",
    );
    match second {
        Some(e2) => {
            let d3 = other_domain(3);
            r.must("attach second endpoint", encode_attach(d3, e2, 0));
            r.simple(
                "detach-wrong-domain",
                encode_detach(d3, ep),
                DETACH_MAY_INVAL,
                "DETACH, device: the endpoint isn't attached to this domain -> MAY set INVAL",
            );
            r.must("detach second endpoint", encode_detach(d3, e2));
        }
        None => skip("detach-wrong-domain", "only one endpoint behind the IOMMU"),
    }
    let mut detach = encode_detach(d, ep);
    detach[12..20].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    r.simple(
        "detach-reserved-ignored",
        detach,
        OK,
        "DETACH, device: MUST ignore reserved",
    );
    r.simple(
        "detach-not-attached",
        encode_detach(d, ep),
        DETACH_MAY_INVAL,
        "DETACH, device: the domain doesn't exist or the endpoint isn't attached to it -> MAY set INVAL",
    );
    r.simple(
        "map-on-destroyed-domain",
        encode_map(d, iova_a, iova_a + g - 1, page, rw),
        NOENT,
        "DETACH: after all endpoints are detached the domain ceases to exist; MAP, device: -> SHOULD reject with NOENT",
    );

    // 9. Bypass domains.
    if features & F_BYPASS_CONFIG != 0 {
        let d5 = other_domain(5);
        r.simple(
            "attach-bypass-domain",
            encode_attach(d5, ep, ATTACH_F_BYPASS),
            OK,
            "ATTACH: with BYPASS_CONFIG negotiated the driver can create a bypass domain",
        );
        r.simple(
            "map-on-bypass-domain",
            encode_map(d5, iova_a, iova_a + g - 1, page, rw),
            INVAL,
            "MAP, device: the domain is a bypass domain -> SHOULD reject with INVAL",
        );
        r.simple(
            "unmap-on-bypass-domain",
            encode_unmap(d5, iova_a, iova_a + g - 1),
            INVAL,
            "UNMAP, device: the domain is a bypass domain -> SHOULD reject with INVAL",
        );
        r.must("detach from the bypass domain", encode_detach(d5, ep));
    } else {
        skip("bypass-domain", "BYPASS_CONFIG not negotiated");
    }

    // 10. `bypass` is kept across a device reset (restored only on a system reset).
    if features & F_BYPASS_CONFIG != 0 {
        let set = r.io.set_bypass(true);
        r.extra("bypass-writable", set == 1, "bypass does not read back 1");
        or_fail(r.io.reinit());
        let after = r.io.config.bypass;
        println!("iommu-bad: bypass after a device reset: {}", after);
        r.extra(
            "bypass-kept-across-device-reset",
            after == 1,
            "bypass changed on a device reset (spec: Device configuration layout, device: bypass SHOULD NOT change on device reset, but SHOULD be restored to its initial value on system reset)",
        );
        let off = r.io.set_bypass(false);
        if off != 0 {
            fail(format!("bypass reads back {off} after writing 0"));
        }
    } else {
        skip(
            "bypass-kept-across-device-reset",
            "BYPASS_CONFIG not negotiated",
        );
    }

    // 11. The device still serves valid requests (after the reset, too).
    let steps = [
        ("attach", encode_attach(d, ep, 0)),
        ("map", encode_map(d, iova_a, iova_a + 2 * g - 1, page, rw)),
        ("unmap", encode_unmap(d, iova_a, iova_a + 2 * g - 1)),
        ("detach", encode_detach(d, ep)),
    ];
    let mut served = true;
    for (what, req) in steps {
        let st = or_fail(r.io.simple(req));
        println!(
            "iommu-bad: valid {} -> status {} ({})",
            what,
            st,
            status_name(st)
        );
        served &= st == S_OK;
    }
    if !served {
        println!("check: still-serves-valid-requests FAIL");
        fail("the device no longer serves valid requests");
    }
    println!("check: still-serves-valid-requests ok");
    println!("iommu-bad: device still serves valid requests ok");
    println!(
        "iommu-bad: {} case(s) failed, {} note(s)",
        r.failed.len(),
        r.notes
    );
    if !r.failed.is_empty() {
        fail(format!(
            "{} case(s) failed: {}",
            r.failed.len(),
            r.failed.join(", ")
        ));
    }
    println!("result: PASS");
}
