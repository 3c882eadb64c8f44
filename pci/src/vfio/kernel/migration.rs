//! The VFIO migration uAPI v2 (`linux/vfio.h`) on a kernel VFIO device: [`MigrationBackend`] for
//! [`KernelVfioDevice`], plus [`KernelVfioDevice::precopy_info`].
//!
//! What vfio-ioctls 0.10 does and what is done here instead: `VfioDevice` wraps the whole
//! migration v2 feature set (`query_migration_support`, `set_migration_state`,
//! `get_migration_state`, `get_mig_data_size`, `mig_get_precopy_info`,
//! `read_migration_data`, `write_migration_data`, `start/stop/report_dma_logging`). The
//! GET-only features and DMA logging are used from it as they are. Two things are not:
//! - the data fd the kernel returns on SET into PRE_COPY, PRE_COPY_P2P, STOP_COPY or RESUMING
//!   is kept in a `pub(crate)` field with no accessor, so it can be neither polled nor read
//!   without the crate's lock, and `set_migration_state` drops (closes) it whenever the ioctl
//!   fails — a refused arc out of STOP_COPY would end the saving session with it;
//! - `read_migration_data` is one `read(2)`: ENOMSG (the temporary end of the pre-copy data)
//!   and EINTR come back as `VfioMigrationDataIo` errors, and `read_migration_data_to_end`
//!   loses what it already read when the read fails with ENOMSG.
//!
//! So MIG_DEVICE_STATE SET and `VFIO_MIG_GET_PRECOPY_INFO` are issued here (vmm-sys-util ioctls
//! on the device fd and the data fd), the data fd is ours, and the data is read by
//! [`read_mig_data`] / written by [`write_mig_data`], which take any reader or writer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use log::warn;
use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_mig_state,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY, vfio_precopy_info, VFIO_BASE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
use vfio_ioctls::DmaLoggingRange;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::{errno_of, to_io, KernelVfioDevice};
pub use crate::vfio::mig_backend::{bitmap_words, check_report, report_pieces};
use crate::vfio::mig_backend::{DmaDirtyReport, MigrationBackend};
use crate::vfio::VfioError;

// linux/vfio.h: VFIO_DEVICE_FEATURE _IO(VFIO_TYPE, VFIO_BASE + 17) on the device fd,
// VFIO_MIG_GET_PRECOPY_INFO _IO(VFIO_TYPE, VFIO_BASE + 21) on the migration data fd.
ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);
ioctl_io_nr!(VFIO_MIG_GET_PRECOPY_INFO, VFIO_TYPE as u32, VFIO_BASE + 21);

/// The kernel's cap on DMA_LOGGING_START ranges: as many `struct
/// vfio_device_feature_dma_logging_range` (16 bytes) as fit in a 4 KiB page (linux/vfio.h: "The
/// core kernel code guarantees to support by minimum num_ranges that fit into a single kernel
/// page").
pub const MAX_LOGGING_RANGES: usize = 4096 / 16;

/// Largest bitmap (bytes) asked for in one DMA_LOGGING_REPORT: 128 KiB covers 4 GiB of 4 KiB
/// pages; longer reports are asked in pieces. A multiple of 8, so every piece but the last
/// covers a whole number of u64 words and the pieces' bitmaps concatenate.
pub const MAX_REPORT_BITMAP_BYTES: u64 = 128 << 10;

/// `struct vfio_device_feature` followed by its payload, as `VFIO_DEVICE_FEATURE` takes it
/// (`argsz` covers both; the payload starts at byte 8, where the header's `data[]` begins).
#[repr(C)]
pub(crate) struct Feature<T> {
    /// `argsz` and `flags`.
    pub(crate) hdr: vfio_device_feature,
    /// The feature's data (`data[]`).
    pub(crate) payload: T,
}

