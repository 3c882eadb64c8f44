//! The frame layer: the stream start, and frames with their CRCs and the running chain.
//!
//! A frame's CRC starts with its index in the stream (u64 LE, not sent; the first frame after
//! the start is 0), then covers kind, length and payload. The index matters: two frames with
//! the same bytes (a page sent twice, an empty chunk) would otherwise have the same CRC, and
//! swapping or repeating them would change neither the frame CRCs nor their chain. (In protocol
//! version 1, RAM records carried their own CRC, and a CRC32 run over data followed by that
//! data's CRC32 ends in the same state whatever the data: any two RAM frames with records of
//! the same shape had the same CRC.)

use std::io::{Read, Write};

use super::{Direction, FrameKind, Result, StreamError, MAX_FRAME_LEN, PROTOCOL_VERSION};
use crate::memory_file::read_up_to;

/// Bytes of the stream start: magic and version.
pub(crate) const START_LEN: usize = 12;
/// Bytes of a frame around its payload: kind, length, CRC.
pub(crate) const FRAME_OVERHEAD: usize = 9;

/// Totals of the frames written or read so far (what COMPLETE carries).
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    /// Frames, the start excluded.
    pub frames: u64,
    /// Bytes, the start included.
    pub bytes: u64,
    /// CRC32 of every frame CRC.
    pub chain: crc32fast::Hasher,
}

impl Totals {
    /// Count one frame with `len` bytes of payload and CRC `crc`.
    pub fn add(&mut self, crc: u32, len: usize) {
        self.frames += 1;
        self.bytes += (len + FRAME_OVERHEAD) as u64;
        self.chain.update(&crc.to_le_bytes());
    }

    /// The chain value so far.
    pub fn chain(&self) -> u32 {
        self.chain.clone().finalize()
    }
}

/// Writes the stream start and frames.
#[derive(Debug)]
pub(crate) struct FrameOut<W: Write> {
    pub out: W,
    pub totals: Totals,
    /// Time spent in the connection's writes (the link's share of sending).
    pub write_time: std::time::Duration,
}

impl<W: Write> FrameOut<W> {
    /// Write the start of a stream in `direction`.
    pub fn new(mut out: W, direction: Direction) -> Result<Self> {
        let mut start = [0u8; START_LEN];
        start[..8].copy_from_slice(&direction.magic());
        start[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.write_all(&start)?;
        Ok(Self {
            out,
            totals: Totals {
                bytes: START_LEN as u64,
                ..Totals::default()
            },
            write_time: std::time::Duration::ZERO,
        })
    }

    /// Write one frame whose payload is the concatenation of `parts`.
    pub fn write(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_FRAME_LEN)
            .ok_or_else(|| StreamError::Invalid {
                kind,
                reason: format!("{len} bytes of payload; a frame holds at most {MAX_FRAME_LEN}"),
            })?;
        let mut head = [0u8; 5];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&len32.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.totals.frames.to_le_bytes());
        crc.update(&head);
        for p in parts {
            crc.update(p);
        }
        let crc = crc.finalize();
        let started = std::time::Instant::now();
        self.out.write_all(&head)?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.out.write_all(&crc.to_le_bytes())?;
        self.write_time += started.elapsed();
        self.totals.add(crc, len);
        Ok(())
    }
}

/// How much a payload buffer grows at a time beyond what it held before.
const GROW_STEP: usize = 1 << 20;

/// Read `len` bytes into `payload` (resized to what was read); returns how many arrived (fewer
/// when the input ended). The buffer's old contents are overwritten in place (a recycled
/// buffer is neither cleared nor zeroed again), and it grows [`GROW_STEP`] at a time, with the
/// data actually present: a lying length in a short stream costs little.
fn read_payload<R: Read>(
    input: &mut R,
    payload: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < len {
        let end = payload.len().min(len);
        if filled == end {
            payload.resize(filled + (len - filled).min(GROW_STEP), 0);
            continue;
        }
        let got = read_up_to(input, &mut payload[filled..end])?;
        filled += got;
        if filled < end {
            break;
        }
    }
    payload.truncate(filled);
    Ok(filled)
}

/// One frame read and checked: its kind, payload, the stream offset it started at and its CRC.
/// The reader's totals do not include it until the caller [`Totals::add`]s it.
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
    pub offset: u64,
    pub crc: u32,
}

/// Reads and checks the stream start and frames.
#[derive(Debug)]
pub(crate) struct FrameIn<R: Read> {
    pub input: R,
    pub totals: Totals,
    /// A payload buffer given back by the caller, filled by the next read.
    pub spare: Option<Vec<u8>>,
}

impl<R: Read> FrameIn<R> {
    /// Read and check the start of a stream in `direction`.
    pub fn new(mut input: R, direction: Direction) -> Result<Self> {
        let mut start = [0u8; START_LEN];
        let got = read_up_to(&mut input, &mut start)?;
        let magic = direction.magic();
        let seen = got.min(magic.len());
        if start[..seen] != magic[..seen] {
            return Err(StreamError::BadMagic {
                expected: direction.name(),
                found: start[..seen].to_vec(),
            });
        }
        if got < START_LEN {
            return Err(StreamError::Truncated {
                offset: got as u64,
                what: "the stream start",
            });
        }
        let mut version = [0u8; 4];
        version.copy_from_slice(&start[8..]);
        let version = u32::from_le_bytes(version);
        if version != PROTOCOL_VERSION {
            return Err(StreamError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(Self {
            input,
            totals: Totals {
                bytes: START_LEN as u64,
                ..Totals::default()
            },
            spare: None,
        })
    }

    fn exact(&mut self, buf: &mut [u8], at: u64, what: &'static str) -> Result<()> {
        let got = read_up_to(&mut self.input, buf)?;
        if got < buf.len() {
            return Err(StreamError::Truncated {
                offset: at + got as u64,
                what,
            });
        }
        Ok(())
    }

    /// The next frame, checked; `Ok(None)` when the input ends cleanly before a frame. The frame
    /// starts at `totals.bytes`: the caller must add it to the totals before reading on.
    pub fn read(&mut self) -> Result<Option<RawFrame>> {
        let offset = self.totals.bytes;
        let mut head = [0u8; 5];
        let got = read_up_to(&mut self.input, &mut head)?;
        if got == 0 {
            return Ok(None);
        }
        if got < head.len() {
            return Err(StreamError::Truncated {
                offset: offset + got as u64,
                what: "a frame header",
            });
        }
        let kind = FrameKind::from_u8(head[0]).ok_or(StreamError::UnknownKind {
            offset,
            kind: head[0],
        })?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_FRAME_LEN {
            return Err(StreamError::Oversized {
                offset,
                len: u64::from(len),
                max: MAX_FRAME_LEN,
            });
        }
        let mut payload = self.spare.take().unwrap_or_default();
        let read = read_payload(&mut self.input, &mut payload, len as usize)?;
        if read < len as usize {
            return Err(StreamError::Truncated {
                offset: offset + 5 + read as u64,
                what: "a frame payload",
            });
        }
        let mut crc = [0u8; 4];
        self.exact(&mut crc, offset + 5 + u64::from(len), "a frame checksum")?;
        let mut computed = crc32fast::Hasher::new();
        computed.update(&self.totals.frames.to_le_bytes());
        computed.update(&head);
        computed.update(&payload);
        let computed = computed.finalize();
        if !crate::checksum_ok(u32::from_le_bytes(crc), computed) {
            return Err(StreamError::Checksum { offset, kind });
        }
        Ok(Some(RawFrame {
            kind,
            payload,
            offset,
            crc: computed,
        }))
    }
}
