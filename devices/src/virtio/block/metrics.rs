//! I/O counters of one block device, shared between the device and its worker thread and
//! reported through [`VirtioDevice::counters`](crate::virtio::VirtioDevice::counters).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one block device. Every field only ever grows (until the process ends).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Completed read (`VIRTIO_BLK_T_IN`) requests.
    pub read_ops: AtomicU64,
    /// Completed write (`VIRTIO_BLK_T_OUT`) requests.
    pub write_ops: AtomicU64,
    /// Completed flush requests.
    pub flush_ops: AtomicU64,
    /// Bytes read from the image into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the image.
    pub write_bytes: AtomicU64,
    /// Completed discard requests.
    pub discard_ops: AtomicU64,
    /// Completed write-zeroes requests.
    pub write_zeroes_ops: AtomicU64,
    /// Requests that failed on the host side (an I/O error on the image).
    pub errors: AtomicU64,
    /// Requests rejected because of what the guest asked for (malformed chain, out-of-range
    /// sector, write to a read-only device, unsupported request type, ...).
    pub invalid_requests: AtomicU64,
}

impl BlockMetrics {
    /// Names of the counters, in the order [`BlockMetrics::counters`] reports them.
    pub const NAMES: [&'static str; 9] = [
        "read_ops",
        "write_ops",
        "flush_ops",
        "read_bytes",
        "write_bytes",
        "discard_ops",
        "write_zeroes_ops",
        "errors",
        "invalid_requests",
    ];

    /// Add `n` to `counter` (relaxed: the counters are statistics, not synchronization).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Add one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Every counter as (name, value).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let values = [
            &self.read_ops,
            &self.write_ops,
            &self.flush_ops,
            &self.read_bytes,
            &self.write_bytes,
            &self.discard_ops,
            &self.write_zeroes_ops,
            &self.errors,
            &self.invalid_requests,
        ];
        Self::NAMES
            .iter()
            .zip(values)
            .map(|(name, v)| (*name, v.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_every_name() {
        let m = BlockMetrics::default();
        BlockMetrics::add(&m.read_bytes, 4096);
        BlockMetrics::inc(&m.invalid_requests);
        let c = m.counters();
        assert_eq!(c.len(), BlockMetrics::NAMES.len());
        assert!(c.contains(&("read_bytes", 4096)));
        assert!(c.contains(&("invalid_requests", 1)));
        assert!(c.contains(&("errors", 0)));
    }
}
