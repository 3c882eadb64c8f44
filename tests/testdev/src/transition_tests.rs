//! Unit tests of the incremental arcs (`transition.rs`): late writes after STOP_COPY counted by
//! the chunk, device memory loaded in RESUMING as it arrives, refused streams.

use super::*;
use crate::device::DeviceState::*;
use crate::mem::memfd;
use crate::migration::CHUNK;
use crate::regs::{pattern_byte, DEVICE_MEMORY_SIZE};

const SIZE: usize = DEVICE_MEMORY_SIZE as usize;

fn memory() -> Mapping {
    let fd = memfd("test-bar2", DEVICE_MEMORY_SIZE).unwrap();
    Mapping::new(&fd, 0, DEVICE_MEMORY_SIZE, true).unwrap()
}

fn filled(seed: u32) -> Mapping {
    let mem = memory();
    let b: Vec<u8> = (0..SIZE as u32).map(|i| pattern_byte(seed, i)).collect();
    assert!(mem.write(0, &b));
    mem
}

fn contents(mem: &Mapping) -> Vec<u8> {
    let mut b = vec![0u8; SIZE];
    assert!(mem.read(0, &mut b));
    b
}

fn walk(d: &mut Device, mem: &Mapping, states: &[DeviceState]) {
    for &s in states {
        d.set_state(s, mem)
            .unwrap_or_else(|e| panic!("{:?} -> {s:?}: errno {e}", d.state));
    }
}

/// Reads everything the saving session has now.
fn drain(d: &mut Device, mem: &Mapping) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = d.mig_data_read(mem, 1 << 20).unwrap();
        if b.is_empty() {
            return out;
        }
        out.extend(b);
    }
}

/// A source device PRE_COPY'd to the end, then in STOP_COPY: the stream and its two parts'
/// boundary.
fn pre_copied_source(mem: &Mapping) -> (Device, Vec<u8>, usize) {
    let mut d = Device::default();
    walk(&mut d, mem, &[PreCopy]);
    let mut stream = drain(&mut d, mem);
    // Changes while pre-copying are sent again.
    assert!(mem.write(3 * CHUNK as u64 + 5, b"changed in PRE_COPY"));
    stream.extend(drain(&mut d, mem));
    let pre = stream.len();
    walk(&mut d, mem, &[PreCopyP2p, StopCopy]);
    stream.extend(drain(&mut d, mem));
    (d, stream, pre)
}

#[test]
fn a_late_write_to_one_chunk_after_stop_copy_is_counted_and_one_before_is_not() {
    let mem = filled(3);
    let mut d = Device::default();
    walk(&mut d, &mem, &[PreCopy, PreCopyP2p]);
    let _ = drain(&mut d, &mem);
    // Before STOP_COPY (PRE_COPY_P2P still accepts peer writes): saved with the state.
    assert!(mem.write(10 * CHUNK as u64, b"in time"));
    d.peer_region_write(&mem, 11 * CHUNK as u64, b"in time too");
    walk(&mut d, &mem, &[StopCopy]);
    assert_eq!(d.viol.late_peer_write, 0, "nothing late yet");
    // After: one chunk through the mapping (twice: still one chunk), and one by message.
    assert!(mem.write(20 * CHUNK as u64, b"late"));
    assert!(mem.write(20 * CHUNK as u64 + 100, b"late again"));
    let _ = drain(&mut d, &mem);
    walk(&mut d, &mem, &[Stop]);
    assert_eq!(
        d.viol.late_peer_write, 0,
        "inside the frozen states: not looked at yet"
    );
    d.peer_region_write(&mem, 30 * CHUNK as u64, b"late by message");
    assert_eq!(d.viol.late_peer_write, 1, "the message, at once");
    d.check_late_writes(&mem);
    assert_eq!(
        d.viol.late_peer_write, 2,
        "the mapping write: its one chunk"
    );
    d.check_late_writes(&mem);
    assert_eq!(d.viol.late_peer_write, 2, "counted once");
    // A REGION_WRITE checks the chunks it writes: a mapping write there is counted with it.
    assert!(mem.write(40 * CHUNK as u64, b"late"));
    d.peer_region_write(&mem, 40 * CHUNK as u64 + 8, b"and a message");
    assert_eq!(d.viol.late_peer_write, 4);
    // Leaving the frozen states counts what is left; afterwards writes are fine again.
    assert!(mem.write(50 * CHUNK as u64, b"late"));
    walk(&mut d, &mem, &[RunningP2p]);
    assert_eq!(d.viol.late_peer_write, 5);
    assert!(mem.write(60 * CHUNK as u64, b"fine"));
    d.peer_region_write(&mem, 61 * CHUNK as u64, b"fine");
    walk(&mut d, &mem, &[Running]);
    assert_eq!(d.viol.late_peer_write, 5);
}

