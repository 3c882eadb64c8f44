//! The messages a frame carries, and their payload encoding.

use super::{FrameKind, Result, StreamError, MAX_CONNECTIONS};
use crate::codec::{StateReader, StateWriter};
use crate::dirty::validate_layout;
use crate::snapshot::{write_snapshot, SnapshotReader};
use crate::{StateError, StateSection};

/// HELLO feature: the source iterates over dirty RAM while the guest runs.
pub const FEATURE_PRECOPY: &str = "pre-copy";
/// HELLO feature: source and target share the host; RAM may move as a memfd instead of bytes.
pub const FEATURE_LOCAL_MEMFD: &str = "local-memfd";

/// The longest name, id, feature or host record value, in bytes.
const MAX_STRING: usize = 4096;
/// The longest REFUSE / ABORT / FAILED reason, in bytes.
const MAX_REASON: usize = 64 * 1024;
/// The most entries of a list (features, host record, devices).
const MAX_ITEMS: usize = 4096;
/// Bytes of a RAM frame's header: iteration and pages.
pub(crate) const RAM_HEAD: usize = 8;

/// The first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u32,
    /// The sending software and its version (e.g. `skiff 0.1.0`), for messages.
    pub software: String,
    /// Features the sender uses ([`FEATURE_PRECOPY`], [`FEATURE_LOCAL_MEMFD`], ...).
    pub features: Vec<String>,
    /// Index of this connection (0 carries CONFIG, STATE and the replies).
    pub connection: u16,
    /// Number of connections of the migration (1..=[`MAX_CONNECTIONS`]).
    pub connections: u16,
}

impl Hello {
    /// Whether the sender announced `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// One component of the VM, as the configuration handshake lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The component id (`serial0`, `disk0`, ...).
    pub id: String,
    /// Its kind (`virtio-blk`, `vfio`, ...).
    pub kind: String,
    /// Its PCI address, for PCI functions.
    pub pci_address: Option<String>,
}

/// What the target must accept before any state is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The VM configuration (JSON, opaque to this crate).
    pub vm_config: Vec<u8>,
    /// The host compatibility record: CPU vendor, family, model, feature bits, ... as
    /// `(name, value)` pairs the VMM fills.
    pub host: Vec<(String, String)>,
    /// The RAM layout, `(guest address, length)` regions in address order.
    pub ram: Vec<(u64, u64)>,
    /// Every component with its kind and PCI address.
    pub devices: Vec<DeviceEntry>,
}

impl Config {
    /// How the `local` (target) configuration differs from this (source) one, one line each:
    /// host record values, RAM layout, devices. Empty when they match.
    pub fn differences(&self, local: &Config) -> Vec<String> {
        let mut out = Vec::new();
        for (name, value) in &self.host {
            match local.host.iter().find(|(n, _)| n == name) {
                None => out.push(format!("host: the target has no {name} (source: {value})")),
                Some((_, v)) if v != value => {
                    out.push(format!("host: {name} is {v} here, {value} on the source"))
                }
                Some(_) => {}
            }
        }
        if self.ram != local.ram {
            out.push(format!(
                "RAM: {}",
                crate::memory_file::layout_mismatch(&self.ram, &local.ram)
            ));
        }
        for d in &self.devices {
            match local.devices.iter().find(|l| l.id == d.id) {
                None => out.push(format!("device {}: missing on the target", d.id)),
                Some(l) if l != d => out.push(format!(
                    "device {}: {} at {:?} here, {} at {:?} on the source",
                    d.id, l.kind, l.pci_address, d.kind, d.pci_address
                )),
                Some(_) => {}
            }
        }
        for l in &local.devices {
            if !self.devices.iter().any(|d| d.id == l.id) {
                out.push(format!("device {}: only on the target", l.id));
            }
        }
        out
    }
}

/// RAM records of one iteration; see [`super::RamApplier`] to apply them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFrame {
    /// The iteration the pages were read in.
    pub iteration: u32,
    /// Pages carried by the records (DATA and ZERO).
    pub pages: u32,
    /// The whole payload: the 8-byte header, then the records.
    payload: Vec<u8>,
}

