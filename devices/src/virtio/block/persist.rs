//! Saving and restoring a block device: acked features, the configuration space and, when the
//! device is activated, the request queue's state.
//!
//! Layout of version 1 (little endian): `acked_features: u64`, `config: [u8; 60]`,
//! `needs_reset: u8`, `has_queue: u8`, then when `has_queue` is 1 the [`QueueState`] fields
//! `max_size: u16`, `next_avail: u16`, `next_used: u16`, `event_idx_enabled: u8`, `size: u16`,
//! `ready: u8`, `desc_table: u64`, `avail_ring: u64`, `used_ring: u64`.
//!
//! Restore happens on a device that is not activated; the restored queue position is used by the
//! next [`VirtioDevice::activate`](crate::virtio::VirtioDevice::activate), which the transport
//! calls when it restores DRIVER_OK.

use std::sync::atomic::Ordering;

use migration::{Snapshottable, StateError, StateSection};
use virtio_queue::{Queue, QueueState};

use super::device::{Block, CONFIG_LEN, QUEUE_MAX_SIZE};
use crate::legacy::{StateReader, StateWriter};
use crate::virtio::common::require_quiescent;

/// Version of the block device's state section.
pub const BLOCK_STATE_VERSION: u16 = 1;

/// The saved state of a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The configuration space as the guest saw it.
    pub config: [u8; CONFIG_LEN],
    /// The device had stopped serving its queue.
    pub needs_reset: bool,
    /// The request queue, when the device was activated.
    pub queue: Option<QueueState>,
}

fn flag(r: &mut StateReader<'_>, what: &str) -> Result<bool, StateError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(r.malformed(format!("{what} is {v}, not 0 or 1"))),
    }
}

impl BlockState {
    /// Encode as a section owned by `id`.
    pub fn save(&self, id: &str) -> StateSection {
        let mut w = StateWriter::new();
        w.u64(self.acked_features)
            .raw(&self.config)
            .u8(u8::from(self.needs_reset));
        match &self.queue {
            None => {
                w.u8(0);
            }
            Some(q) => {
                w.u8(1)
                    .u16(q.max_size)
                    .u16(q.next_avail)
                    .u16(q.next_used)
                    .u8(u8::from(q.event_idx_enabled))
                    .u16(q.size)
                    .u8(u8::from(q.ready))
                    .u64(q.desc_table)
                    .u64(q.avail_ring)
                    .u64(q.used_ring);
            }
        }
        w.into_section(id, BLOCK_STATE_VERSION)
    }

    /// Decode a section written by [`BlockState::save`] for `id`; rejects another id, another
    /// version, truncated or trailing data and invalid queue state.
    pub fn load(section: &StateSection, id: &str) -> Result<Self, StateError> {
        let mut r = StateReader::open(section, id, BLOCK_STATE_VERSION)?;
        let acked_features = r.u64()?;
        let mut config = [0u8; CONFIG_LEN];
        config.copy_from_slice(r.raw(CONFIG_LEN)?);
        let needs_reset = flag(&mut r, "needs_reset")?;
        let queue = if flag(&mut r, "has_queue")? {
            let q = QueueState {
                max_size: r.u16()?,
                next_avail: r.u16()?,
                next_used: r.u16()?,
                event_idx_enabled: flag(&mut r, "event_idx_enabled")?,
                size: r.u16()?,
                ready: flag(&mut r, "ready")?,
                desc_table: r.u64()?,
                avail_ring: r.u64()?,
                used_ring: r.u64()?,
            };
            if q.max_size > QUEUE_MAX_SIZE {
                return Err(r.malformed(format!(
                    "queue max size {} exceeds {QUEUE_MAX_SIZE}",
                    q.max_size
                )));
            }
            Queue::try_from(q).map_err(|e| r.malformed(format!("invalid queue state: {e}")))?;
            Some(q)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            acked_features,
            config,
            needs_reset,
            queue,
        })
    }
}

impl Block {
    /// The device's current state (the queue's position is only stable while paused).
    pub fn state(&self) -> BlockState {
        let queue = match &self.active {
            Some(a) => Some(a.queue.lock().unwrap_or_else(|e| e.into_inner()).state()),
            None => self.restored_queue,
        };
        BlockState {
            acked_features: self.acked_features,
            config: self.config,
            needs_reset: self.needs_reset.load(Ordering::SeqCst),
            queue,
        }
    }

    /// Take over `state` (the device must not be activated); see the module documentation.
    pub fn set_state(&mut self, state: &BlockState) -> Result<(), StateError> {
        let malformed = |reason: String| StateError::Malformed {
            id: self.id.clone(),
            reason,
        };
        if self.active.is_some() {
            return Err(malformed("cannot restore an activated device".into()));
        }
        let unknown = state.acked_features & !self.avail_features;
        if unknown != 0 {
            return Err(malformed(format!(
                "saved features {unknown:#x} are not offered by this device (image {})",
                self.disk.path().display()
            )));
        }
        let saved_capacity = u64::from_le_bytes(
            state.config[..8]
                .try_into()
                .map_err(|_| malformed("short config".into()))?,
        );
        if saved_capacity != self.disk.capacity() {
            return Err(malformed(format!(
                "saved capacity {saved_capacity} sectors, image {} has {}",
                self.disk.path().display(),
                self.disk.capacity()
            )));
        }
        self.acked_features = state.acked_features;
        self.config = state.config;
        self.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.restored_queue = state.queue;
        Ok(())
    }
}

