//! [`MigrationBackend`]: the VFIO migration uAPI v2 (`linux/vfio.h`: `VFIO_DEVICE_FEATURE_MIGRATION`,
//! `..._MIG_DEVICE_STATE`, `..._MIG_DATA_SIZE`, `..._DMA_LOGGING_*`) as a backend offers it. The
//! vfio-user backend carries it in DEVICE_FEATURE and MIG_DATA_READ/WRITE messages, the kernel
//! backends in ioctls and the data fd. Which arcs to take and when is not decided here (see
//! `migration::device_fsm` and [`crate::vfio::migration`]); this is transport only.

use std::io;

use crate::vfio::VfioError;

/// `VFIO_MIGRATION_STOP_COPY`: the device supports STOP_COPY (and so migration at all).
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`: the device supports RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY).
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`: the device supports PRE_COPY.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// A device's dirty-page report (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`): bit `n` (word
/// `n / 64`, bit `n % 64`) stands for the page at `iova + n * page_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaDirtyReport {
    /// First IOVA covered.
    pub iova: u64,
    /// Bytes covered.
    pub length: u64,
    /// Bytes per bit.
    pub page_size: u64,
    /// The bitmap.
    pub bitmap: Vec<u64>,
}

impl DmaDirtyReport {
    /// The IOVAs of the dirty pages.
    pub fn dirty_iovas(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.length.div_ceil(self.page_size.max(1));
        (0..pages)
            .filter(|n| {
                let word = self.bitmap.get((n / 64) as usize).copied().unwrap_or(0);
                word & (1 << (n % 64)) != 0
            })
            .map(|n| self.iova + n * self.page_size)
    }
}

/// The migration half of a backend. Every method moves or reads exactly what it says; none
/// walks several arcs.
pub trait MigrationBackend: Send + Sync {
    /// `VFIO_DEVICE_FEATURE_MIGRATION` (GET): the `VFIO_MIGRATION_*` flags, or `None` when the
    /// device does not support migration (the feature is refused).
    fn migration_flags(&self) -> Result<Option<u64>, VfioError>;

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (SET): take the arc from the current state to
    /// `state` (a `vfio_device_mig_state` value). Callers only ask for direct arcs.
    fn set_mig_state(&self, state: u32) -> Result<(), VfioError>;

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET): the current state.
    fn mig_state(&self) -> Result<u32, VfioError>;

    /// Read at most `max` bytes of migration data (PRE_COPY, PRE_COPY_P2P or STOP_COPY). Fewer
    /// bytes than `max` — zero included — mean "no more for now" in a pre-copy state and "end
    /// of the data" in STOP_COPY; the kernel's ENOMSG is reported as zero bytes.
    fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, VfioError>;

    /// Write migration data (RESUMING).
    fn mig_data_write(&self, data: &[u8]) -> Result<(), VfioError>;

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET): the bytes STOP_COPY would produce now, or
    /// `None` when the device does not say.
    fn mig_data_size(&self) -> Result<Option<u64>, VfioError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` for `ranges` (`(iova, length)`) at `page_size`:
    /// the page size the device picked, or `None` when it has no DMA logging.
    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Option<u64>, VfioError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    fn dma_logging_stop(&self) -> Result<(), VfioError>;

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` for `length` bytes at `iova`: the pages the
    /// device wrote since the last report of them (reporting clears them).
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError>;
}

/// The IOMMU's record of a device's DMA writes (iommufd: a dirty-tracking HWPT), for a device
/// without DMA logging of its own. It covers every IOVA the device can reach; reading clears
/// what it reads.
pub trait IommuDirtyLog: Send + Sync + std::fmt::Debug {
    /// Starts (`true`; what was recorded before is dropped) or stops recording.
    fn set_enabled(&self, on: bool) -> Result<(), VfioError>;

    /// The pages of `length` bytes at `iova` written since they were last read, at
    /// `page_size` bytes per bit, clearing them. The range must be mapped without holes and
    /// aligned to `page_size`.
    fn read_and_clear(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError>;
}

// Splitting and checking dirty-page reports: the same for a device's DMA log (vfio-user or
// kernel) and for the IOMMU's dirty bitmap.

/// Splits a DMA_LOGGING_REPORT of `length` bytes at `iova` into pieces whose bitmaps are at
/// most `max_bitmap_bytes` (a multiple of 8): every piece but the last covers a multiple of
/// 64 pages, so the pieces' bitmaps concatenate word by word into the whole range's bitmap.
pub fn report_pieces(
    iova: u64,
    length: u64,
    page_size: u64,
    max_bitmap_bytes: u64,
) -> Vec<(u64, u64)> {
    let words = (max_bitmap_bytes / 8).max(1);
    let per_piece = words.saturating_mul(64).saturating_mul(page_size.max(1));
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < length {
        let len = per_piece.min(length - at);
        pieces.push((iova + at, len));
        at += len;
    }
    pieces
}

/// u64 words of the bitmap of `length` bytes at `page_size` bytes per bit.
pub fn bitmap_words(length: u64, page_size: u64) -> u64 {
    length.div_ceil(page_size.max(1)).div_ceil(64)
}

/// Checks a dirty-page report's range and page size the way the kernel will (`page_size` a power of two
/// of at least 4 KiB, a non-empty range that does not wrap).
pub fn check_report(
    what: &'static str,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<(), VfioError> {
    if !page_size.is_power_of_two() || page_size < 4096 {
        return Err(VfioError::Invalid {
            what,
            reason: format!("page size {page_size:#x} is not a power of two of at least 4 KiB"),
        });
    }
    if length == 0 || iova.checked_add(length).is_none() {
        return Err(VfioError::Invalid {
            what,
            reason: format!("bad range {iova:#x}+{length:#x}"),
        });
    }
    Ok(())
}

/// Whether an error is the device saying "this feature does not exist here" (the kernel answers
/// ENOTTY for an unknown feature; vfio-user servers answer ENOTSUP or EINVAL).
pub fn is_unsupported(e: &VfioError) -> bool {
    match e {
        VfioError::Refused { source, .. } => matches!(
            source.raw_os_error(),
            Some(libc::ENOTTY) | Some(libc::ENOTSUP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
        ),
        _ => false,
    }
}

/// An error for a backend that has no migration at all.
pub fn no_migration(what: &'static str) -> VfioError {
    VfioError::Refused {
        what,
        source: io::Error::from_raw_os_error(libc::ENOTTY),
    }
}
