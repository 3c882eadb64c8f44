//! Parsing, validating and executing one virtio-blk request.
//!
//! This is the only place where values written by the guest (descriptor addresses, lengths and
//! flags, the request header, discard ranges) are trusted or rejected. A request is laid out as
//! device-readable bytes (the 16-byte header, then for writes and discards the payload) followed by
//! device-writable bytes (for reads and GET_ID the data, then the one-byte status). Framing into
//! descriptors is free (VIRTIO_F_ANY_LAYOUT is implied by VIRTIO_F_VERSION_1), so every check
//! works on byte offsets across the chain, not on descriptor positions.
//!
//! What is rejected, and how:
//! - a chain that does not end (a loop, a `next` index beyond the queue, an unreadable descriptor
//!   table, a bad indirect table), has more descriptors than the queue size, or whose last
//!   descriptor cannot take a status byte (device-readable, zero length, outside guest RAM): no
//!   status can be written; the chain is returned with used length 0;
//! - otherwise a descriptor of length 0, a range outside guest RAM or overflowing, a
//!   device-readable descriptor after a device-writable one, a header shorter than 16 bytes,
//!   data in the wrong direction for the request type, more than [`MAX_REQUEST_BYTES`] of data,
//!   a data length that is not a multiple of 512, sectors beyond the capacity, a write to a
//!   read-only device: status `VIRTIO_BLK_S_IOERR`;
//! - unknown request types, features that were not negotiated, unknown discard flags:
//!   `VIRTIO_BLK_S_UNSUPP`.

use std::io;
use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::{DiskImage, Segment, SECTOR_SHIFT, SECTOR_SIZE};
use super::metrics::BlockMetrics;
use crate::virtio::{AccessPlatform, DmaAccess};
use crate::GuestMemoryMmap;

/// Size of the request header (`struct virtio_blk_outhdr`: type, reserved, sector).
pub const HEADER_LEN: u64 = 16;
/// Size of one discard / write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_LEN: u64 = 16;
/// Largest data transfer one request may ask for (1 GiB).
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;
/// Length of the GET_ID answer (a serial number, zero padded).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a request was rejected. Every variant is caused by the guest.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The head index pointed at no readable descriptor, or an indirect table was unusable.
    #[error("descriptor chain is empty (bad head index or unusable indirect table)")]
    EmptyChain,
    /// The chain loops, points beyond the queue, or its descriptor table is unreadable.
    #[error(
        "descriptor chain does not end (loop, next index beyond the queue or unreadable table)"
    )]
    UnterminatedChain,
    /// More descriptors than the queue has entries.
    #[error("descriptor chain has more than {0} descriptors")]
    ChainTooLong(usize),
    /// The last descriptor is device-readable, so there is nowhere to put the status.
    #[error("no status descriptor: the chain ends with a device-readable descriptor")]
    MissingStatus,
    /// The last descriptor is device-writable but has length 0.
    #[error("status descriptor has length 0")]
    EmptyStatus,
    /// A descriptor of length 0.
    #[error("descriptor {index} has length 0")]
    ZeroLengthDescriptor {
        /// Position in the chain.
        index: usize,
    },
    /// A descriptor that does not lie entirely in guest RAM (or whose end overflows).
    #[error("descriptor {index} ({addr:#x}, {len} bytes) is outside guest memory")]
    OutsideGuestMemory {
        /// Position in the chain.
        index: usize,
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position in the chain.
        index: usize,
    },
    /// Fewer than 16 device-readable bytes.
    #[error("request header has {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(u64),
    /// Data in the wrong direction (e.g. a device-writable buffer in a write request).
    #[error("{kind} request with {readable} device-readable and {writable} device-writable bytes")]
    WrongDirection {
        /// Request type name.
        kind: &'static str,
        /// Device-readable bytes, header included.
        readable: u64,
        /// Device-writable bytes, status included.
        writable: u64,
    },
    /// More data than [`MAX_REQUEST_BYTES`].
    #[error("request carries {0} bytes of data (limit {MAX_REQUEST_BYTES})")]
    TooLarge(u64),
    /// A read or write whose length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// Sectors beyond the end of the disk.
    #[error("sectors {sector}..+{count} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes to a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// A discard / write-zeroes payload that is not exactly the supported number of ranges.
    #[error("discard/write-zeroes payload of {0} bytes (expects {RANGE_LEN} bytes per range, at most one range)")]
    BadRangePayload(u64),
    /// A discard / write-zeroes range longer than the advertised maximum.
    #[error("discard/write-zeroes of {count} sectors exceeds the maximum of {max}")]
    RangeTooLong {
        /// Sectors asked for.
        count: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// Unknown or reserved flags in a discard / write-zeroes range.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The IOMMU refused to translate a buffer of descriptor `index` (a fault event was reported).
    #[error("descriptor {index}: IOMMU fault at device address {addr:#x}")]
    IommuFault {
        /// Position of the descriptor in the chain.
        index: usize,
        /// The faulting device address.
        addr: u64,
    },
    /// A request type the device does not implement (or whose feature was not negotiated).
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
}

impl RequestError {
    /// The status byte reported for this error.
    pub fn status(&self) -> u8 {
        match self {
            Self::UnsupportedFlags(_) | Self::UnsupportedType(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What the device allows; fixed between activation and reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Disk capacity in sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes are rejected.
    pub readonly: bool,
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
    /// Advertised `max_discard_sectors` / `max_write_zeroes_sectors`.
    pub max_range_sectors: u32,
    /// Longest chain accepted, in descriptors (the queue size).
    pub max_chain_len: usize,
}

/// The type of a request, with what it needs beyond the common fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into the (device-writable) data segments.
    In,
    /// Write the (device-readable) data segments at `sector`.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Write the serial number into the data segments.
    GetId,
    /// Deallocate a sector range.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u32,
    },
    /// Zero a sector range, deallocating it when `unmap`.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u32,
        /// The driver allows deallocation.
        unmap: bool,
    },
}

