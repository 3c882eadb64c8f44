//! DMA through fd-backed and remote mappings, interrupts, the stream, disconnects, the binary.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use testdev::regs::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x10_0000;
const PEER: u64 = 0xe000_0000;

/// SET_IRQS payload: argsz @0, flags @4, index @8, start @12, count @16.
fn set_irqs(flags: u64, index: u64, start: u64, count: u64) -> Vec<u8> {
    fields(&[(20, 4), (flags, 4), (index, 4), (start, 4), (count, 4)])
}
const DATA_NONE: u64 = 1;
const DATA_EVENTFD: u64 = 4;
const ACTION_MASK: u64 = 8;
const ACTION_UNMASK: u64 = 16;
const ACTION_TRIGGER: u64 = 32;

#[test]
fn dma_through_mapped_ram_with_msix() {
    let mut c = Client::negotiated();
    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM, RAM_SIZE, Some(ram.as_raw_fd())).ok();
    let v0 = EventFd::new(EFD_NONBLOCK).unwrap();
    let v1 = EventFd::new(EFD_NONBLOCK).unwrap();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_TRIGGER, 2, 0, 2),
        &[v0.as_raw_fd(), v1.as_raw_fd()],
    )
    .ok();
    c.set_reg(REG_IRQ_CONTROL, IRQ_DONE);

    c.command(CMD_WRITE_PATTERN, RAM + 0x100, 0, 5000, 7);
    c.wait_done(1);
    assert_eq!(c.reg(REG_COMPLETED), 1);
    assert_eq!(read_at(&ram, 0x100, 5000), pattern(7, 5000));
    assert_eq!(read_at(&ram, 0xff, 1), [0], "nothing before");
    assert_eq!(read_at(&ram, 0x100 + 5000, 1), [0], "nothing after");
    assert!(fired(&v0, 2000), "MSI-X vector 0 on completion");
    assert!(!fired(&v1, 0), "vector 1 unused");

    c.command(CMD_COPY, RAM + 0x100, RAM + 0x8000, 5000, 0);
    c.wait_done(2);
    assert_eq!(read_at(&ram, 0x8000, 5000), pattern(7, 5000));
    assert!(fired(&v0, 2000));

    write_at(&ram, 0x20000, b"hello, device");
    c.command(CMD_READ_CHECKSUM, RAM + 0x20000, 0, 13, 0);
    c.wait_done(3);
    let result = c.reg(REG_RESULT_LO) as u64 | (c.reg(REG_RESULT_HI) as u64) << 32;
    assert_eq!(result, fnv1a64(b"hello, device"));
    assert_eq!(c.reg(REG_DMA_WRITTEN), 10000);
    assert_eq!(c.reg(REG_DMA_READ), 5013);
    assert_eq!(c.reg(REG_IRQ_STATUS), IRQ_DONE);

    // Failures: unmapped address, straddling the end of RAM, bad length, unknown command.
    c.command(CMD_WRITE_PATTERN, 0x5000_0000, 0, 16, 1);
    c.wait_done(4);
    assert_eq!((c.reg(REG_FAILED), c.reg(REG_LAST_ERROR)), (1, ERR_DMA));
    c.command(CMD_READ_CHECKSUM, RAM + RAM_SIZE - 8, 0, 16, 0);
    c.wait_done(5);
    assert_eq!((c.reg(REG_FAILED), c.reg(REG_LAST_ERROR)), (2, ERR_DMA));
    c.command(CMD_COPY, RAM, RAM + 0x100, MAX_LEN + 1, 0);
    c.wait_done(6);
    assert_eq!(c.reg(REG_LAST_ERROR), ERR_BAD_LEN);
    c.command(42, 0, 0, 0, 0);
    c.wait_done(7);
    assert_eq!(
        (c.reg(REG_FAILED), c.reg(REG_LAST_ERROR)),
        (4, ERR_BAD_COMMAND)
    );
    // The device keeps working, with a full MAX_LEN transfer.
    c.command(CMD_WRITE_PATTERN, RAM, 0, MAX_LEN, 3);
    c.wait_done(8);
    assert_eq!(c.reg(REG_COMPLETED), 4);
    assert_eq!(read_at(&ram, 0, MAX_LEN as usize), pattern(3, MAX_LEN));

    // CLEAR_COUNTERS zeroes, then counts itself.
    c.set_reg(REG_DOORBELL, CMD_CLEAR_COUNTERS);
    c.wait_done(1);
    assert_eq!(
        (
            c.reg(REG_COMPLETED),
            c.reg(REG_FAILED),
            c.reg(REG_DMA_READ),
            c.reg(REG_DMA_WRITTEN)
        ),
        (1, 0, 0, 0)
    );

    // After DMA_UNMAP the same address fails.
    c.call(
        DMA_UNMAP,
        &fields(&[(24, 4), (0, 4), (RAM, 8), (RAM_SIZE, 8)]),
    )
    .ok();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 16, 1);
    c.wait_done(2);
    assert_eq!(c.reg(REG_LAST_ERROR), ERR_DMA);
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

