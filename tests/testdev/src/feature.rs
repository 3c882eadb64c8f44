//! The wire side of migration and DMA logging: VFIO_USER_DEVICE_FEATURE (16),
//! VFIO_USER_MIG_DATA_READ (17) and VFIO_USER_MIG_DATA_WRITE (18), from the vfio-user spec's
//! tables, with the kernel's `VFIO_DEVICE_FEATURE` rules where the spec defers to VFIO.
//!
//! Choices where the texts are silent or loose:
//! - DEVICE_FEATURE checks as the kernel does: unknown flag bits, GET with SET without PROBE,
//!   neither GET nor SET without PROBE, an op the feature lacks, `argsz` smaller than the
//!   header or (GET, SET) than the feature's data: EINVAL. A feature the device does not
//!   offer (unknown index, migration with `--migration none`, DMA logging with
//!   `--dma-logging off`): ENOTTY, as the kernel. A too-small GET `argsz` is refused rather
//!   than answered with a data-less reply announcing the size: a feature reply without its
//!   data is no use to anybody.
//! - Replies: PROBE and SET echo the request (the spec: "the same as the request payload"),
//!   with MIG_DEVICE_STATE's `device_state` the new state and DMA_LOGGING_START's `page_size`
//!   the one we log at; GET replies `argsz` = 8 + data, the request's flags, the data.
//!   MIG_DEVICE_STATE GET answers `data_fd` -1 (as the kernel); no fd is ever attached.
//! - MIG_DATA_READ: `size` above `max_data_xfer_size`, or `argsz` below 8 + `size`: EINVAL (a
//!   shortened reply would read as "no more data"). The reply has `size` = bytes returned;
//!   fewer than asked means no more data for now — in PRE_COPY that is the kernel's ENOMSG
//!   on the data fd (0 bytes: nothing at all), in STOP_COPY the end of the stream.
//! - MIG_DATA_WRITE: `size` must equal the data carried (EINVAL); the reply has no payload.
//! - Without migration support MIG_DATA_READ/WRITE answer ENOTSUP (as before migration
//!   existed); with it, outside the saving states / RESUMING, EINVAL.

use log::{debug, info, warn};

use crate::device::DeviceState;
use crate::dirty_log::{DmaLog, LOG_PAGE, MAX_LOG_RANGES};
use crate::engine::Shared;
use crate::proto::*;

/// A reply payload or an errno.
pub type FeatureReply = Result<Vec<u8>, i32>;

/// The GET/SET ops a feature supports here, or ENOTTY when the device does not offer it.
fn ops(feature: u32, mig_caps: u64, dma_logging: bool) -> Result<u32, i32> {
    let migration = mig_caps != 0;
    match feature {
        FEATURE_MIGRATION | FEATURE_MIG_DATA_SIZE if migration => Ok(FEATURE_GET),
        FEATURE_MIG_DEVICE_STATE if migration => Ok(FEATURE_GET | FEATURE_SET),
        FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP if dma_logging => Ok(FEATURE_SET),
        FEATURE_DMA_LOGGING_REPORT if dma_logging => Ok(FEATURE_GET),
        _ => {
            debug!("DEVICE_FEATURE {feature} not offered");
            Err(libc::ENOTTY)
        }
    }
}

/// Data bytes a GET reply carries / a SET request must carry (REPORT: without the bitmap).
fn data_len(feature: u32, set: bool) -> usize {
    match feature {
        FEATURE_MIGRATION | FEATURE_MIG_DATA_SIZE | FEATURE_MIG_DEVICE_STATE => 8,
        FEATURE_DMA_LOGGING_START => 16,
        FEATURE_DMA_LOGGING_REPORT if !set => 24,
        _ => 0,
    }
}

fn get_reply(flags: u32, data: &[u8]) -> Vec<u8> {
    Bytes::default()
        .u32(8 + data.len() as u32)
        .u32(flags)
        .raw(data)
        .0
}