impl RamFrame {
    /// A frame of `records` (bare [`crate::ram`] DATA/ZERO records, see
    /// [`crate::ram::RamWriter::bare`]) carrying `pages` pages.
    pub fn new(iteration: u32, pages: u32, records: &[u8]) -> Self {
        let mut payload = Vec::with_capacity(RAM_HEAD + records.len());
        payload.extend_from_slice(&iteration.to_le_bytes());
        payload.extend_from_slice(&pages.to_le_bytes());
        payload.extend_from_slice(records);
        Self {
            iteration,
            pages,
            payload,
        }
    }

    /// A frame from a payload whose first [`RAM_HEAD`] bytes are the header.
    pub(crate) fn from_payload(payload: Vec<u8>) -> std::result::Result<Self, StateError> {
        let mut r = StateReader::from_bytes("RAM", &payload);
        let iteration = r.u32()?;
        let pages = r.u32()?;
        Ok(Self {
            iteration,
            pages,
            payload,
        })
    }

    /// The RAM records: bare DATA/ZERO records, as [`crate::ram::RamWriter::bare`] writes them.
    pub fn records(&self) -> &[u8] {
        &self.payload[RAM_HEAD..]
    }

    /// The frame payload.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload buffer, to be reused.
    pub(crate) fn into_payload(self) -> Vec<u8> {
        self.payload
    }
}

/// The end of an iteration on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationEnd {
    /// The iteration that ended.
    pub iteration: u32,
    /// Pages this connection carried in it.
    pub pages: u64,
}

/// The last frame of a connection: totals of everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Frames before COMPLETE.
    pub frames: u64,
    /// Bytes before COMPLETE, the stream start included.
    pub bytes: u64,
    /// Pages in RAM frames.
    pub ram_pages: u64,
    /// ITERATION_END frames.
    pub iterations: u32,
    /// CRC32 of the CRC (u32 LE) of every frame before COMPLETE, in order.
    pub chain: u32,
}

/// One frame's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// HELLO.
    Hello(Hello),
    /// CONFIG.
    Config(Config),
    /// ACCEPT: the target takes the configuration.
    Accept,
    /// REFUSE: the target cannot take the configuration, and why.
    Refuse(String),
    /// RAM.
    Ram(RamFrame),
    /// DEVICE_PRECOPY: a chunk of component `id`'s pre-copy state.
    DevicePrecopy {
        /// Component id.
        id: String,
        /// The chunk, as [`crate::Migratable::precopy_read`] returned it.
        data: Vec<u8>,
    },
    /// STATE: sections saved after stop.
    State(Vec<StateSection>),
    /// ITERATION_END.
    IterationEnd(IterationEnd),
    /// COMPLETE.
    Complete(Complete),
    /// ABORT: the source gives up, and why.
    Abort(String),
    /// RESUMED: the target runs the VM.
    Resumed,
    /// READY: the target loaded the VM and waits for the commit.
    Ready,
    /// FAILED: the target could not load or run the VM, and why.
    Failed(String),
}

fn string(r: &mut StateReader<'_>, max: usize) -> std::result::Result<String, StateError> {
    let b = r.bytes(max)?;
    String::from_utf8(b.to_vec()).map_err(|_| r.malformed("a string is not UTF-8"))
}

/// A list count, bounded by `MAX_ITEMS` and by the bytes left (each item takes at least `min`).
fn count(r: &mut StateReader<'_>, min: usize) -> std::result::Result<usize, StateError> {
    let n = r.u32()? as usize;
    if n > MAX_ITEMS || n.saturating_mul(min) > r.remaining() {
        return Err(r.malformed(format!("a list of {n} entries does not fit")));
    }
    Ok(n)
}

fn put_str(w: &mut StateWriter, s: &str, max: usize, kind: FrameKind) -> Result<()> {
    if s.len() > max {
        return Err(StreamError::Invalid {
            kind,
            reason: format!("a string of {} bytes (at most {max})", s.len()),
        });
    }
    w.bytes(s.as_bytes());
    Ok(())
}

