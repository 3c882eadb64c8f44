//! The device state stream: what MIG_DATA_READ produces in the saving states and MIG_DATA_WRITE
//! consumes in RESUMING. The bytes are opaque to the client (the kernel header: "the user must
//! consider the migration data stream ... to be opaque and must preserve the byte order"), so
//! the format is ours. It is versioned, self-describing and checksummed, so that a resuming
//! device refuses corrupt, truncated or foreign data.
//!
//! # Format (version 1, all integers little endian)
//!
//! A stream is a sequence of records: `tag u32, len u32, body[len], crc u32`, where `crc` is the
//! CRC-32 (IEEE, reflected, as zlib) of tag, len and body. Records, in order:
//!
//! 1. `HEADER` (tag 1, 32 bytes): magic `"SKTDSTAT"`, format version u32 (1), PCI vendor u16 and
//!    device u16, device memory size u64 (BAR 2's size, `--memory-mib`), chunk size u32
//!    ([`CHUNK`]), flags u32 (bit 0: the device has the MSI capability). Source and target must
//!    agree on the memory size and the flags.
//! 2. any number of `MEMORY` (tag 2, 4 + [`CHUNK`] bytes): chunk index u32, then the chunk's
//!    bytes of device memory (BAR2; [`chunks`] of them). A later record for the same chunk
//!    replaces an earlier one (PRE_COPY re-sends chunks that changed).
//! 3. one `DEVICE` (tag 3): registers, the latched stream, violation counters, config space,
//!    MSI-X table and PBA, and the command queue (the command that was executing first: it is
//!    run again from its start on the target). See [`DeviceSnapshot::encode`].
//! 4. `END` (tag 4, 12 bytes): the number of records before it u32 and their total bytes u64,
//!    so that a dropped or repeated piece of the stream is noticed.
//!
//! The stream of one saving session is produced in that order: PRE_COPY yields the header and
//! memory records (every chunk once, then chunks whose bytes changed since they were sent);
//! entering STOP_COPY produces the rest at once — the chunks still unsent or changed, the
//! DEVICE record and END — so the state is the one at the STOP_COPY arc. Concatenated, the
//! PRE_COPY and STOP_COPY bytes are one stream, which RESUMING accepts in any chunking.
//!
//! Every chunk must have been received at least once by END; anything after END, a record
//! before the header, an unknown tag, an oversized length or a bad CRC is corruption.

use std::collections::VecDeque;
use std::time::Instant;

use crate::config::CONFIG_SIZE;
use crate::device::{Command, Device, Regs, Stream, Violations};
use crate::mem::Mapping;
use crate::regs::{DEVICE_ID, MSIX_VECTORS, QUEUE_DEPTH, VENDOR_ID};

/// Stream magic (first body bytes of the HEADER record).
pub const MAGIC: [u8; 8] = *b"SKTDSTAT";
/// Format version.
pub const FORMAT_VERSION: u32 = 1;
/// Device memory is tracked and sent in chunks of this size.
pub const CHUNK: usize = 4096;

/// Number of chunks of a device memory of `mem_size` bytes (a multiple of [`CHUNK`]: a power of
/// two of at least 1 MiB).
pub fn chunks(mem_size: usize) -> usize {
    mem_size / CHUNK
}

const TAG_HEADER: u32 = 1;
const TAG_MEMORY: u32 = 2;
const TAG_DEVICE: u32 = 3;
const TAG_END: u32 = 4;
/// tag + len + crc.
const OVERHEAD: usize = 12;
const HEADER_LEN: usize = 32;
const MEMORY_LEN: usize = 4 + CHUNK;
const END_LEN: usize = 12;
const MSIX_TABLE_LEN: usize = 16 * MSIX_VECTORS as usize;
const COMMAND_LEN: usize = 28;
/// DEVICE record without its queue entries.
const DEVICE_FIXED_LEN: usize = 96 + 28 + 16 + CONFIG_SIZE + MSIX_TABLE_LEN + 8 + 4;
/// Commands a DEVICE record may carry: a full queue plus the one that was executing.
pub const MAX_SAVED_COMMANDS: usize = QUEUE_DEPTH + 1;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, reflected; zlib's `crc32`) of `parts` concatenated.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for p in parts {
        for &b in *p {
            c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// The latched stream parameters (without its timing, which restarts on the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamParams {
    /// Ring address.
    pub ring: u64,
    /// Ring entries.
    pub entries: u32,
    /// Peer address (0: none).
    pub peer: u64,
    /// Period in microseconds.
    pub period_us: u32,
}