/// A validated request: every guest range in it lies in guest RAM, every sector on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First sector of a read or write (from the header).
    pub sector: u64,
    /// Guest data ranges: the destination of a read or GET_ID, the source of a write.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// A rejected chain: the error and, when one can be written, where the status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Status byte address, `None` when the chain has no usable status descriptor.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

/// What became of one chain, for the used ring and the log.
#[derive(Debug)]
pub struct Completion {
    /// Value for the used ring's `len`: bytes written into guest buffers (data plus status).
    pub used_len: u32,
    /// The status byte written (`None` when none could be written).
    pub status: Option<u8>,
    /// Why the request did not succeed, if it did not.
    pub failure: Option<Failure>,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The guest asked for something invalid.
    Invalid(RequestError),
    /// The host image returned an error.
    Io(io::Error),
}

fn in_guest_ram(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    addr.0.checked_add(len).is_some()
        && usize::try_from(len).is_ok_and(|l| GuestMemoryBackend::check_range(mem, addr, l))
}

/// The sub-ranges of `segs` covering `len` bytes from logical offset `skip`.
fn sub_segments(segs: &[Segment], mut skip: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let take = (slen - skip).min(len);
        // `take <= s.len`, so it fits in u32; `skip < s.len` and the segment was range-checked.
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + skip),
            len: take as u32,
        });
        len -= take;
        skip = 0;
    }
    out
}

/// Copy `buf.len()` bytes from logical offset `skip` of `segs` (checked ranges).
fn read_from_segments(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for s in sub_segments(segs, skip, buf.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut buf[pos..pos + n], s.addr)?;
        pos += n;
    }
    Ok(())
}

/// Append the guest-physical segments of descriptor `index` to `out` (translated through
/// `access` when the device sits behind an IOMMU), each checked to lie in guest RAM.
fn guest_segments(
    mem: &GuestMemoryMmap,
    access: Option<&dyn AccessPlatform>,
    index: usize,
    d: &Descriptor,
    out: &mut Vec<Segment>,
) -> Result<(), RequestError> {
    let outside = |addr: GuestAddress, len: u32| RequestError::OutsideGuestMemory {
        index,
        addr: addr.0,
        len,
    };
    let Some(platform) = access else {
        if !in_guest_ram(mem, d.addr(), u64::from(d.len())) {
            return Err(outside(d.addr(), d.len()));
        }
        out.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
        return Ok(());
    };
    let dir = if d.is_write_only() {
        DmaAccess::Write
    } else {
        DmaAccess::Read
    };
    let mut parts = Vec::with_capacity(1);
    platform
        .translate(d.addr().0, u64::from(d.len()), dir, &mut parts)
        .map_err(|f| RequestError::IommuFault {
            index,
            addr: f.addr,
        })?;
    for (addr, len) in parts {
        // Each part is a piece of the descriptor, so it fits in u32.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        if !in_guest_ram(mem, addr, u64::from(len)) {
            return Err(outside(addr, len));
        }
        out.push(Segment { addr, len });
    }
    Ok(())
}

/// A validated chain's buffers, split by direction, with their total lengths.
struct ChainBuffers {
    /// Device-readable segments: the header, then any payload.
    readable: Vec<Segment>,
    /// Device-writable segments: any data, then the status byte.
    writable: Vec<Segment>,
    /// Device-readable bytes, header included.
    rlen: u64,
    /// Device-writable bytes, status included.
    wlen: u64,
}

/// Step 1 of [`Request::parse`]: collect the chain's descriptors, which are never empty.
/// virtio-queue bounds a direct chain by the queue size and stops at an unreadable descriptor or
/// a bad indirect table; indirect tables can be longer, so bound the total here too.
fn collect_chain<M>(
    chain: DescriptorChain<M>,
    max_chain_len: usize,
) -> Result<Vec<Descriptor>, RequestError>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
    for d in chain {
        if descs.len() >= max_chain_len {
            return Err(RequestError::ChainTooLong(max_chain_len));
        }
        descs.push(d);
    }
    let last = descs.last().ok_or(RequestError::EmptyChain)?;
    // The iterator ends early (loop, bad index, unreadable table) on a descriptor that still
    // says NEXT.
    if last.has_next() {
        return Err(RequestError::UnterminatedChain);
    }
    Ok(descs)
}

/// Step 2 of [`Request::parse`]: the address of the status byte, the last byte of the last
/// descriptor (`last`, at position `last_index`), and, behind an IOMMU, that descriptor's
/// translated segments (translated once, here, and reused by [`gather_buffers`]).
fn status_location(
    mem: &GuestMemoryMmap,
    access: Option<&dyn AccessPlatform>,
    last_index: usize,
    last: &Descriptor,
) -> Result<(GuestAddress, Vec<Segment>), RequestError> {
    if !last.is_write_only() {
        return Err(RequestError::MissingStatus);
    }
    if last.len() == 0 {
        return Err(RequestError::EmptyStatus);
    }
    let mut last_segs: Vec<Segment> = Vec::new();
    let status_addr = if access.is_some() {
        guest_segments(mem, access, last_index, last, &mut last_segs)?;
        match last_segs.last() {
            // Non-empty segments of a checked range: the last byte is inside it.
            Some(seg) => GuestAddress(seg.addr.0 + u64::from(seg.len) - 1),
            None => return Err(RequestError::EmptyStatus),
        }
    } else if in_guest_ram(mem, last.addr(), u64::from(last.len())) {
        GuestAddress(last.addr().0 + u64::from(last.len()) - 1)
    } else {
        return Err(RequestError::OutsideGuestMemory {
            index: last_index,
            addr: last.addr().0,
            len: last.len(),
        });
    };
    Ok((status_addr, last_segs))
}

