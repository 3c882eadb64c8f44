//! Negotiation, device/region/irq info layouts, config space, hostile input.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use testdev::regs::*;
use vmm_sys_util::eventfd::EventFd;

#[test]
fn version_and_info_layouts() {
    let mut c = Client::start();
    let v = c.version(r#"{"capabilities":{"max_msg_fds":8,"unknown_key":[1,2],"twin_socket":{"supported":true}}}"#);
    assert_eq!((le16(&v.payload, 0), le16(&v.payload, 2)), (0, 1));
    let json = std::str::from_utf8(&v.payload[4..])
        .unwrap()
        .trim_end_matches('\0');
    let j: serde_json::Value = serde_json::from_str(json).unwrap();
    let caps = &j["capabilities"];
    assert_eq!(caps["max_msg_fds"], 16);
    assert_eq!(caps["max_data_xfer_size"], 1 << 20);
    assert_eq!(caps["pgsizes"], 4096);
    assert!(caps.get("twin_socket").is_none(), "no twin socket offered");

    let i = c
        .call(GET_INFO, &fields(&[(16, 4), (0, 4), (0, 4), (0, 4)]))
        .ok();
    assert_eq!(i.payload, fields(&[(16, 4), (0b11, 4), (9, 4), (5, 4)]));

    // Region info: argsz @0, flags @4, index @8, cap_offset @12, size @16, offset @24.
    let ri = |c: &mut Client, index: u64, argsz: u64| {
        c.call(
            GET_REGION_INFO,
            &fields(&[(argsz, 4), (0, 4), (index, 4), (0, 4), (0, 8), (0, 8)]),
        )
        .ok()
    };
    let cfg = ri(&mut c, 7, 32);
    assert_eq!(
        cfg.payload,
        fields(&[(32, 4), (0b11, 4), (7, 4), (0, 4), (256, 8), (0, 8)])
    );
    assert!(cfg.fds.is_empty());
    let bar0 = ri(&mut c, 0, 32);
    assert_eq!(
        bar0.payload,
        fields(&[(32, 4), (0b11, 4), (0, 4), (0, 4), (0x1000, 8), (0, 8)])
    );
    for idx in [1u64, 3, 4, 5, 6, 8] {
        let r = ri(&mut c, idx, 32);
        assert_eq!(le32(&r.payload, 4), 0, "region {idx} flags");
        assert_eq!(le64(&r.payload, 16), 0, "region {idx} size");
    }
    // BAR2 with too small an argsz: full size announced, no capability bytes.
    let small = ri(&mut c, 2, 32);
    assert_eq!(le32(&small.payload, 0), 64);
    assert_eq!(small.payload.len(), 32);
    let bar2 = ri(&mut c, 2, 64);
    let mut want = fields(&[
        (64, 4),
        (0b1111, 4),
        (2, 4),
        (32, 4),
        (0x10_0000, 8),
        (0, 8),
    ]);
    // cap header: id 1 (SPARSE_MMAP) @0, version 1 @2, next 0 @4; nr_areas 1, reserved, area.
    want.extend(fields(&[
        (1, 2),
        (1, 2),
        (0, 4),
        (1, 4),
        (0, 4),
        (0, 8),
        (0x10_0000, 8),
    ]));
    assert_eq!(bar2.payload, want);
    assert_eq!(bar2.fds.len(), 1, "the memfd arrives with the reply");
    // The fd maps, and is the device memory: a write through it reads back via REGION_READ.
    let mem = &bar2.fds[0];
    assert_eq!(mem.metadata().unwrap().len(), DEVICE_MEMORY_SIZE);
    // SAFETY: a fresh shared mapping of the 1 MiB memfd, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: offset 0x1234 + 4 lies inside the 1 MiB mapping.
    unsafe {
        std::ptr::copy_nonoverlapping([9u8, 8, 7, 6].as_ptr(), p.cast::<u8>().add(0x1234), 4)
    };
    assert_eq!(c.region_read(2, 0x1234, 4).unwrap(), [9, 8, 7, 6]);
    c.region_write(2, 0x2000, &[1, 2, 3]).unwrap();
    // SAFETY: inside the mapping.
    assert_eq!(unsafe { *p.cast::<u8>().add(0x2001) }, 2);
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, 1 << 20) };
    assert_eq!(
        c.reg(REG_PEER_WRITES),
        1,
        "a REGION_WRITE to BAR2 is a peer write"
    );
    assert_eq!(c.reg(REG_VIOLATIONS), 0);

    // IRQ info: argsz @0, flags @4, index @8, count @12.
    let irq = |c: &mut Client, index: u64| {
        c.call(
            GET_IRQ_INFO,
            &fields(&[(16, 4), (0, 4), (index, 4), (0, 4)]),
        )
        .ok()
    };
    let intx = irq(&mut c, 0);
    assert_eq!(le32(&intx.payload, 12), 1);
    assert_eq!(le32(&intx.payload, 4) & 1, 1, "EVENTFD");
    assert_eq!(le32(&irq(&mut c, 1).payload, 12), 0);
    let msix = irq(&mut c, 2);
    assert_eq!(
        (
            le32(&msix.payload, 4) & 1,
            le32(&msix.payload, 8),
            le32(&msix.payload, 12)
        ),
        (1, 2, 2)
    );
    assert_eq!(
        c.call(GET_IRQ_INFO, &fields(&[(16, 4), (0, 4), (5, 4), (0, 4)]))
            .errno(),
        libc::EINVAL as u32
    );
    c.finish().expect("clean disconnect");
}