impl Snapshottable for Block {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Refused while the worker runs: the queue position would move under the snapshot.
    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let running = self.active.as_ref().is_some_and(|a| !a.paused);
        require_quiescent(&self.id, running)?;
        Ok(self.state().save(&self.id))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let state = BlockState::load(section, &self.id)?;
        self.set_state(&state)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use migration::Pausable;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::super::test_utils::*;
    use super::*;
    use crate::virtio::{ActivatedQueue, VirtioDevice};

    fn wait_until(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn inactive_round_trip() {
        let img = patterned("persist0");
        let mut a = Block::new(config(&img.path, false)).unwrap();
        a.set_acked_features(a.avail_features());
        let section = a.snapshot().unwrap();
        assert_eq!(section.id, "blk0");
        assert_eq!(section.version, BLOCK_STATE_VERSION);
        let mut b = Block::new(config(&img.path, false)).unwrap();
        b.restore(&section).unwrap();
        assert_eq!(b.state(), a.state());
        assert_eq!(b.state().queue, None);
    }

    /// Save an activated device after it served one request; the restored device continues at
    /// the same queue position when the transport activates it with its own (fresh) queue.
    #[test]
    fn active_round_trip_continues_the_queue() {
        let img = patterned("persist1");
        let mem = guest_mem();
        let mut a = Block::new(config(&img.path, false)).unwrap();
        a.set_acked_features(a.avail_features());
        let mut drv = Driver::new(&mem, 64);
        let irq = Arc::new(CountingInterrupt::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        a.activate(mem.clone(), irq.clone(), vec![aq], None)
            .unwrap();
        drv.read(0, 512);
        kick.write(1).unwrap();
        wait_until(|| drv.used_idx() == 1);
        Pausable::pause(&mut a).unwrap();
        let section = a.snapshot().unwrap();
        let q = a.state().queue.expect("queue saved");
        assert_eq!((q.next_avail, q.next_used, q.size), (1, 1, 64));
        assert!(q.event_idx_enabled && q.ready);
        a.reset();

        let mut b = Block::new(config(&img.path, false)).unwrap();
        b.restore(&section).unwrap();
        assert_eq!(b.acked_features(), b.avail_features());
        // The guest queued a second request while the VM was stopped.
        let r = drv.read(3, 512);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let aq = ActivatedQueue {
            index: 0,
            queue: drv.queue(),
            kick: kick.try_clone().unwrap(),
        };
        b.activate(mem.clone(), irq.clone(), vec![aq], None)
            .unwrap();
        wait_until(|| drv.used_idx() == 2);
        assert_eq!(drv.bytes(r.data, 512), vec![4; 512]);
        assert_eq!(drv.used(1).0, u32::from(r.head));
        assert!(
            b.counters().contains(&("read_ops", 1)),
            "only the new request"
        );
        // Restoring an active device is refused.
        assert!(b.restore(&section).is_err());
        b.reset();
    }

    #[test]
    fn bad_sections_are_rejected() {
        let img = patterned("persist2");
        let mut a = Block::new(config(&img.path, false)).unwrap();
        a.set_acked_features(a.avail_features());
        let mut state = a.state();
        state.queue = Some(virtio_queue::QueueState {
            max_size: 64,
            size: 64,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            ..Default::default()
        });
        let good = state.save("blk0");
        let mut b = Block::new(config(&img.path, false)).unwrap();

        let mut wrong_version = good.clone();
        wrong_version.version = BLOCK_STATE_VERSION + 1;
        assert!(matches!(
            b.restore(&wrong_version),
            Err(StateError::Version { .. })
        ));
        let mut wrong_id = good.clone();
        wrong_id.id = "blk1".into();
        assert!(b.restore(&wrong_id).is_err());
        for cut in [0, 8, 60, good.data.len() - 1] {
            let mut t = good.clone();
            t.data.truncate(cut);
            assert!(
                matches!(b.restore(&t), Err(StateError::Malformed { .. })),
                "truncated to {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.data.push(0);
        assert!(b.restore(&trailing).is_err());
        let mut bad_flag = good.clone();
        bad_flag.data[8 + CONFIG_LEN + 1] = 7;
        assert!(b.restore(&bad_flag).is_err());

        // Invalid queue: size not a power of two / above the maximum.
        let mut s = state.clone();
        s.queue.as_mut().unwrap().size = 48;
        assert!(b.restore(&s.save("blk0")).is_err());
        let mut s = state.clone();
        s.queue.as_mut().unwrap().max_size = 1024;
        assert!(b.restore(&s.save("blk0")).is_err());

        // A different image size, or features the device does not offer.
        let mut s = state.clone();
        s.config[0] ^= 1;
        assert!(b.restore(&s.save("blk0")).is_err());
        let mut ro = Block::new(config(&img.path, true)).unwrap();
        let e = ro.restore(&good).unwrap_err().to_string();
        assert!(e.contains("not offered"), "{e}");

        // None of the failures changed the device; the good section restores.
        assert_eq!(b.acked_features(), 0);
        b.restore(&good).unwrap();
        assert_eq!(b.state(), state);
    }
}
