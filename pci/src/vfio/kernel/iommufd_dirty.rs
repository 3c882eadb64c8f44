//! IOMMU dirty tracking through iommufd (`linux/iommufd.h`), for devices without DMA logging
//! of their own: the device is attached to a HWPT (hardware page table) allocated with
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`; `IOMMU_HWPT_SET_DIRTY_TRACKING` turns the IOMMU's dirty
//! bits on and off and `IOMMU_HWPT_GET_DIRTY_BITMAP` reads and clears them for an IOVA range.
//!
//! iommufd-ioctls 0.4 has `IommuFd::alloc_iommu_hwpt`, `get_hw_info` and
//! `destroy_iommu_object`, used here, but no call for SET_DIRTY_TRACKING or GET_DIRTY_BITMAP:
//! those two ioctls are issued here on its fd, with iommufd-bindings' structs.

use std::io;
use std::mem::size_of;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hwpt_alloc, iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use log::warn;
use vfio_ioctls::VfioIommufd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::errno_of;
use super::migration::{bitmap_words, check_report, report_pieces, MAX_REPORT_BITMAP_BYTES};
use crate::vfio::mig_backend::{DmaDirtyReport, IommuDirtyLog};
use crate::vfio::VfioError;

// linux/iommufd.h: IOMMU_HWPT_SET_DIRTY_TRACKING _IO(IOMMUFD_TYPE, 0x8b) and
// IOMMU_HWPT_GET_DIRTY_BITMAP _IO(IOMMUFD_TYPE, 0x8c).
ioctl_io_nr!(
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING
);
ioctl_io_nr!(
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP
);

/// Why a dirty-tracking HWPT could not be had.
#[derive(Debug)]
pub(crate) enum DirtyHwptError {
    /// `IOMMU_GET_HW_INFO` says the IOMMU has no dirty tracking (its capabilities).
    NoCapability(u64),
    /// A step was refused (the step, the errno).
    Refused(&'static str, io::Error),
}

/// The `IOMMU_HWPT_ALLOC` argument for a dirty-tracking HWPT of device `dev_id` over
/// `ioas_id` (a kernel-managed HWPT: `data_type` NONE, no data).
pub(crate) fn dirty_hwpt_alloc(dev_id: u32, ioas_id: u32) -> iommu_hwpt_alloc {
    iommu_hwpt_alloc {
        size: size_of::<iommu_hwpt_alloc>() as u32,
        flags: iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        dev_id,
        pt_id: ioas_id,
        ..Default::default()
    }
}

/// The `IOMMU_HWPT_SET_DIRTY_TRACKING` argument.
pub(crate) fn set_dirty_tracking_arg(hwpt_id: u32, on: bool) -> iommu_hwpt_set_dirty_tracking {
    iommu_hwpt_set_dirty_tracking {
        size: size_of::<iommu_hwpt_set_dirty_tracking>() as u32,
        flags: if on {
            iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id,
        __reserved: 0,
    }
}

/// The `IOMMU_HWPT_GET_DIRTY_BITMAP` argument for `bitmap` (read and clear: flags 0).
pub(crate) fn get_dirty_bitmap_arg(
    hwpt_id: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> iommu_hwpt_get_dirty_bitmap {
    iommu_hwpt_get_dirty_bitmap {
        size: size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id,
        flags: 0,
        __reserved: 0,
        iova,
        length,
        page_size,
        data: bitmap.as_mut_ptr() as u64,
    }
}

/// A HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`; destroyed when dropped (after the
/// device detached from it, see [`super::KernelVfioDevice`]'s `Drop`). Keeps the IOAS (and
/// iommufd) it was allocated from alive.
pub(crate) struct DirtyHwpt {
    vfio: Arc<VfioIommufd>,
    id: u32,
}

impl DirtyHwpt {
    /// Asks the IOMMU behind `dev_id` for a dirty-tracking HWPT over the IOAS of `vfio`: first
    /// whether it can track dirty pages at all (`IOMMU_GET_HW_INFO`), then the allocation.
    pub(crate) fn alloc(vfio: Arc<VfioIommufd>, dev_id: u32) -> Result<Self, DirtyHwptError> {
        let iommufd = vfio.iommufd();
        let mut info = iommu_hw_info {
            size: size_of::<iommu_hw_info>() as u32,
            dev_id,
            ..Default::default()
        };
        iommufd
            .get_hw_info(&mut info)
            .map_err(|e| DirtyHwptError::Refused("IOMMU_GET_HW_INFO", errno_io(&e)))?;
        if info.out_capabilities & iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING as u64 == 0 {
            return Err(DirtyHwptError::NoCapability(info.out_capabilities));
        }
        let mut alloc = dirty_hwpt_alloc(dev_id, vfio.ioas().id());
        iommufd.alloc_iommu_hwpt(&mut alloc).map_err(|e| {
            DirtyHwptError::Refused("IOMMU_HWPT_ALLOC (DIRTY_TRACKING)", errno_io(&e))
        })?;
        Ok(DirtyHwpt {
            vfio,
            id: alloc.out_hwpt_id,
        })
    }

    /// The HWPT's id.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for DirtyHwpt {
    fn drop(&mut self) {
        if let Err(e) = self.vfio.iommufd().destroy_iommu_object(self.id) {
            // EBUSY: a device is still attached; the kernel frees it with the iommufd.
            warn!("cannot destroy dirty-tracking HWPT {}: {e}", self.id);
        }
    }
}

/// An errno-carrying error as an io::Error.
fn errno_io(e: &(dyn std::error::Error + 'static)) -> io::Error {
    match errno_of(e) {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    }
}

/// IOMMU dirty tracking of one device opened with [`super::IommufdSet::open_dirty_tracking`]
/// (get it from [`super::IommufdSet::dirty_tracking`]): the device's DMA writes are recorded by
/// the IOMMU in the page table it is attached to, for every IOVA of its IOAS — use it where
/// [`crate::vfio::mig_backend::MigrationBackend::dma_logging_start`] answers `None`.
///
/// Use: [`Self::set_enabled`]`(true)` when the migration starts (the bits the IOMMU had are
/// cleared), then [`Self::read_and_clear`] each round for each mapped IOVA range, then
/// [`Self::set_enabled`]`(false)`. A page table shared by devices of one IOMMU group would
/// report them together; each device gets its own here.
#[derive(Clone)]
pub struct IommuDirtyTracking {
    hwpt: Arc<DirtyHwpt>,
}

impl std::fmt::Debug for IommuDirtyTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuDirtyTracking")
            .field("hwpt_id", &self.hwpt.id)
            .finish()
    }
}