fn put_count(w: &mut StateWriter, n: usize, kind: FrameKind) -> Result<()> {
    if n > MAX_ITEMS {
        return Err(StreamError::Invalid {
            kind,
            reason: format!("a list of {n} entries (at most {MAX_ITEMS})"),
        });
    }
    w.u32(n as u32);
    Ok(())
}

impl Message {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::Config(_) => FrameKind::Config,
            Message::Accept => FrameKind::Accept,
            Message::Refuse(_) => FrameKind::Refuse,
            Message::Ram(_) => FrameKind::Ram,
            Message::DevicePrecopy { .. } => FrameKind::DevicePrecopy,
            Message::State(_) => FrameKind::State,
            Message::IterationEnd(_) => FrameKind::IterationEnd,
            Message::Complete(_) => FrameKind::Complete,
            Message::Abort(_) => FrameKind::Abort,
            Message::Resumed => FrameKind::Resumed,
            Message::Ready => FrameKind::Ready,
            Message::Failed(_) => FrameKind::Failed,
        }
    }

    /// The frame payload of this message (bounds checked; not the frame header or CRC).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let kind = self.kind();
        let mut w = StateWriter::new();
        match self {
            Message::Hello(h) => {
                w.u32(h.version);
                put_str(&mut w, &h.software, MAX_STRING, kind)?;
                put_count(&mut w, h.features.len(), kind)?;
                for f in &h.features {
                    put_str(&mut w, f, MAX_STRING, kind)?;
                }
                w.u16(h.connection).u16(h.connections);
            }
            Message::Config(c) => encode_config(&mut w, c)?,
            Message::Accept | Message::Resumed | Message::Ready => {}
            Message::Refuse(s) | Message::Abort(s) | Message::Failed(s) => {
                put_str(&mut w, s, MAX_REASON, kind)?
            }
            Message::Ram(f) => return Ok(f.payload.clone()),
            Message::DevicePrecopy { id, data } => {
                put_str(&mut w, id, MAX_STRING, kind)?;
                w.raw(data);
            }
            Message::State(sections) => {
                return write_snapshot(Vec::new(), sections)
                    .map_err(|source| StreamError::State { source })
            }
            Message::IterationEnd(e) => {
                w.u32(e.iteration).u64(e.pages);
            }
            Message::Complete(c) => {
                w.u64(c.frames)
                    .u64(c.bytes)
                    .u64(c.ram_pages)
                    .u32(c.iterations)
                    .u32(c.chain);
            }
        }
        Ok(w.into_bytes())
    }

    /// Decode the payload of a frame of `kind` (the frame was read at stream `offset`, for errors).
    pub fn decode(kind: FrameKind, payload: Vec<u8>, offset: u64) -> Result<Message> {
        let malformed = |source| StreamError::Malformed {
            offset,
            kind,
            source,
        };
        match kind {
            FrameKind::Ram => {
                return RamFrame::from_payload(payload)
                    .map(Message::Ram)
                    .map_err(malformed)
            }
            FrameKind::State => {
                return SnapshotReader::read_all(&payload[..])
                    .map(Message::State)
                    .map_err(|source| StreamError::State { source })
            }
            _ => {}
        }
        let mut r = StateReader::from_bytes(kind.name(), &payload);
        let msg = decode_fields(kind, &mut r).map_err(malformed)?;
        r.finish().map_err(malformed)?;
        Ok(msg)
    }
}

