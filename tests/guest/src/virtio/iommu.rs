//! virtio-iommu (device type 23, virtio 1.2 §5.13): request queue 0, event queue 1.
//!
//! Requests are a device-readable part (`head` + the type's fields) followed by a device-writable
//! part (PROBE properties, then the 4-byte `tail` whose first byte is the status). [`Iommu::call`]
//! sends any chain (malformed ones too) and reports what came back; the typed helpers build
//! well-formed requests. Fault reports arrive in device-writable buffers posted on the event
//! queue; [`Iommu::poll_fault`] takes one and posts a fresh buffer.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::queue::{Buf, Used, Virtqueue};
use super::Transport;
use crate::arch::time::Deadline;
use crate::dma;

/// `VIRTIO_IOMMU_F_INPUT_RANGE`: `input_range` is valid.
pub const F_INPUT_RANGE: u64 = 1 << 0;
/// `VIRTIO_IOMMU_F_DOMAIN_RANGE`: `domain_range` is valid.
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
/// `VIRTIO_IOMMU_F_MAP_UNMAP`: MAP and UNMAP requests.
pub const F_MAP_UNMAP: u64 = 1 << 2;
/// `VIRTIO_IOMMU_F_BYPASS` (legacy): unattached endpoints bypass; never accepted here.
pub const F_BYPASS: u64 = 1 << 3;
/// `VIRTIO_IOMMU_F_PROBE`: PROBE requests.
pub const F_PROBE: u64 = 1 << 4;
/// `VIRTIO_IOMMU_F_MMIO`: the MMIO map flag.
pub const F_MMIO: u64 = 1 << 5;
/// `VIRTIO_IOMMU_F_BYPASS_CONFIG`: the `bypass` config field and bypass domains.
pub const F_BYPASS_CONFIG: u64 = 1 << 6;
/// The features this driver accepts when offered.
pub const WANTED: u64 =
    F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_MMIO | F_BYPASS_CONFIG;

/// Request types.
pub const T_ATTACH: u8 = 1;
/// DETACH.
pub const T_DETACH: u8 = 2;
/// MAP.
pub const T_MAP: u8 = 3;
/// UNMAP.
pub const T_UNMAP: u8 = 4;
/// PROBE.
pub const T_PROBE: u8 = 5;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: virtio communication error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Status: internal device error.
pub const S_DEVERR: u8 = 3;
/// Status: invalid parameters.
pub const S_INVAL: u8 = 4;
/// Status: out-of-range parameters.
pub const S_RANGE: u8 = 5;
/// Status: entry not found.
pub const S_NOENT: u8 = 6;
/// Status: bad address.
pub const S_FAULT: u8 = 7;
/// Status: insufficient resources.
pub const S_NOMEM: u8 = 8;

/// Name of a status code.
pub fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        S_DEVERR => "DEVERR",
        S_INVAL => "INVAL",
        S_RANGE => "RANGE",
        S_NOENT => "NOENT",
        S_FAULT => "FAULT",
        S_NOMEM => "NOMEM",
        _ => "?",
    }
}

/// ATTACH flag: a bypass domain.
pub const ATTACH_F_BYPASS: u32 = 1;
/// MAP flag: the device may read.
pub const MAP_F_READ: u32 = 1;
/// MAP flag: the device may write.
pub const MAP_F_WRITE: u32 = 2;
/// MAP flag: the target is MMIO.
pub const MAP_F_MMIO: u32 = 4;

/// Probe property: RESV_MEM.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: reserved.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell.
pub const RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: unknown.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to a domain.
pub const FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or a mapping without the needed permission.
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault flag: a read.
pub const FAULT_F_READ: u32 = 1;
/// Fault flag: a write.
pub const FAULT_F_WRITE: u32 = 2;
/// Fault flag: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;
/// Size of `struct virtio_iommu_fault`.
pub const FAULT_SIZE: usize = 24;
/// Size of each event buffer the driver posts (room for a longer future format).
pub const EVENT_BUF_LEN: usize = 64;

/// Byte the driver fills device-writable buffers with, to see what the device wrote.
pub const UNWRITTEN: u8 = 0xEE;

/// How long one request may take (the guest is emulated on the development host).
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;

/// `struct virtio_iommu_config`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// First IOVA.
    pub input_start: u64,
    /// Last IOVA.
    pub input_end: u64,
    /// First domain id.
    pub domain_start: u32,
    /// Last domain id.
    pub domain_end: u32,
    /// Size of the PROBE properties buffer.
    pub probe_size: u32,
    /// The `bypass` field.
    pub bypass: u8,
}