impl IommuDirtyTracking {
    /// A handle on `hwpt`.
    pub(crate) fn new(hwpt: Arc<DirtyHwpt>) -> Self {
        IommuDirtyTracking { hwpt }
    }

    /// The id of the HWPT the device is attached to.
    pub fn hwpt_id(&self) -> u32 {
        self.hwpt.id
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`: starts (`true`) or stops recording the device's writes.
    pub fn set_enabled(&self, on: bool) -> Result<(), VfioError> {
        let mut arg = set_dirty_tracking_arg(self.hwpt.id, on);
        // SAFETY: `arg` is a properly sized `struct iommu_hwpt_set_dirty_tracking`, read by the
        // kernel on the iommufd the HWPT belongs to.
        let ret = unsafe {
            ioctl_with_mut_ref(
                self.hwpt.vfio.iommufd().as_ref(),
                IOMMU_HWPT_SET_DIRTY_TRACKING(),
                &mut arg,
            )
        };
        if ret < 0 {
            return Err(VfioError::Refused {
                what: "IOMMU_HWPT_SET_DIRTY_TRACKING",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`: the pages of `length` bytes at `iova` the device wrote
    /// since they were last read, at `page_size` bytes per bit (a power of two of at least
    /// 4 KiB; `iova` and `length` multiples of it and of the IOMMU's page size), clearing them.
    /// Long ranges are read in pieces whose bitmaps stay bounded.
    pub fn read_and_clear(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        const WHAT: &str = "IOMMU_HWPT_GET_DIRTY_BITMAP";
        check_report(WHAT, iova, length, page_size)?;
        if !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
            return Err(VfioError::Invalid {
                what: WHAT,
                reason: format!("{iova:#x}+{length:#x} is not aligned to {page_size:#x}"),
            });
        }
        let mut bitmap = Vec::with_capacity(bitmap_words(length, page_size) as usize);
        for (at, len) in report_pieces(iova, length, page_size, MAX_REPORT_BITMAP_BYTES) {
            // The kernel only sets bits: the piece's bitmap starts zeroed.
            let mut piece = vec![0u64; bitmap_words(len, page_size) as usize];
            let mut arg = get_dirty_bitmap_arg(self.hwpt.id, at, len, page_size, &mut piece);
            // SAFETY: `arg` is a properly sized `struct iommu_hwpt_get_dirty_bitmap`; its
            // `data` points to `piece`, which holds one bit per page of the range and outlives
            // the call; the kernel writes only within it.
            let ret = unsafe {
                ioctl_with_mut_ref(
                    self.hwpt.vfio.iommufd().as_ref(),
                    IOMMU_HWPT_GET_DIRTY_BITMAP(),
                    &mut arg,
                )
            };
            if ret < 0 {
                return Err(VfioError::Refused {
                    what: WHAT,
                    source: io::Error::last_os_error(),
                });
            }
            bitmap.extend_from_slice(&piece);
        }
        Ok(DmaDirtyReport {
            iova,
            length,
            page_size,
            bitmap,
        })
    }
}

impl IommuDirtyLog for IommuDirtyTracking {
    fn set_enabled(&self, on: bool) -> Result<(), VfioError> {
        IommuDirtyTracking::set_enabled(self, on)
    }

    fn read_and_clear(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        IommuDirtyTracking::read_and_clear(self, iova, length, page_size)
    }
}
