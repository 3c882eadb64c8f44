//! DMA against guest RAM (pattern, copy, checksum), device memory, faults behind the IOMMU.

use super::*;

/// The buffers of the DMA tests, kept for the fault tests: (buffer, its DMA address).
pub(super) struct DmaBufs {
    pub(super) a: GuestBuf,
    pub(super) a_dma: u64,
}

/// WRITE_PATTERN, COPY and READ_CHECKSUM against guest RAM, polled, data verified.
pub(super) fn dma_tests(d: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params) -> DmaBufs {
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
    let want = regs::fnv1a64(&dma::read_bytes(c.at, len));
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

/// A u64 marker for page `page` of `d`'s device memory.
pub(super) fn marker(d: &Dev, page: u64) -> u64 {
    0xD0D0_0000_0000_0000 | u64::from(d.func.bdf.dev) << 40 | page << 8 | 0x5A
}

/// The guest writes device memory (BAR 2) directly and reads it back.
pub(super) fn bar2_test(d: &Dev) {
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
pub(super) fn iommu_faults(d: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params, bufs: &DmaBufs) {
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
    // map_range mapped the granules covering the buffer; unmap exactly those.
    let first = victim.base & !(g - 1);
    let start = iova - (victim.base - first);
    let span = (victim.base + victim.total as u64).next_multiple_of(g) - first;
    let st =
        c.io.unmap(tr.domain, start, start + span - 1)
            .unwrap_or_else(|e| bad("iommu-unmap-followed", Some(d), e));
    if st != iommu::S_OK {
        bad(
            "iommu-unmap-followed",
            Some(d),
            format!("UNMAP {start:#x}+{span:#x}: status {st}"),
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
    drain_faults(c, d);
}

/// Take the virtio-iommu's fault reports (informational: the refused DMA above may or may not
/// be reported) so that its event buffers never run out.
pub(super) fn drain_faults(c: &mut IommuCtx, d: &Dev) {
    let mut n = 0;
    while let Ok(Some(f)) = c.io.poll_fault() {
        if n < 8 {
            println!(
                "vfio: {} iommu fault report reason {} flags {:#x} endpoint {:#x} address {:#x}",
                d.name, f.reason, f.flags, f.endpoint, f.address
            );
        }
        n += 1;
    }
    println!("vfio: {} {} iommu fault report(s)", d.name, n);
}