impl<T> Feature<T> {
    /// A request for `flags` (`VFIO_DEVICE_FEATURE_GET`/`SET` | the feature index).
    pub(crate) fn new(flags: u32, payload: T) -> Self {
        Feature {
            hdr: vfio_device_feature {
                argsz: size_of::<Self>() as u32,
                flags,
                ..Default::default()
            },
            payload,
        }
    }
}

/// Whether `state` belongs to the "saving group" (PRE_COPY, PRE_COPY_P2P, STOP_COPY) or is
/// RESUMING: the states with a data transfer session, hence a data fd.
pub fn has_data_session(state: u32) -> bool {
    state == vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY
        || state == vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P
        || state == vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY
        || state == vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING
}

/// Whether `state` is PRE_COPY or PRE_COPY_P2P (where `VFIO_MIG_GET_PRECOPY_INFO` is valid).
fn is_precopy(state: u32) -> bool {
    state == vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY
        || state == vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P
}

/// The device's migration session as this process knows it: the state last set and the data
/// fd of the current transfer session.
#[derive(Debug)]
pub(crate) struct MigSession {
    /// The state of the last successful SET (RUNNING until one).
    state: u32,
    /// The data fd; shared with readers so that a blocking read does not hold the lock.
    fd: Option<Arc<File>>,
}

impl Default for MigSession {
    fn default() -> Self {
        MigSession {
            state: vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
            fd: None,
        }
    }
}

impl MigSession {
    /// Records a successful SET into `state` that returned `returned` (the kernel's `data_fd`
    /// when it was not -1): a new session's fd replaces the old one; moving within the saving
    /// group keeps it; leaving the saving group or RESUMING closes it (the uAPI makes closing
    /// it the user's job).
    pub(crate) fn apply(&mut self, state: u32, returned: Option<File>) {
        self.state = state;
        if !has_data_session(state) {
            // A data fd returned for a state without a session would be a kernel bug; closing
            // it is all there is to do with it.
            drop(returned);
            self.fd = None;
            return;
        }
        match returned {
            Some(f) => self.fd = Some(Arc::new(f)),
            None if self.fd.is_none() => {
                warn!("migration state {state} has a data session but the kernel gave no data fd");
            }
            None => {}
        }
    }

    /// The data fd, when there is a session.
    pub(crate) fn fd(&self) -> Option<Arc<File>> {
        self.fd.clone()
    }
}

