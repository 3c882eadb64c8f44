//! Migration over the socket, with messages built from the spec's layouts: DEVICE_FEATURE
//! (argsz u32 @0, flags u32 @4 = feature index | GET 1<<16 | SET 1<<17 | PROBE 1<<18, data
//! @8), MIG_DATA_READ/WRITE (argsz u32 @0, size u32 @4, data @8), the v2 state machine, a
//! whole PRE_COPY + STOP_COPY migration between two devices, bad RESUMING data, DMA logging,
//! the violation counters, and the injected faults (`--fail-arc`, `--fail-read-after`,
//! `--reject-resume`, `--exit-on-arc`).

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use testdev::device::DeviceState;
use testdev::fault::{ArcFault, Faults};
use testdev::regs::*;

const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const PROBE: u32 = 1 << 18;
const MIGRATION: u32 = 1;
const MIG_STATE: u32 = 2;
const LOG_START: u32 = 6;
const LOG_STOP: u32 = 7;
const LOG_REPORT: u32 = 8;
const MIG_DATA_SIZE: u32 = 9;

// enum vfio_device_mig_state.
const ERROR: u32 = 0;
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const RUNNING_P2P: u32 = 5;
const PRE_COPY: u32 = 6;
const PRE_COPY_P2P: u32 = 7;

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x10_0000;
const REMOTE: u64 = 0xe000_0000;

fn einval() -> u32 {
    libc::EINVAL as u32
}

fn opts(migration: u64, dma_logging: bool) -> testdev::Options {
    testdev::Options {
        migration,
        dma_logging,
        ..test_options()
    }
}

fn feature(c: &mut Client, argsz: u32, flags: u32, data: &[u8]) -> Msg {
    let mut p = fields(&[(argsz as u64, 4), (flags as u64, 4)]);
    p.extend_from_slice(data);
    c.call(DEVICE_FEATURE, &p)
}

/// SET MIG_DEVICE_STATE; on success checks the reply echoes the request with the new state.
fn set_state(c: &mut Client, state: u32) -> Result<(), u32> {
    let req = fields(&[(state as u64, 4), (u32::MAX as u64, 4)]);
    let m = feature(c, 16, SET | MIG_STATE, &req);
    if m.is_error() {
        return Err(m.error);
    }
    let p = m.ok().payload;
    assert_eq!(
        p,
        fields(&[
            (16, 4),
            ((SET | MIG_STATE) as u64, 4),
            (state as u64, 4),
            (u32::MAX as u64, 4)
        ])
    );
    Ok(())
}

fn get_state(c: &mut Client) -> u32 {
    let p = feature(c, 16, GET | MIG_STATE, &[]).ok().payload;
    assert_eq!(p.len(), 16);
    assert_eq!((le32(&p, 0), le32(&p, 4)), (16, GET | MIG_STATE));
    assert_eq!(le32(&p, 12), u32::MAX, "data_fd -1: no fd in vfio-user");
    le32(&p, 8)
}

fn walk(c: &mut Client, states: &[u32]) {
    for &s in states {
        set_state(c, s).unwrap_or_else(|e| panic!("to state {s}: errno {e}"));
        assert_eq!(get_state(c), s);
    }
}

fn mig_data_size(c: &mut Client) -> u64 {
    let p = feature(c, 16, GET | MIG_DATA_SIZE, &[]).ok().payload;
    assert_eq!((le32(&p, 0), p.len()), (16, 16));
    le64(&p, 8)
}

/// MIG_DATA_READ of `size`: checks the reply's argsz and size against its data.
fn mig_read(c: &mut Client, size: u32) -> Vec<u8> {
    let m = c.call(
        MIG_DATA_READ,
        &fields(&[(8 + size as u64, 4), (size as u64, 4)]),
    );
    let p = m.ok().payload;
    let n = le32(&p, 4) as usize;
    assert!(n <= size as usize);
    assert_eq!((le32(&p, 0) as usize, p.len()), (8 + n, 8 + n));
    p[8..].to_vec()
}

/// Reads until a short read: the bytes available now (PRE_COPY) or the rest (STOP_COPY).
fn mig_read_all(c: &mut Client, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let b = mig_read(c, size);
        let short = b.len() < size as usize;
        v.extend(b);
        if short {
            return v;
        }
    }
}

fn mig_write(c: &mut Client, data: &[u8]) -> Result<(), u32> {
    let mut p = fields(&[(8, 4), (data.len() as u64, 4)]);
    p.extend_from_slice(data);
    let m = c.call(MIG_DATA_WRITE, &p);
    if m.is_error() {
        return Err(m.error);
    }
    assert!(m.ok().payload.is_empty(), "no reply payload");
    Ok(())
}

/// MIG_DATA_WRITE of `data` in messages of at most 512 KiB; the first error.
fn mig_write_all(c: &mut Client, data: &[u8]) -> Result<(), u32> {
    data.chunks(1 << 19).try_for_each(|p| mig_write(c, p))
}

