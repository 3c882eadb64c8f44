//! The virtio-iommu wire format (virtio 1.2, section 5.13): request and response layouts, status
//! codes, feature bits, the configuration space, probe properties and fault events.
//!
//! This is the only place where guest-supplied request bytes are trusted or rejected: [`parse_request`]
//! turns the device-readable part of a request into a typed [`Request`] or an [`IommuStatus`] that
//! the device writes back in the request's tail. Nothing here panics on guest input.
//!
//! The constants are the spec's (Linux `include/uapi/linux/virtio_iommu.h`): virtio-bindings 0.2
//! has no `virtio_iommu` module, so they are kept here.

/// Request type: attach an endpoint to a domain.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type: detach an endpoint from a domain.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type: map a range of IOVA space.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type: unmap a range of IOVA space.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type: probe an endpoint's properties.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// Feature bit: `input_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature bit: `domain_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature bit: MAP/UNMAP requests are supported.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Feature bit (legacy): endpoints not attached to a domain bypass the IOMMU.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature bit: PROBE requests are supported.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature bit: the `MMIO` map flag is supported.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature bit: the `bypass` config field is valid and writable.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// ATTACH flag: the domain is a bypass domain (identity mapping of guest memory).
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1;

/// MAP flag: the device may read through the mapping.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1;
/// MAP flag: the device may write through the mapping.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 2;
/// MAP flag: the mapping targets MMIO (a device BAR), not RAM.
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 4;
/// Every MAP flag this device knows.
pub const VIRTIO_IOMMU_MAP_F_MASK: u32 =
    VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;

/// Probe property type: end of the property list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// Probe property type: a reserved memory region.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: accesses fault (region must not be mapped).
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: a software-mapped MSI doorbell window.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// First address of the x86 MSI window reported as a RESV_MEM property.
pub const MSI_WINDOW_START: u64 = 0xfee0_0000;
/// Last address (inclusive) of the x86 MSI window.
pub const MSI_WINDOW_END: u64 = 0xfeef_ffff;

/// Fault reason: unknown.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to a domain (and does not bypass).
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or the mapping does not allow the access.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1;
/// Fault flag: the access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 2;
/// Fault flag: the access was an instruction fetch.
pub const VIRTIO_IOMMU_FAULT_F_EXEC: u32 = 4;
/// Fault flag: the `address` field is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 0x100;

/// Size of the request head (`type`, `reserved[3]`).
pub const REQ_HEAD_SIZE: usize = 4;
/// Size of the request tail (`status`, `reserved[3]`), written by the device.
pub const REQ_TAIL_SIZE: usize = 4;
/// Device-readable size of an ATTACH request.
pub const ATTACH_REQ_SIZE: usize = REQ_HEAD_SIZE + 16;
/// Device-readable size of a DETACH request.
pub const DETACH_REQ_SIZE: usize = REQ_HEAD_SIZE + 16;
/// Device-readable size of a MAP request.
pub const MAP_REQ_SIZE: usize = REQ_HEAD_SIZE + 32;
/// Device-readable size of an UNMAP request.
pub const UNMAP_REQ_SIZE: usize = REQ_HEAD_SIZE + 24;
/// Device-readable size of a PROBE request.
pub const PROBE_REQ_SIZE: usize = REQ_HEAD_SIZE + 4 + 64;
/// Size of the encoded configuration space.
pub const CONFIG_SIZE: usize = 40;
/// Size of an encoded fault event.
pub const FAULT_EVENT_SIZE: usize = 24;
/// Size of one encoded RESV_MEM probe property including its header.
pub const RESV_MEM_PROPERTY_SIZE: usize = 24;