impl Config {
    /// The mapping granule (smallest page size; 4 KiB if the mask is empty).
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            4096
        } else {
            1 << self.page_size_mask.trailing_zeros()
        }
    }
}

/// Offset of `bypass` in the device configuration.
pub const CONFIG_BYPASS: u32 = 36;

/// A RESV_MEM probe property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvMem {
    /// Subtype (RESERVED, MSI, ...).
    pub subtype: u8,
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

/// Walk a PROBE properties buffer: the RESV_MEM properties, and the number of other properties.
/// Stops at a NONE (type 0) property or the end of the buffer.
pub fn parse_properties(props: &[u8]) -> (Vec<ResvMem>, usize) {
    let mut resv = Vec::new();
    let mut other = 0;
    let mut off = 0;
    while off + 4 <= props.len() {
        let word = u16::from_le_bytes([props[off], props[off + 1]]);
        let kind = word & 0xFFF;
        let reserved = word >> 12;
        let len = usize::from(u16::from_le_bytes([props[off + 2], props[off + 3]]));
        if kind == 0 {
            break;
        }
        let body = off + 4;
        if body + len > props.len() {
            break;
        }
        if kind == PROBE_T_RESV_MEM && reserved == 0 && len >= 20 {
            let b = &props[body..body + len];
            resv.push(ResvMem {
                subtype: b[0],
                start: u64::from_le_bytes(b[4..12].try_into().unwrap()),
                end: u64::from_le_bytes(b[12..20].try_into().unwrap()),
            });
        } else {
            other += 1;
        }
        off = body + len;
    }
    (resv, other)
}

/// A fault report from the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `reason`.
    pub reason: u8,
    /// `flags`.
    pub flags: u32,
    /// `endpoint`.
    pub endpoint: u32,
    /// `address`.
    pub address: u64,
    /// Used length the device returned with the buffer.
    pub len: u32,
    /// Whether either reserved field was non-zero.
    pub reserved_nonzero: bool,
}

impl Fault {
    fn parse(b: &[u8], len: u32) -> Fault {
        Fault {
            reason: b[0],
            flags: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            endpoint: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            address: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            len,
            reserved_nonzero: b[1..4].iter().any(|&x| x != 0) || b[12..16].iter().any(|&x| x != 0),
        }
    }
}

/// One part of a request chain.
#[derive(Clone, Debug)]
pub enum Part {
    /// Device-readable bytes.
    Out(Vec<u8>),
    /// A device-writable buffer of this many bytes (filled with [`UNWRITTEN`] first).
    In(u32),
    /// These bytes, but in a descriptor *not* marked device-writable where the tail belongs.
    OutTail(Vec<u8>),
}

/// What came back for a request.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The used-ring entry (None: no completion within the timeout).
    pub used: Option<Used>,
    /// The contents of the device-writable parts, concatenated, after completion.
    pub writable: Vec<u8>,
}

impl Reply {
    /// The status byte: first byte of the last 4 writable bytes, if any were written.
    pub fn status(&self) -> Option<u8> {
        let used = self.used?;
        if used.len == 0 || self.writable.len() < 4 {
            return None;
        }
        Some(self.writable[self.writable.len() - 4])
    }

    /// Whether every writable byte still holds [`UNWRITTEN`].
    pub fn untouched(&self) -> bool {
        self.writable.iter().all(|&b| b == UNWRITTEN)
    }
}

