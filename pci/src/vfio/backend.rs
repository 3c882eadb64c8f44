//! [`VfioBackend`]: what the passthrough PCI function needs from whatever reaches the device —
//! the vfio-user protocol over a Unix socket, or kernel VFIO (container/group or iommufd).
//!
//! The shape follows the kernel's VFIO device uAPI (`linux/vfio.h`): a device has numbered
//! regions (BARs 0-5, the expansion ROM, PCI configuration space) and numbered interrupt
//! indices (INTx, MSI, MSI-X, ...); its DMA space is a set of IOVA ranges mapped to host memory.
//! Everything PCI above it (configuration space virtualisation, BAR placement, MSI-X emulation,
//! INTx, following the guest's IOMMU mappings) is written once, in the function that uses a
//! backend. The backend methods take `&self`: a backend is shared between vCPU threads (trapped
//! BAR accesses), the control thread and the IOMMU listener, and serialises what it must itself.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use thiserror::Error;

use crate::vfio::mig_backend::{IommuDirtyLog, MigrationBackend};
use vmm_sys_util::eventfd::EventFd;

/// Region index of BAR 0 (BARs are 0..=5).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of the expansion ROM.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// Region index of PCI configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// Number of PCI region indices (`VFIO_PCI_NUM_REGIONS`).
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;

/// Interrupt index of INTx.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
/// Interrupt index of MSI.
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// Interrupt index of MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// `vfio_region_info.flags`: the region can be read.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `vfio_region_info.flags`: the region can be written.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `vfio_region_info.flags`: the region (or its sparse areas) can be mmap'ed.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// Errors of a backend.
#[derive(Debug, Error)]
pub enum VfioError {
    /// The peer (vfio-user server) or the kernel refused the request with an errno.
    #[error("{what}: the device refused it: {source}")]
    Refused {
        /// The request.
        what: &'static str,
        /// The errno it answered.
        #[source]
        source: io::Error,
    },
    /// The connection to the device failed (socket error, peer gone, timeout).
    #[error("{what}: {source}")]
    Transport {
        /// The request.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The device answered something that breaks the protocol or makes no sense.
    #[error("{what}: malformed reply: {reason}")]
    Protocol {
        /// The request.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request does not fit the device (unknown region, out-of-range access, ...).
    #[error("{what}: {reason}")]
    Invalid {
        /// The request.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// `VFIO_DEVICE_GET_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (PCI, RESET, ...).
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt indices.
    pub num_irqs: u32,
}

/// A part of a region that can be mapped (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`), relative to the
/// region's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// `VFIO_DEVICE_GET_REGION_INFO`, with the file to map when the region is mappable.
#[derive(Clone)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in `mmap_fd` (kernel VFIO: in the device fd).
    pub offset: u64,
    /// The file to map the region (or its sparse areas) from, when `FLAG_MMAP` is set.
    pub mmap_fd: Option<Arc<dyn AsRawFd + Send + Sync>>,
    /// Mappable areas; empty with `FLAG_MMAP` means the whole region.
    pub sparse: Vec<SparseArea>,
}

impl std::fmt::Debug for RegionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionInfo")
            .field("index", &self.index)
            .field("flags", &self.flags)
            .field("size", &self.size)
            .field("offset", &self.offset)
            .field("mmap_fd", &self.mmap_fd.as_ref().map(|fd| fd.as_raw_fd()))
            .field("sparse", &self.sparse)
            .finish()
    }
}

impl RegionInfo {
    /// The areas to map into the guest: the sparse areas, or the whole region when it is
    /// mappable without them, or none.
    pub fn mappable_areas(&self) -> Vec<SparseArea> {
        if self.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || self.mmap_fd.is_none() {
            return Vec::new();
        }
        if self.sparse.is_empty() {
            return vec![SparseArea {
                offset: 0,
                size: self.size,
            }];
        }
        self.sparse.clone()
    }
}

/// `VFIO_DEVICE_GET_IRQ_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE).
    pub flags: u32,
    /// Number of vectors (0: the index is not supported).
    pub count: u32,
}