/// VFIO_USER_DEVICE_FEATURE.
pub fn device_feature(shared: &Shared, dma_logging: bool, p: &[u8]) -> FeatureReply {
    if p.len() < 8 {
        return Err(libc::EINVAL);
    }
    let (argsz, flags) = (le32(p, 0), le32(p, 4));
    let (get, set, probe) = (
        flags & FEATURE_GET != 0,
        flags & FEATURE_SET != 0,
        flags & FEATURE_PROBE != 0,
    );
    if argsz < 8
        || flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0
        || (get && set && !probe)
    {
        return Err(libc::EINVAL);
    }
    let feature = flags & FEATURE_MASK;
    let mig_caps = shared.lock().mig_caps;
    let supported = ops(feature, mig_caps, dma_logging)?;
    if flags & (FEATURE_GET | FEATURE_SET) & !supported != 0 {
        return Err(libc::EINVAL);
    }
    if probe {
        return Ok(p.to_vec());
    }
    if !get && !set {
        return Err(libc::EINVAL);
    }
    let need = 8 + data_len(feature, set);
    // Request data: a SET's, or REPORT's range (a GET's only request data).
    let carried = match feature {
        FEATURE_DMA_LOGGING_REPORT => need,
        _ if set => need,
        _ => 8,
    };
    if (argsz as usize) < need || p.len() < carried {
        return Err(libc::EINVAL);
    }
    let data = &p[8..];
    match feature {
        FEATURE_MIGRATION => Ok(get_reply(flags, &mig_caps.to_le_bytes())),
        FEATURE_MIG_DATA_SIZE => {
            let n = shared.lock().stop_copy_len(&shared.bar2);
            Ok(get_reply(flags, &n.to_le_bytes()))
        }
        FEATURE_MIG_DEVICE_STATE if get => {
            let state = shared.lock().state as u32;
            Ok(get_reply(
                flags,
                &Bytes::default().u32(state).u32(u32::MAX).0,
            ))
        }
        FEATURE_MIG_DEVICE_STATE => set_state(shared, p),
        FEATURE_DMA_LOGGING_START => logging_start(shared, p),
        FEATURE_DMA_LOGGING_STOP => {
            // Our choice: STOP without START succeeds (nothing to stop).
            if shared.lock().dma_log.take().is_some() {
                info!("DMA logging stopped");
            }
            Ok(p.to_vec())
        }
        _ => logging_report(shared, argsz, flags, data),
    }
}

fn set_state(shared: &Shared, p: &[u8]) -> FeatureReply {
    let want = le32(p, 8);
    let to = DeviceState::from_u32(want).ok_or_else(|| {
        warn!("MIG_DEVICE_STATE SET to unknown state {want}");
        libc::EINVAL
    })?;
    let mut d = shared.lock();
    let res = d.set_state(to, &shared.bar2);
    let now = d.state as u32;
    drop(d);
    // The engine may run (or must notice it may not).
    shared.wake.notify_all();
    res?;
    let mut r = p.to_vec();
    r[8..12].copy_from_slice(&now.to_le_bytes());
    Ok(r)
}

fn logging_start(shared: &Shared, p: &[u8]) -> FeatureReply {
    let (page_size, n) = (le64(p, 8), le32(p, 16) as usize);
    if n > MAX_LOG_RANGES {
        return Err(libc::E2BIG);
    }
    if p.len() < 24 + 16 * n {
        return Err(libc::EINVAL);
    }
    let ranges: Vec<(u64, u64)> = (0..n)
        .map(|i| (le64(p, 24 + 16 * i), le64(p, 32 + 16 * i)))
        .collect();
    let mut d = shared.lock();
    if d.dma_log.is_some() {
        // The kernel: "Another start is not allowed in the meantime".
        return Err(libc::EBUSY);
    }
    d.dma_log = Some(DmaLog::start(page_size, &ranges)?);
    info!(
        "DMA logging started: {n} ranges, page size hint {page_size:#x}, logging at {LOG_PAGE:#x}"
    );
    let mut r = p.to_vec();
    r[8..16].copy_from_slice(&LOG_PAGE.to_le_bytes());
    Ok(r)
}

fn logging_report(shared: &Shared, argsz: u32, flags: u32, data: &[u8]) -> FeatureReply {
    let (iova, length, page_size) = (le64(data, 0), le64(data, 8), le64(data, 16));
    let bytes = DmaLog::bitmap_len(iova, length, page_size)?;
    if (argsz as usize) < 8 + 24 + bytes {
        return Err(libc::EINVAL);
    }
    let mut d = shared.lock();
    let log = d.dma_log.as_mut().ok_or(libc::EINVAL)?;
    let bitmap = log.report(iova, length, page_size)?;
    let mut b = Bytes::default().raw(&data[..24]);
    for w in bitmap {
        b = b.u64(w);
    }
    Ok(get_reply(flags, &b.0))
}

/// VFIO_USER_MIG_DATA_READ.
pub fn mig_data_read(shared: &Shared, p: &[u8]) -> FeatureReply {
    if p.len() < 8 {
        return Err(libc::EINVAL);
    }
    let (argsz, size) = (le32(p, 0) as usize, le32(p, 4) as usize);
    let mut d = shared.lock();
    if d.mig_caps == 0 {
        return Err(libc::ENOTSUP);
    }
    if size > MAX_DATA_XFER || argsz < 8 + size {
        return Err(libc::EINVAL);
    }
    let data = d.mig_data_read(&shared.bar2, size)?;
    debug!("MIG_DATA_READ {size}: {} bytes", data.len());
    Ok(Bytes::default()
        .u32(8 + data.len() as u32)
        .u32(data.len() as u32)
        .raw(&data)
        .0)
}

/// VFIO_USER_MIG_DATA_WRITE.
pub fn mig_data_write(shared: &Shared, p: &[u8]) -> FeatureReply {
    if p.len() < 8 {
        return Err(libc::EINVAL);
    }
    let size = le32(p, 4) as usize;
    let mut d = shared.lock();
    if d.mig_caps == 0 {
        return Err(libc::ENOTSUP);
    }
    if p.len() != 8 + size {
        return Err(libc::EINVAL);
    }
    d.mig_data_write(&p[8..], &shared.bar2)?;
    Ok(Vec::new())
}
