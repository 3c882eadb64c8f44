//! virtio-blk: a block device backed by a raw image file (or host block device).
//!
//! | file | what |
//! |---|---|
//! | `device.rs` | [`Block`]: features, configuration space, activation onto a worker thread |
//! | `request.rs` | parsing and validating one request — the only place guest values are trusted |
//! | `event_handler.rs` | [`QueueHandler`]: the worker body that serves the queue and signals the driver |
//! | `disk.rs` | [`DiskImage`]: opening/probing the image, vectored I/O straight into guest memory |
//! | `persist.rs` | [`BlockState`]: versioned save/restore |
//! | `metrics.rs` | [`BlockMetrics`]: counters reported by `vm.counters` |
//!
//! Features offered: VERSION_1, EVENT_IDX, SEG_MAX, BLK_SIZE, FLUSH, RO (read-only images),
//! DISCARD and WRITE_ZEROES (when the host file system can punch holes / zero ranges, never for
//! read-only images) and ACCESS_PLATFORM (when configured behind the IOMMU). One queue of at most
//! [`QUEUE_MAX_SIZE`] entries.
//!
//! When the driver corrupts the available ring the device stops serving it and sets the flag
//! returned by [`Block::needs_reset_flag`]; the transport reports DEVICE_NEEDS_RESET while it is
//! set.

mod device;
mod disk;
mod event_handler;
mod metrics;
mod persist;
mod request;

#[cfg(test)]
mod test_utils;

pub use device::{
    Block, BlockConfig, BlockError, CONFIG_LEN, MAX_RANGE_SECTORS, QUEUE_MAX_SIZE, SEG_MAX,
};
pub use disk::{DiskImage, Segment, SECTOR_SIZE};
pub use event_handler::{QueueHandler, QueueHandlerParts};
pub use metrics::BlockMetrics;
pub use persist::{BlockState, BLOCK_STATE_VERSION};
pub use request::{
    Completion, Failure, Rejection, Request, RequestError, RequestKind, RequestLimits, HEADER_LEN,
    ID_BYTES, MAX_REQUEST_BYTES,
};