/// Status written in a request's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IommuStatus {
    /// Success.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl IommuStatus {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// One parsed virtio-iommu request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Attach `endpoint` to `domain`, creating the domain if needed.
    Attach {
        /// Domain id.
        domain: u32,
        /// Endpoint id.
        endpoint: u32,
        /// Whether the domain is a bypass domain (`VIRTIO_IOMMU_ATTACH_F_BYPASS`).
        bypass: bool,
    },
    /// Detach `endpoint` from `domain`.
    Detach {
        /// Domain id.
        domain: u32,
        /// Endpoint id.
        endpoint: u32,
    },
    /// Map `[virt_start, virt_end]` to `phys_start` in `domain`.
    Map {
        /// Domain id.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// Guest-physical address of `virt_start`.
        phys_start: u64,
        /// `VIRTIO_IOMMU_MAP_F_*` flags.
        flags: u32,
    },
    /// Remove the mappings inside `[virt_start, virt_end]` from `domain`.
    Unmap {
        /// Domain id.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
    /// Report `endpoint`'s properties.
    Probe {
        /// Endpoint id.
        endpoint: u32,
    },
}

impl Request {
    /// The request's type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Request::Attach { .. } => VIRTIO_IOMMU_T_ATTACH,
            Request::Detach { .. } => VIRTIO_IOMMU_T_DETACH,
            Request::Map { .. } => VIRTIO_IOMMU_T_MAP,
            Request::Unmap { .. } => VIRTIO_IOMMU_T_UNMAP,
            Request::Probe { .. } => VIRTIO_IOMMU_T_PROBE,
        }
    }

    /// Encode the device-readable part of the request (used by tests and by guest-side tools).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.type_byte(), 0, 0, 0];
        match *self {
            Request::Attach {
                domain,
                endpoint,
                bypass,
            } => {
                b.extend_from_slice(&domain.to_le_bytes());
                b.extend_from_slice(&endpoint.to_le_bytes());
                let flags = if bypass {
                    VIRTIO_IOMMU_ATTACH_F_BYPASS
                } else {
                    0
                };
                b.extend_from_slice(&flags.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
            }
            Request::Detach { domain, endpoint } => {
                b.extend_from_slice(&domain.to_le_bytes());
                b.extend_from_slice(&endpoint.to_le_bytes());
                b.extend_from_slice(&[0; 8]);
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                b.extend_from_slice(&domain.to_le_bytes());
                b.extend_from_slice(&virt_start.to_le_bytes());
                b.extend_from_slice(&virt_end.to_le_bytes());
                b.extend_from_slice(&phys_start.to_le_bytes());
                b.extend_from_slice(&flags.to_le_bytes());
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                b.extend_from_slice(&domain.to_le_bytes());
                b.extend_from_slice(&virt_start.to_le_bytes());
                b.extend_from_slice(&virt_end.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
            }
            Request::Probe { endpoint } => {
                b.extend_from_slice(&endpoint.to_le_bytes());
                b.extend_from_slice(&[0; 64]);
            }
        }
        b
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The device-readable size of a request of type `req_type`, or `None` for an unknown type.
pub fn request_size(req_type: u8) -> Option<usize> {
    match req_type {
        VIRTIO_IOMMU_T_ATTACH => Some(ATTACH_REQ_SIZE),
        VIRTIO_IOMMU_T_DETACH => Some(DETACH_REQ_SIZE),
        VIRTIO_IOMMU_T_MAP => Some(MAP_REQ_SIZE),
        VIRTIO_IOMMU_T_UNMAP => Some(UNMAP_REQ_SIZE),
        VIRTIO_IOMMU_T_PROBE => Some(PROBE_REQ_SIZE),
        _ => None,
    }
}

/// Parse the device-readable bytes of one request.
///
/// Rules (virtio 1.2 §5.13.6): an unknown type is `UNSUPP`; a buffer shorter than the type's
/// layout is `INVAL`; unknown ATTACH or MAP flags are `INVAL`; `virt_start > virt_end` is `INVAL`;
/// a mapping whose physical end would overflow 64 bits is `RANGE`. Reserved fields are ignored and
/// extra trailing bytes are allowed. Per-device policy (page alignment, input and domain ranges,
/// whether MMIO was negotiated) is checked by [`crate::iommu::IommuState`].
pub fn parse_request(b: &[u8]) -> Result<Request, IommuStatus> {
    let Some(&req_type) = b.first() else {
        return Err(IommuStatus::Inval);
    };
    let size = request_size(req_type).ok_or(IommuStatus::Unsupp)?;
    if b.len() < size {
        return Err(IommuStatus::Inval);
    }
    let h = REQ_HEAD_SIZE;
    match req_type {
        VIRTIO_IOMMU_T_ATTACH => {
            let flags = le32(b, h + 8);
            // virtio 1.x 5.13.6.3.2: unknown flags and a non-zero `reserved` MUST be rejected.
            if flags & !VIRTIO_IOMMU_ATTACH_F_BYPASS != 0 || le32(b, h + 12) != 0 {
                return Err(IommuStatus::Inval);
            }
            Ok(Request::Attach {
                domain: le32(b, h),
                endpoint: le32(b, h + 4),
                bypass: flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0,
            })
        }
        VIRTIO_IOMMU_T_DETACH => Ok(Request::Detach {
            domain: le32(b, h),
            endpoint: le32(b, h + 4),
        }),
        VIRTIO_IOMMU_T_MAP => {
            let virt_start = le64(b, h + 4);
            let virt_end = le64(b, h + 12);
            let phys_start = le64(b, h + 20);
            let flags = le32(b, h + 28);
            if flags & !VIRTIO_IOMMU_MAP_F_MASK != 0 || virt_start > virt_end {
                return Err(IommuStatus::Inval);
            }
            if phys_start.checked_add(virt_end - virt_start).is_none() {
                return Err(IommuStatus::Range);
            }
            Ok(Request::Map {
                domain: le32(b, h),
                virt_start,
                virt_end,
                phys_start,
                flags,
            })
        }
        VIRTIO_IOMMU_T_UNMAP => {
            let virt_start = le64(b, h + 4);
            let virt_end = le64(b, h + 12);
            if virt_start > virt_end {
                return Err(IommuStatus::Inval);
            }
            Ok(Request::Unmap {
                domain: le32(b, h),
                virt_start,
                virt_end,
            })
        }
        VIRTIO_IOMMU_T_PROBE => Ok(Request::Probe {
            endpoint: le32(b, h),
        }),
        _ => Err(IommuStatus::Unsupp),
    }
}

/// Whether `req_type` is a request this device knows (an unknown one is returned unwritten, with
/// a used length of 0, as the spec asks).
pub fn is_known_request(req_type: u8) -> bool {
    request_size(req_type).is_some()
}

/// Whether `[start, end]` overlaps the reserved MSI window reported by PROBE (MAP requests there
/// are refused).
pub fn overlaps_msi_window(start: u64, end: u64) -> bool {
    start <= MSI_WINDOW_END && end >= MSI_WINDOW_START
}

/// Encode a request tail carrying `status`.
pub fn encode_tail(status: IommuStatus) -> [u8; REQ_TAIL_SIZE] {
    [status.as_u8(), 0, 0, 0]
}

/// The virtio-iommu configuration space (`struct virtio_iommu_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuConfig {
    /// Page sizes the device supports; bit N set means 2^N bytes. The smallest set bit is the
    /// mapping granule.
    pub page_size_mask: u64,
    /// First valid IOVA.
    pub input_start: u64,
    /// Last valid IOVA (inclusive).
    pub input_end: u64,
    /// First valid domain id.
    pub domain_start: u32,
    /// Last valid domain id (inclusive).
    pub domain_end: u32,
    /// Size of the buffer the driver supplies for PROBE properties.
    pub probe_size: u32,
    /// Whether unattached endpoints bypass the IOMMU (`bypass`, writable by the driver).
    pub bypass: bool,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            page_size_mask: !0xfffu64,
            input_start: 0,
            input_end: (1u64 << 48) - 1,
            domain_start: 0,
            domain_end: u32::MAX,
            probe_size: 512,
            bypass: false,
        }
    }
}