#[test]
fn feature_probe_get_set_and_refusals() {
    let mut c = Client::negotiated();
    // PROBE echoes; with GET it succeeds, with SET it does not (MIGRATION is GET-only).
    let probe = feature(&mut c, 8, PROBE | MIGRATION, &[]).ok();
    assert_eq!(
        probe.payload,
        fields(&[(8, 4), ((PROBE | MIGRATION) as u64, 4)])
    );
    feature(&mut c, 8, PROBE | GET | MIGRATION, &[]).ok();
    assert_eq!(
        feature(&mut c, 8, PROBE | SET | MIGRATION, &[]).errno(),
        einval()
    );
    feature(&mut c, 8, PROBE | GET | SET | MIG_STATE, &[]).ok();
    for f in [LOG_START, LOG_STOP] {
        feature(&mut c, 8, PROBE | SET | f, &[]).ok();
    }
    feature(&mut c, 8, PROBE | GET | LOG_REPORT, &[]).ok();
    // GET MIGRATION: flags u64 = STOP_COPY | P2P | PRE_COPY.
    let m = feature(&mut c, 16, GET | MIGRATION, &[]).ok();
    assert_eq!(
        m.payload,
        fields(&[(16, 4), ((GET | MIGRATION) as u64, 4), (7, 8)])
    );
    assert!(m.fds.is_empty());
    assert_eq!(get_state(&mut c), RUNNING, "the power-on state");
    // Refused: argsz too small for the data, GET with SET, neither, unknown flag bits, an
    // unknown feature, a short payload, a SET without its data.
    assert_eq!(feature(&mut c, 8, GET | MIGRATION, &[]).errno(), einval());
    assert_eq!(feature(&mut c, 4, PROBE | MIGRATION, &[]).errno(), einval());
    assert_eq!(
        feature(&mut c, 16, GET | SET | MIG_STATE, &[0; 8]).errno(),
        einval()
    );
    assert_eq!(feature(&mut c, 16, MIG_STATE, &[0; 8]).errno(), einval());
    assert_eq!(
        feature(&mut c, 16, (1 << 19) | GET | MIGRATION, &[]).errno(),
        einval()
    );
    for f in [0, 3, 4, 5, 10, 0xffff] {
        assert_eq!(
            feature(&mut c, 64, GET | f, &[]).errno(),
            libc::ENOTTY as u32,
            "feature {f}"
        );
    }
    assert_eq!(c.call(DEVICE_FEATURE, &[8, 0, 0, 0]).errno(), einval());
    assert_eq!(
        feature(&mut c, 16, SET | MIG_STATE, &[1, 0, 0, 0]).errno(),
        einval()
    );
    // MIG_DATA_* outside the saving states / RESUMING, or malformed.
    assert_eq!(
        c.call(MIG_DATA_READ, &fields(&[(72, 4), (64, 4)])).errno(),
        einval()
    );
    assert_eq!(mig_write(&mut c, b"x").unwrap_err(), einval());
    assert_eq!(c.call(MIG_DATA_READ, &[1, 2, 3]).errno(), einval());
    assert_eq!(
        c.call(MIG_DATA_WRITE, &fields(&[(8, 4), (5, 4), (0, 2)]))
            .errno(),
        einval()
    );
    assert_eq!(get_state(&mut c), RUNNING);
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

#[test]
fn capability_sets_from_the_options() {
    // stop-copy only: flags 1, no P2P or PRE_COPY states, RUNNING <-> STOP direct.
    let mut c = Client::negotiated_opts(opts(1, true));
    let m = feature(&mut c, 16, GET | MIGRATION, &[]).ok();
    assert_eq!(le64(&m.payload, 8), 1);
    for s in [RUNNING_P2P, PRE_COPY, PRE_COPY_P2P] {
        assert_eq!(set_state(&mut c, s).unwrap_err(), einval());
    }
    walk(&mut c, &[STOP, STOP_COPY, STOP, RUNNING]);
    c.finish().unwrap();
    // No migration: the feature is not there (ENOTTY), MIG_DATA_* are not supported; no DMA
    // logging: its features are not there either.
    let mut c = Client::negotiated_opts(opts(0, false));
    for f in [
        MIGRATION,
        MIG_STATE,
        MIG_DATA_SIZE,
        LOG_START,
        LOG_STOP,
        LOG_REPORT,
    ] {
        assert_eq!(
            feature(&mut c, 8, PROBE | f, &[]).errno(),
            libc::ENOTTY as u32
        );
    }
    assert_eq!(
        feature(&mut c, 16, GET | MIGRATION, &[]).errno(),
        libc::ENOTTY as u32
    );
    assert_eq!(
        c.call(MIG_DATA_READ, &fields(&[(72, 4), (64, 4)])).errno(),
        libc::ENOTSUP as u32
    );
    c.finish().unwrap();
}

#[test]
fn only_direct_arcs_are_accepted() {
    let mut c = Client::negotiated();
    // With P2P, RUNNING -> STOP is not direct: refused, nothing changes; the walk works.
    assert_eq!(set_state(&mut c, STOP).unwrap_err(), einval());
    assert_eq!(get_state(&mut c), RUNNING);
    set_state(&mut c, RUNNING).unwrap();
    walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
    assert_eq!(set_state(&mut c, RUNNING).unwrap_err(), einval());
    // RESUMING is left with a whole stream or a reset (below); the reset gives RUNNING.
    c.call(RESET, &[]).ok();
    assert_eq!(get_state(&mut c), RUNNING);
    walk(&mut c, &[RUNNING_P2P, STOP, STOP_COPY]);
    for s in [
        PRE_COPY,
        PRE_COPY_P2P,
        RUNNING,
        RESUMING,
        ERROR,
        8,
        u32::MAX,
    ] {
        assert_eq!(
            set_state(&mut c, s).unwrap_err(),
            einval(),
            "STOP_COPY -> {s}"
        );
        assert_eq!(get_state(&mut c), STOP_COPY);
    }
    walk(
        &mut c,
        &[
            STOP,
            RUNNING_P2P,
            PRE_COPY_P2P,
            PRE_COPY,
            PRE_COPY_P2P,
            RUNNING_P2P,
        ],
    );
    walk(&mut c, &[RUNNING, PRE_COPY, RUNNING]);
    c.finish().unwrap();
    // Without P2P the arcs skipping it are direct.
    let mut c = Client::negotiated_opts(opts(0b101, true));
    walk(&mut c, &[PRE_COPY, STOP_COPY, STOP, RUNNING, STOP, RUNNING]);
    c.finish().unwrap();
}

/// Waits for the next DMA_WRITE request and returns it unanswered.
fn dma_write_request(c: &mut Client) -> Msg {
    let r = c.next_request();
    assert_eq!(r.cmd, DMA_WRITE);
    r
}

fn answer_write(c: &mut Client, r: &Msg) {
    let (addr, count) = (le64(&r.payload, 0), le64(&r.payload, 8));
    c.answer(r, &fields(&[(addr, 8), (count, 8)]), None);
}

/// Whether a server message arrives within `ms` (the socket becomes readable).
fn request_within(c: &mut Client, ms: i32) -> bool {
    if !c.requests.is_empty() {
        return true;
    }
    let mut p = libc::pollfd {
        fd: c.sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Source: a command blocked on a remote DMA_WRITE, two more queued behind it, device memory
/// written; RUNNING -> PRE_COPY (memory streams, a peer write is re-sent) -> PRE_COPY_P2P
/// (the engine stops: the interrupted command goes back to the queue) -> STOP_COPY (the rest,
/// then 0). Target: RESUMING with the concatenated bytes in odd pieces, -> STOP -> RUNNING_P2P
/// -> RUNNING: the interrupted command runs again from its start, then the queued ones.
#[test]
fn pre_copy_and_stop_copy_migrate_the_device() {
    let mut src = Client::negotiated();
    let ram = memfd(RAM_SIZE);
    src.dma_map(RAM, RAM_SIZE, Some(ram.as_raw_fd())).ok();
    src.dma_map(REMOTE, 0x1000, None).ok();
    src.set_reg(REG_IRQ_CONTROL, IRQ_DONE);
    let mem: Vec<u8> = (0..DEVICE_MEMORY_SIZE as u32)
        .map(|i| pattern_byte(42, i))
        .collect();
    for (i, part) in mem.chunks(1 << 18).enumerate() {
        src.region_write(2, (i << 18) as u64, part).unwrap();
    }
    src.command(CMD_WRITE_PATTERN, RAM, 0, 4096, 1);
    src.wait_done(1);
    src.command(CMD_P2P_WRITE, REMOTE + 0x10, 0, 64, 2);
    let blocked = dma_write_request(&mut src);
    src.command(CMD_WRITE_PATTERN, RAM + 0x4000, 0, 100, 3);
    src.command(CMD_READ_CHECKSUM, RAM, 0, 4096, 0);
    let full = mig_data_size(&mut src);

    set_state(&mut src, PRE_COPY).unwrap();
    let mut stream = mig_read_all(&mut src, 100_000);
    assert!(
        stream.len() > DEVICE_MEMORY_SIZE as usize,
        "the initial bytes"
    );
    assert!(mig_read(&mut src, 4096).is_empty(), "nothing more for now");
    // A peer write into device memory: its chunk is sent again.
    src.region_write(2, 0x8_0000, b"peer").unwrap();
    let again = mig_read_all(&mut src, 100_000);
    assert!(
        again.len() > 4096 && again.len() < 3 * 4096,
        "one chunk: {}",
        again.len()
    );
    stream.extend(again);
    assert!(
        mig_data_size(&mut src) < full / 100,
        "only device state left"
    );

    set_state(&mut src, PRE_COPY_P2P).unwrap();
    answer_write(&mut src, &blocked);
    assert!(!request_within(&mut src, 200), "no DMA in PRE_COPY_P2P");
    let left = {
        set_state(&mut src, STOP_COPY).unwrap();
        mig_data_size(&mut src)
    };
    let rest = mig_read_all(&mut src, 1000);
    assert_eq!(
        rest.len() as u64,
        left,
        "MIG_DATA_SIZE in STOP_COPY: the bytes left"
    );
    assert!(mig_read(&mut src, 1000).is_empty(), "end of stream stays");
    stream.extend(rest);
    set_state(&mut src, STOP).unwrap();
    src.finish().unwrap();

    let mut dst = Client::negotiated();
    let ram2 = memfd(RAM_SIZE);
    dst.dma_map(RAM, RAM_SIZE, Some(ram2.as_raw_fd())).ok();
    dst.dma_map(REMOTE, 0x1000, None).ok();
    // "Migrate" guest RAM as the VMM would.
    write_at(&ram2, 0, &read_at(&ram, 0, RAM_SIZE as usize));
    walk(&mut dst, &[RUNNING_P2P, STOP, RESUMING]);
    for piece in stream.chunks(333_333) {
        mig_write(&mut dst, piece).unwrap();
    }
    walk(&mut dst, &[STOP, RUNNING_P2P]);
    assert!(!request_within(&mut dst, 200), "no DMA before RUNNING");
    set_state(&mut dst, RUNNING).unwrap();
    // The interrupted P2P write runs again from its start, then the queued commands.
    let r = dma_write_request(&mut dst);
    assert_eq!(
        (le64(&r.payload, 0), &r.payload[16..]),
        (REMOTE + 0x10, &pattern(2, 64)[..])
    );
    answer_write(&mut dst, &r);
    dst.wait_done(4);
    assert_eq!((dst.reg(REG_COMPLETED), dst.reg(REG_FAILED)), (4, 0));
    assert_eq!(read_at(&ram2, 0x4000, 100), pattern(3, 100));
    let result = dst.reg(REG_RESULT_LO) as u64 | (dst.reg(REG_RESULT_HI) as u64) << 32;
    assert_eq!(result, fnv1a64(&pattern(1, 4096)));
    assert_eq!(dst.reg(REG_IRQ_CONTROL), IRQ_DONE, "registers came along");
    let mut want = mem;
    want[0x8_0000..0x8_0004].copy_from_slice(b"peer");
    for (i, part) in want.chunks(1 << 18).enumerate() {
        assert_eq!(dst.region_read(2, (i << 18) as u64, 1 << 18).unwrap(), part);
    }
    assert_eq!(
        dst.reg(REG_PEER_WRITES),
        5,
        "four writes to fill it, one peer write"
    );
    assert_eq!(dst.reg(REG_VIOLATIONS), 0);
    dst.finish().unwrap();
}

/// A stream of a freshly started device, saved with STOP_COPY.
fn saved_stream() -> Vec<u8> {
    let mut c = Client::negotiated();
    walk(&mut c, &[RUNNING_P2P, STOP, STOP_COPY]);
    let s = mig_read_all(&mut c, 1 << 20);
    c.finish().unwrap();
    s
}

#[test]
fn bad_resuming_data_is_refused() {
    let good = saved_stream();
    let mut c = Client::negotiated();
    // Truncated: RESUMING -> STOP fails and the device stays in RESUMING; the rest completes it.
    walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
    mig_write_all(&mut c, &good[..good.len() - 10]).unwrap();
    assert_eq!(set_state(&mut c, STOP).unwrap_err(), einval());
    assert_eq!(get_state(&mut c), RESUMING);
    mig_write(&mut c, &good[good.len() - 10..]).unwrap();
    walk(&mut c, &[STOP, RUNNING_P2P, RUNNING]);
    // Corrupt: the write fails, so does RESUMING -> STOP, and the device is in ERROR until reset.
    walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
    let mut bad = good.clone();
    bad[5000] ^= 1;
    assert_eq!(mig_write_all(&mut c, &bad).unwrap_err(), einval());
    assert_eq!(
        mig_write_all(&mut c, &good).unwrap_err(),
        einval(),
        "poisoned"
    );
    assert_eq!(set_state(&mut c, STOP).unwrap_err(), einval());
    assert_eq!(get_state(&mut c), ERROR);
    for s in [STOP, RUNNING, RESUMING, ERROR] {
        assert_eq!(set_state(&mut c, s).unwrap_err(), einval());
    }
    c.call(RESET, &[]).ok();
    assert_eq!(get_state(&mut c), RUNNING);
    // Foreign bytes.
    walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
    assert_eq!(
        mig_write(&mut c, b"GIF89a....................").unwrap_err(),
        einval()
    );
    assert_eq!(set_state(&mut c, STOP).unwrap_err(), einval());
    assert_eq!(get_state(&mut c), ERROR);
    c.call(RESET, &[]).ok();
    // A source with an MSI capability cannot load into one without.
    let mut m = Client::negotiated_with(true);
    walk(&mut m, &[RUNNING_P2P, STOP, STOP_COPY]);
    let msi_stream = mig_read_all(&mut m, 1 << 20);
    m.finish().unwrap();
    walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
    assert_eq!(mig_write_all(&mut c, &msi_stream).unwrap_err(), einval());
    c.call(RESET, &[]).ok();
    assert_eq!(c.reg(REG_VIOLATIONS), 0, "read after the reset: RUNNING");
    c.finish().unwrap();
}

#[test]
fn dma_logging_reports_pages_written_by_the_device() {
    let mut c = Client::negotiated();
    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM, RAM_SIZE, Some(ram.as_raw_fd())).ok();
    let start = |page: u64, ranges: &[(u64, u64)]| {
        let mut d = fields(&[(page, 8), (ranges.len() as u64, 4), (0, 4)]);
        for &(iova, len) in ranges {
            d.extend(fields(&[(iova, 8), (len, 8)]));
        }
        d
    };
    let report = |c: &mut Client, iova: u64, len: u64, page: u64, argsz: u32| {
        feature(
            c,
            argsz,
            GET | LOG_REPORT,
            &fields(&[(iova, 8), (len, 8), (page, 8)]),
        )
    };
    assert_eq!(
        report(&mut c, RAM, RAM_SIZE, 4096, 4096).errno(),
        einval(),
        "not started"
    );
    // Bad START: page size, unaligned or overlapping ranges, ranges missing from the payload.
    for d in [
        start(0, &[]),
        start(3000, &[]),
        start(4096, &[(RAM + 1, 4096)]),
        start(4096, &[(RAM, 0x2000), (RAM + 0x1000, 0x1000)]),
    ] {
        assert_eq!(feature(&mut c, 64, SET | LOG_START, &d).errno(), einval());
    }
    let mut short = start(4096, &[(RAM, 4096)]);
    short.truncate(20);
    assert_eq!(
        feature(&mut c, 64, SET | LOG_START, &short).errno(),
        einval()
    );
    // The hint (64 KiB) becomes our 4 KiB in the reply, the rest echoed.
    let req = start(0x10000, &[(RAM, RAM_SIZE)]);
    let m = feature(&mut c, 40, SET | LOG_START, &req).ok();
    let mut want = fields(&[(40, 4), ((SET | LOG_START) as u64, 4)]);
    want.extend(start(4096, &[(RAM, RAM_SIZE)]));
    assert_eq!(m.payload, want);
    assert_eq!(
        feature(&mut c, 40, SET | LOG_START, &req).errno(),
        libc::EBUSY as u32
    );

    c.command(CMD_WRITE_PATTERN, RAM + 0x1000, 0, 0x2001, 1); // pages 1, 2, 3
    c.command(CMD_WRITE_PATTERN, RAM + 70 * 4096 + 5, 0, 1, 2); // page 70
    c.command(CMD_READ_CHECKSUM, RAM + 0x20000, 0, 4096, 0); // a read: not logged
    c.wait_done(3);
    // A bitmap of 256 pages: four u64s after iova/length/page_size.
    let m = report(&mut c, RAM, RAM_SIZE, 4096, 8 + 24 + 32).ok();
    let p = &m.payload;
    assert_eq!((le32(p, 0), le32(p, 4)), (64, GET | LOG_REPORT));
    assert_eq!(
        &p[8..32],
        &fields(&[(RAM, 8), (RAM_SIZE, 8), (4096, 8)])[..]
    );
    assert_eq!(
        (le64(p, 32), le64(p, 40), le64(p, 48), le64(p, 56)),
        (0b1110, 1 << 6, 0, 0)
    );
    // Reported pages were cleared.
    let m = report(&mut c, RAM, RAM_SIZE, 4096, 64).ok();
    assert!(m.payload[32..].iter().all(|&b| b == 0));
    // At 64 KiB per bit, over a window of eight units.
    c.command(CMD_WRITE_PATTERN, RAM + 70 * 4096, 0, 1, 3);
    c.wait_done(4);
    let m = report(&mut c, RAM, 0x80000, 0x10000, 40).ok();
    assert_eq!(
        le64(&m.payload, 32),
        1 << 4,
        "0x46000 is in the fifth 64 KiB unit"
    );
    // Bad reports: page size, unaligned iova, no room for the bitmap, a bitmap too large.
    assert_eq!(report(&mut c, RAM, RAM_SIZE, 2048, 4096).errno(), einval());
    assert_eq!(
        report(&mut c, RAM + 512, 4096, 4096, 4096).errno(),
        einval()
    );
    assert_eq!(report(&mut c, RAM, RAM_SIZE, 4096, 63).errno(), einval());
    assert_eq!(report(&mut c, 0, 1 << 45, 4096, u32::MAX).errno(), einval());
    feature(&mut c, 8, SET | LOG_STOP, &[]).ok();
    assert_eq!(
        report(&mut c, RAM, RAM_SIZE, 4096, 64).errno(),
        einval(),
        "stopped"
    );
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

/// Late peer writes: device memory must not change in STOP, STOP_COPY and RESUMING (the
/// kernel's STOP: "must not change its internal state"); the P2P states still accept peer
/// writes. A REGION_WRITE into BAR2 counts as it arrives; a change through the mapping counts
/// once per 4 KiB chunk, noticed at the next state change, MIG_DATA_READ or BAR2 REGION_WRITE.
#[test]
fn violations_count_ordering_mistakes() {
    let good = saved_stream();
    let mut c = Client::negotiated();
    let bar2 = {
        let m = c.call(
            GET_REGION_INFO,
            &fields(&[(64, 4), (0, 4), (2, 4), (0, 4), (0, 8), (0, 8)]),
        );
        m.ok().fds.into_iter().next().unwrap()
    };
    walk(&mut c, &[RUNNING_P2P]);
    // Guest MMIO while not RUNNING/PRE_COPY: counted (the access itself is served).
    assert_eq!(c.reg(REG_MAGIC), MAGIC);
    // Peer writes in RUNNING_P2P and PRE_COPY_P2P are fine, by message or by the mapping.
    c.region_write(2, 0, b"ok").unwrap();
    write_at(&bar2, 0x1000, b"ok");
    walk(&mut c, &[PRE_COPY_P2P]);
    c.region_write(2, 0x2000, b"ok").unwrap();
    write_at(&bar2, 0x3000, b"ok");
    let _ = mig_read(&mut c, 4096);
    walk(&mut c, &[RUNNING_P2P]);
    // STOP, before anything was saved: late too (1 by message, 1 chunk by the mapping,
    // noticed at the next arc).
    walk(&mut c, &[STOP]);
    c.region_write(2, 8, b"late").unwrap();
    write_at(&bar2, 0x4000, b"late");
    walk(&mut c, &[STOP_COPY]);
    // STOP_COPY: a REGION_WRITE (1); two chunks changed through the mapping (2: a MIG_DATA_READ
    // checks only a share of the chunks, here 0 and 1, so the next REGION_WRITE notices them);
    // a mapping write then a REGION_WRITE into the same chunk (2).
    c.region_write(2, 16, b"late").unwrap();
    write_at(&bar2, 0x6000 - 2, b"late");
    let _ = mig_read(&mut c, 4096);
    write_at(&bar2, 0x5_0000, b"late");
    c.region_write(2, 0x5_0010, b"late").unwrap();
    // Back in STOP (1), then RESUMING: by message (1), through the mapping (1, noticed at
    // RESUMING -> STOP, whose load is not a write); after the load, STOP again (1).
    walk(&mut c, &[STOP]);
    c.region_write(2, 16, b"still late").unwrap();
    walk(&mut c, &[RESUMING]);
    c.region_write(2, 32, b"overwritten").unwrap();
    write_at(&bar2, 0x7000, b"overwritten");
    mig_write_all(&mut c, &good).unwrap();
    walk(&mut c, &[STOP]);
    write_at(&bar2, 0x8000, b"late");
    walk(&mut c, &[RUNNING_P2P]);
    // Fine again in RUNNING_P2P and RUNNING.
    c.region_write(2, 16, b"fine again").unwrap();
    write_at(&bar2, 0x9000, b"fine");
    walk(&mut c, &[RUNNING]);
    c.region_write(2, 16, b"fine").unwrap();
    let v = [
        c.reg(REG_VIOL_DMA_STATE),
        c.reg(REG_VIOL_MMIO_STATE),
        c.reg(REG_VIOL_LATE_PEER_WRITE),
        c.reg(REG_VIOL_P2P_STATE),
    ];
    assert_eq!(v, [0, 1, 2 + 5 + 1 + 2 + 1, 0]);
    assert_eq!(c.reg(REG_VIOLATIONS), 12);
    c.finish().unwrap();
}

/// A command queued before the device stops does not run while it is stopped (nor in
/// RUNNING_P2P), stays queued, and runs once the device runs again.
#[test]
fn queued_commands_wait_for_running() {
    let mut c = Client::negotiated();
    let ram = memfd(0x10000);
    c.dma_map(RAM, 0x10000, Some(ram.as_raw_fd())).ok();
    c.dma_map(REMOTE, 0x1000, None).ok();
    c.command(CMD_P2P_WRITE, REMOTE, 0, 8, 1);
    let r = dma_write_request(&mut c);
    c.command(CMD_WRITE_PATTERN, RAM, 0, 64, 2);
    walk(&mut c, &[RUNNING_P2P]);
    answer_write(&mut c, &r);
    walk(&mut c, &[STOP]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!request_within(&mut c, 100), "no DMA while stopped");
    assert_eq!(
        read_at(&ram, 0, 64),
        vec![0; 64],
        "the queued command did not run"
    );
    walk(&mut c, &[RUNNING_P2P, RUNNING]);
    let r = dma_write_request(&mut c);
    assert_eq!(le64(&r.payload, 0), REMOTE, "run again from its start");
    answer_write(&mut c, &r);
    c.wait_done(2);
    assert_eq!(read_at(&ram, 0, 64), pattern(2, 64));
    assert_eq!((c.reg(REG_COMPLETED), c.reg(REG_VIOLATIONS)), (2, 0));
    c.finish().unwrap();
}

/// Pseudo-random payloads for DEVICE_FEATURE and MIG_DATA_* in several states: every one gets
/// a reply (success or errno), and the session stays clean.
#[test]
fn garbage_migration_messages_get_replies() {
    for start in [RUNNING, PRE_COPY, RESUMING] {
        let mut c = Client::negotiated();
        match start {
            PRE_COPY => walk(&mut c, &[PRE_COPY]),
            RESUMING => walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]),
            _ => {}
        }
        for seed in 0..60u32 {
            let len = (seed * 7 % 70) as usize;
            let mut p: Vec<u8> = (0..len as u32).map(|i| pattern_byte(seed, i)).collect();
            // Some with a plausible argsz and flags, to get past the first checks.
            if len >= 8 && seed % 2 == 0 {
                p[..4].copy_from_slice(&64u32.to_le_bytes());
                let f = [GET, SET, PROBE | GET][seed as usize % 3] | (seed % 10);
                p[4..8].copy_from_slice(&f.to_le_bytes());
            }
            for cmd in [DEVICE_FEATURE, MIG_DATA_READ, MIG_DATA_WRITE] {
                let m = c.call(cmd, &p);
                assert_eq!(m.flags & 0xf, 1, "a reply");
            }
        }
        c.finish().expect("still a clean session");
    }
}

fn eio() -> u32 {
    libc::EIO as u32
}

/// The default device with `faults`.
fn faulty(faults: Faults) -> Client {
    Client::negotiated_opts(testdev::Options {
        faults,
        ..test_options()
    })
}

/// `--fail-arc RUNNING:RUNNING_P2P:2 --fail-arc STOP:STOP_COPY`: only those requests fail,
/// with EIO, and the state stays; retrying works.
#[test]
fn fail_arc_fails_the_nth_request_only() {
    use DeviceState::*;
    let mut c = faulty(Faults {
        fail_arcs: vec![
            ArcFault {
                from: Running,
                to: RunningP2p,
                nth: 2,
            },
            ArcFault {
                from: Stop,
                to: StopCopy,
                nth: 1,
            },
        ],
        ..Faults::default()
    });
    walk(&mut c, &[RUNNING_P2P, RUNNING]);
    assert_eq!(set_state(&mut c, RUNNING_P2P).unwrap_err(), eio(), "2nd");
    assert_eq!(get_state(&mut c), RUNNING, "unchanged");
    assert_eq!(set_state(&mut c, RUNNING).unwrap(), (), "not an arc");
    walk(&mut c, &[RUNNING_P2P, STOP]);
    assert_eq!(set_state(&mut c, STOP_COPY).unwrap_err(), eio());
    assert_eq!(get_state(&mut c), STOP);
    assert_eq!(
        c.call(MIG_DATA_READ, &fields(&[(72, 4), (64, 4)])).errno(),
        einval(),
        "no session started"
    );
    walk(&mut c, &[STOP_COPY]);
    let s = mig_read_all(&mut c, 1 << 20);
    assert_eq!(
        s.len() as u64,
        testdev::migration::full_stream_len(DEVICE_MEMORY_SIZE as usize, 0)
    );
    walk(&mut c, &[STOP, RUNNING_P2P, RUNNING]);
    assert_eq!(c.reg(REG_VIOLATIONS), 0);
    c.finish().unwrap();
}

/// `--fail-read-after 10000`: PRE_COPY reads do not count; in STOP_COPY the read after 10000
/// bytes fails with EIO, once; the reads after it continue the stream, which loads.
#[test]
fn fail_read_after_fails_one_read_and_the_stream_continues() {
    let mut c = faulty(Faults {
        fail_read_after: Some(10_000),
        ..Faults::default()
    });
    walk(&mut c, &[RUNNING_P2P, PRE_COPY_P2P]);
    let mut stream = Vec::new();
    for _ in 0..5 {
        stream.extend(mig_read(&mut c, 4096));
    }
    assert_eq!(stream.len(), 5 * 4096, "PRE_COPY_P2P bytes");
    walk(&mut c, &[STOP_COPY]);
    for _ in 0..3 {
        stream.extend(mig_read(&mut c, 4096));
    }
    let read = |c: &mut Client| c.call(MIG_DATA_READ, &fields(&[(8 + 4096, 4), (4096, 4)]));
    assert_eq!(read(&mut c).errno(), eio(), "12288 bytes read");
    assert_eq!(get_state(&mut c), STOP_COPY, "the session stays");
    stream.extend(mig_read_all(&mut c, 4096));
    walk(&mut c, &[STOP]);
    // A second saving session: the fault fired already.
    walk(&mut c, &[STOP_COPY]);
    let again = mig_read_all(&mut c, 4096);
    assert_eq!(
        again.len() as u64,
        testdev::migration::full_stream_len(DEVICE_MEMORY_SIZE as usize, 0)
    );
    c.finish().unwrap();
    let mut t = Client::negotiated();
    walk(&mut t, &[RUNNING_P2P, STOP, RESUMING]);
    mig_write_all(&mut t, &stream).unwrap();
    walk(&mut t, &[STOP, RUNNING_P2P, RUNNING]);
    t.finish().unwrap();
}

/// `--reject-resume`: good data is written, but RESUMING -> STOP fails with EINVAL and the
/// device is in ERROR; a reset leaves it, and the next try fails the same way.
#[test]
fn reject_resume_sends_the_device_to_error() {
    let good = saved_stream();
    let mut c = faulty(Faults {
        reject_resume: true,
        ..Faults::default()
    });
    for _ in 0..2 {
        walk(&mut c, &[RUNNING_P2P, STOP, RESUMING]);
        mig_write_all(&mut c, &good).unwrap();
        assert_eq!(set_state(&mut c, STOP).unwrap_err(), einval());
        assert_eq!(get_state(&mut c), ERROR);
        assert_eq!(set_state(&mut c, RUNNING).unwrap_err(), einval());
        c.call(RESET, &[]).ok();
        assert_eq!(get_state(&mut c), RUNNING);
    }
    // The saving side is untouched.
    walk(&mut c, &[RUNNING_P2P, STOP, STOP_COPY]);
    assert_eq!(mig_read_all(&mut c, 1 << 20).len(), good.len());
    c.finish().unwrap();
}

/// Sends SET MIG_DEVICE_STATE `state` and expects no reply: the connection closes.
fn set_state_gets_eof(c: &mut Client, state: u32) {
    let mut p = fields(&[(16, 4), ((SET | MIG_STATE) as u64, 4)]);
    p.extend(fields(&[(state as u64, 4), (u32::MAX as u64, 4)]));
    c.send_raw(&message(7, DEVICE_FEATURE, 0, &p), &[]);
    assert!(c.recv().is_none(), "no reply, the connection closed");
}

/// `--exit-on-arc STOP_COPY:STOP`, in-process: the session ends without a reply with
/// `Error::InjectedExit`; other arcs work before it.
#[test]
fn exit_on_arc_ends_the_session_without_a_reply() {
    let mut c = faulty(Faults {
        exit_on_arcs: vec![(DeviceState::StopCopy, DeviceState::Stop)],
        ..Faults::default()
    });
    walk(&mut c, &[RUNNING_P2P, STOP, STOP_COPY]);
    let _ = mig_read(&mut c, 4096);
    set_state_gets_eof(&mut c, STOP);
    assert!(matches!(c.finish(), Err(testdev::Error::InjectedExit)));
}

/// The binary: `--exit-on-arc RUNNING:RUNNING_P2P` exits with code 3 when the arc is
/// requested, without replying, and removes its socket.
#[test]
fn binary_exits_with_code_3_on_the_arc() {
    let dir = std::env::temp_dir().join(format!("skiff-testdev-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("td.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff-testdev"))
        .args(["--socket", path.to_str().unwrap(), "--id", "exit"])
        .args(["--exit-on-arc", "RUNNING:RUNNING_P2P"])
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
    let mut c = Client::over(sock);
    c.version("{}");
    walk(&mut c, &[RUNNING]);
    set_state_gets_eof(&mut c, RUNNING_P2P);
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
    assert_eq!(status.code(), Some(3), "{status:?}");
    assert!(!path.exists(), "socket file removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--memory-mib 4 --fill-memory SEED`: BAR 2 is 4 MiB everywhere the client sees it (region
/// info, the memfd, config space BAR sizing), starts filled with the pattern, and migrates
/// (PRE_COPY, a changed chunk re-sent, STOP_COPY) into a 4 MiB device; a device of the default
/// size refuses the stream as foreign.
#[test]
fn a_larger_filled_device_memory_migrates_whole() {
    const SIZE: u64 = 4 << 20;
    let big = |fill_seed| testdev::Options {
        memory_size: SIZE,
        fill_seed,
        ..test_options()
    };
    let mut src = Client::negotiated_opts(big(Some(0x5eed)));
    let info = src.call(
        GET_REGION_INFO,
        &fields(&[(64, 4), (0, 4), (2, 4), (0, 4), (0, 8), (0, 8)]),
    );
    let info = info.ok();
    assert_eq!(le64(&info.payload, 16), SIZE, "region size");
    assert_eq!(le64(&info.payload, 56), SIZE, "the sparse mmap area");
    let mem = info.fds.into_iter().next().unwrap();
    assert_eq!(mem.metadata().unwrap().len(), SIZE);
    let want: Vec<u8> = (0..SIZE as u32).map(|i| pattern_byte(0x5eed, i)).collect();
    assert_eq!(read_at(&mem, 0, SIZE as usize), want, "filled at start");
    src.region_write(7, 0x18, &[0xff; 4]).unwrap();
    assert_eq!(src.region_read(7, 0x18, 4).unwrap(), [0x0c, 0, 0xc0, 0xff]);
    src.region_write(7, 0x18, &[0; 4]).unwrap();

    walk(&mut src, &[PRE_COPY]);
    let mut stream = mig_read_all(&mut src, 1 << 20);
    assert!(stream.len() > SIZE as usize, "every chunk once");
    write_at(&mem, SIZE - 4096, b"changed while pre-copying");
    walk(&mut src, &[PRE_COPY_P2P, STOP_COPY]);
    let rest = mig_read_all(&mut src, 1 << 20);
    assert!(
        rest.len() < 3 * 4096,
        "STOP_COPY: the changed chunk and the state"
    );
    stream.extend(rest);
    walk(&mut src, &[STOP]);
    assert_eq!(src.reg(REG_VIOLATIONS), 1, "the BAR0 read in STOP only");

    let mut small = Client::negotiated();
    walk(&mut small, &[RUNNING_P2P, STOP, RESUMING]);
    assert_eq!(mig_write_all(&mut small, &stream), Err(einval()), "foreign");
    small.finish().unwrap();

    let mut dst = Client::negotiated_opts(big(None));
    walk(&mut dst, &[RUNNING_P2P, STOP, RESUMING]);
    mig_write_all(&mut dst, &stream).unwrap();
    walk(&mut dst, &[STOP, RUNNING_P2P, RUNNING]);
    let mut got = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(1 << 20) {
        got.extend(dst.region_read(2, off, 1 << 20).unwrap());
    }
    let mut want = want;
    want[SIZE as usize - 4096..SIZE as usize - 4096 + 25]
        .copy_from_slice(b"changed while pre-copying");
    assert_eq!(got, want, "the target's memory");
    assert_eq!(
        dst.reg(REG_VIOLATIONS),
        0,
        "saved before the source's BAR0 read"
    );
    src.finish().unwrap();
    dst.finish().unwrap();
}