/// Step 3 of [`Request::parse`]: check every descriptor (non-empty, in guest RAM, readable ones
/// before writable ones) and sort its segments by direction. `last_segs` are the status
/// descriptor's segments when [`status_location`] already translated them.
fn gather_buffers(
    mem: &GuestMemoryMmap,
    access: Option<&dyn AccessPlatform>,
    descs: &[Descriptor],
    mut last_segs: Vec<Segment>,
) -> Result<ChainBuffers, RequestError> {
    let last_index = descs.len() - 1;
    let mut readable: Vec<Segment> = Vec::with_capacity(2);
    let mut writable: Vec<Segment> = Vec::with_capacity(2);
    let (mut rlen, mut wlen) = (0u64, 0u64);
    for (index, d) in descs.iter().enumerate() {
        if d.len() == 0 {
            return Err(RequestError::ZeroLengthDescriptor { index });
        }
        if !d.is_write_only() && !writable.is_empty() {
            return Err(RequestError::ReadableAfterWritable { index });
        }
        if index == last_index && !last_segs.is_empty() {
            // The status descriptor, already translated (it is device-writable).
            writable.append(&mut last_segs);
            wlen += u64::from(d.len());
        } else if d.is_write_only() {
            guest_segments(mem, access, index, d, &mut writable)?;
            wlen += u64::from(d.len());
        } else {
            guest_segments(mem, access, index, d, &mut readable)?;
            rlen += u64::from(d.len());
        }
    }
    Ok(ChainBuffers {
        readable,
        writable,
        rlen,
        wlen,
    })
}

