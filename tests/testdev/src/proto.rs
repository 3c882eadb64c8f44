//! vfio-user wire constants and little helpers, written from QEMU's
//! `docs/interop/vfio-user.rst` (protocol 0.1). Independent of the VMM's client module on purpose.
//!
//! All integers are little endian ("the endianness of the host system"; skiff only runs on
//! x86_64, so we encode little endian explicitly).

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// `VFIO_USER_VERSION`.
pub const CMD_VERSION: u16 = 1;
/// `VFIO_USER_DMA_MAP`.
pub const CMD_DMA_MAP: u16 = 2;
/// `VFIO_USER_DMA_UNMAP`.
pub const CMD_DMA_UNMAP: u16 = 3;
/// `VFIO_USER_DEVICE_GET_INFO`.
pub const CMD_DEVICE_GET_INFO: u16 = 4;
/// `VFIO_USER_DEVICE_GET_REGION_INFO`.
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
/// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`.
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
/// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
/// `VFIO_USER_DEVICE_SET_IRQS`.
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
/// `VFIO_USER_REGION_READ`.
pub const CMD_REGION_READ: u16 = 9;
/// `VFIO_USER_REGION_WRITE`.
pub const CMD_REGION_WRITE: u16 = 10;
/// `VFIO_USER_DMA_READ` (server to client).
pub const CMD_DMA_READ: u16 = 11;
/// `VFIO_USER_DMA_WRITE` (server to client).
pub const CMD_DMA_WRITE: u16 = 12;
/// `VFIO_USER_DEVICE_RESET`.
pub const CMD_DEVICE_RESET: u16 = 13;
/// `VFIO_USER_REGION_WRITE_MULTI`.
pub const CMD_REGION_WRITE_MULTI: u16 = 15;
/// `VFIO_USER_DEVICE_FEATURE`.
pub const CMD_DEVICE_FEATURE: u16 = 16;
/// `VFIO_USER_MIG_DATA_READ`.
pub const CMD_MIG_DATA_READ: u16 = 17;
/// `VFIO_USER_MIG_DATA_WRITE`.
pub const CMD_MIG_DATA_WRITE: u16 = 18;

/// Header flags: type mask (bits 0-3).
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Header flags: type "command".
pub const FLAG_TYPE_COMMAND: u32 = 0;
/// Header flags: type "reply".
pub const FLAG_TYPE_REPLY: u32 = 1;
/// Header flags: no reply wanted.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flags: the reply carries an error.
pub const FLAG_ERROR: u32 = 1 << 5;

/// Protocol major version we speak: 0, as the spec's VERSION example and libvfio-user
/// (`LIB_VFIO_USER_MAJOR`) have it (found when skiff's client first met this server).
pub const VERSION_MAJOR: u16 = 0;
/// Protocol minor version we speak.
pub const VERSION_MINOR: u16 = 1;

/// Largest data count in one REGION/DMA read or write we accept and announce.
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Largest message we accept: a full data transfer plus its 16-byte access header, plus slack
/// for the largest fixed structure. Anything above is refused (E2BIG) and the connection closed,
/// because the stream cannot be resynchronised without reading the whole announced payload.
pub const MAX_MSG_SIZE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER;
/// File descriptors we accept in one message (announced as `max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;
/// DMA mappings valid at once (the spec's default `max_dma_maps`).
pub const MAX_DMA_MAPS: usize = 65535;

/// `VFIO_DEVICE_FLAGS_RESET`.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// PCI region indices (`VFIO_PCI_*_REGION_INDEX`): BAR0..BAR5 are 0..5.
pub const REGION_ROM: u32 = 6;
/// Config space region index.
pub const REGION_CONFIG: u32 = 7;
/// Number of PCI regions (`VFIO_PCI_NUM_REGIONS`, with VGA).
pub const NUM_REGIONS: u32 = 9;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const REGION_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Size of `struct vfio_region_info`.
pub const REGION_INFO_SIZE: usize = 32;

/// IRQ indices (`VFIO_PCI_*_IRQ_INDEX`).
pub const IRQ_INTX: u32 = 0;
/// MSI index.
pub const IRQ_MSI: u32 = 1;
/// MSI-X index.
pub const IRQ_MSIX: u32 = 2;
/// Number of IRQ types (INTx, MSI, MSI-X, ERR, REQ).
pub const NUM_IRQS: u32 = 5;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// DMA_MAP flags: readable.
pub const DMA_FLAG_READ: u32 = 1 << 0;
/// DMA_MAP flags: writeable.
pub const DMA_FLAG_WRITE: u32 = 1 << 1;

/// DEVICE_FEATURE flags: the feature index (bits 0-15).
pub const FEATURE_MASK: u32 = 0xffff;
/// DEVICE_FEATURE flags: `VFIO_DEVICE_FEATURE_GET`.
pub const FEATURE_GET: u32 = 1 << 16;
/// DEVICE_FEATURE flags: `VFIO_DEVICE_FEATURE_SET`.
pub const FEATURE_SET: u32 = 1 << 17;
/// DEVICE_FEATURE flags: `VFIO_DEVICE_FEATURE_PROBE`.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// `VFIO_DEVICE_FEATURE_MIGRATION` (GET: `flags` u64).
pub const FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET/SET: `device_state` u32, `data_fd` s32).
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET: `page_size` u64, `num_ranges` u32, reserved
/// u32, then `num_ranges` × (`iova` u64, `length` u64)).
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (SET, no data).
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET: `iova`, `length`, `page_size` u64 each; the
/// reply adds the bitmap at offset 24).
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET: `stop_copy_length` u64). In the kernel's header,
/// not in the vfio-user spec's feature table; offered in addition.
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;

/// A parsed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message id (echoed in the reply).
    pub msg_id: u16,
    /// Command.
    pub command: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// Flags (type, no-reply, error).
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Decodes the 16 header bytes.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            msg_size: le32(b, 4),
            flags: le32(b, 8),
            error: le32(b, 12),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY
    }
}

/// Reads a little-endian u32 at `off` (caller checked the bounds).
pub fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `off` (caller checked the bounds).
pub fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Little-endian byte builder for payloads.
#[derive(Default)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}
