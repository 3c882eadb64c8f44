//! Unit tests of the state stream (`migration.rs`): round trip, corruption, truncation, foreign
//! data, PRE_COPY re-sending, the concatenated stream.

use super::*;
use crate::device::DeviceState;
use crate::mem::memfd;
use crate::regs::{pattern_byte, CMD_COPY, CMD_P2P_WRITE, CMD_WRITE_PATTERN, DEVICE_MEMORY_SIZE};

/// The default device memory size, as the stream code takes it.
const SIZE: usize = DEVICE_MEMORY_SIZE as usize;

fn memory() -> Mapping {
    let fd = memfd("test-bar2", DEVICE_MEMORY_SIZE).unwrap();
    Mapping::new(&fd, 0, DEVICE_MEMORY_SIZE, true).unwrap()
}

fn fill(mem: &Mapping, seed: u32) {
    let b: Vec<u8> = (0..DEVICE_MEMORY_SIZE as u32)
        .map(|i| pattern_byte(seed, i))
        .collect();
    assert!(mem.write(0, &b));
}

fn contents(mem: &Mapping) -> Vec<u8> {
    let mut b = vec![0u8; DEVICE_MEMORY_SIZE as usize];
    assert!(mem.read(0, &mut b));
    b
}

fn cmd(code: u32, seed: u32) -> Command {
    Command {
        code,
        addr: 0x10_0000 + seed as u64,
        addr2: 0x20_0000,
        len: 4096 + seed,
        seed,
    }
}

/// A device with every part of its state away from power-on values.
fn busy_device(msi: bool) -> Device {
    let mut d = Device::new(msi);
    for (i, off) in (0..0x9c).step_by(4).enumerate() {
        if off != crate::regs::REG_DOORBELL {
            d.write_reg(off, 0x1111 * (i as u32 + 1));
        }
    }
    d.regs.result = 0xdead_beef_f00d;
    (d.regs.completed, d.regs.failed, d.regs.last_error) = (7, 2, 3);
    (d.regs.dma_written, d.regs.dma_read, d.regs.peer_writes) = (1000, 2000, 5);
    d.regs.stream_seq = 0x1_0000_0042;
    d.regs.stream_entries = 16;
    d.stream = Some(Stream {
        ring: 0x1000,
        entries: 16,
        peer: 0xe000_0000,
        period_us: 250,
        next_due: Instant::now(),
    });
    d.viol = Violations {
        dma_state: 1,
        mmio_state: 2,
        late_peer_write: 3,
        p2p_state: 4,
    };
    assert!(d.config.write(0x10, &[0xff; 4]));
    assert!(d.config.write(0x04, &[0x06, 0x04]));
    d.msix_table[5] = 0x55;
    d.msix_pba[1] = 0x80;
    d.current = Some(cmd(CMD_P2P_WRITE, 1));
    d.queue
        .extend([cmd(CMD_WRITE_PATTERN, 2), cmd(CMD_COPY, 3)]);
    d
}

fn stop_copy_stream(d: &Device, mem: &Mapping) -> Vec<u8> {
    let mut s = Saver::new(d.config.has_msi(), SIZE);
    s.finish(mem, &DeviceSnapshot::of(d));
    s.read(usize::MAX)
}

/// Loads `stream` written in pieces of `piece` bytes into a fresh device and memory (the
/// memory as it arrives, the device state once the stream checked out).
fn load(stream: &[u8], piece: usize, msi: bool) -> Result<(Device, Mapping), LoadError> {
    let mut l = Loader::new(msi, SIZE);
    let mut target = memory();
    for c in stream.chunks(piece) {
        if l.write(c, &mut target).is_err() {
            break;
        }
    }
    let snap = l.finish()?;
    let mut d = Device::new(msi);
    snap.restore(&mut d);
    Ok((d, target))
}

#[test]
fn crc32_known_value() {
    assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926);
    assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
    assert_eq!(crc32(&[]), 0);
}

#[test]
fn state_round_trips_into_a_fresh_device() {
    for msi in [false, true] {
        let d = busy_device(msi);
        let mem = memory();
        fill(&mem, 9);
        let stream = stop_copy_stream(&d, &mem);
        assert_eq!(stream.len() as u64, full_stream_len(SIZE, 3));
        for piece in [stream.len(), 1, 7, 4096, 65536 + 3] {
            let (t, tmem) = load(&stream, piece, msi).expect("a good stream loads");
            assert_eq!(contents(&tmem), contents(&mem), "memory, pieces of {piece}");
            let (a, b) = (DeviceSnapshot::of(&d), DeviceSnapshot::of(&t));
            assert_eq!(a, b, "device state, pieces of {piece}");
            assert_eq!(
                t.queue.len(),
                3,
                "the executing command first, then the queue"
            );
            assert_eq!(t.queue[0], cmd(CMD_P2P_WRITE, 1));
            assert!(t.current.is_none());
            assert_eq!(t.config.has_msi(), msi);
            assert_eq!(
                t.state,
                DeviceState::Running,
                "restore leaves the state to the FSM"
            );
        }
    }
}