/// `virtio_iommu_req_attach` (device-readable part).
pub fn encode_attach(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut b = vec![T_ATTACH, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// `virtio_iommu_req_detach` (device-readable part).
pub fn encode_detach(domain: u32, endpoint: u32) -> Vec<u8> {
    let mut b = vec![T_DETACH, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    b
}

/// `virtio_iommu_req_map` (device-readable part).
pub fn encode_map(domain: u32, virt_start: u64, virt_end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![T_MAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&virt_start.to_le_bytes());
    b.extend_from_slice(&virt_end.to_le_bytes());
    b.extend_from_slice(&phys.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

/// `virtio_iommu_req_unmap` (device-readable part).
pub fn encode_unmap(domain: u32, virt_start: u64, virt_end: u64) -> Vec<u8> {
    let mut b = vec![T_UNMAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&virt_start.to_le_bytes());
    b.extend_from_slice(&virt_end.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// `virtio_iommu_req_probe` (device-readable part).
pub fn encode_probe(endpoint: u32) -> Vec<u8> {
    let mut b = vec![T_PROBE, 0, 0, 0];
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    b
}

/// An initialised virtio-iommu.
pub struct Iommu {
    /// Transport.
    pub t: Transport,
    /// Request queue.
    pub req: Virtqueue,
    /// Event queue.
    pub evt: Virtqueue,
    /// Configuration as read at initialisation (bypass re-read by [`Iommu::bypass`]).
    pub config: Config,
    /// Event buffer address per head descriptor.
    event_bufs: Vec<Option<u64>>,
    msix: Option<(u16, u16)>,
    event_buffers: usize,
}

impl Iommu {
    /// Negotiate (MAP_UNMAP required; the other [`WANTED`] features when offered), read the
    /// configuration, set up both queues (routed to MSI-X entries `msix` = (request, event) if
    /// given), set DRIVER_OK and post `event_buffers` event buffers.
    pub fn init(
        t: Transport,
        msix: Option<(u16, u16)>,
        event_buffers: usize,
    ) -> Result<Iommu, String> {
        let mut io = Iommu {
            t,
            req: Virtqueue::new(0, 1, 0),
            evt: Virtqueue::new(1, 1, 0),
            config: Config::default(),
            event_bufs: Vec::new(),
            msix,
            event_buffers,
        };
        io.reinit()?;
        Ok(io)
    }

    /// Reset the device and set it up again from scratch (fresh queues and event buffers; the
    /// device forgets its domains).
    pub fn reinit(&mut self) -> Result<(), String> {
        let t = &mut self.t;
        let features = t.negotiate(WANTED)?;
        if features & F_MAP_UNMAP == 0 {
            return Err(format!(
                "{}: virtio-iommu does not offer VIRTIO_IOMMU_F_MAP_UNMAP",
                t.func.bdf
            ));
        }
        if t.device_len < 36 {
            return Err(format!(
                "{}: virtio-iommu config is {} bytes, shorter than its layout",
                t.func.bdf, t.device_len
            ));
        }
        let mut config = Config {
            page_size_mask: t.device_config_u64(0),
            input_start: 0,
            input_end: u64::MAX,
            domain_start: 0,
            domain_end: u32::MAX,
            probe_size: 0,
            bypass: 0,
        };
        if features & F_INPUT_RANGE != 0 {
            config.input_start = t.device_config_u64(8);
            config.input_end = t.device_config_u64(16);
        }
        if features & F_DOMAIN_RANGE != 0 {
            config.domain_start = t.device_config_u32(24);
            config.domain_end = t.device_config_u32(28);
        }
        if features & F_PROBE != 0 {
            config.probe_size = t.device_config_u32(32);
        }
        if t.device_len > CONFIG_BYPASS {
            config.bypass = t.device_config(CONFIG_BYPASS, 1)[0];
        }
        self.req = t.setup_queue(0, 64, self.msix.map(|m| m.0))?;
        self.evt = t.setup_queue(1, 64, self.msix.map(|m| m.1))?;
        t.driver_ok();
        self.config = config;
        self.event_bufs = vec![None; usize::from(self.evt.size)];
        for _ in 0..self.event_buffers.min(usize::from(self.evt.size)) {
            self.post_event_buffer()?;
        }
        Ok(())
    }

    /// The features accepted.
    pub fn features(&self) -> u64 {
        self.t.features
    }

    fn post_event_buffer(&mut self) -> Result<(), String> {
        let buf = dma::alloc(EVENT_BUF_LEN, 64);
        dma::fill(buf, EVENT_BUF_LEN, 0);
        let head = self
            .evt
            .submit(&[Buf::input(buf, EVENT_BUF_LEN as u32)])
            .ok_or("event queue full")?;
        self.event_bufs[usize::from(head)] = Some(buf);
        Ok(())
    }

    /// Take one fault report, if the device has returned an event buffer, and post a new buffer.
    pub fn poll_fault(&mut self) -> Result<Option<Fault>, String> {
        let Some(used) = self.evt.poll() else {
            return Ok(None);
        };
        let buf = self
            .event_bufs
            .get_mut(used.id as usize)
            .and_then(|b| b.take())
            .ok_or_else(|| format!("event queue returned unknown head {}", used.id))?;
        let fault = Fault::parse(&dma::read_bytes(buf, FAULT_SIZE), used.len);
        self.post_event_buffer()?;
        Ok(Some(fault))
    }

    /// Wait up to `ms` for a fault report.
    pub fn wait_fault(&mut self, ms: u64) -> Result<Option<Fault>, String> {
        let deadline = Deadline::after_ms(ms);
        loop {
            if let Some(f) = self.poll_fault()? {
                return Ok(Some(f));
            }
            if deadline.expired() {
                return Ok(None);
            }
            crate::arch::time::delay_us(100);
        }
    }

    /// Write the `bypass` config field (meaningful with BYPASS_CONFIG) and return what reads back.
    pub fn set_bypass(&mut self, on: bool) -> u8 {
        self.t.device_config_write_u8(CONFIG_BYPASS, u8::from(on));
        self.bypass()
    }

    /// The `bypass` config field now.
    pub fn bypass(&mut self) -> u8 {
        self.config.bypass = self.t.device_config(CONFIG_BYPASS, 1)[0];
        self.config.bypass
    }

    /// Send a chain made of `parts` and wait for it; device-writable parts are filled with
    /// [`UNWRITTEN`] first and read back after completion.
    pub fn call(&mut self, parts: &[Part]) -> Result<Reply, String> {
        let mut bufs = Vec::with_capacity(parts.len());
        let mut writable = Vec::new();
        for p in parts {
            match p {
                Part::Out(bytes) | Part::OutTail(bytes) => {
                    let a = dma::alloc(bytes.len().max(1), 64);
                    dma::write_bytes(a, bytes);
                    bufs.push(Buf::out(a, bytes.len() as u32));
                }
                Part::In(len) => {
                    let a = dma::alloc((*len as usize).max(1), 64);
                    dma::fill(a, *len as usize, UNWRITTEN);
                    bufs.push(Buf::input(a, *len));
                    writable.push((a, *len as usize));
                }
            }
        }
        let head = self.req.submit(&bufs).ok_or("request queue full")?;
        let used = self.wait(head);
        let mut out = Vec::new();
        for (a, len) in writable {
            out.extend(dma::read_bytes(a, len));
        }
        Ok(Reply {
            used,
            writable: out,
        })
    }

    /// Wait for the request chain `head` to come back; None on a timeout or as soon as the
    /// device reports DEVICE_NEEDS_RESET.
    fn wait(&mut self, head: u16) -> Option<Used> {
        let deadline = Deadline::after_ms(REQUEST_TIMEOUT_MS);
        loop {
            while let Some(u) = self.req.poll() {
                if u.id == u32::from(head) {
                    return Some(u);
                }
            }
            if deadline.expired() || self.needs_reset() {
                return self.req.poll().filter(|u| u.id == u32::from(head));
            }
            crate::arch::time::delay_us(50);
        }
    }

    /// Whether the device has set DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.t.status() & super::status::NEEDS_RESET != 0
    }

    /// Send a well-formed request (`readable` + a 4-byte tail) and return its status; an error
    /// when it does not complete or comes back without a status.
    pub fn simple(&mut self, readable: Vec<u8>) -> Result<u8, String> {
        let kind = readable.first().copied().unwrap_or(0);
        let r = self.call(&[Part::Out(readable), Part::In(4)])?;
        let used = r
            .used
            .ok_or_else(|| format!("virtio-iommu request type {kind} timed out"))?;
        r.status().ok_or_else(|| {
            format!(
                "virtio-iommu request type {kind} came back without a status (used length {})",
                used.len
            )
        })
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Result<u8, String> {
        self.simple(encode_attach(domain, endpoint, 0))
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<u8, String> {
        self.simple(encode_detach(domain, endpoint))
    }

    /// MAP `[virt_start, virt_end]` of `domain` to `phys`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys: u64,
        flags: u32,
    ) -> Result<u8, String> {
        self.simple(encode_map(domain, virt_start, virt_end, phys, flags))
    }

    /// UNMAP `[virt_start, virt_end]` of `domain`.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<u8, String> {
        self.simple(encode_unmap(domain, virt_start, virt_end))
    }

    /// PROBE `endpoint` with a `probe_size`-byte properties buffer: (status, properties).
    pub fn probe(&mut self, endpoint: u32) -> Result<(u8, Vec<u8>), String> {
        let size = self.config.probe_size;
        let r = self.call(&[Part::Out(encode_probe(endpoint)), Part::In(size + 4)])?;
        let used = r.used.ok_or("PROBE timed out")?;
        let status = r.status().ok_or_else(|| {
            format!(
                "PROBE came back without a status (used length {})",
                used.len
            )
        })?;
        Ok((status, r.writable[..size as usize].to_vec()))
    }
}