/// What backs a DMA mapping.
#[derive(Debug, Clone, Copy)]
pub enum DmaBacking<'a> {
    /// Host memory the device accesses directly: guest RAM, `fd` at `offset` (vfio-user passes
    /// the fd; kernel VFIO maps `host_addr`).
    Memory {
        /// The memory's file (the guest RAM memfd).
        fd: BorrowedFd<'a>,
        /// Offset of the IOVA range's first byte in `fd`.
        offset: u64,
        /// Where the range is mapped in this process.
        host_addr: u64,
    },
    /// No memory the device can reach itself: accesses come back to the VMM (vfio-user
    /// DMA_READ/DMA_WRITE), which serves them through the guest physical address space — how a
    /// device reaches a peer's BAR. Kernel VFIO cannot map this and refuses it.
    Trapped,
}

/// Access rights of a DMA mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaProt {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

/// Serves the device's DMA that the backend cannot do directly (vfio-user DMA_READ/DMA_WRITE):
/// `addr` is an IOVA in the device's DMA space; the handler translates it (the IOVA is the GPA
/// without an IOMMU) and accesses guest RAM or MMIO (a peer's BAR). Errors are answered to the
/// device as EFAULT.
pub trait DmaHandler: Send + Sync {
    /// Read `data.len()` bytes at `addr`.
    fn dma_read(&self, addr: u64, data: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `addr`.
    fn dma_write(&self, addr: u64, data: &[u8]) -> io::Result<()>;
}

/// How a passthrough device is reached.
pub trait VfioBackend: Send + Sync {
    /// `vfio-user`, `vfio-group` or `vfio-iommufd`, for `vm.info`.
    fn kind(&self) -> &'static str;
    /// Where the device is, for `vm.info`: `socket` (vfio-user), `host_device` and
    /// `iommu_group` (kernel VFIO).
    fn describe(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// The device's info.
    fn device_info(&self) -> Result<DeviceInfo, VfioError>;
    /// Region `index`'s info.
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError>;
    /// Interrupt index `index`'s info.
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError>;
    /// Read `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError>;
    /// Write `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError>;
    /// Signal vectors `start..start + fds.len()` of interrupt `index` on these eventfds
    /// (`VFIO_IRQ_SET_DATA_EVENTFD | ACTION_TRIGGER`); `None` leaves a vector unsignalled.
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), VfioError>;
    /// Turn interrupt index `index` off (`DATA_NONE | ACTION_TRIGGER`, count 0).
    fn disable_irqs(&self, index: u32) -> Result<(), VfioError>;
    /// INTx: unmask the line when `fd` is signalled (`DATA_EVENTFD | ACTION_UNMASK`): the
    /// resample eventfd KVM signals on the guest's EOI.
    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<(), VfioError>;
    /// Map `size` bytes at `iova` of the device's DMA space.
    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        backing: DmaBacking<'_>,
        prot: DmaProt,
    ) -> Result<(), VfioError>;
    /// Unmap `size` bytes at `iova`.
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), VfioError>;
    /// Reset the device (`VFIO_DEVICE_RESET`).
    fn reset(&self) -> Result<(), VfioError>;
    /// Where DMA the device cannot do directly goes (vfio-user only; kernel backends ignore it).
    fn set_dma_handler(&self, _handler: Arc<dyn DmaHandler>) {}
    /// Called once, when the peer is found dead (vfio-user: socket closed or timed out): the
    /// function then reads as all-ones and the VMM emits a `device-error` event.
    fn set_failure_hook(&self, _hook: Arc<dyn Fn(&str) + Send + Sync>) {}
    /// The migration uAPI, when the backend carries it (the device may still refuse it).
    fn migration(&self) -> Option<&dyn MigrationBackend> {
        None
    }
    /// The IOMMU's dirty tracking of the device, when it was opened with one (kernel iommufd
    /// with a dirty-tracking page table); `None` otherwise (vfio-user, the legacy container).
    fn iommu_dirty_log(&self) -> Option<Arc<dyn IommuDirtyLog>> {
        None
    }
}
