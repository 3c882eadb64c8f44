//! virtio-net counters, shared between the device (which reports them) and its worker (which
//! updates them).

use std::sync::atomic::{AtomicU64, Ordering};

/// I/O counters of one virtio-net device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (frames, without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes sent to the TAP (frames, without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames the TAP had for the guest that could not be delivered (read error, buffer too small).
    pub rx_dropped: AtomicU64,
    /// Guest frames the TAP refused.
    pub tx_errors: AtomicU64,
    /// Descriptor chains rejected as malformed (both queues).
    pub invalid_descriptors: AtomicU64,
}

impl NetMetrics {
    /// Add `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as `(name, value)` pairs, in a stable order.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_packets", g(&self.rx_packets)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("tx_packets", g(&self.tx_packets)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("rx_dropped", g(&self.rx_dropped)),
            ("tx_errors", g(&self.tx_errors)),
            ("invalid_descriptors", g(&self.invalid_descriptors)),
        ]
    }
}