impl ChainBuffers {
    /// Step 4 of [`Request::parse`]: the header's request type and sector.
    fn header(&self, mem: &GuestMemoryMmap) -> Result<(u32, u64), RequestError> {
        if self.rlen < HEADER_LEN {
            return Err(RequestError::ShortHeader(self.rlen));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        // The ranges were checked above; a failure means guest memory changed under us.
        read_from_segments(mem, &self.readable, 0, &mut hdr)
            .map_err(|_| RequestError::ShortHeader(self.rlen))?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        Ok((req_type, sector))
    }

    /// Device-readable bytes after the header.
    fn payload(&self) -> u64 {
        self.rlen - HEADER_LEN
    }

    /// Device-writable bytes before the status.
    fn out_len(&self) -> u64 {
        self.wlen - 1
    }

    /// The error for data in the wrong direction for a `kind` request.
    fn wrong_direction(&self, kind: &'static str) -> RequestError {
        RequestError::WrongDirection {
            kind,
            readable: self.rlen,
            writable: self.wlen,
        }
    }
}

/// Check the data length `len` of a read or write starting at `sector`.
fn check_rw(sector: u64, len: u64, limits: &RequestLimits) -> Result<(), RequestError> {
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    check_sectors(sector, len >> SECTOR_SHIFT, limits)
}

/// Step 5 of [`Request::parse`] for DISCARD and WRITE_ZEROES: check the request and read its
/// one range from the payload.
fn range_kind(
    req_type: u32,
    bufs: &ChainBuffers,
    mem: &GuestMemoryMmap,
    limits: &RequestLimits,
) -> Result<RequestKind, RequestError> {
    let discard = req_type == VIRTIO_BLK_T_DISCARD;
    if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
        return Err(RequestError::UnsupportedType(req_type));
    }
    if bufs.out_len() != 0 {
        return Err(bufs.wrong_direction(if discard { "discard" } else { "write-zeroes" }));
    }
    if limits.readonly {
        return Err(RequestError::ReadOnly);
    }
    let payload = bufs.payload();
    if payload != RANGE_LEN {
        return Err(RequestError::BadRangePayload(payload));
    }
    let mut range = [0u8; RANGE_LEN as usize];
    read_from_segments(mem, &bufs.readable, HEADER_LEN, &mut range)
        .map_err(|_| RequestError::BadRangePayload(payload))?;
    let r_sector = u64::from_le_bytes([
        range[0], range[1], range[2], range[3], range[4], range[5], range[6], range[7],
    ]);
    let count = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
    let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
    let allowed = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    if count > limits.max_range_sectors {
        return Err(RequestError::RangeTooLong {
            count,
            max: limits.max_range_sectors,
        });
    }
    check_sectors(r_sector, u64::from(count), limits)?;
    Ok(if discard {
        RequestKind::Discard {
            sector: r_sector,
            count,
        }
    } else {
        RequestKind::WriteZeroes {
            sector: r_sector,
            count,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    })
}

impl Request {
    /// Walk and validate one descriptor chain. With `access` (a device behind an IOMMU) every
    /// buffer address is a device address, translated (and possibly split) into guest-physical
    /// segments.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
        access: Option<&dyn AccessPlatform>,
    ) -> Result<Request, Rejection>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let no_status = |error| Rejection {
            status_addr: None,
            error,
        };
        // 1. Collect the chain.
        let descs = collect_chain(chain, limits.max_chain_len).map_err(no_status)?;
        // 2. The status byte is the last byte of the last descriptor.
        let last_index = descs.len() - 1;
        let (status_addr, last_segs) =
            status_location(mem, access, last_index, &descs[last_index]).map_err(no_status)?;
        let reject = |error| Rejection {
            status_addr: Some(status_addr),
            error,
        };
        // 3. Every descriptor: non-empty, in guest RAM, readable ones before writable ones.
        let bufs = gather_buffers(mem, access, &descs, last_segs).map_err(reject)?;
        // 4. The header.
        let (req_type, sector) = bufs.header(mem).map_err(reject)?;
        // 5. Per type.
        Self::for_type(req_type, sector, &bufs, mem, limits, status_addr).map_err(reject)
    }

    /// Step 5 of [`Request::parse`]: check the buffers against request type `req_type` and build
    /// the request.
    fn for_type(
        req_type: u32,
        sector: u64,
        bufs: &ChainBuffers,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
        status_addr: GuestAddress,
    ) -> Result<Request, RequestError> {
        let (payload, out_len) = (bufs.payload(), bufs.out_len());
        let request = |kind, data, data_len| Request {
            kind,
            sector,
            data,
            data_len,
            status_addr,
        };
        match req_type {
            VIRTIO_BLK_T_IN => {
                if payload != 0 {
                    return Err(bufs.wrong_direction("read"));
                }
                check_rw(sector, out_len, limits)?;
                let data = sub_segments(&bufs.writable, 0, out_len);
                Ok(request(RequestKind::In, data, out_len))
            }
            VIRTIO_BLK_T_OUT => {
                if out_len != 0 {
                    return Err(bufs.wrong_direction("write"));
                }
                if limits.readonly {
                    return Err(RequestError::ReadOnly);
                }
                check_rw(sector, payload, limits)?;
                let data = sub_segments(&bufs.readable, HEADER_LEN, payload);
                Ok(request(RequestKind::Out, data, payload))
            }
            VIRTIO_BLK_T_FLUSH => {
                if payload != 0 || out_len != 0 {
                    return Err(bufs.wrong_direction("flush"));
                }
                Ok(request(RequestKind::Flush, Vec::new(), 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                if payload != 0 {
                    return Err(bufs.wrong_direction("get-id"));
                }
                let len = out_len.min(ID_BYTES as u64);
                let data = sub_segments(&bufs.writable, 0, len);
                Ok(request(RequestKind::GetId, data, len))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let kind = range_kind(req_type, bufs, mem, limits)?;
                Ok(request(kind, Vec::new(), 0))
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    /// Run the request against `disk`; returns the number of data bytes written into guest
    /// memory (the status byte not included).
    pub fn execute(
        &self,
        disk: &DiskImage,
        mem: &GuestMemoryMmap,
        serial: &[u8; ID_BYTES],
        metrics: &BlockMetrics,
    ) -> io::Result<u64> {
        let offset = self.sector << SECTOR_SHIFT;
        match self.kind {
            RequestKind::In => {
                disk.read_to_guest(mem, &self.data, offset)?;
                BlockMetrics::inc(&metrics.read_ops);
                BlockMetrics::add(&metrics.read_bytes, self.data_len);
                Ok(self.data_len)
            }
            RequestKind::Out => {
                disk.write_from_guest(mem, &self.data, offset)?;
                BlockMetrics::inc(&metrics.write_ops);
                BlockMetrics::add(&metrics.write_bytes, self.data_len);
                Ok(0)
            }
            RequestKind::Flush => {
                disk.flush()?;
                BlockMetrics::inc(&metrics.flush_ops);
                Ok(0)
            }
            RequestKind::GetId => {
                let mut pos = 0usize;
                for s in &self.data {
                    let n = s.len as usize;
                    mem.write_slice(&serial[pos..pos + n], s.addr)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                    pos += n;
                }
                Ok(self.data_len)
            }
            RequestKind::Discard { sector, count } => {
                disk.punch_hole(sector << SECTOR_SHIFT, u64::from(count) << SECTOR_SHIFT)?;
                BlockMetrics::inc(&metrics.discard_ops);
                Ok(0)
            }
            RequestKind::WriteZeroes {
                sector,
                count,
                unmap,
            } => {
                let (off, len) = (sector << SECTOR_SHIFT, u64::from(count) << SECTOR_SHIFT);
                if (unmap || !disk.supports_zero_range()) && disk.supports_punch_hole() {
                    disk.punch_hole(off, len)?;
                } else {
                    disk.zero_range(off, len)?;
                }
                BlockMetrics::inc(&metrics.write_zeroes_ops);
                Ok(0)
            }
        }
    }
}

fn check_sectors(sector: u64, count: u64, limits: &RequestLimits) -> Result<(), RequestError> {
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: limits.capacity,
        }),
    }
}

/// Parse, execute and complete one chain: the status byte is written and the used length
/// computed. Never fails; what went wrong is in [`Completion::failure`] (and counted in
/// `metrics`).
pub fn process_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    disk: &DiskImage,
    limits: &RequestLimits,
    serial: &[u8; ID_BYTES],
    metrics: &BlockMetrics,
    access: Option<&dyn AccessPlatform>,
) -> Completion
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let (status_addr, status, written, failure) = match Request::parse(chain, mem, limits, access) {
        Ok(req) => match req.execute(disk, mem, serial, metrics) {
            Ok(n) => (Some(req.status_addr), VIRTIO_BLK_S_OK as u8, n, None),
            Err(e) => {
                BlockMetrics::inc(&metrics.errors);
                (
                    Some(req.status_addr),
                    VIRTIO_BLK_S_IOERR as u8,
                    0,
                    Some(Failure::Io(e)),
                )
            }
        },
        Err(rej) => {
            BlockMetrics::inc(&metrics.invalid_requests);
            let status = rej.error.status();
            (
                rej.status_addr,
                status,
                0,
                Some(Failure::Invalid(rej.error)),
            )
        }
    };
    let Some(addr) = status_addr else {
        return Completion {
            used_len: 0,
            status: None,
            failure,
        };
    };
    if mem.write_obj(status, addr).is_err() {
        // Checked while parsing; only a changed memory map gets here.
        return Completion {
            used_len: 0,
            status: None,
            failure,
        };
    }
    // `written` is at most MAX_REQUEST_BYTES, far below u32::MAX.
    let used_len = u32::try_from(written + 1).unwrap_or(u32::MAX);
    Completion {
        used_len,
        status: Some(status),
        failure,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_T_SCSI_CMD};
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::Address;

    use super::super::test_utils::*;
    use super::*;
    use crate::virtio::VirtioDevice;

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const IND: u16 = VRING_DESC_F_INDIRECT as u16;

    /// Process and return the used entry of the one chain that was published last.
    fn run_one(h: &mut super::super::QueueHandler, drv: &Driver<'_>) -> (u32, u32) {
        let before = drv.used_idx();
        assert_eq!(h.process_queue(), 1);
        assert!(!h.is_broken());
        assert_eq!(drv.used_idx(), before.wrapping_add(1));
        drv.used(before)
    }

    /// A good read of sector 1 still works.
    fn assert_still_serving(h: &mut super::super::QueueHandler, drv: &mut Driver<'_>) {
        let r = drv.read(1, 512);
        let (id, len) = run_one(h, drv);
        assert_eq!((id, len), (u32::from(r.head), 513));
        assert_eq!(drv.status(&r), OK);
        assert_eq!(drv.bytes(r.data, 512), vec![2u8; 512]);
    }

    #[test]
    fn reads_sector_zero() {
        let img = patterned("read0");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let r = drv.read(0, 512);
        assert_eq!(run_one(&mut h, &drv), (u32::from(r.head), 513));
        assert_eq!(drv.status(&r), OK);
        assert_eq!(drv.bytes(r.data, 512), vec![1u8; 512]);
        let m = blk.metrics();
        assert_eq!(m.read_ops.load(Ordering::SeqCst), 1);
        assert_eq!(m.read_bytes.load(Ordering::SeqCst), 512);
    }

    #[test]
    fn write_flush_read_back() {
        let img = patterned("wfr");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let w = drv.write(3, &pattern);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(drv.status(&w), OK);
        let f = drv.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&f), OK);
        let r = drv.read(3, 1024);
        assert_eq!(run_one(&mut h, &drv).1, 1025);
        assert_eq!(drv.bytes(r.data, 1024), pattern);
        assert_eq!(&img.contents()[3 * 512..5 * 512], &pattern[..]);
        assert_eq!(img.contents()[5 * 512], 6, "neighbouring sector untouched");
        let c = blk.counters();
        for (name, v) in [("write_ops", 1), ("write_bytes", 1024), ("flush_ops", 1)] {
            assert!(c.contains(&(name, v)), "{name} in {c:?}");
        }
    }

    #[test]
    fn get_id_returns_padded_serial() {
        let img = patterned("getid");
        let mem = guest_mem();
        let (_blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let g = drv.request(VIRTIO_BLK_T_GET_ID, 0, &[0xee; 20], true);
        assert_eq!(run_one(&mut h, &drv).1, 21);
        assert_eq!(drv.status(&g), OK);
        let mut want = b"skiff-serial-1".to_vec();
        want.resize(20, 0);
        assert_eq!(drv.bytes(g.data, 20), want);
    }

    #[test]
    fn readonly_device_rejects_writes() {
        let img = patterned("ro");
        let before = img.contents();
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, true, &mem, 16);
        assert_eq!(blk.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let w = drv.write(0, &[0x55; 512]);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(drv.status(&w), IOERR);
        // Discard / write-zeroes are not offered, so they are unsupported.
        let mut range = [0u8; 16];
        range[8] = 1;
        let d = drv.request(VIRTIO_BLK_T_DISCARD, 0, &range, false);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&d), UNSUPP);
        assert_eq!(img.contents(), before);
        assert_still_serving(&mut h, &mut drv);
        assert_eq!(blk.metrics().invalid_requests.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn out_of_range_sectors_fail() {
        let img = patterned("range");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let cap = blk.capacity();
        for sector in [cap - 1, cap, u64::MAX, u64::MAX >> 9] {
            let r = drv.read(sector, 1024);
            assert_eq!(run_one(&mut h, &drv).1, 1, "sector {sector}");
            assert_eq!(drv.status(&r), IOERR);
        }
        let w = drv.write(cap, &[1; 512]);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&w), IOERR);
        // The last sector itself is fine.
        let r = drv.read(cap - 1, 512);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&r), OK);
    }

    fn range(sector: u64, count: u32, flags: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&count.to_le_bytes());
        b[12..].copy_from_slice(&flags.to_le_bytes());
        b
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let img = patterned("discard");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        if blk.avail_features() & (1 << VIRTIO_BLK_F_DISCARD) == 0 {
            let why = format!(
                "{} does not support punching holes",
                std::env::temp_dir().display()
            );
            crate::test_skip::skip_or_fail("SKIFF_SKIP_HOLE_PUNCH", &why);
            return;
        }
        let d = drv.request(VIRTIO_BLK_T_DISCARD, 0, &range(2, 2, 0), false);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&d), OK);
        let z = drv.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(10, 1, 0), false);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&z), OK);
        let zu = drv.request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &range(20, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            false,
        );
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&zu), OK);
        let c = img.contents();
        for s in 0..128usize {
            let zeroed = (2..4).contains(&s) || s == 10 || (20..23).contains(&s);
            let want = if zeroed { 0 } else { s as u8 + 1 };
            assert!(
                c[s * 512..(s + 1) * 512].iter().all(|&b| b == want),
                "sector {s}"
            );
        }
        assert_eq!(c.len(), 64 * 1024, "size kept");

        // Rejections: discard with UNMAP, unknown write-zeroes flag, two ranges, beyond the end,
        // longer than the advertised maximum.
        let cases: Vec<(u32, Vec<u8>, u8)> = vec![
            (VIRTIO_BLK_T_DISCARD, range(0, 1, 1).to_vec(), UNSUPP),
            (VIRTIO_BLK_T_WRITE_ZEROES, range(0, 1, 2).to_vec(), UNSUPP),
            (
                VIRTIO_BLK_T_DISCARD,
                [range(0, 1, 0), range(4, 1, 0)].concat(),
                IOERR,
            ),
            (VIRTIO_BLK_T_DISCARD, range(127, 2, 0).to_vec(), IOERR),
            (VIRTIO_BLK_T_DISCARD, range(0, u32::MAX, 0).to_vec(), IOERR),
            (VIRTIO_BLK_T_DISCARD, range(u64::MAX, 1, 0).to_vec(), IOERR),
            (VIRTIO_BLK_T_DISCARD, range(0, 1, 0)[..8].to_vec(), IOERR),
        ];
        for (t, payload, want) in cases {
            let r = drv.request(t, 0, &payload, false);
            run_one(&mut h, &drv);
            assert_eq!(drv.status(&r), want, "type {t} payload {payload:?}");
        }
        assert_eq!(img.contents(), c, "rejected requests change nothing");
        let m = blk.metrics();
        assert_eq!(m.discard_ops.load(Ordering::SeqCst), 1);
        assert_eq!(m.write_zeroes_ops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unsupported_type_reports_unsupp() {
        let img = patterned("unsupp");
        let mem = guest_mem();
        let (_blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        for t in [VIRTIO_BLK_T_SCSI_CMD, 99, u32::MAX] {
            let r = drv.request(t, 0, &[], false);
            assert_eq!(run_one(&mut h, &drv).1, 1);
            assert_eq!(drv.status(&r), UNSUPP);
        }
    }

    #[test]
    fn iommu_translated_buffers_split_across_mappings_and_faults_fail_only_the_request() {
        use std::sync::Arc;

        use super::super::Block;
        use crate::virtio::access::test_support::TableAccess;
        use crate::virtio::DmaAccess;

        let img = patterned("iommu");
        let mem = guest_mem();
        let mut blk = Block::new(config(&img.path, false)).unwrap();
        blk.set_acked_features(blk.avail_features());
        let mut drv = Driver::new(&mem, 16);
        let hd = drv.alloc(16);
        let d1 = drv.alloc(256);
        let _gap = drv.alloc(64);
        let d2 = drv.alloc(256);
        let st = drv.alloc(1);
        // Device addresses: the header, one 512-byte buffer made of two mappings to
        // non-adjacent guest-physical ranges, the status byte.
        let (ihd, idata, ist) = (0x1000_0000u64, 0x2000_0000u64, 0x3000_0000u64);
        let access = Arc::new(TableAccess::new(&[
            (ihd, hd, 16),
            (idata, d1, 256),
            (idata + 256, d2, 256),
            (ist, st, 1),
        ]));
        let mut h = blk
            .queue_handler(
                mem.clone(),
                drv.queue(),
                Arc::new(CountingInterrupt::default()),
                Some(access.clone()),
            )
            .unwrap();
        let header = |t: u32, sector: u64| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&t.to_le_bytes());
            b[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&b, GuestAddress(hd)).unwrap();
        };

        // Read sector 3 (all 4s) through the split buffer.
        header(VIRTIO_BLK_T_IN, 3);
        drv.push(&[(ihd, 16, 0), (idata, 512, W), (ist, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 513);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);
        assert_eq!(drv.bytes(d1, 256), vec![4; 256]);
        assert_eq!(drv.bytes(d2, 256), vec![4; 256]);
        assert_eq!(
            drv.bytes(d1 + 256, 64),
            vec![0xee; 64],
            "the gap is untouched"
        );

        // Write sector 5 from the split buffer.
        mem.write_slice(&[0x5a; 256], GuestAddress(d1)).unwrap();
        mem.write_slice(&[0xa5; 256], GuestAddress(d2)).unwrap();
        header(VIRTIO_BLK_T_OUT, 5);
        drv.push(&[(ihd, 16, 0), (idata, 512, 0), (ist, 1, W)]);
        run_one(&mut h, &drv);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);
        let c = img.contents();
        assert_eq!(&c[5 * 512..5 * 512 + 256], &[0x5a; 256][..]);
        assert_eq!(&c[5 * 512 + 256..6 * 512], &[0xa5; 256][..]);

        // Unmap the second half: the request fails with IOERR, a fault is reported for the
        // first unmapped device address, nothing is read into the first half.
        access.maps.lock().unwrap().retain(|m| m.0 != idata + 256);
        mem.write_slice(&[0xee; 256], GuestAddress(d1)).unwrap();
        header(VIRTIO_BLK_T_IN, 3);
        drv.push(&[(ihd, 16, 0), (idata, 512, W), (ist, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), IOERR);
        assert_eq!(drv.bytes(d1, 256), vec![0xee; 256]);
        let faults = access.faults.lock().unwrap().clone();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].addr, idata + 256);
        assert_eq!(faults[0].access, DmaAccess::Write);

        // An unmapped status byte: no status can be written, the chain is still returned.
        header(VIRTIO_BLK_T_IN, 3);
        drv.push(&[(ihd, 16, 0), (idata, 512, W), (0x4000_0000, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 0);

        // Once the guest maps the range again, requests through it work.
        access.maps.lock().unwrap().push((idata + 256, d2, 256));
        header(VIRTIO_BLK_T_IN, 3);
        drv.push(&[(ihd, 16, 0), (idata, 512, W), (ist, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 513);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);
        assert_eq!(drv.bytes(d1, 256), vec![4; 256]);
    }

    #[test]
    fn any_layout_is_accepted() {
        let img = patterned("layout");
        let mem = guest_mem();
        let (_blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        // Write: header and data in one descriptor.
        let buf = drv.alloc(16 + 512);
        let mut b = vec![0u8; 16 + 512];
        b[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        b[8..16].copy_from_slice(&7u64.to_le_bytes());
        b[16..].fill(0xab);
        mem.write_slice(&b, GuestAddress(buf)).unwrap();
        let st = drv.alloc(1);
        drv.push(&[(buf, 16 + 512, 0), (st, 1, W)]);
        run_one(&mut h, &drv);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);
        assert_eq!(&img.contents()[7 * 512..8 * 512], &[0xab; 512][..]);
        // Read: data split over two descriptors, the last one also holding the status.
        let hd = drv.header(VIRTIO_BLK_T_IN, 7);
        let d1 = drv.alloc(100);
        let d2 = drv.alloc(413);
        drv.push(&[(hd, 16, 0), (d1, 100, W), (d2, 413, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 513);
        assert_eq!(drv.bytes(d1, 100), vec![0xab; 100]);
        assert_eq!(drv.bytes(d2, 412), vec![0xab; 412]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(d2 + 412)).unwrap(), OK);
        // Header split over two descriptors.
        let hd = drv.header(VIRTIO_BLK_T_IN, 0);
        let d = drv.alloc(512);
        let st = drv.alloc(1);
        drv.push(&[(hd, 10, 0), (hd + 10, 6, 0), (d, 512, W), (st, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 513);
        assert_eq!(drv.bytes(d, 512), vec![1; 512]);
    }

    #[test]
    fn indirect_chains_work_and_bad_tables_are_rejected() {
        let img = patterned("indirect");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let table = |drv: &mut Driver<'_>, descs: &[(u64, u32, u16, u16)]| {
            let t = drv.alloc(16 * descs.len() as u64);
            for (i, &(a, l, f, n)) in descs.iter().enumerate() {
                mem.write_obj(
                    RawDescriptor::from(Descriptor::new(a, l, f, n)),
                    GuestAddress(t + 16 * i as u64),
                )
                .unwrap();
            }
            t
        };
        // A good indirect read.
        let hd = drv.header(VIRTIO_BLK_T_IN, 2);
        let d = drv.alloc(512);
        let st = drv.alloc(1);
        let t = table(
            &mut drv,
            &[(hd, 16, N, 1), (d, 512, W | N, 2), (st, 1, W, 0)],
        );
        drv.push(&[(t, 48, IND)]);
        assert_eq!(run_one(&mut h, &drv).1, 513);
        assert_eq!(drv.bytes(d, 512), vec![3; 512]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);

        // Bad tables: length not a multiple of 16, zero length, outside RAM, nested indirect,
        // an index beyond the table, more entries than the queue size.
        let nested = table(&mut drv, &[(t, 48, IND, 0)]);
        let beyond = table(&mut drv, &[(hd, 16, N, 7), (st, 1, W, 0)]);
        let long: Vec<_> = (0..40u16)
            .map(|i| {
                if i < 39 {
                    (d, 8, W | N, i + 1)
                } else {
                    (st, 1, W, 0)
                }
            })
            .collect();
        let mut long = long;
        long[0] = (hd, 16, N, 1);
        let long = table(&mut drv, &long);
        for (addr, len) in [
            (t, 47),
            (t, 0),
            (MEM_SIZE + 0x1000, 48),
            (nested, 16),
            (beyond, 32),
            (long, 40 * 16),
        ] {
            drv.push(&[(addr, len, IND)]);
            assert_eq!(run_one(&mut h, &drv).1, 0, "table {addr:#x} len {len}");
        }
        assert_eq!(blk.metrics().invalid_requests.load(Ordering::SeqCst), 6);
        assert_still_serving(&mut h, &mut drv);
    }

    #[test]
    fn hostile_chains_are_rejected_and_serving_continues() {
        let img = patterned("hostile");
        let before = img.contents();
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);

        // (descriptors, expected used len, expected status when one is written)
        let hdr_in = drv.header(VIRTIO_BLK_T_IN, 0);
        let hdr_out = drv.header(VIRTIO_BLK_T_OUT, 0);
        let hdr_flush = drv.header(VIRTIO_BLK_T_FLUSH, 0);
        let d = drv.alloc(4096);
        let st = drv.alloc(1);
        let outside = MEM_SIZE + 0x1000;
        type Case = (&'static str, Vec<(u64, u32, u16)>, u32);
        let cases: Vec<Case> = vec![
            ("missing status", vec![(hdr_out, 16, 0), (d, 512, 0)], 0),
            (
                "zero-length status",
                vec![(hdr_in, 16, 0), (d, 512, W), (st, 0, W)],
                0,
            ),
            (
                "status outside RAM",
                vec![(hdr_in, 16, 0), (outside, 1, W)],
                0,
            ),
            ("header only", vec![(hdr_in, 16, 0)], 0),
            ("short header", vec![(hdr_in, 8, 0), (st, 1, W)], 1),
            (
                "data outside RAM",
                vec![(hdr_in, 16, 0), (outside, 512, W), (st, 1, W)],
                1,
            ),
            (
                "data straddling the end of RAM",
                vec![(hdr_in, 16, 0), (MEM_SIZE - 256, 512, W), (st, 1, W)],
                1,
            ),
            (
                "overflowing address",
                vec![(hdr_in, 16, 0), (u64::MAX - 100, 512, W), (st, 1, W)],
                1,
            ),
            (
                "zero-length data",
                vec![(hdr_in, 16, 0), (d, 0, W), (st, 1, W)],
                1,
            ),
            ("header outside RAM", vec![(outside, 16, 0), (st, 1, W)], 1),
            (
                "write from writable data",
                vec![(hdr_out, 16, 0), (d, 512, W), (st, 1, W)],
                1,
            ),
            (
                "read into read-only data",
                vec![(hdr_in, 16, 0), (d, 512, 0), (st, 1, W)],
                1,
            ),
            (
                "readable after writable",
                vec![(hdr_in, 16, 0), (d, 512, W), (d, 512, 0), (st, 1, W)],
                1,
            ),
            (
                "flush with data",
                vec![(hdr_flush, 16, 0), (d, 512, 0), (st, 1, W)],
                1,
            ),
            (
                "unaligned read",
                vec![(hdr_in, 16, 0), (d, 100, W), (st, 1, W)],
                1,
            ),
            (
                "unaligned write",
                vec![(hdr_out, 16, 0), (d, 513, 0), (st, 1, W)],
                1,
            ),
        ];
        let n_cases = cases.len() as u64;
        for (what, descs, want_len) in cases {
            mem.write_obj(0xeeu8, GuestAddress(st)).unwrap();
            drv.push(&descs);
            let (_, len) = run_one(&mut h, &drv);
            assert_eq!(len, want_len, "{what}");
            if want_len == 1 {
                assert_eq!(
                    mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
                    IOERR,
                    "{what}"
                );
            }
            assert_still_serving(&mut h, &mut drv);
        }
        assert_eq!(
            img.contents(),
            before,
            "no hostile request reached the image"
        );
        let m = blk.metrics();
        assert_eq!(m.invalid_requests.load(Ordering::SeqCst), n_cases);
        assert_eq!(m.errors.load(Ordering::SeqCst), 0);
        let _ = GuestAddress(0).unchecked_add(0);
    }

    #[test]
    fn descriptor_loops_and_bad_next_indices_end() {
        let img = patterned("loop");
        let mem = guest_mem();
        let (_blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let hd = drv.header(VIRTIO_BLK_T_IN, 0);
        let d = drv.alloc(512);
        // 0 -> 1 -> 0 -> ...
        let first = drv.store_raw(&[(hd, 16, N, 1), (d, 512, W | N, 0)]);
        assert_eq!(first, 0);
        drv.publish(first);
        assert_eq!(run_one(&mut h, &drv).1, 0);
        assert_still_serving(&mut h, &mut drv);
        // A self loop in the middle of a chain.
        let first = drv.store_raw(&[(hd, 16, N, 0)]);
        let lp = first + 1;
        drv.store_raw(&[(d, 512, W | N, lp)]);
        drv.store_raw(&[(hd, 16, N, lp)]);
        drv.publish(lp + 1);
        assert_eq!(run_one(&mut h, &drv).1, 0);
        // next beyond the queue size.
        let first = drv.store_raw(&[(hd, 16, N, 200)]);
        drv.publish(first);
        assert_eq!(run_one(&mut h, &drv).1, 0);
        assert_still_serving(&mut h, &mut drv);
    }

    #[test]
    fn oversized_request_is_rejected() {
        // Enough (lazily allocated) guest memory for a 1 GiB + 512 byte buffer.
        let big = (MAX_REQUEST_BYTES + 2 * DATA_START) as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), big)]).unwrap();
        let img = patterned("huge");
        let (_blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        let hd = drv.header(VIRTIO_BLK_T_IN, 0);
        let st = drv.alloc(1);
        let len = (MAX_REQUEST_BYTES + 512) as u32;
        drv.push(&[(hd, 16, 0), (DATA_START + 0x1000, len, W), (st, 1, W)]);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), IOERR);
        // Also when the length is spread over several descriptors.
        let half = (MAX_REQUEST_BYTES / 2) as u32;
        drv.push(&[
            (hd, 16, 0),
            (DATA_START + 0x1000, half, W),
            (DATA_START + 0x1000, half, W),
            (DATA_START + 0x1000, 512, W),
            (st, 1, W),
        ]);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), IOERR);
    }

    #[test]
    fn host_io_errors_report_ioerr() {
        let img = patterned("ioerr");
        let mem = guest_mem();
        let (blk, mut drv, mut h, _) = setup(&img, false, &mem, 16);
        // Shrink the image behind the device's back: reads past the new end fail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img.path)
            .unwrap()
            .set_len(512)
            .unwrap();
        let r = drv.read(4, 512);
        assert_eq!(run_one(&mut h, &drv).1, 1);
        assert_eq!(drv.status(&r), IOERR);
        assert_eq!(blk.metrics().errors.load(Ordering::SeqCst), 1);
        let r = drv.read(0, 512);
        run_one(&mut h, &drv);
        assert_eq!(drv.status(&r), OK);
    }
}