/// Reads at most `max` bytes of migration data from `r` (the data fd): reads until `max`
/// bytes, the end of the stream (a read of 0: for good in STOP_COPY) or ENOMSG (the kernel's
/// temporary end of the pre-copy data), retrying EINTR. EAGAIN (a non-blocking fd with nothing
/// ready) also ends the read, as "no more for now".
pub fn read_mig_data<R: Read>(mut r: R, max: usize) -> io::Result<Vec<u8>> {
    // Grown as data arrives rather than allocated at `max` up front: callers ask for large
    // reads and devices often have little.
    const STEP: usize = 64 << 10;
    let mut buf = Vec::new();
    while buf.len() < max {
        let at = buf.len();
        let want = (max - at).min(STEP);
        buf.resize(at + want, 0);
        match r.read(&mut buf[at..]) {
            Ok(0) => {
                buf.truncate(at);
                break;
            }
            Ok(n) => buf.truncate(at + n),
            Err(e) => {
                buf.truncate(at);
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOMSG) | Some(libc::EAGAIN) => break,
                    _ if e.kind() == io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(buf)
}

/// Writes all of `data` to `w` (the RESUMING data fd), retrying EINTR and short writes.
pub fn write_mig_data<W: Write>(mut w: W, data: &[u8]) -> io::Result<()> {
    // write_all retries ErrorKind::Interrupted (EINTR) and continues after short writes; a
    // write of 0 bytes becomes WriteZero.
    w.write_all(data)
}

/// Merges `ranges` (`(iova, length)`) into at most `max` ranges covering all of them: sorted,
/// overlapping and touching ranges joined, then the closest neighbours joined (covering the
/// gap between them) until `max` remain. Empty ranges are dropped.
pub fn fit_logging_ranges(ranges: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    // (first, end) with end exclusive, saturating at the top of the space.
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(iova, len)| (iova, iova.saturating_add(len)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    while merged.len() > max.max(1) {
        // Join the pair with the smallest gap.
        let Some(i) = (1..merged.len()).min_by_key(|&i| merged[i].0 - merged[i - 1].1) else {
            break;
        };
        merged[i - 1].1 = merged[i].1;
        merged.remove(i);
    }
    merged
        .into_iter()
        .map(|(start, end)| (start, end - start))
        .collect()
}

/// A vfio-ioctls failure as the backend's error, keeping the errno.
fn refused(what: &'static str, e: vfio_ioctls::VfioError) -> VfioError {
    VfioError::Refused {
        what,
        source: to_io(e),
    }
}

impl KernelVfioDevice {
    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data fd: `(initial_bytes, dirty_bytes)`, the
    /// estimate of the pre-copy data still to read. `None` when the device is not in a
    /// pre-copy state (as set through this device) or its driver does not answer it.
    pub fn precopy_info(&self) -> Result<Option<(u64, u64)>, VfioError> {
        const WHAT: &str = "VFIO_MIG_GET_PRECOPY_INFO";
        let fd = {
            let mig = self.mig.lock().unwrap();
            match mig.fd() {
                Some(fd) if is_precopy(mig.state) => fd,
                _ => return Ok(None),
            }
        };
        let mut info = vfio_precopy_info {
            argsz: size_of::<vfio_precopy_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `fd` is the migration data fd the kernel gave us, open while we hold the
        // Arc; `info` is a properly sized `struct vfio_precopy_info` the kernel fills.
        let ret = unsafe { ioctl_with_mut_ref(&*fd, VFIO_MIG_GET_PRECOPY_INFO(), &mut info) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return match source.raw_os_error() {
                // EINVAL: not in a pre-copy state; ENOTTY: the fd does not know the ioctl.
                Some(libc::EINVAL) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(VfioError::Refused { what: WHAT, source }),
            };
        }
        Ok(Some((info.initial_bytes, info.dirty_bytes)))
    }

    /// The data fd of the current session, or why there is none.
    fn data_fd(&self, what: &'static str) -> Result<Arc<File>, VfioError> {
        self.mig
            .lock()
            .unwrap()
            .fd()
            .ok_or_else(|| VfioError::Invalid {
                what,
                reason: format!(
                    "{}: no migration data session (the device is not in PRE_COPY, \
                     PRE_COPY_P2P, STOP_COPY or RESUMING)",
                    self.bdf
                ),
            })
    }
}

impl MigrationBackend for KernelVfioDevice {
    fn migration_flags(&self) -> Result<Option<u64>, VfioError> {
        // vfio-ioctls answers None for ENOTTY (no migration in this kernel) and EINVAL.
        self.device
            .query_migration_support()
            .map_err(|e| refused("VFIO_DEVICE_FEATURE_MIGRATION", e))
    }

    fn set_mig_state(&self, state: u32) -> Result<(), VfioError> {
        let mut arg = Feature::new(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            vfio_device_feature_mig_state {
                device_state: state,
                data_fd: -1,
            },
        );
        // Held across the ioctl: state changes are serialised with each other, not with data
        // reads (those hold their own reference to the fd).
        let mut mig = self.mig.lock().unwrap();
        // SAFETY: `arg` is a `struct vfio_device_feature` whose `argsz` covers the
        // `struct vfio_device_feature_mig_state` right after it; the kernel reads both and
        // writes `data_fd`.
        let ret = unsafe { ioctl_with_mut_ref(&**self.device, VFIO_DEVICE_FEATURE(), &mut arg) };
        if ret < 0 {
            // The device may now be anywhere along the arc (linux/vfio.h); the session's fd
            // stays until a successful SET out of the session closes it.
            return Err(VfioError::Refused {
                what: "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
                source: io::Error::last_os_error(),
            });
        }
        let returned = (arg.payload.data_fd >= 0).then(|| {
            // SAFETY: the kernel installed this fd for us on success; nothing else owns it.
            unsafe { File::from_raw_fd(arg.payload.data_fd) }
        });
        mig.apply(state, returned);
        Ok(())
    }

    fn mig_state(&self) -> Result<u32, VfioError> {
        self.device
            .get_migration_state()
            .map_err(|e| refused("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", e))
    }

    fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, VfioError> {
        const WHAT: &str = "mig_data_read";
        let fd = self.data_fd(WHAT)?;
        read_mig_data(&*fd, max).map_err(|source| VfioError::Refused { what: WHAT, source })
    }

    fn mig_data_write(&self, data: &[u8]) -> Result<(), VfioError> {
        const WHAT: &str = "mig_data_write";
        let fd = self.data_fd(WHAT)?;
        write_mig_data(&*fd, data).map_err(|source| VfioError::Refused { what: WHAT, source })
    }

    fn mig_data_size(&self) -> Result<Option<u64>, VfioError> {
        match self.device.get_mig_data_size() {
            Ok(n) => Ok(Some(n)),
            Err(e) if errno_of(&e) == Some(libc::ENOTTY) => Ok(None),
            Err(e) => Err(refused("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", e)),
        }
    }

    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Option<u64>, VfioError> {
        const WHAT: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_START";
        let fitted: Vec<DmaLoggingRange> = fit_logging_ranges(ranges, MAX_LOGGING_RANGES)
            .into_iter()
            .map(|(iova, length)| DmaLoggingRange { iova, length })
            .collect();
        if fitted.is_empty() {
            return Err(VfioError::Invalid {
                what: WHAT,
                reason: "no range to log".into(),
            });
        }
        // vfio-ioctls builds the ranges array and passes its pointer.
        match self.device.start_dma_logging(page_size, &fitted) {
            Ok(p) if p.is_power_of_two() => Ok(Some(p)),
            Ok(p) => Err(VfioError::Protocol {
                what: WHAT,
                reason: format!("page size {p:#x} is not a power of two"),
            }),
            // ENOTTY: the device has no DMA logging (no log_ops).
            Err(e) if errno_of(&e) == Some(libc::ENOTTY) => Ok(None),
            Err(vfio_ioctls::VfioError::DmaLoggingAlreadyStarted) => Err(VfioError::Invalid {
                what: WHAT,
                reason: format!("{}: DMA logging is already started", self.bdf),
            }),
            Err(e) => Err(refused(WHAT, e)),
        }
    }

    fn dma_logging_stop(&self) -> Result<(), VfioError> {
        match self.device.stop_dma_logging() {
            // Nothing was started through this device: nothing to stop.
            Ok(()) | Err(vfio_ioctls::VfioError::DmaLoggingNotStarted) => Ok(()),
            Err(e) => Err(refused("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP", e)),
        }
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        const WHAT: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT";
        check_report(WHAT, iova, length, page_size)?;
        let mut bitmap = Vec::with_capacity(bitmap_words(length, page_size) as usize);
        for (at, len) in report_pieces(iova, length, page_size, MAX_REPORT_BITMAP_BYTES) {
            // vfio-ioctls allocates the piece's bitmap and passes its pointer.
            let range = DmaLoggingRange {
                iova: at,
                length: len,
            };
            match self.device.report_dma_logging(range, page_size) {
                Ok(words) => bitmap.extend(words),
                Err(vfio_ioctls::VfioError::DmaLoggingNotStarted) => {
                    return Err(VfioError::Invalid {
                        what: WHAT,
                        reason: format!("{}: DMA logging is not started", self.bdf),
                    })
                }
                Err(e) => return Err(refused(WHAT, e)),
            }
        }
        Ok(DmaDirtyReport {
            iova,
            length,
            page_size,
            bitmap,
        })
    }
}