impl IommuConfig {
    /// Offset of the `bypass` byte in the config space.
    pub const BYPASS_OFFSET: usize = 36;

    /// The mapping granule (smallest supported page size), at least 1.
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            1
        } else {
            1u64 << self.page_size_mask.trailing_zeros()
        }
    }

    /// Encode the configuration space (little-endian, 40 bytes).
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_start.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_end.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_start.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_end.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[Self::BYPASS_OFFSET] = u8::from(self.bypass);
        b
    }
}

/// Encode a RESV_MEM probe property (`struct virtio_iommu_probe_resv_mem`).
pub fn encode_resv_mem(subtype: u8, start: u64, end: u64) -> [u8; RESV_MEM_PROPERTY_SIZE] {
    let mut b = [0u8; RESV_MEM_PROPERTY_SIZE];
    b[0..2].copy_from_slice(&VIRTIO_IOMMU_PROBE_T_RESV_MEM.to_le_bytes());
    // `length` counts the bytes after the 4-byte property header.
    b[2..4].copy_from_slice(&((RESV_MEM_PROPERTY_SIZE - 4) as u16).to_le_bytes());
    b[4] = subtype;
    b[8..16].copy_from_slice(&start.to_le_bytes());
    b[16..24].copy_from_slice(&end.to_le_bytes());
    b
}