/// Everything of the device's state except device memory (the DEVICE record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// Registers.
    pub regs: Regs,
    /// The stream, when started.
    pub stream: Option<StreamParams>,
    /// Violation counters (the target adds them to its own).
    pub viol: Violations,
    /// Config space bytes.
    pub config: [u8; CONFIG_SIZE],
    /// MSI-X table.
    pub msix_table: [u8; MSIX_TABLE_LEN],
    /// MSI-X PBA.
    pub msix_pba: [u8; 8],
    /// The executing command (restarted from its beginning), then the queued ones.
    pub queue: Vec<Command>,
}

/// Little-endian writer.
struct W(Vec<u8>);
impl W {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Little-endian reader over a record body; errors name what was missing.
struct R<'a>(&'a [u8]);
impl<'a> R<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record body too short".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
}

impl DeviceSnapshot {
    /// The device's state now (the executing command, if any, first in the queue).
    pub fn of(d: &Device) -> DeviceSnapshot {
        DeviceSnapshot {
            regs: d.regs.clone(),
            stream: d.stream.map(|s| StreamParams {
                ring: s.ring,
                entries: s.entries,
                peer: s.peer,
                period_us: s.period_us,
            }),
            viol: d.viol,
            config: *d.config.bytes(),
            msix_table: d.msix_table,
            msix_pba: d.msix_pba,
            queue: d.current.iter().chain(d.queue.iter()).copied().collect(),
        }
    }

    /// Loads the state into `d` (which keeps its eventfds and INTx mask). Violations are added
    /// to the target's own, so that neither side's are lost.
    pub fn restore(&self, d: &mut Device) {
        d.regs = self.regs.clone();
        d.stream = self.stream.map(|s| Stream {
            ring: s.ring,
            entries: s.entries,
            peer: s.peer,
            period_us: s.period_us,
            next_due: Instant::now(),
        });
        let v = &mut d.viol;
        v.dma_state = v.dma_state.wrapping_add(self.viol.dma_state);
        v.mmio_state = v.mmio_state.wrapping_add(self.viol.mmio_state);
        v.late_peer_write = v.late_peer_write.wrapping_add(self.viol.late_peer_write);
        v.p2p_state = v.p2p_state.wrapping_add(self.viol.p2p_state);
        d.config.load_bytes(&self.config);
        d.msix_table = self.msix_table;
        d.msix_pba = self.msix_pba;
        d.queue = self.queue.iter().copied().collect();
        d.current = None;
        d.generation = d.generation.wrapping_add(1);
    }

    /// Size of the encoded record body.
    pub fn encoded_len(commands: usize) -> usize {
        DEVICE_FIXED_LEN + COMMAND_LEN * commands
    }

