//! The VFIO migration uAPI v2 over vfio-user: DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE, the DMA
//! logging features) and MIG_DATA_READ/WRITE, from the specification's "Device Features" and
//! "VFIO_USER_MIG_DATA_READ" sections.
//!
//! Where the specification is silent or ambiguous, what we chose:
//! - MIG_DEVICE_STATE SET carries `data_fd`, which vfio-user does not use; we send -1.
//! - `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (index 9) is not in the vfio-user feature table; we ask
//!   for it with the kernel's layout (one u64, `stop_copy_length`) and treat a refusal as "the
//!   device does not say".
//! - DMA_LOGGING_REPORT's formula in the specification (`bitmap[(addr - iova)/page_size] &
//!   (1ULL << (addr % 64))`) indexes words by page; we read it as the kernel does: page `n`
//!   is bit `n % 64` of u64 word `n / 64`.
//! - A MIG_DATA_READ reply shorter than asked ends the data "for now" in PRE_COPY and for good
//!   in STOP_COPY (the specification: "there is no more migration data to read").
//! - The specification does not say how an arc relates to the server's own DMA requests. The
//!   kernel requires outstanding P2P DMA to complete before an arc into a P2P state completes;
//!   we take a MIG_DEVICE_STATE SET as complete only once every DMA_READ/DMA_WRITE the server
//!   sent before its reply has been served (our DMA worker serves them off the reader thread).

use super::backend::VfioUserBackend;
use super::protocol::{
    DEVICE_FEATURE_GET, DEVICE_FEATURE_SET, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE,
};
use crate::vfio::mig_backend::{
    bitmap_words, check_report, is_unsupported, report_pieces, DmaDirtyReport, MigrationBackend,
};
use crate::vfio::VfioError;

/// Feature index `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (kernel; see the module doc).
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;

/// How long a migration-state arc may take: a device saving or loading a large state on the
/// arc (STOP_COPY, RESUMING -> STOP) can take seconds; the general request timeout (5 s) would
/// declare it dead. A hung device still fails the migration after this, and the VM resumes.
const ARC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest bitmap (bytes) asked for in one DMA_LOGGING_REPORT; longer ranges are asked in
/// pieces.
const MAX_REPORT_BITMAP: u64 = 32 << 10;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn short(what: &'static str, len: usize) -> VfioError {
    VfioError::Protocol {
        what,
        reason: format!("{len} bytes of feature data"),
    }
}

impl VfioUserBackend {
    /// One DMA_LOGGING_REPORT piece whose bitmap fits one reply.
    fn report_piece(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, VfioError> {
        const WHAT: &str = "DMA_LOGGING_REPORT";
        let words = bitmap_words(length, page_size);
        let mut req = Vec::with_capacity(24);
        req.extend_from_slice(&iova.to_le_bytes());
        req.extend_from_slice(&length.to_le_bytes());
        req.extend_from_slice(&page_size.to_le_bytes());
        let want = 24 + words * 8;
        let data = self.device_feature(
            FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET,
            &req,
            want as u32,
        )?;
        if data.len() as u64 != want || data[..24] != req[..] {
            return Err(VfioError::Protocol {
                what: WHAT,
                reason: format!(
                    "{} bytes answered for a {want}-byte report, or another range",
                    data.len()
                ),
            });
        }
        let mut bitmap: Vec<u64> = data[24..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        // Bits past the range must be zero (the specification); we clear them rather than trust.
        let pages = length.div_ceil(page_size);
        if !pages.is_multiple_of(64) {
            if let Some(last) = bitmap.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Ok(bitmap)
    }
}

impl MigrationBackend for VfioUserBackend {
    fn migration_flags(&self) -> Result<Option<u64>, VfioError> {
        match self.device_feature(FEATURE_MIGRATION | DEVICE_FEATURE_GET, &[], 8) {
            Ok(d) => u64_at(&d, 0)
                .map(Some)
                .ok_or_else(|| short("VFIO_DEVICE_FEATURE_MIGRATION", d.len())),
            Err(e) if is_unsupported(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_mig_state(&self, state: u32) -> Result<(), VfioError> {
        let mut data = state.to_le_bytes().to_vec();
        data.extend_from_slice(&(-1i32).to_le_bytes());
        self.device_feature_within(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
            &data,
            8,
            ARC_TIMEOUT,
        )?;
        // The arc is complete only once the DMA the device started before it has been served
        // (see `Client::wait_dma_done`).
        self.client()
            .wait_dma_done("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE")
    }

    fn mig_state(&self) -> Result<u32, VfioError> {
        let d = self.device_feature(FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_GET, &[], 8)?;
        u32_at(&d, 0).ok_or_else(|| short("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", d.len()))
    }

    fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, VfioError> {
        VfioUserBackend::mig_data_read(self, max.min(u32::MAX as usize) as u32)
    }

    fn mig_data_write(&self, data: &[u8]) -> Result<(), VfioError> {
        VfioUserBackend::mig_data_write(self, data)
    }

    fn mig_data_size(&self) -> Result<Option<u64>, VfioError> {
        match self.device_feature(FEATURE_MIG_DATA_SIZE | DEVICE_FEATURE_GET, &[], 8) {
            Ok(d) => u64_at(&d, 0)
                .map(Some)
                .ok_or_else(|| short("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", d.len())),
            Err(e) if is_unsupported(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Option<u64>, VfioError> {
        let mut req = Vec::with_capacity(16 + ranges.len() * 16);
        req.extend_from_slice(&page_size.to_le_bytes());
        req.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        req.extend_from_slice(&0u32.to_le_bytes());
        for (iova, len) in ranges {
            req.extend_from_slice(&iova.to_le_bytes());
            req.extend_from_slice(&len.to_le_bytes());
        }
        let flags = FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_SET;
        match self.device_feature(flags, &req, req.len() as u32) {
            // The reply is the request, with the page size the device picked.
            Ok(d) => match u64_at(&d, 0) {
                Some(p) if p.is_power_of_two() => Ok(Some(p)),
                Some(p) => Err(VfioError::Protocol {
                    what: "DMA_LOGGING_START",
                    reason: format!("page size {p} is not a power of two"),
                }),
                // An empty SET reply: the device kept our page size.
                None if d.is_empty() => Ok(Some(page_size)),
                None => Err(short("DMA_LOGGING_START", d.len())),
            },
            Err(e) if is_unsupported(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn dma_logging_stop(&self) -> Result<(), VfioError> {
        self.device_feature(FEATURE_DMA_LOGGING_STOP | DEVICE_FEATURE_SET, &[], 0)
            .map(drop)
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        check_report("DMA_LOGGING_REPORT", iova, length, page_size)?;
        let mut bitmap = Vec::with_capacity(bitmap_words(length, page_size) as usize);
        for (at, len) in report_pieces(iova, length, page_size, MAX_REPORT_BITMAP) {
            bitmap.extend(self.report_piece(at, len, page_size)?);
        }
        Ok(DmaDirtyReport {
            iova,
            length,
            page_size,
            bitmap,
        })
    }
}