#[test]
fn intx_is_level_triggered_with_unmask() {
    let mut c = Client::negotiated();
    let ram = memfd(0x10000);
    c.dma_map(RAM, 0x10000, Some(ram.as_raw_fd())).ok();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let unmask = EventFd::new(EFD_NONBLOCK).unwrap();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_TRIGGER, 0, 0, 1),
        &[trigger.as_raw_fd()],
    )
    .ok();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_UNMASK, 0, 0, 1),
        &[unmask.as_raw_fd()],
    )
    .ok();

    // Without IRQ_CONTROL, nothing.
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(1);
    assert!(!fired(&trigger, 100));
    // Enabling it with IRQ_DONE pending asserts the line.
    c.set_reg(REG_IRQ_CONTROL, IRQ_DONE);
    assert!(fired(&trigger, 2000));
    let status = c.region_read(CONFIG, 6, 2).unwrap();
    assert_ne!(status[0] & 0x08, 0, "config space interrupt status");
    // Another completion while asserted and masked: no new edge.
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(2);
    assert!(!fired(&trigger, 100), "automasked");
    // The resample eventfd unmasks; still pending, so it fires again.
    unmask.write(1).unwrap();
    assert!(fired(&trigger, 2000), "re-raised on unmask while pending");
    // Acknowledge, then unmask: nothing pending, nothing fires.
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    assert_eq!(c.region_read(CONFIG, 6, 1).unwrap()[0] & 0x08, 0);
    unmask.write(1).unwrap();
    assert!(!fired(&trigger, 200));
    // Unmasked and idle: the next completion fires.
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(3);
    assert!(fired(&trigger, 2000));
    // Unmask through SET_IRQS (DATA_NONE) while pending fires too; MASK keeps it quiet.
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_UNMASK, 0, 0, 1))
        .ok();
    assert!(fired(&trigger, 2000));
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_UNMASK, 0, 0, 1))
        .ok();
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_MASK, 0, 0, 1))
        .ok();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(4);
    assert!(!fired(&trigger, 100), "masked");
    // INTx disable in the command register drops the level.
    c.region_write(CONFIG, 4, &[0x06, 0x04]).unwrap();
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_UNMASK, 0, 0, 1))
        .ok();
    assert!(!fired(&trigger, 100), "INTx disabled");
    // With MSI-X enabled in config space, INTx stays quiet.
    c.region_write(CONFIG, 4, &[0x06, 0x00]).unwrap();
    assert!(fired(&trigger, 2000), "re-enabled while pending");
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    let cap = c.region_read(CONFIG, 0x34, 1).unwrap()[0] as u64;
    c.region_write(CONFIG, cap + 3, &[0x80]).unwrap();
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_UNMASK, 0, 0, 1))
        .ok();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(5);
    assert!(!fired(&trigger, 100), "MSI-X mode");
    c.finish().unwrap();
}

