//! The common configuration structure (`virtio_pci_common_cfg`) and the per-queue settings the
//! driver programs through it. Status writes are reported to the device (they have side effects
//! on the wrapped virtio device); everything else is handled here.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use devices::legacy::{LogLimiter, StateReader, StateWriter};
use migration::StateError;

use super::VIRTIO_MSI_NO_VECTOR;

// Field offsets of `virtio_pci_common_cfg` (virtio 1.x 4.1.4.3; virtio-bindings 0.2 has no
// `virtio_pci` module to take the struct from).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// `(offset, width)` of every field, in address order.
const FIELDS: [(u64, u64); 16] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (MSIX_CONFIG, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC, 8),
    (QUEUE_DRIVER, 8),
    (QUEUE_DEVICE, 8),
];

/// MSI-X vectors the driver assigned; shared with the interrupt path (device worker threads).
#[derive(Debug)]
pub(crate) struct Vectors {
    /// Vector for configuration changes.
    pub(crate) config: AtomicU16,
    /// Vector of each queue.
    pub(crate) queues: Vec<AtomicU16>,
}

impl Vectors {
    fn new(num_queues: usize) -> Self {
        Self {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        }
    }

    fn reset(&self) {
        self.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for q in &self.queues {
            q.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueConfig {
    /// Largest size the device supports.
    pub(crate) max_size: u16,
    /// Size the driver chose (a power of two, at most `max_size`).
    pub(crate) size: u16,
    /// The driver enabled the queue.
    pub(crate) enabled: bool,
    /// Descriptor table address.
    pub(crate) desc: u64,
    /// Available (driver) ring address.
    pub(crate) driver: u64,
    /// Used (device) ring address.
    pub(crate) device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// A write that the device must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommonWrite {
    /// Nothing beyond the register update.
    Done,
    /// The driver wrote `device_status`.
    Status(u8),
}

/// Transport state behind the common configuration structure.
#[derive(Debug)]
pub(crate) struct CommonConfig {
    pub(crate) device_feature_select: u32,
    pub(crate) driver_feature_select: u32,
    /// Features the driver wrote (checked against the offer when it sets FEATURES_OK).
    pub(crate) driver_features: u64,
    pub(crate) status: u8,
    pub(crate) config_generation: u8,
    pub(crate) queue_select: u16,
    pub(crate) queues: Vec<QueueConfig>,
    pub(crate) vectors: Arc<Vectors>,
    avail_features: u64,
    num_msix_vectors: u16,
    bad_writes: LogLimiter,
}

impl CommonConfig {
    /// State for a device with the given queue sizes, features and MSI-X vector count.
    pub(crate) fn new(queue_max_sizes: &[u16], avail_features: u64, num_msix_vectors: u16) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect(),
            vectors: Arc::new(Vectors::new(queue_max_sizes.len())),
            avail_features,
            num_msix_vectors,
            bad_writes: LogLimiter::new(),
        }
    }

    /// Device reset: everything but the queue maximums and the configuration generation.
    pub(crate) fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.vectors.reset();
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn log_bad(&mut self, what: std::fmt::Arguments<'_>) {
        if self.bad_writes.allow() {
            log::warn!(
                "virtio-pci: ignoring {what} (occurrence {})",
                self.bad_writes.count()
            );
        }
    }

    fn field(offset: u64, len: u64) -> Option<(u64, u64)> {
        FIELDS
            .iter()
            .copied()
            .find(|&(o, w)| offset >= o && offset + len <= o + w)
    }

    fn field_value(&self, field: u64) -> u64 {
        let q = self.selected();
        let half = |v: u64, select: u32| match select {
            0 => v & 0xffff_ffff,
            1 => v >> 32,
            _ => 0,
        };
        match field {
            DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            DEVICE_FEATURE => half(self.avail_features, self.device_feature_select),
            DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            DRIVER_FEATURE => half(self.driver_features, self.driver_feature_select),
            MSIX_CONFIG => u64::from(self.vectors.config.load(Ordering::SeqCst)),
            NUM_QUEUES => self.queues.len() as u64,
            DEVICE_STATUS => u64::from(self.status),
            CONFIG_GENERATION => u64::from(self.config_generation),
            QUEUE_SELECT => u64::from(self.queue_select),
            QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            QUEUE_MSIX_VECTOR => self
                .vectors
                .queues
                .get(usize::from(self.queue_select))
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            QUEUE_NOTIFY_OFF => q.map_or(0, |_| u64::from(self.queue_select)),
            QUEUE_DESC => q.map_or(0, |q| q.desc),
            QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            QUEUE_DEVICE => q.map_or(0, |q| q.device),
            _ => 0,
        }
    }

    /// Guest read at `offset`; accesses that do not fall inside one field read as 0.
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        let Some((field, _)) = Self::field(offset, len) else {
            return;
        };
        let bytes = self.field_value(field).to_le_bytes();
        let within = (offset - field) as usize;
        data.copy_from_slice(&bytes[within..within + data.len()]);
    }