    /// The DEVICE record body: registers (addr u64, addr2 u64, len u32, seed u32, result u64,
    /// completed, failed, last_error, irq_status, irq_control, dma_written, dma_read,
    /// peer_writes u32 each, stream_ring u64, stream_entries u32, stream_peer u64,
    /// stream_period_us u32, stream_seq u64); the stream (active u32, ring u64, entries u32,
    /// peer u64, period_us u32); violations (dma, mmio, late peer write, p2p: u32 each); config
    /// space (256 bytes); MSI-X table (32) and PBA (8); command count u32, then per command
    /// code u32, addr u64, addr2 u64, len u32, seed u32.
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.regs;
        let mut w = W(Vec::with_capacity(Self::encoded_len(self.queue.len())));
        w.u64(r.addr)
            .u64(r.addr2)
            .u32(r.len)
            .u32(r.seed)
            .u64(r.result);
        for v in [
            r.completed,
            r.failed,
            r.last_error,
            r.irq_status,
            r.irq_control,
            r.dma_written,
            r.dma_read,
            r.peer_writes,
        ] {
            w.u32(v);
        }
        w.u64(r.stream_ring)
            .u32(r.stream_entries)
            .u64(r.stream_peer);
        w.u32(r.stream_period_us).u64(r.stream_seq);
        let s = self.stream.unwrap_or(StreamParams {
            ring: 0,
            entries: 0,
            peer: 0,
            period_us: 0,
        });
        w.u32(self.stream.is_some() as u32)
            .u64(s.ring)
            .u32(s.entries);
        w.u64(s.peer).u32(s.period_us);
        let v = &self.viol;
        w.u32(v.dma_state).u32(v.mmio_state).u32(v.late_peer_write);
        w.u32(v.p2p_state);
        w.0.extend_from_slice(&self.config);
        w.0.extend_from_slice(&self.msix_table);
        w.0.extend_from_slice(&self.msix_pba);
        w.u32(self.queue.len() as u32);
        for c in &self.queue {
            w.u32(c.code)
                .u64(c.addr)
                .u64(c.addr2)
                .u32(c.len)
                .u32(c.seed);
        }
        w.0
    }

    /// Parses and checks a DEVICE record body.
    pub fn decode(body: &[u8]) -> Result<DeviceSnapshot, String> {
        let mut p = R(body);
        let mut r = Regs {
            addr: p.u64()?,
            addr2: p.u64()?,
            len: p.u32()?,
            seed: p.u32()?,
            result: p.u64()?,
            ..Regs::default()
        };
        for f in [
            &mut r.completed,
            &mut r.failed,
            &mut r.last_error,
            &mut r.irq_status,
            &mut r.irq_control,
            &mut r.dma_written,
            &mut r.dma_read,
            &mut r.peer_writes,
        ] {
            *f = p.u32()?;
        }
        (r.stream_ring, r.stream_entries, r.stream_peer) = (p.u64()?, p.u32()?, p.u64()?);
        (r.stream_period_us, r.stream_seq) = (p.u32()?, p.u64()?);
        let active = p.u32()?;
        let s = StreamParams {
            ring: p.u64()?,
            entries: p.u32()?,
            peer: p.u64()?,
            period_us: p.u32()?,
        };
        let stream = match active {
            0 => None,
            1 if s.entries.is_power_of_two() && s.entries <= 65536 => Some(s),
            _ => {
                return Err(format!(
                    "bad stream (active {active}, entries {})",
                    s.entries
                ))
            }
        };
        let viol = Violations {
            dma_state: p.u32()?,
            mmio_state: p.u32()?,
            late_peer_write: p.u32()?,
            p2p_state: p.u32()?,
        };
        let config = p.array::<CONFIG_SIZE>()?;
        let msix_table = p.array::<MSIX_TABLE_LEN>()?;
        let msix_pba = p.array::<8>()?;
        let n = p.u32()? as usize;
        if n > MAX_SAVED_COMMANDS {
            return Err(format!("{n} commands (at most {MAX_SAVED_COMMANDS})"));
        }
        let mut queue = Vec::with_capacity(n);
        for _ in 0..n {
            queue.push(Command {
                code: p.u32()?,
                addr: p.u64()?,
                addr2: p.u64()?,
                len: p.u32()?,
                seed: p.u32()?,
            });
        }
        if !p.0.is_empty() {
            return Err(format!("{} stray bytes after the DEVICE record", p.0.len()));
        }
        Ok(DeviceSnapshot {
            regs: r,
            stream,
            viol,
            config,
            msix_table,
            msix_pba,
            queue,
        })
    }
}

/// The HEADER record's body for a device with `mem_size` bytes of memory.
fn header_body(msi: bool, mem_size: usize) -> Vec<u8> {
    let mut w = W(MAGIC.to_vec());
    w.u32(FORMAT_VERSION);
    w.0.extend_from_slice(&VENDOR_ID.to_le_bytes());
    w.0.extend_from_slice(&DEVICE_ID.to_le_bytes());
    w.u64(mem_size as u64).u32(CHUNK as u32).u32(msi as u32);
    w.0
}

/// Bytes of a whole stream (no PRE_COPY) for a device with `mem_size` bytes of memory and
/// `commands` saved commands.
pub fn full_stream_len(mem_size: usize, commands: usize) -> u64 {
    (OVERHEAD + HEADER_LEN) as u64
        + ((OVERHEAD + MEMORY_LEN) * chunks(mem_size)) as u64
        + (OVERHEAD + DeviceSnapshot::encoded_len(commands)) as u64
        + (OVERHEAD + END_LEN) as u64
}