/// `--msi`: with MSI eventfds set (SET_IRQS index 1), completions signal MSI vector 0 and INTx
/// stays quiet; the per-vector mask bit in config space holds the message in the pending bit
/// until unmasked; MSI-X wins over MSI; de-assigning the MSI eventfds gives INTx back, and so
/// does clearing the MSI enable bit of config space.
#[test]
fn msi_vector_0_signals_completions() {
    let mut c = Client::negotiated_with(true);
    let ram = memfd(0x10000);
    c.dma_map(RAM, 0x10000, Some(ram.as_raw_fd())).ok();
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_TRIGGER, 0, 0, 1),
        &[intx.as_raw_fd()],
    )
    .ok();
    // The capability: after MSI-X (0x40), at 0x50; mask bits @0x10, pending bits @0x14.
    let msi = c.region_read(CONFIG, 0x41, 1).unwrap()[0] as u64;
    assert_eq!(c.region_read(CONFIG, msi, 1).unwrap()[0], 0x05);
    let (mask, pending) = (msi + 0x10, msi + 0x14);
    // One eventfd for vector 0, as a VMM does when the guest enables one vector.
    let v0 = EventFd::new(EFD_NONBLOCK).unwrap();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_TRIGGER, 1, 0, 1),
        &[v0.as_raw_fd()],
    )
    .ok();
    c.set_reg(REG_IRQ_CONTROL, IRQ_DONE);
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 1);
    c.wait_done(1);
    assert_eq!(read_at(&ram, 0, 64), pattern(1, 64));
    assert!(fired(&v0, 2000), "MSI vector 0 on completion");
    assert!(!fired(&intx, 100), "no INTx while MSI is in use");
    assert_eq!(
        c.region_read(CONFIG, 6, 1).unwrap()[0] & 0x08,
        0,
        "INTx status"
    );
    assert_eq!(c.reg(REG_IRQ_STATUS), IRQ_DONE);
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    // Edge: the next completion signals again.
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 2);
    c.wait_done(2);
    assert!(fired(&v0, 2000), "second completion");
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);

    // Masked: no message, the pending bit holds it; unmasking sends it once.
    c.region_write(CONFIG, mask, &1u32.to_le_bytes()).unwrap();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 3);
    c.wait_done(3);
    assert!(!fired(&v0, 200), "masked");
    assert_eq!(le32(&c.region_read(CONFIG, pending, 4).unwrap(), 0), 1);
    c.region_write(CONFIG, mask, &0u32.to_le_bytes()).unwrap();
    assert!(fired(&v0, 2000), "the pending message on unmask");
    assert_eq!(le32(&c.region_read(CONFIG, pending, 4).unwrap(), 0), 0);
    assert!(!fired(&v0, 100), "only once");
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);

    // SET_IRQS TRIGGER with DATA_NONE signals the eventfd (loopback).
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_TRIGGER, 1, 0, 1))
        .ok();
    assert!(fired(&v0, 2000), "loopback trigger");

    // MSI-X eventfds win over MSI.
    let x0 = EventFd::new(EFD_NONBLOCK).unwrap();
    c.call_fds(
        SET_IRQS,
        &set_irqs(DATA_EVENTFD | ACTION_TRIGGER, 2, 0, 1),
        &[x0.as_raw_fd()],
    )
    .ok();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 4);
    c.wait_done(4);
    assert!(fired(&x0, 2000), "MSI-X vector 0");
    assert!(!fired(&v0, 100), "not MSI while MSI-X is in use");
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_TRIGGER, 2, 0, 0))
        .ok();

    // MSI disabled (count 0): INTx takes over again.
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_TRIGGER, 1, 0, 0))
        .ok();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 5);
    c.wait_done(5);
    assert!(fired(&intx, 2000), "INTx after MSI was disabled");
    assert!(!fired(&v0, 100), "no MSI after it was disabled");
    c.set_reg(REG_IRQ_STATUS, IRQ_DONE);
    // The MSI enable bit in config space alone also means MSI (no eventfd: nothing is sent);
    // clearing it lets the pending INTx out.
    c.call(SET_IRQS, &set_irqs(DATA_NONE | ACTION_UNMASK, 0, 0, 1))
        .ok();
    c.region_write(CONFIG, msi + 2, &[0x01, 0x00]).unwrap();
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 6);
    c.wait_done(6);
    assert!(!fired(&intx, 100), "MSI enabled in config space");
    c.region_write(CONFIG, msi + 2, &[0x00, 0x00]).unwrap();
    assert!(
        fired(&intx, 2000),
        "INTx once MSI is disabled in config space"
    );
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

/// Answers one DMA_WRITE request, checking it, and returns its (address, data).
fn take_dma_write(c: &mut Client) -> (u64, Vec<u8>) {
    let r = c.next_request();
    assert_eq!(r.cmd, DMA_WRITE);
    let (addr, count) = (le64(&r.payload, 0), le64(&r.payload, 8));
    assert_eq!(r.payload.len() as u64, 16 + count);
    c.answer(&r, &fields(&[(addr, 8), (count, 8)]), None);
    (addr, r.payload[16..].to_vec())
}

