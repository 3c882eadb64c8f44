//! Tests of the migration stream: messages, simulated migrations, bad input, and fuzzing.

mod bad_input;
mod fuzz;
mod messages;
mod migration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory_file::PAGE_SIZE;
use crate::ram::ZeroPages;
use crate::test_util::guest_mem;
use crate::{DirtyBitmap, StateSection};

type Mem = vm_memory::GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;

/// Two regions around a hole (scaled down).
fn layout() -> Vec<(u64, u64)> {
    vec![(0, 3 * MIB), (4 * MIB, MIB + 5 * PAGE_SIZE)]
}

fn mem(layout: &[(u64, u64)]) -> Mem {
    guest_mem(layout)
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A random page of `layout`.
fn random_page(rng: &mut Rng, layout: &[(u64, u64)]) -> u64 {
    let (gpa, len) = layout[rng.below(layout.len() as u64) as usize];
    gpa + rng.below(len / PAGE_SIZE) * PAGE_SIZE
}

/// The guest's workload: `writes` writes to random pages (some of them zeroing the page), each
/// marked in `dirty`.
fn dirty_pages(m: &Mem, dirty: &mut DirtyBitmap, rng: &mut Rng, writes: usize) {
    let layout = dirty.layout().to_vec();
    for _ in 0..writes {
        let page = random_page(rng, &layout);
        if rng.below(8) == 0 {
            m.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(page))
                .unwrap();
            dirty.mark(page, PAGE_SIZE).unwrap();
        } else {
            let at = page + rng.below(PAGE_SIZE - 8);
            m.write_slice(&rng.next().to_le_bytes(), GuestAddress(at))
                .unwrap();
            dirty.mark(at, 8).unwrap();
        }
    }
}

fn hello(connection: u16, connections: u16) -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: "skiff test".into(),
        features: vec![FEATURE_PRECOPY.into(), format!("connections={connections}")],
        connection,
        connections,
    })
}

fn config() -> Config {
    Config {
        vm_config: br#"{"cpus":{"boot_vcpus":2}}"#.to_vec(),
        host: vec![
            ("cpu.vendor".into(), "GenuineIntel".into()),
            ("cpu.family".into(), "6".into()),
            ("cpuid.7.0.ebx".into(), "0x029c6fbf".into()),
        ],
        ram: layout(),
        devices: vec![
            DeviceEntry {
                id: "serial0".into(),
                kind: "serial".into(),
                pci_address: None,
            },
            DeviceEntry {
                id: "disk0".into(),
                kind: "virtio-blk".into(),
                pci_address: Some("0000:00:03.0".into()),
            },
        ],
    }
}

fn sections() -> Vec<StateSection> {
    vec![
        StateSection {
            id: "cpu0".into(),
            version: 2,
            data: vec![1, 2, 3],
        },
        StateSection {
            id: "disk0".into(),
            version: 1,
            data: b"queue state".to_vec(),
        },
    ]
}

/// What a target received from its connections.
#[derive(Debug, Default)]
struct Received {
    stats: ApplyStats,
    state: Vec<StateSection>,
    precopy: Vec<(String, Vec<u8>)>,
    config: Option<Config>,
    ends: usize,
}

/// Receive `streams` (connections of one migration) into `target`, taking the next frame from a
/// connection picked by `rng` (each connection in order, the connections interleaved at random).
fn receive(streams: &[Vec<u8>], target: &Mem, rng: &mut Rng) -> Result<Received> {
    let mut receivers = streams
        .iter()
        .map(|s| MigrationReceiver::new(&s[..]))
        .collect::<Result<Vec<_>>>()?;
    let mut applier = RamApplier::new(&layout()).unwrap();
    let mut got = Received::default();
    let mut live: Vec<usize> = (0..receivers.len()).collect();
    while !live.is_empty() {
        let pick = rng.below(live.len() as u64) as usize;
        let rx = &mut receivers[live[pick]];
        match rx.recv()? {
            Message::Ram(frame) => {
                applier.apply(target, &frame)?;
                // As the target does: the next frame is read into this one's buffer.
                rx.recycle(frame);
            }
            Message::Config(c) => got.config = Some(c),
            Message::State(s) => got.state.extend(s),
            Message::DevicePrecopy { id, data } => got.precopy.push((id, data)),
            Message::IterationEnd(_) => got.ends += 1,
            Message::Complete(_) => {
                assert!(rx.is_complete());
                rx.expect_end()?;
                live.remove(pick);
            }
            Message::Abort(reason) => panic!("aborted: {reason}"),
            _ => {}
        }
    }
    got.stats = applier.stats();
    Ok(got)
}

/// Read frames (kind, payload) back out of a well-formed stream, without checks.
fn split_frames(stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut at = frame::START_LEN;
    let mut out = Vec::new();
    while at < stream.len() {
        let len = u32::from_le_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push((stream[at], stream[at + 5..at + 5 + len].to_vec()));
        at += len + frame::FRAME_OVERHEAD;
    }
    out
}

/// A stream start and these frames, each with a correct CRC.
fn join_frames(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = MIGRATION_MAGIC.to_vec();
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    for (index, (kind, payload)) in frames.iter().enumerate() {
        out.extend_from_slice(&raw_frame(index as u64, *kind, payload));
    }
    out
}

/// Frame number `index` with a correct CRC.
fn raw_frame(index: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&index.to_le_bytes());
    crc.update(&f);
    f.extend_from_slice(&crc.finalize().to_le_bytes());
    f
}

/// The frames of a stream as they were sent (bytes with their CRC), after the start.
fn split_raw(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut at = frame::START_LEN;
    let mut out = Vec::new();
    for (_, payload) in split_frames(stream) {
        let end = at + payload.len() + frame::FRAME_OVERHEAD;
        out.push(stream[at..end].to_vec());
        at = end;
    }
    out
}

/// A small complete one-connection migration of `source` (full pass, one dirty pass with a
/// ZERO page, state), with RAM frames of about `frame_bytes`.
fn small_stream(source: &Mem, frame_bytes: usize) -> Vec<u8> {
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    tx.set_ram_frame_bytes(frame_bytes);
    tx.send(&hello(0, 1)).unwrap();
    tx.send(&Message::Config(config())).unwrap();
    tx.send_ram(source, layout(), ZeroPages::Skip).unwrap();
    tx.end_iteration().unwrap();
    source
        .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(0x3000))
        .unwrap();
    source.write_slice(b"later", GuestAddress(0x5000)).unwrap();
    tx.send_ram(source, [(0x3000, 3 * PAGE_SIZE)], ZeroPages::Send)
        .unwrap();
    tx.end_iteration().unwrap();
    tx.send(&Message::DevicePrecopy {
        id: "disk0".into(),
        data: b"chunk".to_vec(),
    })
    .unwrap();
    tx.send(&Message::State(sections())).unwrap();
    tx.complete().unwrap().0
}

/// Source memory with a few non-zero pages.
fn small_source() -> Mem {
    let m = mem(&layout());
    for (i, gpa) in [0x1000u64, 0x3000, 0x4000, 0x9000, 4 * MIB + 0x2000]
        .into_iter()
        .enumerate()
    {
        m.write_slice(&[i as u8 + 1; 3000], GuestAddress(gpa))
            .unwrap();
    }
    m
}