#[test]
fn memory_is_applied_in_resuming_as_it_arrives_and_equals_the_source() {
    let src_mem = filled(7);
    let (_src, stream, pre) = pre_copied_source(&src_mem);
    for piece in [stream.len(), 1000, 4096 + 17] {
        let mem = memory();
        let mut t = Device::default();
        walk(&mut t, &mem, &[RunningP2p, Stop, Resuming]);
        for p in stream[..pre].chunks(piece) {
            t.mig_data_write(p, &mem).unwrap();
        }
        // Every chunk was pre-copied: the memory is the source's already, before the
        // STOP_COPY part (which re-sends nothing) and before RESUMING -> STOP.
        assert_eq!(contents(&mem), contents(&src_mem), "pieces of {piece}");
        assert_eq!(t.state, Resuming);
        for p in stream[pre..].chunks(piece) {
            t.mig_data_write(p, &mem).unwrap();
        }
        walk(&mut t, &mem, &[Stop, RunningP2p, Running]);
        assert_eq!(contents(&mem), contents(&src_mem));
        assert_eq!(t.viol.total(), 0, "loading is not a late write");
    }
}

#[test]
fn a_write_before_its_chunk_is_loaded_is_counted_when_the_chunk_arrives() {
    let src_mem = filled(5);
    let (_src, stream, _) = pre_copied_source(&src_mem);
    let mem = memory();
    let mut t = Device::default();
    walk(&mut t, &mem, &[RunningP2p, Stop, Resuming]);
    assert!(mem.write(2 * CHUNK as u64, b"overwritten by the load"));
    t.mig_data_write(&stream[..100 * CHUNK], &mem).unwrap();
    assert_eq!(t.viol.late_peer_write, 1, "chunk 2 was loaded over it");
    t.mig_data_write(&stream[100 * CHUNK..], &mem).unwrap();
    walk(&mut t, &mem, &[Stop, RunningP2p, Running]);
    assert_eq!(t.viol.late_peer_write, 1);
    assert_eq!(contents(&mem), contents(&src_mem));
}

#[test]
fn a_truncated_or_corrupt_stream_is_refused_at_resuming_to_stop() {
    let src_mem = filled(9);
    let (src, stream, _) = pre_copied_source(&src_mem);
    assert_eq!(src.state, StopCopy);
    // Truncated (in the DEVICE record): refused, stays in RESUMING, registers untouched.
    let mem = memory();
    let mut t = Device::default();
    t.regs.seed = 0x1234;
    walk(&mut t, &mem, &[RunningP2p, Stop, Resuming]);
    let cut = stream.len() - 40;
    t.mig_data_write(&stream[..cut], &mem).unwrap();
    assert_eq!(t.set_state(Stop, &mem), Err(libc::EINVAL));
    assert_eq!(t.state, Resuming);
    assert_eq!(t.regs.seed, 0x1234, "the device state is not loaded");
    // The rest completes it.
    t.mig_data_write(&stream[cut..], &mem).unwrap();
    walk(&mut t, &mem, &[Stop]);
    assert_eq!(contents(&mem), contents(&src_mem));
    // Truncated inside the memory records: refused the same way.
    let mem = memory();
    let mut t = Device::default();
    walk(&mut t, &mem, &[RunningP2p, Stop, Resuming]);
    t.mig_data_write(&stream[..SIZE / 2], &mem).unwrap();
    assert_eq!(t.set_state(Stop, &mem), Err(libc::EINVAL));
    assert_eq!(t.state, Resuming);
    // Corrupt after some chunks were applied: the write and the arc fail, the device goes to
    // ERROR (not a loaded state) and only a reset leaves it.
    let mem = memory();
    let mut t = Device::default();
    t.regs.seed = 0x1234;
    walk(&mut t, &mem, &[RunningP2p, Stop, Resuming]);
    let mut bad = stream.clone();
    bad[SIZE / 2] ^= 1;
    assert_eq!(t.mig_data_write(&bad, &mem), Err(libc::EINVAL));
    assert_eq!(t.set_state(Stop, &mem), Err(libc::EINVAL));
    assert_eq!(t.state, Error);
    assert_eq!(t.regs.seed, 0x1234);
    assert_eq!(t.set_state(Running, &mem), Err(libc::EINVAL));
    t.reset();
    assert_eq!(t.state, Running);
}
