//! The virtio-blk device: configuration, features, config space, activation onto a worker
//! thread, pause/resume and reset.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use migration::{Migratable, Pausable, StateError};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{DiskImage, SECTOR_SIZE};
use super::event_handler::{QueueHandler, QueueHandlerParts};
use super::metrics::BlockMetrics;
use super::request::{RequestLimits, ID_BYTES};
use crate::legacy::LogLimiter;
use crate::virtio::features::{self, bit, VIRTIO_F_EVENT_IDX};
use crate::virtio::worker::Worker;
use crate::virtio::{
    device_type, AccessPlatform, ActivatedQueue, ErrorHook, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::GuestMemoryMmap;

/// Largest size of the (single) request queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Advertised `seg_max`: data segments per request (the header and status take two more
/// descriptors).
pub const SEG_MAX: u32 = 128;
/// Advertised `max_discard_sectors` and `max_write_zeroes_sectors` (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Length of the configuration space laid out (virtio 1.2 `struct virtio_blk_config` up to and
/// including `unused1`): 60 bytes.
pub const CONFIG_LEN: usize = cfg_off::END;
// The state section (`persist.rs`) stores exactly these 60 bytes.
const _: () = assert!(CONFIG_LEN == 60);

/// Byte offsets in `struct virtio_blk_config` (virtio-bindings' layout).
mod cfg_off {
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config as C;

    pub const CAPACITY: usize = offset_of!(C, capacity);
    pub const SEG_MAX: usize = offset_of!(C, seg_max);
    pub const BLK_SIZE: usize = offset_of!(C, blk_size);
    pub const NUM_QUEUES: usize = offset_of!(C, num_queues);
    pub const MAX_DISCARD_SECTORS: usize = offset_of!(C, max_discard_sectors);
    pub const MAX_DISCARD_SEG: usize = offset_of!(C, max_discard_seg);
    pub const DISCARD_SECTOR_ALIGNMENT: usize = offset_of!(C, discard_sector_alignment);
    pub const MAX_WRITE_ZEROES_SECTORS: usize = offset_of!(C, max_write_zeroes_sectors);
    pub const MAX_WRITE_ZEROES_SEG: usize = offset_of!(C, max_write_zeroes_seg);
    pub const WRITE_ZEROES_MAY_UNMAP: usize = offset_of!(C, write_zeroes_may_unmap);
    /// End of `unused1`: the part of the configuration space laid out.
    pub const END: usize = offset_of!(C, max_secure_erase_sectors);
}

/// How to build a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Stable device id (API, counters, state sections).
    pub id: String,
    /// Raw image: a regular file or a block device.
    pub path: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// Answer to GET_ID (at most 20 bytes); the id (truncated to 20 bytes) when `None`.
    pub serial: Option<String>,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (the device sits behind the virtual IOMMU).
    pub iommu: bool,
}