/// The probe properties of every endpoint: the x86 MSI doorbell window, followed by the end marker
/// when it fits. Returns `None` when `probe_size` cannot hold the property.
pub fn probe_properties(probe_size: usize) -> Option<Vec<u8>> {
    if probe_size < RESV_MEM_PROPERTY_SIZE {
        return None;
    }
    let mut v = encode_resv_mem(
        VIRTIO_IOMMU_RESV_MEM_T_MSI,
        MSI_WINDOW_START,
        MSI_WINDOW_END,
    )
    .to_vec();
    // The rest of the buffer is zero, which reads as a NONE property (end of list).
    v.resize(probe_size, 0);
    Some(v)
}

/// A fault event sent on the event queue (`struct virtio_iommu_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultEvent {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// Endpoint that faulted.
    pub endpoint: u32,
    /// Faulting address, valid when `flags` has `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
    pub address: u64,
}

impl FaultEvent {
    /// Encode the event (24 bytes).
    pub fn encode(&self) -> [u8; FAULT_EVENT_SIZE] {
        let mut b = [0u8; FAULT_EVENT_SIZE];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_request_type() {
        let reqs = [
            Request::Attach {
                domain: 3,
                endpoint: 0x10,
                bypass: false,
            },
            Request::Attach {
                domain: 4,
                endpoint: 0x18,
                bypass: true,
            },
            Request::Detach {
                domain: 3,
                endpoint: 0x10,
            },
            Request::Map {
                domain: 3,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x8000_0000,
                flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            },
            Request::Unmap {
                domain: 3,
                virt_start: 0,
                virt_end: u64::MAX,
            },
            Request::Probe { endpoint: 7 },
        ];
        for r in reqs {
            let b = r.encode();
            assert_eq!(Some(b.len()), request_size(r.type_byte()));
            assert_eq!(parse_request(&b), Ok(r));
            // Trailing bytes (e.g. the tail in a single buffer) are allowed.
            let mut long = b.clone();
            long.extend_from_slice(&[0xff; 8]);
            assert_eq!(parse_request(&long), Ok(r));
            // Every truncation is INVAL.
            for n in 1..b.len() {
                assert_eq!(parse_request(&b[..n]), Err(IommuStatus::Inval), "{r:?} {n}");
            }
        }
    }

    #[test]
    fn layout_offsets_match_the_spec() {
        let b = Request::Map {
            domain: 0x0403_0201,
            virt_start: 0x1111,
            virt_end: 0x2222,
            phys_start: 0x3333,
            flags: 1,
        }
        .encode();
        assert_eq!(b.len(), 36);
        assert_eq!(b[0], 3);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(le64(&b, 8), 0x1111);
        assert_eq!(le64(&b, 16), 0x2222);
        assert_eq!(le64(&b, 24), 0x3333);
        assert_eq!(le32(&b, 32), 1);
    }

    #[test]
    fn empty_and_unknown_types() {
        assert_eq!(parse_request(&[]), Err(IommuStatus::Inval));
        for t in [0u8, 6, 7, 8, 0xff] {
            assert_eq!(parse_request(&[t; 80]), Err(IommuStatus::Unsupp));
        }
    }

    #[test]
    fn bad_flags_and_ranges() {
        let mut attach = Request::Attach {
            domain: 1,
            endpoint: 1,
            bypass: false,
        }
        .encode();
        attach[12] = 2;
        assert_eq!(parse_request(&attach), Err(IommuStatus::Inval));
        // A non-zero reserved field of ATTACH must be rejected.
        attach[12] = 0;
        assert!(parse_request(&attach).is_ok());
        attach[18] = 1;
        assert_eq!(parse_request(&attach), Err(IommuStatus::Inval));
        assert!(!is_known_request(42));
        assert!(overlaps_msi_window(0xfed0_0000, 0xfee0_0000));
        assert!(!overlaps_msi_window(0, 0xfedf_ffff));
        assert!(!overlaps_msi_window(0xfef0_0000, u64::MAX));

        let map = |virt_start, virt_end, phys_start, flags| {
            Request::Map {
                domain: 1,
                virt_start,
                virt_end,
                phys_start,
                flags,
            }
            .encode()
        };
        assert_eq!(parse_request(&map(0, 0xfff, 0, 8)), Err(IommuStatus::Inval));
        assert_eq!(
            parse_request(&map(0, 0xfff, 0, 0x8000_0001)),
            Err(IommuStatus::Inval)
        );
        assert_eq!(
            parse_request(&map(0x2000, 0x1fff, 0, 1)),
            Err(IommuStatus::Inval)
        );
        assert_eq!(
            parse_request(&map(0, 0x1fff, u64::MAX - 0xfff, 1)),
            Err(IommuStatus::Range)
        );
        assert!(parse_request(&map(0, u64::MAX, 0, 1)).is_ok());

        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 5,
            virt_end: 4,
        }
        .encode();
        assert_eq!(parse_request(&unmap), Err(IommuStatus::Inval));
    }

