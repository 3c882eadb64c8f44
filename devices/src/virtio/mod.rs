//! Virtio devices, independent of their transport (the virtio-pci transport lives in `pci/`).
//!
//! A device offers features, a configuration space and a number of queues. When the driver sets
//! DRIVER_OK the transport calls [`VirtioDevice::activate`] with the guest memory, the configured
//! queues (each with the ioeventfd the guest's notifications arrive on) and a [`VirtioInterrupt`]
//! to signal used buffers. The device then serves its queues on its own worker thread
//! ([`worker::Worker`]): ioeventfd → worker → irqfd, no VMM round trip on the data path.

pub mod access;
pub mod block;
pub mod common;
pub mod console;
pub mod net;
pub mod rng;
pub mod worker;

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;
pub use access::{AccessPlatform, DmaAccess, DmaFault};

/// Virtio device type ids (virtio 1.x, section 5), from virtio-bindings' `virtio_ids`.
pub mod device_type {
    use virtio_bindings::virtio_ids;

    /// Network card.
    pub const NET: u32 = virtio_ids::VIRTIO_ID_NET;
    /// Block device.
    pub const BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
    /// Console.
    pub const CONSOLE: u32 = virtio_ids::VIRTIO_ID_CONSOLE;
    /// Entropy source.
    pub const RNG: u32 = virtio_ids::VIRTIO_ID_RNG;
    /// IOMMU.
    pub const IOMMU: u32 = virtio_ids::VIRTIO_ID_IOMMU;
}

/// Transport-independent feature bits (virtio 1.x, section 6) as masks. virtio-bindings gives
/// feature *bit numbers* (`u32`); [`features::bit`] is the one place they become `u64` masks.
pub mod features {
    use virtio_bindings::{virtio_config, virtio_ring};

    /// The mask of feature bit number `n` (a virtio-bindings `*_F_*` constant).
    pub const fn bit(n: u32) -> u64 {
        1 << n
    }

    /// The driver may use indirect descriptors.
    pub const VIRTIO_F_INDIRECT_DESC: u64 = bit(virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
    /// used_event / avail_event suppression (event index).
    pub const VIRTIO_F_EVENT_IDX: u64 = bit(virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    /// Virtio 1.x (modern) device.
    pub const VIRTIO_F_VERSION_1: u64 = bit(virtio_config::VIRTIO_F_VERSION_1);
    /// The device accesses memory through the platform's IOMMU (addresses are IOVAs).
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = bit(virtio_config::VIRTIO_F_ACCESS_PLATFORM);

    /// The transport features every device offers: VERSION_1, and ACCESS_PLATFORM when it sits
    /// behind the IOMMU.
    pub fn common(behind_iommu: bool) -> u64 {
        if behind_iommu {
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM
        } else {
            VIRTIO_F_VERSION_1
        }
    }
}

/// Device status bits (virtio 1.x, section 2.1), from virtio-bindings' `virtio_config` (`u32`
/// there, the status register is one byte).
pub mod status {
    use virtio_bindings::virtio_config;

    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The driver gave up on the device.
    pub const FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;
}

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration space changed.
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device signals the driver; implemented by the transport (an MSI-X vector's irqfd, or INTx
/// plus the ISR status register).
pub trait VirtioInterrupt: Send + Sync {
    /// Raise the interrupt for `int`.
    fn trigger(&self, int: VirtioInterruptType) -> io::Result<()>;
}

/// Told `(device id, reason)` when a device enters DEVICE_NEEDS_RESET after a driver error; the
/// VMM turns it into a `device-error` event. Called from device worker or vCPU threads.
pub type ErrorHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A queue handed to an activated device.
pub struct ActivatedQueue {
    /// Queue index within the device.
    pub index: u16,
    /// The queue as the driver configured it (size, ring addresses, ready, event-idx).
    pub queue: Queue,
    /// The ioeventfd the driver's notifications for this queue arrive on.
    pub kick: EventFd,
}

/// Errors of virtio devices.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The driver set up the device in a way it cannot run with.
    #[error("{id}: cannot activate: {reason}")]
    Activate {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The worker thread could not be started or controlled.
    #[error("{id}: worker: {reason}")]
    Worker {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// An I/O error on a host resource (image file, TAP, ...).
    #[error("{id}: {source}")]
    Io {
        /// Device id.
        id: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Copy the bytes of a device configuration space `config` starting at `offset` into `data`;
/// bytes beyond its end read as zero (the [`VirtioDevice::read_config`] contract).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

impl VirtioError {
    /// Device `id` cannot activate because of `reason`.
    pub fn activate(id: &str, reason: impl Into<String>) -> Self {
        Self::Activate {
            id: id.to_string(),
            reason: reason.into(),
        }
    }
}

/// A virtio device, as the transport sees it.
///
/// Pause, resume, snapshot and restore come from the [`migration`] state traits every device
/// implements ([`migration::Migratable`] and below); [`migration::Snapshottable::id`] is the
/// device's stable id (from the configuration; used by the API, counters, logs and migration).
/// For a virtio device they mean:
/// - [`migration::Pausable::pause`]: stop touching guest memory and raising interrupts until
///   `resume`; a device paused before activation starts its worker paused.
/// - [`migration::Snapshottable::snapshot`]: the device's own state (acked features, queue
///   positions, device config). Only while paused: a running device refuses with
///   [`migration::StateError::Pause`].
/// - [`migration::Snapshottable::restore`]: a section of the same device, applied to a device
///   that is not activated (or is paused) and *before* the transport activates it: the saved
///   queue positions are used by the next [`VirtioDevice::activate`]. Wrong id, version or a
///   malformed payload is refused with a [`migration::StateError`] and changes nothing.
pub trait VirtioDevice: migration::Migratable + Send {
    /// Virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers (including [`features::VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Record the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Read from the device-specific configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device-specific configuration space (ignored unless the device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues (called when the driver sets DRIVER_OK). `access` is given when
    /// the driver accepted `VIRTIO_F_ACCESS_PLATFORM` for a device behind an IOMMU: every buffer
    /// address the device takes from a descriptor is then translated through it (the transport
    /// has already translated the ring addresses in `queues`).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError>;
    /// Stop serving queues and drop them (driver reset); the device can be activated again.
    fn reset(&mut self);
    /// Whether the device stopped serving after a driver error and needs a reset (reported to the
    /// driver as DEVICE_NEEDS_RESET by the transport).
    fn needs_reset(&self) -> bool {
        false
    }
    /// Where to report entering the needs-reset state (devices that can enter it keep `hook`).
    fn set_error_hook(&mut self, _hook: ErrorHook) {}
    /// I/O counters reported by `vm.counters` (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