    /// Guest write at `offset`. Partial writes of a field merge with its current value.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> CommonWrite {
        let len = data.len() as u64;
        let Some((field, width)) = Self::field(offset, len).filter(|_| len > 0 && len <= 8) else {
            self.log_bad(format_args!(
                "common config write of {len} bytes at {offset:#x}"
            ));
            return CommonWrite::Done;
        };
        let within = (offset - field) as usize;
        let mut bytes = self.field_value(field).to_le_bytes();
        bytes[within..within + data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes) & (u64::MAX >> (64 - 8 * width));
        self.write_field(field, value)
    }

    fn vector_ok(&self, v: u16) -> bool {
        v == VIRTIO_MSI_NO_VECTOR || v < self.num_msix_vectors
    }

    fn write_field(&mut self, field: u64, value: u64) -> CommonWrite {
        let features_locked = self.status & devices::virtio::status::FEATURES_OK != 0;
        let qsel = usize::from(self.queue_select);
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            DRIVER_FEATURE if features_locked => {
                self.log_bad(format_args!("feature write after FEATURES_OK"))
            }
            DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                s => self.log_bad(format_args!("driver feature write with select {s}")),
            },
            MSIX_CONFIG => {
                let v = value as u16;
                let v = if self.vector_ok(v) {
                    v
                } else {
                    VIRTIO_MSI_NO_VECTOR
                };
                self.vectors.config.store(v, Ordering::SeqCst);
            }
            DEVICE_STATUS => return CommonWrite::Status(value as u8),
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_MSIX_VECTOR => {
                let v = value as u16;
                let v = if self.vector_ok(v) {
                    v
                } else {
                    VIRTIO_MSI_NO_VECTOR
                };
                match self.vectors.queues.get(qsel) {
                    Some(q) => q.store(v, Ordering::SeqCst),
                    None => self.log_bad(format_args!("vector write for absent queue {qsel}")),
                }
            }
            QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => {
                self.write_queue_field(qsel, field, value)
            }
            // Read-only: device_feature, num_queues, config_generation, queue_notify_off.
            _ => self.log_bad(format_args!(
                "write to read-only common config field {field:#x}"
            )),
        }
        CommonWrite::Done
    }

    fn write_queue_field(&mut self, qsel: usize, field: u64, value: u64) {
        let Some(q) = self.queues.get(qsel).copied() else {
            self.log_bad(format_args!("write for absent queue {qsel}"));
            return;
        };
        if q.enabled {
            if !(field == QUEUE_ENABLE && value == 1) {
                self.log_bad(format_args!(
                    "change of enabled queue {qsel} (field {field:#x})"
                ));
            }
            return;
        }
        let q = &mut self.queues[qsel];
        match field {
            QUEUE_SIZE => {
                let size = value as u16;
                if size == 0 || size > q.max_size || !size.is_power_of_two() {
                    let max = q.max_size;
                    self.log_bad(format_args!(
                        "queue {qsel} size {size} (max {max}, power of two)"
                    ));
                } else {
                    q.size = size;
                }
            }
            QUEUE_ENABLE => {
                if value == 1 {
                    q.enabled = true;
                } else {
                    self.log_bad(format_args!("queue_enable value {value}"));
                }
            }
            QUEUE_DESC => q.desc = value,
            QUEUE_DRIVER => q.driver = value,
            _ => q.device = value,
        }
    }

    /// Append the transport state to `w`.
    pub(crate) fn save(&self, w: &mut StateWriter) {
        w.u32(self.device_feature_select)
            .u32(self.driver_feature_select)
            .u64(self.driver_features)
            .u8(self.status)
            .u8(self.config_generation)
            .u16(self.queue_select)
            .u16(self.vectors.config.load(Ordering::SeqCst))
            .u16(self.queues.len() as u16);
        for (q, v) in self.queues.iter().zip(&self.vectors.queues) {
            w.u16(q.size)
                .u8(u8::from(q.enabled))
                .u16(v.load(Ordering::SeqCst))
                .u64(q.desc)
                .u64(q.driver)
                .u64(q.device);
        }
    }

    /// Read state written by [`Self::save`] for a device with the same queues.
    pub(crate) fn restore(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let device_feature_select = r.u32()?;
        let driver_feature_select = r.u32()?;
        let driver_features = r.u64()?;
        let status = r.u8()?;
        let config_generation = r.u8()?;
        let queue_select = r.u16()?;
        let config_vector = r.u16()?;
        let n = usize::from(r.u16()?);
        if n != self.queues.len() {
            return Err(r.malformed(format!(
                "state has {n} queues, the device has {}",
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(n);
        let mut vectors = Vec::with_capacity(n);
        for q in &self.queues {
            let size = r.u16()?;
            if size == 0 || size > q.max_size || !size.is_power_of_two() {
                return Err(r.malformed(format!("queue size {size} (max {})", q.max_size)));
            }
            let enabled = r.u8()? != 0;
            vectors.push(r.u16()?);
            queues.push(QueueConfig {
                max_size: q.max_size,
                size,
                enabled,
                desc: r.u64()?,
                driver: r.u64()?,
                device: r.u64()?,
            });
        }
        if !self.vector_ok(config_vector) || vectors.iter().any(|&v| !self.vector_ok(v)) {
            return Err(r.malformed("MSI-X vector out of range"));
        }
        self.device_feature_select = device_feature_select;
        self.driver_feature_select = driver_feature_select;
        self.driver_features = driver_features;
        self.status = status;
        self.config_generation = config_generation;
        self.queue_select = queue_select;
        self.queues = queues;
        self.vectors.config.store(config_vector, Ordering::SeqCst);
        for (slot, v) in self.vectors.queues.iter().zip(vectors) {
            slot.store(v, Ordering::SeqCst);
        }
        Ok(())
    }
}