#[test]
fn remote_dma_requests_interleave_with_client_commands() {
    let mut c = Client::start();
    c.version(r#"{"capabilities":{"max_data_xfer_size":4096}}"#);
    let ram = memfd(0x10000);
    c.dma_map(RAM, 0x10000, Some(ram.as_raw_fd())).ok();
    c.dma_map(PEER, 0x10000, None).ok();

    // P2P_WRITE of 10000 bytes to the fd-less peer: three DMA_WRITEs of at most 4096 bytes.
    c.command(CMD_P2P_WRITE, PEER + 0x100, 0, 10000, 5);
    let mut got = Vec::new();
    let mut next = PEER + 0x100;
    while got.len() < 10000 {
        let (addr, data) = take_dma_write(&mut c);
        assert_eq!(addr, next);
        assert!(data.len() <= 4096);
        next += data.len() as u64;
        got.extend(data);
    }
    assert_eq!(got, pattern(5, 10000));
    c.wait_done(1);
    assert_eq!(c.reg(REG_COMPLETED), 1);

    // COPY from the peer into RAM: a DMA_READ arrives. Before answering it, the client's own
    // MMIO is served (the device thread waits; the socket thread does not).
    c.command(CMD_COPY, PEER + 0x40, RAM + 0x200, 64, 0);
    let r = c.next_request();
    assert_eq!(r.cmd, DMA_READ);
    assert_eq!(
        (le64(&r.payload, 0), le64(&r.payload, 8), r.payload.len()),
        (PEER + 0x40, 64, 16)
    );
    assert_eq!(
        c.reg(REG_STATUS) & STATUS_BUSY,
        STATUS_BUSY,
        "MMIO answered mid-DMA"
    );
    assert_eq!(c.reg(REG_MAGIC), MAGIC);
    let data: Vec<u8> = (0..64u8).map(|i| i ^ 0x5a).collect();
    let mut reply = fields(&[(PEER + 0x40, 8), (64, 8)]);
    reply.extend_from_slice(&data);
    c.answer(&r, &reply, None);
    c.wait_done(2);
    assert_eq!(c.reg(REG_COMPLETED), 2);
    assert_eq!(read_at(&ram, 0x200, 64), data);

    // The client refuses a DMA_WRITE: the command fails with ERR_DMA.
    c.command(CMD_P2P_WRITE, PEER, 0, 8, 1);
    let r = c.next_request();
    c.answer(&r, &[], Some(libc::EFAULT as u32));
    c.wait_done(3);
    assert_eq!((c.reg(REG_FAILED), c.reg(REG_LAST_ERROR)), (1, ERR_DMA));
    // A malformed DMA_READ reply (wrong count) fails the command too.
    c.command(CMD_READ_CHECKSUM, PEER, 0, 8, 0);
    let r = c.next_request();
    c.answer(&r, &fields(&[(PEER, 8), (4, 8), (0, 4)]), None);
    c.wait_done(4);
    assert_eq!((c.reg(REG_FAILED), c.reg(REG_LAST_ERROR)), (2, ERR_DMA));
    // A checksum over remote memory.
    c.command(CMD_READ_CHECKSUM, PEER, 0, 3, 0);
    let r = c.next_request();
    let mut reply = fields(&[(PEER, 8), (3, 8)]);
    reply.extend_from_slice(b"abc");
    c.answer(&r, &reply, None);
    c.wait_done(5);
    let result = c.reg(REG_RESULT_LO) as u64 | (c.reg(REG_RESULT_HI) as u64) << 32;
    assert_eq!(result, fnv1a64(b"abc"));
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

#[test]
fn stream_writes_consecutive_sequence_numbers() {
    let mut c = Client::negotiated();
    let ram = memfd(0x10000);
    let peer = memfd(DEVICE_MEMORY_SIZE);
    c.dma_map(RAM, 0x10000, Some(ram.as_raw_fd())).ok();
    c.dma_map(PEER, DEVICE_MEMORY_SIZE, Some(peer.as_raw_fd()))
        .ok();
    const ENTRIES: u64 = 16;
    c.region_write(0, REG_STREAM_RING_LO, &(RAM + 0x1000).to_le_bytes())
        .unwrap();
    c.set_reg(REG_STREAM_RING_ENTRIES, ENTRIES as u32);
    c.region_write(0, REG_STREAM_PEER_LO, &PEER.to_le_bytes())
        .unwrap();
    c.set_reg(REG_STREAM_PERIOD_US, 200);
    c.set_reg(REG_DOORBELL, CMD_STREAM_START);
    c.wait_done(1);
    assert_eq!(c.reg(REG_STATUS) & STATUS_STREAMING, STATUS_STREAMING);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.reg(REG_STREAM_SEQ) < 50 {
        assert!(Instant::now() < deadline, "stream too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.set_reg(REG_DOORBELL, CMD_STREAM_STOP);
    c.wait_done(2);
    assert_eq!(c.reg(REG_STATUS) & STATUS_STREAMING, 0);
    let end = c.reg(REG_STREAM_SEQ) as u64;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.reg(REG_STREAM_SEQ) as u64, end, "stopped");
    // The ring holds the last ENTRIES sequence numbers, each in slot seq % ENTRIES.
    for s in end - ENTRIES..end {
        let v = le64(&read_at(&ram, 0x1000 + 8 * (s % ENTRIES), 8), 0);
        assert_eq!(v, s, "ring slot {}", s % ENTRIES);
    }
    // The peer's memory holds every number at 8 * seq (first half of its memory).
    for s in 0..end {
        assert_eq!(le64(&read_at(&peer, 8 * s, 8), 0), s);
    }
    assert_eq!(c.reg(REG_DMA_WRITTEN) as u64, 16 * end);
    // Bad ring size fails the start.
    c.set_reg(REG_STREAM_RING_ENTRIES, 12);
    c.set_reg(REG_DOORBELL, CMD_STREAM_START);
    c.wait_done(3);
    assert_eq!(c.reg(REG_LAST_ERROR), ERR_BAD_LEN);
    // A stream into unmapped memory stops itself with ERR_DMA.
    c.set_reg(REG_STREAM_RING_ENTRIES, 4);
    c.region_write(0, REG_STREAM_RING_LO, &0x7000_0000u64.to_le_bytes())
        .unwrap();
    c.set_reg(REG_DOORBELL, CMD_STREAM_START);
    c.wait_done(5);
    assert_eq!(
        (c.reg(REG_LAST_ERROR), c.reg(REG_STATUS) & STATUS_STREAMING),
        (ERR_DMA, 0)
    );
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

#[test]
fn disconnect_mid_dma_ends_the_server_cleanly() {
    let mut c = Client::negotiated();
    c.dma_map(PEER, 0x10000, None).ok();
    c.command(CMD_P2P_WRITE, PEER, 0, 4096, 1);
    let r = c.next_request();
    assert_eq!(r.cmd, DMA_WRITE);
    // Hang up without answering: the device thread's wait ends, the server returns.
    let started = Instant::now();
    c.finish().expect("a disconnect between messages is clean");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "did not wait for the DMA timeout"
    );
}

#[test]
fn binary_serves_one_client_and_removes_its_socket() {
    let dir = std::env::temp_dir().join(format!("skiff-testdev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("td.sock");
    let run = |script: &dyn Fn(&std::os::unix::net::UnixStream)| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff-testdev"))
            .args([
                "--socket",
                path.to_str().unwrap(),
                "--id",
                "bin",
                "--no-p2p",
                "--msi",
                "-v",
            ])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&path) {
                break s;
            }
            assert!(Instant::now() < deadline, "no socket");
            std::thread::sleep(Duration::from_millis(10));
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        script(&sock);
        drop(sock);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("skiff-testdev did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!path.exists(), "socket file removed");
        status
    };
    let ok = run(&|s| {
        use std::io::{Read, Write};
        let mut p = fields(&[(0, 2), (1, 2)]);
        p.extend_from_slice(b"{}\0");
        (&*s).write_all(&message(1, CMD_VERSION, 0, &p)).unwrap();
        let mut h = [0u8; 16];
        (&*s).read_exact(&mut h).unwrap();
        assert_eq!((le16(&h, 0), le16(&h, 2), le32(&h, 8)), (1, CMD_VERSION, 1));
        let mut rest = vec![0u8; le32(&h, 4) as usize - 16];
        (&*s).read_exact(&mut rest).unwrap();
        assert_eq!(le16(&rest, 0), 0, "major");
    });
    assert!(ok.success(), "{ok:?}");
    // Hanging up with the reply unread is a disconnect too.
    let ok = run(&|s| {
        use std::io::Write;
        let mut p = fields(&[(0, 2), (1, 2)]);
        p.extend_from_slice(b"{}\0");
        (&*s).write_all(&message(1, CMD_VERSION, 0, &p)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    assert!(ok.success(), "{ok:?}");
    let bad = run(&|s| {
        use std::io::Write;
        (&*s).write_all(&[1, 0, 1]).unwrap();
    });
    assert!(!bad.success(), "a truncated message is an error exit");
    let _ = std::fs::remove_dir_all(&dir);
}