#[test]
fn config_space_and_bar_sizing() {
    let mut c = Client::negotiated();
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    assert_eq!((le16(&cfg, 0), le16(&cfg, 2)), (VENDOR_ID, DEVICE_ID));
    assert_eq!(cfg[0x0b], CLASS_CODE);
    assert_eq!(cfg[0x0e], 0, "header type 0");
    assert_eq!(cfg[0x3d], 1, "pin A");
    assert_ne!(le16(&cfg, 6) & (1 << 4), 0, "capability list");
    let cap = cfg[0x34] as usize;
    assert_eq!(cfg[cap], 0x11, "MSI-X");
    assert_eq!(le16(&cfg, cap + 2) & 0x7ff, MSIX_VECTORS - 1);
    assert_eq!(
        le32(&cfg, cap + 4),
        MSIX_TABLE_OFFSET as u32 | REGS_BAR as u32
    );
    assert_eq!(
        le32(&cfg, cap + 8),
        MSIX_PBA_OFFSET as u32 | REGS_BAR as u32
    );
    assert_eq!(le32(&cfg, 0x10) & 0xf, 0, "BAR0: 32-bit memory");
    assert_eq!(
        le32(&cfg, 0x18) & 0xf,
        0xc,
        "BAR2: 64-bit prefetchable memory"
    );
    for off in [0x10u64, 0x18, 0x1c] {
        c.region_write(CONFIG, off, &[0xff; 4]).unwrap();
    }
    let size_of = |lo: u32, hi: u32| !(((hi as u64) << 32) | (lo & !0xf) as u64) + 1;
    let cfg = c.region_read(CONFIG, 0, 64).unwrap();
    assert_eq!(!(le32(&cfg, 0x10) & !0xf) + 1, REGS_BAR_SIZE as u32);
    assert_eq!(
        size_of(le32(&cfg, 0x18), le32(&cfg, 0x1c)),
        DEVICE_MEMORY_SIZE
    );
    // Program addresses; they read back.
    c.region_write(CONFIG, 0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    c.region_write(CONFIG, 0x18, &0xc000_0000u32.to_le_bytes())
        .unwrap();
    let cfg = c.region_read(CONFIG, 0, 64).unwrap();
    assert_eq!(le32(&cfg, 0x10), 0xfe00_0000);
    assert_eq!(le32(&cfg, 0x18), 0xc000_000c);
    // Command register bits stick; vendor id does not change.
    c.region_write(CONFIG, 4, &[0x06, 0x04]).unwrap();
    c.region_write(CONFIG, 0, &[0, 0]).unwrap();
    let cfg = c.region_read(CONFIG, 0, 8).unwrap();
    assert_eq!(le16(&cfg, 4), 0x0406);
    assert_eq!(le16(&cfg, 0), VENDOR_ID);
    // BAR0 identity registers.
    assert_eq!(c.reg(REG_MAGIC), MAGIC);
    assert_eq!(c.reg(REG_VERSION), testdev::regs::VERSION);
    c.finish().unwrap();
}

#[test]
fn reset_restores_registers() {
    let mut c = Client::negotiated();
    c.set_reg(REG_LEN, 77);
    c.set_reg(REG_IRQ_CONTROL, IRQ_DONE);
    c.set_reg(REG_DOORBELL, 0x99);
    c.wait_done(1);
    assert_eq!(c.reg(REG_LAST_ERROR), ERR_BAD_COMMAND);
    c.call(RESET, &[]).ok();
    for r in [
        REG_LEN,
        REG_IRQ_CONTROL,
        REG_FAILED,
        REG_IRQ_STATUS,
        REG_LAST_ERROR,
    ] {
        assert_eq!(c.reg(r), 0, "register {r:#x} after reset");
    }
    assert_eq!(c.reg(REG_MAGIC), MAGIC);
    c.finish().unwrap();
}

fn einval() -> u32 {
    libc::EINVAL as u32
}

#[test]
fn hostile_requests_get_error_replies() {
    let mut c = Client::start();
    // Before VERSION.
    assert_eq!(
        c.call(GET_INFO, &fields(&[(16, 4), (0, 8), (0, 4)]))
            .errno(),
        einval()
    );
    // Garbage JSON, then wrong major: refused; a good VERSION still works afterwards.
    assert_eq!(
        c.call(CMD_VERSION, b"\x00\x00\x01\x00{not json").errno(),
        einval()
    );
    assert_eq!(
        c.call(CMD_VERSION, b"\x00\x00\x01\x00[1,2]").errno(),
        einval()
    );
    assert_eq!(
        c.call(CMD_VERSION, b"\x02\x00\x00\x00").errno(),
        libc::ENOTSUP as u32
    );
    assert_eq!(c.call(CMD_VERSION, b"\x01").errno(), einval());
    c.version("");
    assert_eq!(
        c.call(CMD_VERSION, b"\x01\x00\x00\x00").errno(),
        einval(),
        "a second VERSION"
    );

    // Unknown command, server-to-client commands, unsupported ones.
    assert_eq!(c.call(99, &[]).errno(), libc::ENOSYS as u32);
    assert_eq!(
        c.call(DMA_READ, &fields(&[(0, 8), (8, 8)])).errno(),
        einval()
    );
    // DEVICE_FEATURE with argsz 0 is malformed; feature 0 (PCI_VF_TOKEN) is not offered.
    assert_eq!(c.call(16, &[0; 16]).errno(), einval());
    assert_eq!(
        c.call(16, &fields(&[(8, 4), (1 << 16, 4)])).errno(),
        libc::ENOTTY as u32
    );
    // Truncated payloads for every command.
    for cmd in [
        DMA_MAP,
        DMA_UNMAP,
        GET_INFO,
        GET_REGION_INFO,
        GET_IRQ_INFO,
        SET_IRQS,
        REGION_READ,
        REGION_WRITE,
    ] {
        assert_eq!(c.call(cmd, &[1, 2, 3]).errno(), einval(), "command {cmd}");
    }
    // Bad region index and out-of-range offsets.
    assert_eq!(
        c.call(
            GET_REGION_INFO,
            &fields(&[(32, 4), (0, 4), (50, 4), (0, 4), (0, 8), (0, 8)])
        )
        .errno(),
        einval()
    );
    for (region, off, count) in [
        (5u32, 0u64, 4u32),
        (9, 0, 4),
        (0xffff_ffff, 0, 4),
        (CONFIG, 250, 8),
        (0, 0xffe, 4),
        (2, u64::MAX - 1, 4),
        (2, 0, 0),
        (2, 0, (1 << 20) + 1),
    ] {
        assert_eq!(
            c.region_read(region, off, count).unwrap_err(),
            einval(),
            "read {region} {off:#x} {count}"
        );
    }
    assert_eq!(
        c.region_write(0, 0x1002, &[1, 2, 3, 4]).unwrap_err(),
        einval(),
        "unaligned register write"
    );
    assert_eq!(c.region_write(CONFIG, 255, &[1, 2]).unwrap_err(), einval());
    // REGION_WRITE whose count does not match the data.
    let bad = fields(&[(0, 8), (CONFIG as u64, 4), (64, 4), (0, 4)]);
    assert_eq!(c.call(REGION_WRITE, &bad).errno(), einval());
    // SET_IRQS: bad flags, index, range.
    let set = |flags: u64, index: u64, start: u64, count: u64| {
        fields(&[(20, 4), (flags, 4), (index, 4), (start, 4), (count, 4)])
    };
    assert_eq!(
        c.call(SET_IRQS, &set(0b100001, 2, 0, 1)).ok().payload.len(),
        0,
        "MSI-X trigger, DATA_NONE"
    );
    assert_eq!(
        c.call(SET_IRQS, &set(0b000011, 2, 0, 1)).errno(),
        einval(),
        "two data flags"
    );
    assert_eq!(c.call(SET_IRQS, &set(0b100001, 9, 0, 1)).errno(), einval());
    assert_eq!(c.call(SET_IRQS, &set(0b100001, 2, 1, 2)).errno(), einval());
    assert_eq!(
        c.call(SET_IRQS, &set(0b100001, 2, u32::MAX as u64, 2))
            .errno(),
        einval()
    );
    assert_eq!(
        c.call(SET_IRQS, &set(0b100001, 1, 0, 1)).errno(),
        einval(),
        "no MSI vectors"
    );
    // Too many fds: 17 eventfds with one message.
    let efds: Vec<EventFd> = (0..17).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    assert_eq!(
        c.call_fds(SET_IRQS, &set(0b100100, 2, 0, 2), &raw).errno(),
        einval()
    );
    assert_eq!(
        c.call_fds(SET_IRQS, &set(0b100100, 2, 0, 2), &raw[..1])
            .errno(),
        einval(),
        "fd count != count"
    );
    // DMA_MAP: bad flags, zero size, overflow, overlap, fd smaller than the region.
    let map = |flags: u64, iova: u64, size: u64| {
        fields(&[(32, 4), (flags, 4), (0, 8), (iova, 8), (size, 8)])
    };
    assert_eq!(
        c.call(DMA_MAP, &map(0x10, 0x1000, 0x1000)).errno(),
        einval()
    );
    assert_eq!(c.call(DMA_MAP, &map(3, 0x1000, 0)).errno(), einval());
    assert_eq!(
        c.call(DMA_MAP, &map(3, u64::MAX - 0xfff, 0x2000)).errno(),
        einval()
    );
    c.call(DMA_MAP, &map(3, 0x10000, 0x1000)).ok();
    assert_eq!(
        c.call(DMA_MAP, &map(3, 0x10800, 0x1000)).errno(),
        libc::EEXIST as u32
    );
    let small = memfd(4096);
    assert_eq!(
        c.call_fds(DMA_MAP, &map(3, 0x40000, 0x10000), &[small.as_raw_fd()])
            .errno(),
        einval()
    );
    // DMA_UNMAP of something not mapped; a good one echoes the entry.
    let unmap = |iova: u64, size: u64| fields(&[(24, 4), (0, 4), (iova, 8), (size, 8)]);
    assert_eq!(
        c.call(DMA_UNMAP, &unmap(0x10000, 0x800)).errno(),
        libc::ENOENT as u32
    );
    assert_eq!(
        c.call(DMA_UNMAP, &unmap(0x10000, 0x1000)).ok().payload,
        unmap(0x10000, 0x1000)
    );
    // No-reply commands get no reply, even on error: the next reply is for the next command.
    c.send_raw(&message(7, 99, 0x10, &[]), &[]);
    let m = c.call(GET_INFO, &fields(&[(16, 4), (0, 8), (0, 4)])).ok();
    assert_eq!(le32(&m.payload, 8), 9);
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().expect("still a clean session");
}

#[test]
fn truncated_header_ends_the_session_with_an_error() {
    let c = Client::start();
    c.send_raw(&[1, 0, 1, 0, 20], &[]);
    let res = c.finish();
    assert!(matches!(res, Err(testdev::Error::Truncated)), "{res:?}");
}

#[test]
fn huge_message_size_is_refused_and_closed() {
    let mut c = Client::negotiated();
    let mut m = message(5, GET_INFO, 0, &[]);
    m[4..8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    c.send_raw(&m, &[]);
    let r = c.recv().expect("an error reply");
    assert_eq!((r.id, r.errno()), (5, libc::E2BIG as u32));
    assert!(c.recv().is_none(), "then the server closes");
    let res = c.finish();
    assert!(
        matches!(res, Err(testdev::Error::MessageSize { .. })),
        "{res:?}"
    );
}

#[test]
fn garbage_after_version_never_panics() {
    // Deterministic pseudo-random garbage: whatever it decodes to, the server answers with
    // errors or closes, and its thread returns (no panic) once we hang up.
    for seed in 1..20u32 {
        let c = Client::negotiated();
        let garbage: Vec<u8> = (0..64u32).map(|i| pattern_byte(seed, i)).collect();
        c.send_raw(&garbage, &[]);
        c.sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = c.finish();
    }
}

/// `--msi`: an MSI capability chained after MSI-X (ID 0x05, 64-bit, per-vector masking,
/// Multiple Message Capable = log2(MSI_VECTORS)), IRQ info index 1 with MSI_VECTORS and
/// EVENTFD, SET_IRQS index 1 bounded by it. Without `--msi`: neither (the default).
#[test]
fn msi_capability_and_irq_info() {
    // IRQ info: argsz @0, flags @4, index @8, count @12.
    let irq = |c: &mut Client, index: u64| {
        c.call(
            GET_IRQ_INFO,
            &fields(&[(16, 4), (0, 4), (index, 4), (0, 4)]),
        )
        .ok()
        .payload
    };
    let set = |index: u64, start: u64, count: u64| {
        fields(&[(20, 4), (0b100001, 4), (index, 4), (start, 4), (count, 4)])
    };

    let mut c = Client::negotiated_with(false);
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    let msix = cfg[0x34] as usize;
    assert_eq!(
        (cfg[msix], cfg[msix + 1]),
        (0x11, 0),
        "MSI-X is the only capability"
    );
    assert_eq!(irq(&mut c, 1), fields(&[(16, 4), (1, 4), (1, 4), (0, 4)]));
    assert_eq!(c.call(SET_IRQS, &set(1, 0, 1)).errno(), libc::EINVAL as u32);
    c.finish().unwrap();

    let mut c = Client::negotiated_with(true);
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    assert_ne!(le16(&cfg, 6) & (1 << 4), 0, "capability list");
    // Walk the list: MSI-X (0x11) at 0x40, then MSI (0x05) at 0x50, last.
    let msix = cfg[0x34] as usize;
    assert_eq!((msix, cfg[msix]), (0x40, 0x11));
    let msi = cfg[msix + 1] as usize;
    assert_eq!((msi, cfg[msi], cfg[msi + 1]), (0x50, 0x05, 0));
    // Message control @2: MMC (bits 3:1) = 1 (two vectors), 64-bit (bit 7), per-vector
    // masking (bit 8), disabled; then address lo @4, hi @8, data @0xc, mask @0x10,
    // pending @0x14 — all zero at power-on.
    assert_eq!(MSI_VECTORS, 2);
    assert_eq!(le16(&cfg, msi + 2), 0x0182);
    assert_eq!(&cfg[msi + 4..msi + 0x18], &[0u8; 20]);
    assert_eq!(
        &cfg[msi + 0x18..],
        &[0u8; 256 - 0x68][..],
        "nothing after it"
    );
    // Writable: enable + MME, address (dword aligned), data (16 bits), the two mask bits.
    c.region_write(CONFIG, msi as u64, &[0xff; 24]).unwrap();
    let cap = c.region_read(CONFIG, msi as u64, 24).unwrap();
    assert_eq!(
        cap,
        fields(&[
            (0x05, 1),
            (0, 1),
            (0x01f3, 2),
            (0xffff_fffc, 4),
            (0xffff_ffff, 4),
            (0xffff, 4),
            (0b11, 4),
            (0, 4),
        ])
    );
    // A device reset restores the capability (disabled, unmasked) and keeps it.
    c.call(RESET, &[]).ok();
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    assert_eq!(
        (cfg[0x41], cfg[0x50], le16(&cfg, 0x52)),
        (0x50, 0x05, 0x0182)
    );
    assert_eq!(le32(&cfg, 0x60), 0);

    // IRQ info index 1: EVENTFD, count MSI_VECTORS; the other indexes unchanged.
    assert_eq!(
        irq(&mut c, 1),
        fields(&[(16, 4), (1, 4), (1, 4), (MSI_VECTORS as u64, 4)])
    );
    assert_eq!(le32(&irq(&mut c, 2), 12), MSIX_VECTORS as u32);
    assert_eq!(le32(&irq(&mut c, 0), 12), 1);
    // SET_IRQS index 1: within MSI_VECTORS only; MASK/UNMASK refused (INTx only, like VFIO).
    c.call(SET_IRQS, &set(1, 0, 2)).ok();
    c.call(SET_IRQS, &set(1, 1, 1)).ok();
    assert_eq!(c.call(SET_IRQS, &set(1, 1, 2)).errno(), libc::EINVAL as u32);
    assert_eq!(c.call(SET_IRQS, &set(1, 2, 1)).errno(), libc::EINVAL as u32);
    let mask = fields(&[(20, 4), (0b1001, 4), (1, 4), (0, 4), (1, 4)]);
    assert_eq!(c.call(SET_IRQS, &mask).errno(), libc::EINVAL as u32);
    c.finish().unwrap();
}