/// Errors creating a block device. Each names the image path or the device id.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened (missing, permission denied, ...).
    #[error("cannot open disk image {} ({}): {source}", .path.display(), if *.readonly { "read-only" } else { "read-write" })]
    Open {
        /// Image path.
        path: PathBuf,
        /// Whether it was opened read-only.
        readonly: bool,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The path is not something a disk can be backed by.
    #[error("disk image {} is {what}", .path.display())]
    NotAnImage {
        /// Image path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The size of the image could not be determined.
    #[error("cannot get the size of disk image {}: {source}", .path.display())]
    Size {
        /// Image path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {} has {size} bytes; it needs at least one 512-byte sector", .path.display())]
    TooSmall {
        /// Image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The configured serial does not fit in the 20 bytes of GET_ID.
    #[error("{id}: serial {serial:?} is {} bytes long; at most 20 are allowed", .serial.len())]
    SerialTooLong {
        /// Device id.
        id: String,
        /// The serial.
        serial: String,
    },
}

/// The running part of an activated device.
pub(super) struct Active {
    pub(super) worker: Worker<QueueHandler>,
    pub(super) queue: Arc<Mutex<Queue>>,
    pub(super) paused: bool,
}

/// A virtio-blk device backed by a raw image, serving one request queue on its own thread.
pub struct Block {
    pub(super) id: String,
    pub(super) disk: Arc<DiskImage>,
    pub(super) serial: [u8; ID_BYTES],
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) config: [u8; CONFIG_LEN],
    pub(super) metrics: Arc<BlockMetrics>,
    pub(super) needs_reset: Arc<AtomicBool>,
    /// Told when the queue breaks.
    pub(super) error_hook: Option<ErrorHook>,
    pub(super) active: Option<Active>,
    /// Queue position restored from a snapshot, used by the next activation.
    pub(super) restored_queue: Option<QueueState>,
    /// Paused while not activated: the next activation starts its worker paused.
    pause_pending: bool,
    guest_log: LogLimiter,
}

impl Block {
    /// Open the image and build the device (not yet activated).
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        let serial_src = cfg.serial.as_deref().unwrap_or(&cfg.id);
        if cfg.serial.is_some() && serial_src.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong {
                id: cfg.id.clone(),
                serial: serial_src.to_string(),
            });
        }
        let mut serial = [0u8; ID_BYTES];
        let n = serial_src.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&serial_src.as_bytes()[..n]);

        let disk = DiskImage::open(&cfg.path, cfg.readonly)?;
        let discard = disk.supports_punch_hole();
        let write_zeroes = disk.supports_punch_hole() || disk.supports_zero_range();

        let mut avail = features::common(cfg.iommu)
            | VIRTIO_F_EVENT_IDX
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if cfg.readonly {
            avail |= bit(VIRTIO_BLK_F_RO);
        }
        if discard {
            avail |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if write_zeroes {
            avail |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }

        let mut config = [0u8; CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(cfg_off::CAPACITY, &disk.capacity().to_le_bytes());
        put(cfg_off::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(cfg_off::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(cfg_off::NUM_QUEUES, &1u16.to_le_bytes());
        if discard {
            let align = (disk.block_size() / SECTOR_SIZE) as u32;
            put(
                cfg_off::MAX_DISCARD_SECTORS,
                &MAX_RANGE_SECTORS.to_le_bytes(),
            );
            put(cfg_off::MAX_DISCARD_SEG, &1u32.to_le_bytes());
            put(cfg_off::DISCARD_SECTOR_ALIGNMENT, &align.to_le_bytes());
        }
        if write_zeroes {
            put(
                cfg_off::MAX_WRITE_ZEROES_SECTORS,
                &MAX_RANGE_SECTORS.to_le_bytes(),
            );
            put(cfg_off::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
            put(cfg_off::WRITE_ZEROES_MAY_UNMAP, &[u8::from(discard)]);
        }
        log::info!(
            "{}: disk image {} ({} sectors{}{}{})",
            cfg.id,
            disk.path().display(),
            disk.capacity(),
            if cfg.readonly { ", read-only" } else { "" },
            if discard { ", discard" } else { "" },
            if write_zeroes { ", write-zeroes" } else { "" },
        );

        Ok(Block {
            id: cfg.id,
            disk: Arc::new(disk),
            serial,
            avail_features: avail,
            acked_features: 0,
            config,
            metrics: Arc::new(BlockMetrics::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
            error_hook: None,
            active: None,
            restored_queue: None,
            pause_pending: false,
            guest_log: LogLimiter::new(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device is activated (serving its queue).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The flag the device sets when its request queue is broken beyond recovery (a garbage
    /// available ring). The transport ORs DEVICE_NEEDS_RESET into the device status while it is
    /// set; the device raises a configuration interrupt when setting it and clears it on reset.
    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    /// The counters (also reported by [`VirtioDevice::counters`]).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    fn limits(&self, queue_size: u16) -> RequestLimits {
        RequestLimits {
            capacity: self.disk.capacity(),
            readonly: self.disk.readonly(),
            discard: self.acked_features & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: self.acked_features & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_range_sectors: MAX_RANGE_SECTORS,
            max_chain_len: usize::from(queue_size),
        }
    }

    fn handler_parts(
        &self,
        mem: GuestMemoryMmap,
        queue: Arc<Mutex<Queue>>,
        queue_size: u16,
        kick: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> QueueHandlerParts {
        QueueHandlerParts {
            id: self.id.clone(),
            mem,
            queue,
            kick,
            interrupt,
            disk: self.disk.clone(),
            limits: self.limits(queue_size),
            serial: self.serial,
            metrics: self.metrics.clone(),
            needs_reset: self.needs_reset.clone(),
            access: None,
            error_hook: self.error_hook.clone(),
        }
    }

    /// The request-serving body without a worker thread, for benchmarks and tests: call
    /// [`QueueHandler::process_queue`] on it to serve what `queue` holds. Uses the features
    /// acked so far (EVENT_IDX, DISCARD, WRITE_ZEROES); with `access`, buffer addresses are
    /// translated through it as for a device behind an IOMMU.
    pub fn queue_handler(
        &self,
        mem: GuestMemoryMmap,
        mut queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> io::Result<QueueHandler> {
        queue.set_event_idx(self.acked_features & VIRTIO_F_EVENT_IDX != 0);
        let size = queue.size();
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let mut parts = self.handler_parts(mem, Arc::new(Mutex::new(queue)), size, kick, interrupt);
        parts.access = access;
        Ok(QueueHandler::new(parts))
    }

    fn worker_error(&self, e: io::Error) -> VirtioError {
        VirtioError::Worker {
            id: self.id.clone(),
            reason: e.to_string(),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        let unknown = features & !self.avail_features;
        if unknown != 0 && self.guest_log.allow() {
            log::warn!(
                "{}: driver acked features {unknown:#x} that were not offered; ignored",
                self.id
            );
        }
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.guest_log.allow() {
            log::warn!(
                "{}: ignored write of {} bytes at config offset {offset:#x} (read-only config)",
                self.id,
                data.len()
            );
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        if self.active.is_some() {
            return Err(VirtioError::activate(&self.id, "already active"));
        }
        let mut queues = queues.into_iter();
        let (Some(aq), None) = (queues.next(), queues.next()) else {
            return Err(VirtioError::activate(&self.id, "needs exactly one queue"));
        };
        if aq.index != 0 {
            return Err(VirtioError::activate(
                &self.id,
                format!("unexpected queue index {}", aq.index),
            ));
        }
        let mut queue = match self.restored_queue.take() {
            Some(state) => {
                let given = aq.queue.state();
                if (
                    given.desc_table,
                    given.avail_ring,
                    given.used_ring,
                    given.size,
                ) != (
                    state.desc_table,
                    state.avail_ring,
                    state.used_ring,
                    state.size,
                ) {
                    log::warn!(
                        "{}: the transport's queue differs from the restored one; using the restored queue",
                        self.id
                    );
                }
                Queue::try_from(state)
                    .map_err(|e| VirtioError::activate(&self.id, format!("restored queue: {e}")))?
            }
            None => aq.queue,
        };
        if queue.size() > QUEUE_MAX_SIZE {
            return Err(VirtioError::activate(
                &self.id,
                format!(
                    "queue size {} exceeds the maximum {QUEUE_MAX_SIZE}",
                    queue.size()
                ),
            ));
        }
        queue.set_event_idx(self.acked_features & VIRTIO_F_EVENT_IDX != 0);
        if !queue.is_valid(&mem) {
            return Err(VirtioError::activate(
                &self.id,
                "queue is not ready or its rings are not in guest memory",
            ));
        }
        self.needs_reset.store(false, Ordering::SeqCst);
        // Serve whatever is already available (e.g. after a restore) without waiting for a kick.
        let _ = aq.kick.write(1);
        let size = queue.size();
        let queue = Arc::new(Mutex::new(queue));
        let mut parts = self.handler_parts(mem, queue.clone(), size, aq.kick, interrupt);
        parts.access = access;
        let name = format!("blk-{}", self.id);
        let body = QueueHandler::new(parts);
        // Activated while paused (restore of a paused VM): the worker waits for resume.
        let paused = self.pause_pending;
        let worker = if paused {
            Worker::spawn_paused(name, body)
        } else {
            Worker::spawn(name, body)
        }
        .map_err(|e| self.worker_error(e))?;
        self.active = Some(Active {
            worker,
            queue,
            paused,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            active.worker.stop();
        }
        self.acked_features = 0;
        self.restored_queue = None;
        self.pause_pending = false;
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn set_error_hook(&mut self, hook: ErrorHook) {
        self.error_hook = Some(hook);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics.counters()
    }
}

/// The worker is paused in place (it keeps the queue); a pause before activation is sticky, so
/// that the activation of a restored, paused VM starts its worker paused.
impl Pausable for Block {
    fn pause(&mut self) -> Result<(), StateError> {
        self.pause_pending = true;
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if !active.paused {
            active.worker.pause().map_err(|e| StateError::Pause {
                id: self.id.clone(),
                reason: format!("worker: {e}"),
            })?;
            active.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), StateError> {
        self.pause_pending = false;
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if active.paused {
            active.worker.resume().map_err(|e| StateError::Resume {
                id: self.id.clone(),
                reason: format!("worker: {e}"),
            })?;
            active.paused = false;
        }
        Ok(())
    }
}

impl Migratable for Block {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::virtio::features::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};

    use migration::Snapshottable;

    use super::super::test_utils::*;
    use super::*;

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn open_errors_name_the_path() {
        let missing = std::env::temp_dir().join("skiff-blk-test-does-not-exist.img");
        let e = Block::new(config(&missing, false))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&*missing.to_string_lossy()) && e.contains("No such file"),
            "{e}"
        );

        let dir = std::env::temp_dir();
        let e = Block::new(config(&dir, true)).err().unwrap().to_string();
        assert!(
            e.contains("directory") && e.contains(&*dir.to_string_lossy()),
            "{e}"
        );

        let empty = TempImage::new("empty", &[]);
        let e = Block::new(config(&empty.path, false))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0 bytes") && e.contains(&*empty.path.to_string_lossy()),
            "{e}"
        );

        let locked = TempImage::new("perm", &[0; 512]);
        std::fs::set_permissions(&locked.path, std::fs::Permissions::from_mode(0o400)).unwrap();
        // Root ignores file modes; the read-write open only fails for other users.
        if let Err(e) = Block::new(config(&locked.path, false)) {
            let e = e.to_string();
            assert!(
                e.contains("Permission denied") && e.contains("read-write"),
                "{e}"
            );
        }
        assert!(Block::new(config(&locked.path, true)).is_ok());

        let img = patterned("serial");
        let mut cfg = config(&img.path, false);
        cfg.serial = Some("x".repeat(21));
        let e = Block::new(cfg).err().unwrap().to_string();
        assert!(e.contains("blk0") && e.contains("21 bytes"), "{e}");
    }

    #[test]
    fn features_and_config_space() {
        let img = patterned("features");
        let blk = Block::new(config(&img.path, false)).unwrap();
        let f = blk.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_EVENT_IDX,
            bit(VIRTIO_BLK_F_SEG_MAX),
            bit(VIRTIO_BLK_F_BLK_SIZE),
            bit(VIRTIO_BLK_F_FLUSH),
        ] {
            assert_ne!(f & bit, 0, "{bit:#x}");
        }
        assert_eq!(f & (bit(VIRTIO_BLK_F_RO) | VIRTIO_F_ACCESS_PLATFORM), 0);
        assert_eq!(blk.device_type(), device_type::BLOCK);
        assert_eq!(blk.queue_max_sizes(), vec![QUEUE_MAX_SIZE]);

        let mut b8 = [0u8; 8];
        blk.read_config(0, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 128);
        let mut b4 = [0u8; 4];
        blk.read_config(12, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), SEG_MAX);
        blk.read_config(20, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 512);
        if f & bit(VIRTIO_BLK_F_DISCARD) != 0 {
            blk.read_config(36, &mut b4);
            assert_eq!(u32::from_le_bytes(b4), MAX_RANGE_SECTORS);
            blk.read_config(40, &mut b4);
            assert_eq!(u32::from_le_bytes(b4), 1);
        } else {
            crate::test_skip::skip_or_fail(
                "SKIFF_SKIP_HOLE_PUNCH",
                "the image's file system cannot punch holes (discard config fields not checked)",
            );
        }
        // Partial and out-of-range reads.
        let mut b2 = [0xffu8; 2];
        blk.read_config(1, &mut b2);
        assert_eq!(b2, [0, 0]);
        blk.read_config(CONFIG_LEN as u64 - 1, &mut b2);
        assert_eq!(b2[1], 0);
        blk.read_config(u64::MAX, &mut b2);
        assert_eq!(b2, [0, 0]);

        let mut cfg = config(&img.path, true);
        cfg.iommu = true;
        let ro = Block::new(cfg).unwrap();
        let f = ro.avail_features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VIRTIO_F_ACCESS_PLATFORM, 0);
        assert_eq!(
            f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );

        // A size that is not a whole number of sectors is rounded down.
        let odd = TempImage::new("odd", &[7; 1000]);
        assert_eq!(Block::new(config(&odd.path, false)).unwrap().capacity(), 1);
    }

    #[test]
    fn set_acked_features_drops_unoffered_bits() {
        let img = patterned("ack");
        let mut blk = Block::new(config(&img.path, true)).unwrap();
        blk.set_acked_features(VIRTIO_F_VERSION_1 | (1 << 50) | bit(VIRTIO_BLK_F_DISCARD));
        assert_eq!(blk.acked_features(), VIRTIO_F_VERSION_1);
    }

    /// Activate with a transport-like queue, serve through the worker thread, pause, resume,
    /// reset and activate again.
    #[test]
    fn activate_pause_resume_reset() {
        let img = patterned("activate");
        let mem = guest_mem();
        let mut blk = Block::new(config(&img.path, false)).unwrap();
        blk.set_acked_features(blk.avail_features());
        let mut drv = Driver::new(&mem, 64);
        let irq = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        blk.activate(mem.clone(), irq.clone(), vec![aq], None)
            .unwrap();
        assert!(blk.is_active());

        let r = drv.read(5, 512);
        kick.write(1).unwrap();
        wait_until("first read", || drv.used_idx() == 1);
        assert_eq!(drv.bytes(r.data, 512), vec![6; 512]);
        wait_until("interrupt", || irq.queue_count() == 1);

        migration::Pausable::pause(&mut blk).unwrap();
        drv.read(6, 512);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(drv.used_idx(), 1, "a paused device serves nothing");
        migration::Pausable::resume(&mut blk).unwrap();
        wait_until("read after resume", || drv.used_idx() == 2);
        assert!(blk.counters().contains(&("read_ops", 2)));

        // A second activation while active is refused.
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        assert!(blk
            .activate(mem.clone(), irq.clone(), vec![aq], None)
            .is_err());

        migration::Pausable::pause(&mut blk).unwrap();
        blk.reset();
        assert!(!blk.is_active());
        assert_eq!(blk.acked_features(), 0);

        // Fresh driver state, activate again.
        blk.set_acked_features(blk.avail_features());
        let mut drv = Driver::new(&mem, 64);
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        blk.activate(mem.clone(), irq.clone(), vec![aq], None)
            .unwrap();
        drv.read(0, 512);
        kick.write(1).unwrap();
        wait_until("read after re-activation", || drv.used_idx() == 1);
        blk.reset();
    }

    #[test]
    fn activation_while_paused_waits_for_resume() {
        let img = patterned("paused-activate");
        let mem = guest_mem();
        let mut blk = Block::new(config(&img.path, false)).unwrap();
        blk.set_acked_features(blk.avail_features());
        let mut drv = Driver::new(&mem, 64);
        let irq = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // A request is already available, as after a restore.
        drv.read(5, 512);
        migration::Pausable::pause(&mut blk).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        blk.activate(mem.clone(), irq.clone(), vec![aq], None)
            .unwrap();
        assert!(blk.is_active());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(drv.used_idx(), 0, "activated while paused but served");
        // Saving works while paused; a running device refuses.
        let saved = blk.snapshot().unwrap();
        assert_eq!(saved.id, blk.id);
        migration::Pausable::resume(&mut blk).unwrap();
        wait_until("read after resume", || drv.used_idx() == 1);
        assert!(matches!(blk.snapshot(), Err(StateError::Pause { .. })));
        blk.reset();
    }

    #[test]
    fn activate_rejects_bad_queues() {
        let img = patterned("badq");
        let mem = guest_mem();
        let mut blk = Block::new(config(&img.path, false)).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let drv = Driver::new(&mem, 16);
        let aq = |q: Queue| ActivatedQueue {
            index: 0,
            queue: q,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        assert!(blk
            .activate(mem.clone(), irq.clone(), vec![], None)
            .is_err());
        let two = vec![aq(drv.queue()), aq(drv.queue())];
        assert!(blk.activate(mem.clone(), irq.clone(), two, None).is_err());
        let mut not_ready = drv.queue();
        not_ready.set_ready(false);
        assert!(blk
            .activate(mem.clone(), irq.clone(), vec![aq(not_ready)], None)
            .is_err());
        let mut outside = drv.queue();
        outside
            .try_set_used_ring_address(vm_memory::GuestAddress(MEM_SIZE))
            .unwrap();
        let e = blk
            .activate(mem.clone(), irq.clone(), vec![aq(outside)], None)
            .unwrap_err();
        assert!(e.to_string().contains("blk0"), "{e}");
        assert!(!blk.is_active());
    }
}