    #[test]
    fn config_probe_and_fault_encoding() {
        let c = IommuConfig {
            bypass: true,
            ..Default::default()
        };
        let b = c.encode();
        assert_eq!(le64(&b, 0), !0xfff);
        assert_eq!(le64(&b, 16), (1 << 48) - 1);
        assert_eq!(le32(&b, 28), u32::MAX);
        assert_eq!(le32(&b, 32), 512);
        assert_eq!(b[36], 1);
        assert_eq!(c.granule(), 4096);

        let p = probe_properties(64).unwrap();
        assert_eq!(p.len(), 64);
        assert_eq!(
            u16::from_le_bytes([p[0], p[1]]),
            VIRTIO_IOMMU_PROBE_T_RESV_MEM
        );
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 20);
        assert_eq!(p[4], VIRTIO_IOMMU_RESV_MEM_T_MSI);
        assert_eq!(le64(&p, 8), 0xfee0_0000);
        assert_eq!(le64(&p, 16), 0xfeef_ffff);
        assert!(p[24..].iter().all(|&x| x == 0));
        assert!(probe_properties(23).is_none());

        let f = FaultEvent {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            endpoint: 9,
            address: 0xdead_b000,
        }
        .encode();
        assert_eq!(f[0], 2);
        assert_eq!(le32(&f, 4), 0x102);
        assert_eq!(le32(&f, 8), 9);
        assert_eq!(le64(&f, 16), 0xdead_b000);
        assert_eq!(encode_tail(IommuStatus::NoEnt), [6, 0, 0, 0]);
    }
}