#[test]
fn violations_are_added_to_the_targets() {
    let d = busy_device(false);
    let stream = stop_copy_stream(&d, &memory());
    let mut l = Loader::new(false, SIZE);
    l.write(&stream, &mut memory()).unwrap();
    let mut t = Device::new(false);
    t.viol.late_peer_write = 10;
    l.finish().unwrap().restore(&mut t);
    assert_eq!(t.viol.late_peer_write, 13);
    assert_eq!(t.viol.total(), 1 + 2 + 13 + 4);
}

#[test]
fn corrupt_foreign_and_truncated_streams_are_refused() {
    let d = busy_device(false);
    let mem = memory();
    fill(&mem, 1);
    let good = stop_copy_stream(&d, &mem);
    let corrupt = |s: &[u8]| match load(s, 5000, false) {
        Err(LoadError::Corrupt(e)) => e,
        other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
    };
    // A flipped bit anywhere: header magic, a memory chunk, a CRC, the DEVICE record, END.
    let dev_at = good.len() - (OVERHEAD + END_LEN) - (OVERHEAD + DeviceSnapshot::encoded_len(3));
    for at in [
        8,
        OVERHEAD + HEADER_LEN + 100,
        OVERHEAD + HEADER_LEN + OVERHEAD + MEMORY_LEN - 1,
        dev_at + 40,
        good.len() - 5,
        good.len() - 1,
    ] {
        let mut s = good.clone();
        s[at] ^= 0x10;
        corrupt(&s);
    }
    // Random bytes, an empty-but-plausible record, a huge length, data after END.
    corrupt(
        &(0..4096u32)
            .map(|i| pattern_byte(77, i))
            .collect::<Vec<_>>(),
    );
    corrupt(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    corrupt(&[2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let mut s = good.clone();
    s.push(0);
    corrupt(&s);
    // A dropped memory record: END's counts (and the missing chunk) give it away.
    let rec = OVERHEAD + MEMORY_LEN;
    let mut s = good[..OVERHEAD + HEADER_LEN].to_vec();
    s.extend_from_slice(&good[OVERHEAD + HEADER_LEN + rec..]);
    assert!(corrupt(&s).contains("END counts"));
    // A repeated record: the counts again.
    let mut s = good[..OVERHEAD + HEADER_LEN + rec].to_vec();
    s.extend_from_slice(&good[OVERHEAD + HEADER_LEN..]);
    assert!(corrupt(&s).contains("END counts"));
    // A well-formed header of another version, or of a device with a different capability.
    let mut h = header_body(false, SIZE);
    h[8] = 2;
    let mut s = Saver::new(false, SIZE);
    s.out.clear();
    s.emit(TAG_HEADER, &h);
    assert!(corrupt(&s.read(usize::MAX)).contains("version 2"));
    assert!(matches!(
        load(&good, 4096, true),
        Err(LoadError::Corrupt(_))
    ));
    // Truncated: at a record boundary or inside one, the data is incomplete, not corrupt.
    for cut in [
        1,
        5,
        OVERHEAD + END_LEN,
        OVERHEAD + END_LEN + 1,
        good.len() / 2,
    ] {
        match load(&good[..good.len() - cut], 4096, false) {
            Err(LoadError::Incomplete(_)) => {}
            other => panic!(
                "cut {cut}: expected Incomplete, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // Nothing written at all.
    assert!(matches!(
        Loader::new(false, SIZE).finish(),
        Err(LoadError::Incomplete(_))
    ));
    // A poisoned session stays poisoned, even when good data follows.
    let mut l = Loader::new(false, SIZE);
    let mut target = memory();
    assert!(l.write(&[0xff; 16], &mut target).is_err());
    assert!(l.write(&good, &mut target).is_err());
    assert_eq!(
        contents(&target),
        vec![0; SIZE],
        "nothing applied after the poison"
    );
    assert!(matches!(l.finish(), Err(LoadError::Corrupt(_))));
}

#[test]
fn pre_copy_resends_changed_chunks_and_the_whole_stream_reproduces_the_state() {
    let d = busy_device(false);
    let mem = memory();
    fill(&mem, 3);
    let mut s = Saver::new(false, SIZE);
    let mut pre = Vec::new();
    // The initial pass: header and every chunk once, in reads of an odd size.
    loop {
        s.fill(&mem, 10_000);
        let b = s.read(10_000);
        if b.is_empty() {
            break;
        }
        pre.extend(b);
    }
    let initial = OVERHEAD + HEADER_LEN + chunks(SIZE) * (OVERHEAD + MEMORY_LEN);
    assert_eq!(pre.len(), initial);
    s.fill(&mem, 10_000);
    assert_eq!(s.pending(), 0, "nothing changed: nothing more for now");
    // Two chunks change: exactly those two are sent again, with their new bytes.
    assert!(mem.write(5 * CHUNK as u64 + 17, b"changed"));
    assert!(mem.write(200 * CHUNK as u64, b"also"));
    let before = s.stop_copy_len(&mem, 3);
    s.fill(&mem, 1 << 20);
    let again = s.read(1 << 20);
    assert_eq!(again.len(), 2 * (OVERHEAD + MEMORY_LEN));
    let idx = |r: &[u8]| u32::from_le_bytes(r[8..12].try_into().unwrap());
    assert_eq!(
        (idx(&again), idx(&again[OVERHEAD + MEMORY_LEN..])),
        (5, 200)
    );
    assert_eq!(&again[12 + 17..12 + 24], b"changed");
    pre.extend(again);
    assert_eq!(
        before - s.stop_copy_len(&mem, 3),
        2 * (OVERHEAD + MEMORY_LEN) as u64
    );
    // One more change, then STOP_COPY: it carries that chunk, DEVICE and END.
    assert!(mem.write(0, b"last"));
    let expected = s.stop_copy_len(&mem, 3);
    s.finish(&mem, &DeviceSnapshot::of(&d));
    let stop = s.read(usize::MAX);
    assert_eq!(stop.len() as u64, expected, "MIG_DATA_SIZE was exact");
    assert_eq!(
        stop.len(),
        OVERHEAD + MEMORY_LEN + (stop.len() - OVERHEAD - MEMORY_LEN)
    );
    assert_eq!(s.stop_copy_len(&mem, 3), 0);
    // PRE_COPY bytes + STOP_COPY bytes, in any chunking, reproduce memory and state.
    let mut whole = pre;
    whole.extend(stop);
    for piece in [whole.len(), 3, 4099] {
        let (t, tmem) = load(&whole, piece, false).unwrap();
        assert_eq!(contents(&tmem), contents(&mem));
        assert_eq!(DeviceSnapshot::of(&t), DeviceSnapshot::of(&d));
    }
}

#[test]
fn the_stream_follows_the_memory_size_and_a_different_size_is_foreign() {
    let size = 4 * SIZE;
    let fd = memfd("test-bar2-4m", size as u64).unwrap();
    let mem = Mapping::new(&fd, 0, size as u64, true).unwrap();
    assert!(mem.write(size as u64 - 8, b"the end!"));
    let d = busy_device(false);
    let mut s = Saver::new(false, size);
    assert_eq!(s.stop_copy_len(&mem, 3), full_stream_len(size, 3));
    s.finish(&mem, &DeviceSnapshot::of(&d));
    let stream = s.read(usize::MAX);
    assert_eq!(stream.len() as u64, full_stream_len(size, 3));
    assert_eq!(
        full_stream_len(size, 3) - full_stream_len(SIZE, 3),
        (3 * chunks(SIZE) * (OVERHEAD + MEMORY_LEN)) as u64
    );
    let mut l = Loader::new(false, size);
    let mut target =
        Mapping::new(&memfd("t4m", size as u64).unwrap(), 0, size as u64, true).unwrap();
    l.write(&stream, &mut target).unwrap();
    let snap = l.finish().expect("same size loads");
    let mut end = [0u8; 8];
    assert!(target.read(size as u64 - 8, &mut end));
    assert_eq!(&end, b"the end!");
    assert_eq!(*snap, DeviceSnapshot::of(&d));
    // A device of another size refuses it at the header, and the other way round; nothing of
    // it is applied.
    let mut l = Loader::new(false, SIZE);
    let mut small_target = memory();
    let e = l.write(&stream, &mut small_target).unwrap_err();
    assert!(e.contains("memory 0x400000"), "{e}");
    assert_eq!(contents(&small_target), vec![0; SIZE]);
    let small = stop_copy_stream(&d, &memory());
    assert!(Loader::new(false, size).write(&small, &mut target).is_err());
}

#[test]
fn the_saved_memory_is_handed_over_once_after_stop_copy() {
    let mem = memory();
    fill(&mem, 11);
    let mut s = Saver::new(false, SIZE);
    s.fill(&mem, 10 * CHUNK);
    assert!(s.take_saved_memory().is_none(), "not before STOP_COPY");
    assert!(mem.write(7, b"late in pre-copy"));
    s.finish(&mem, &DeviceSnapshot::of(&busy_device(false)));
    assert_eq!(s.take_saved_memory().as_deref(), Some(&contents(&mem)[..]));
    assert!(s.take_saved_memory().is_none(), "once");
    assert!(s.stop_copy_len(&mem, 0) > 0, "the rest is still to read");
    // Nothing was read yet: the whole stream is pending, and still loads.
    let mut l = Loader::new(false, SIZE);
    let mut target = memory();
    l.write(&s.read(usize::MAX), &mut target).unwrap();
    assert!(l.finish().is_ok());
    assert_eq!(contents(&target), contents(&mem));
}