fn encode_config(w: &mut StateWriter, c: &Config) -> Result<()> {
    let kind = FrameKind::Config;
    w.bytes(&c.vm_config);
    put_count(w, c.host.len(), kind)?;
    for (name, value) in &c.host {
        put_str(w, name, MAX_STRING, kind)?;
        put_str(w, value, MAX_STRING, kind)?;
    }
    validate_layout(&c.ram).map_err(|reason| StreamError::Invalid { kind, reason })?;
    w.u32(c.ram.len() as u32);
    for &(gpa, len) in &c.ram {
        w.u64(gpa).u64(len);
    }
    put_count(w, c.devices.len(), kind)?;
    for d in &c.devices {
        put_str(w, &d.id, MAX_STRING, kind)?;
        put_str(w, &d.kind, MAX_STRING, kind)?;
        w.bool(d.pci_address.is_some());
        if let Some(a) = &d.pci_address {
            put_str(w, a, MAX_STRING, kind)?;
        }
    }
    Ok(())
}

fn decode_fields(
    kind: FrameKind,
    r: &mut StateReader<'_>,
) -> std::result::Result<Message, StateError> {
    Ok(match kind {
        FrameKind::Hello => decode_hello(r)?,
        FrameKind::Config => Message::Config(decode_config(r)?),
        FrameKind::Accept => Message::Accept,
        FrameKind::Resumed => Message::Resumed,
        FrameKind::Ready => Message::Ready,
        FrameKind::Refuse => Message::Refuse(string(r, MAX_REASON)?),
        FrameKind::Abort => Message::Abort(string(r, MAX_REASON)?),
        FrameKind::Failed => Message::Failed(string(r, MAX_REASON)?),
        FrameKind::DevicePrecopy => {
            let id = string(r, MAX_STRING)?;
            if id.is_empty() {
                return Err(r.malformed("empty component id"));
            }
            let data = r.raw(r.remaining())?.to_vec();
            Message::DevicePrecopy { id, data }
        }
        FrameKind::IterationEnd => Message::IterationEnd(IterationEnd {
            iteration: r.u32()?,
            pages: r.u64()?,
        }),
        FrameKind::Complete => Message::Complete(Complete {
            frames: r.u64()?,
            bytes: r.u64()?,
            ram_pages: r.u64()?,
            iterations: r.u32()?,
            chain: r.u32()?,
        }),
        // Decoded by the caller.
        FrameKind::Ram | FrameKind::State => return Err(r.malformed("not a field payload")),
    })
}

fn decode_hello(r: &mut StateReader<'_>) -> std::result::Result<Message, StateError> {
    let version = r.u32()?;
    let software = string(r, MAX_STRING)?;
    let n = count(r, 4)?;
    let features = (0..n)
        .map(|_| string(r, MAX_STRING))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let connection = r.u16()?;
    let connections = r.u16()?;
    if connections == 0 || connections > MAX_CONNECTIONS || connection >= connections {
        return Err(r.malformed(format!(
            "connection {connection} of {connections} (1 to {MAX_CONNECTIONS} connections)"
        )));
    }
    Ok(Message::Hello(Hello {
        version,
        software,
        features,
        connection,
        connections,
    }))
}

fn decode_config(r: &mut StateReader<'_>) -> std::result::Result<Config, StateError> {
    let vm_config = r.bytes(r.remaining())?.to_vec();
    let n = count(r, 8)?;
    let host = (0..n)
        .map(|_| Ok((string(r, MAX_STRING)?, string(r, MAX_STRING)?)))
        .collect::<std::result::Result<Vec<_>, StateError>>()?;
    let n = count(r, 16)?;
    let ram: Vec<(u64, u64)> = (0..n)
        .map(|_| Ok((r.u64()?, r.u64()?)))
        .collect::<std::result::Result<_, StateError>>()?;
    validate_layout(&ram).map_err(|e| r.malformed(e))?;
    let n = count(r, 9)?;
    let devices = (0..n)
        .map(|_| {
            let id = string(r, MAX_STRING)?;
            let kind = string(r, MAX_STRING)?;
            let pci_address = if r.bool()? {
                Some(string(r, MAX_STRING)?)
            } else {
                None
            };
            Ok(DeviceEntry {
                id,
                kind,
                pci_address,
            })
        })
        .collect::<std::result::Result<_, StateError>>()?;
    Ok(Config {
        vm_config,
        host,
        ram,
        devices,
    })
}