/// The saving side of one session (PRE_COPY / PRE_COPY_P2P / STOP_COPY).
#[derive(Debug)]
pub struct Saver {
    /// Produced, not yet read.
    out: VecDeque<u8>,
    /// Device memory as last sent.
    shadow: Vec<u8>,
    /// Chunks sent at least once.
    sent: Vec<bool>,
    /// Where the next scan for a chunk to send starts (round robin).
    cursor: usize,
    /// Records and bytes produced so far (for END).
    records: u32,
    bytes: u64,
    /// The STOP_COPY part has been produced.
    finished: bool,
}

impl Saver {
    /// A new session for a device with `mem_size` bytes of memory (BAR 2's size); the header
    /// is pending at once.
    pub fn new(msi: bool, mem_size: usize) -> Saver {
        let mut s = Saver {
            out: VecDeque::new(),
            shadow: vec![0; mem_size],
            sent: vec![false; chunks(mem_size)],
            cursor: 0,
            records: 0,
            bytes: 0,
            finished: false,
        };
        s.emit(TAG_HEADER, &header_body(msi, mem_size));
        s
    }

    fn emit(&mut self, tag: u32, body: &[u8]) {
        let (t, l) = (tag.to_le_bytes(), (body.len() as u32).to_le_bytes());
        let crc = crc32(&[&t, &l, body]).to_le_bytes();
        for part in [&t[..], &l[..], body, &crc[..]] {
            self.out.extend(part.iter().copied());
        }
        self.records += 1;
        self.bytes += (OVERHEAD + body.len()) as u64;
    }

    /// Whether chunk `i` must be sent: never sent, or its bytes differ from what was.
    fn needs_send(&self, mem: &Mapping, i: usize, buf: &mut [u8]) -> bool {
        let off = i * CHUNK;
        // BAR2 mapping and chunk offsets always agree; a failed read means "send it".
        if !mem.read(off as u64, buf) {
            return true;
        }
        !self.sent[i]
            || self
                .shadow
                .get(off..off + CHUNK)
                .is_none_or(|sent| buf[..] != *sent)
    }

    /// Sends the next chunk that needs it (scanning round robin); false when none does.
    fn send_next(&mut self, mem: &Mapping) -> bool {
        let mut buf = vec![0u8; CHUNK];
        let n = self.sent.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if self.needs_send(mem, i, &mut buf) {
                let off = i * CHUNK;
                if let Some(sent) = self.shadow.get_mut(off..off + CHUNK) {
                    sent.copy_from_slice(&buf);
                }
                self.sent[i] = true;
                let mut body = (i as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&buf);
                self.emit(TAG_MEMORY, &body);
                self.cursor = (i + 1) % n;
                return true;
            }
        }
        false
    }

    /// PRE_COPY: produces memory records until `want` bytes are pending or nothing changed.
    pub fn fill(&mut self, mem: &Mapping, want: usize) {
        while !self.finished && self.out.len() < want && self.send_next(mem) {}
    }

    /// STOP_COPY: produces the rest of the stream at once (remaining chunks, DEVICE, END).
    pub fn finish(&mut self, mem: &Mapping, dev: &DeviceSnapshot) {
        if self.finished {
            return;
        }
        while self.send_next(mem) {}
        self.emit(TAG_DEVICE, &dev.encode());
        let mut end = W(Vec::new());
        end.u32(self.records).u64(self.bytes);
        self.emit(TAG_END, &end.0);
        self.finished = true;
    }

    /// Once the STOP_COPY part was produced: device memory as it was saved (every chunk as
    /// last sent, which [`Saver::finish`] made the memory's bytes at the arc), handed over
    /// without a copy — what must not change from now on (`frozen.rs`). `None` before, and
    /// the second time.
    pub fn take_saved_memory(&mut self) -> Option<Vec<u8>> {
        (self.finished && !self.shadow.is_empty()).then(|| std::mem::take(&mut self.shadow))
    }

    /// Whether the STOP_COPY part was produced.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Takes at most `max` pending bytes.
    pub fn read(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.out.len());
        self.out.drain(..n).collect()
    }

    /// Bytes pending (produced, not read).
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Bytes the rest of the stream would take if STOP_COPY began now (`commands` saved
    /// commands); after STOP_COPY began, the bytes not yet read.
    pub fn stop_copy_len(&self, mem: &Mapping, commands: usize) -> u64 {
        if self.finished {
            return self.out.len() as u64;
        }
        let mut buf = vec![0u8; CHUNK];
        let chunks = (0..self.sent.len())
            .filter(|&i| self.needs_send(mem, i, &mut buf))
            .count();
        self.out.len() as u64
            + ((OVERHEAD + MEMORY_LEN) * chunks) as u64
            + (OVERHEAD + DeviceSnapshot::encoded_len(commands)) as u64
            + (OVERHEAD + END_LEN) as u64
    }
}

/// Why a RESUMING session cannot complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The data is corrupt, truncated inside a record, foreign or inconsistent.
    #[error("corrupt migration data: {0}")]
    Corrupt(String),
    /// The data so far is good but the stream has not ended (no END record yet).
    #[error("incomplete migration data: {0}")]
    Incomplete(String),
}

/// Where a resuming session puts device memory as it arrives: chunk `index` (in range; the
/// stream's header matched this device) now holds `bytes` ([`CHUNK`] of them).
pub trait ChunkSink {
    /// Applies one chunk; an error poisons the session.
    fn apply(&mut self, index: usize, bytes: &[u8]) -> Result<(), String>;
}

/// Writes chunk `index` of device memory `mem`.
pub fn write_chunk(mem: &Mapping, index: usize, bytes: &[u8]) -> Result<(), String> {
    let off = index.checked_mul(CHUNK).map(|o| o as u64);
    match off {
        Some(off) if mem.write(off, bytes) => Ok(()),
        _ => Err(format!("chunk {index} does not fit the device memory")),
    }
}

/// Straight into memory (no checks: the unit tests' target).
impl ChunkSink for Mapping {
    fn apply(&mut self, index: usize, bytes: &[u8]) -> Result<(), String> {
        write_chunk(self, index, bytes)
    }
}

/// The resuming side: parses the stream as it arrives. Device memory is applied record by
/// record as each MEMORY record arrives whole and checks out (CRC, after a matching header,
/// chunk in range), through the [`ChunkSink`] given to [`Loader::write`]; the rest of the
/// state (the DEVICE record) is staged and only handed out by [`Loader::finish`] once the whole
/// stream checked out (END, counts, every chunk received).
///
/// So a stream that turns out corrupt or truncated after some chunks were applied leaves
/// device memory partly loaded: the device never reports that as a success (RESUMING -> STOP
/// fails; corrupt: the device goes to ERROR, its memory undefined until the state is loaded
/// again, as with a real device; truncated: it stays in RESUMING for the rest).
#[derive(Debug)]
pub struct Loader {
    /// Bytes of a record not complete yet.
    partial: Vec<u8>,
    msi: bool,
    mem_size: usize,
    got: Vec<bool>,
    /// MEMORY records applied (a chunk sent twice counts twice).
    applied: usize,
    header: bool,
    device: Option<DeviceSnapshot>,
    end: bool,
    records: u32,
    bytes: u64,
    /// Set by the first bad record: the session cannot succeed any more.
    poisoned: Option<String>,
}

impl Loader {
    /// A session for a device whose MSI capability is `msi` and whose memory is `mem_size`
    /// bytes (the stream's header must say the same).
    pub fn new(msi: bool, mem_size: usize) -> Loader {
        Loader {
            partial: Vec::new(),
            msi,
            mem_size,
            got: vec![false; chunks(mem_size)],
            applied: 0,
            header: false,
            device: None,
            end: false,
            records: 0,
            bytes: 0,
            poisoned: None,
        }
    }

    /// Feeds `data`: each record completed by it is checked, and a MEMORY record applied to
    /// `sink` at once. An error poisons the session (every later write and the final check
    /// fail).
    pub fn write(&mut self, data: &[u8], sink: &mut dyn ChunkSink) -> Result<(), String> {
        if let Some(e) = &self.poisoned {
            return Err(format!("session already failed: {e}"));
        }
        self.partial.extend_from_slice(data);
        let res = self.take_records(sink);
        if let Err(e) = &res {
            self.poisoned = Some(e.clone());
            self.partial.clear();
        }
        res
    }

    fn take_records(&mut self, sink: &mut dyn ChunkSink) -> Result<(), String> {
        let mut at = 0;
        let res = loop {
            let rest = &self.partial[at..];
            if rest.is_empty() {
                break Ok(());
            }
            if self.end {
                break Err(format!("{} bytes after the END record", rest.len()));
            }
            if rest.len() < 8 {
                break Ok(());
            }
            let tag = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            let max = match tag {
                TAG_HEADER => HEADER_LEN,
                TAG_MEMORY => MEMORY_LEN,
                TAG_DEVICE => DeviceSnapshot::encoded_len(MAX_SAVED_COMMANDS),
                TAG_END => END_LEN,
                _ => break Err(format!("unknown record tag {tag:#x}")),
            };
            if len > max {
                break Err(format!("record tag {tag} of {len} bytes (at most {max})"));
            }
            if rest.len() < OVERHEAD + len {
                break Ok(());
            }
            let body = &rest[8..8 + len];
            let crc = u32::from_le_bytes(rest[8 + len..12 + len].try_into().unwrap_or_default());
            if crc32(&[&rest[..8], body]) != crc {
                break Err(format!("CRC mismatch in record tag {tag} ({len} bytes)"));
            }
            let body = body.to_vec();
            if let Err(e) = self.record(tag, &body, sink) {
                break Err(e);
            }
            at += OVERHEAD + len;
        };
        self.partial.drain(..at);
        res
    }

    fn record(&mut self, tag: u32, body: &[u8], sink: &mut dyn ChunkSink) -> Result<(), String> {
        if !self.header && tag != TAG_HEADER {
            return Err(format!("record tag {tag} before the header"));
        }
        match tag {
            TAG_HEADER if self.header => return Err("a second header".into()),
            TAG_HEADER => {
                if body.len() < 8 || body[..8] != MAGIC {
                    return Err("not a skiff-testdev state stream (bad magic)".into());
                }
                let mut p = R(&body[8..]);
                let version = p.u32()?;
                if version != FORMAT_VERSION {
                    return Err(format!(
                        "format version {version} (we read {FORMAT_VERSION})"
                    ));
                }
                let (vendor, device) = (p.u16()?, p.u16()?);
                let (size, chunk, flags) = (p.u64()?, p.u32()?, p.u32()?);
                if (vendor, device, size, chunk as usize)
                    != (VENDOR_ID, DEVICE_ID, self.mem_size as u64, CHUNK)
                {
                    return Err(format!(
                        "foreign device {vendor:04x}:{device:04x}, memory {size:#x} (this device's: {:#x}), chunk {chunk}",
                        self.mem_size
                    ));
                }
                if flags != self.msi as u32 {
                    return Err(format!(
                        "source flags {flags:#x}, this device's {:#x} (MSI capability differs)",
                        self.msi as u32
                    ));
                }
                self.header = true;
            }
            _ if self.device.is_some() && tag != TAG_END => {
                return Err(format!("record tag {tag} after the DEVICE record"));
            }
            TAG_MEMORY => {
                if body.len() != MEMORY_LEN {
                    return Err(format!("memory record of {} bytes", body.len()));
                }
                let i = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                if i >= self.got.len() {
                    return Err(format!(
                        "chunk index {i} (device memory has {})",
                        self.got.len()
                    ));
                }
                sink.apply(i, &body[4..])?;
                self.got[i] = true;
                self.applied += 1;
            }
            TAG_DEVICE => self.device = Some(DeviceSnapshot::decode(body)?),
            _ => self.end_record(body)?,
        }
        self.records += 1;
        self.bytes += (OVERHEAD + body.len()) as u64;
        Ok(())
    }

    fn end_record(&mut self, body: &[u8]) -> Result<(), String> {
        let mut p = R(body);
        let (records, bytes) = (p.u32()?, p.u64()?);
        if (records, bytes) != (self.records, self.bytes) {
            return Err(format!(
                "END counts {records} records / {bytes} bytes, we received {} / {}",
                self.records, self.bytes
            ));
        }
        if self.device.is_none() {
            return Err("END without a DEVICE record".into());
        }
        if let Some(i) = self.got.iter().position(|g| !g) {
            return Err(format!("chunk {i} of device memory never sent"));
        }
        self.end = true;
        Ok(())
    }

    /// MEMORY records applied so far (for the log).
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// The device state (memory was applied on the way), once the whole stream arrived and
    /// checked out.
    pub fn finish(&self) -> Result<&DeviceSnapshot, LoadError> {
        if let Some(e) = &self.poisoned {
            return Err(LoadError::Corrupt(e.clone()));
        }
        match &self.device {
            Some(d) if self.end => Ok(d),
            _ => Err(LoadError::Incomplete(format!(
                "{} records and {} bytes of a record so far, no END",
                self.records,
                self.partial.len()
            ))),
        }
    }
}

#[cfg(test)]
#[path = "migration_tests.rs"]
mod tests;
