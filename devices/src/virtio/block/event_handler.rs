//! The block device's worker body: the queue's ioeventfd wakes it, it serves every available
//! request, puts the chains on the used ring and signals the driver (honouring
//! VIRTIO_F_EVENT_IDX suppression, or VRING_AVAIL_F_NO_INTERRUPT without it).
//!
//! If the available ring itself is garbage (its index runs more than the queue size ahead, or it
//! names a descriptor beyond the queue) or the used ring cannot be written, the queue stops being
//! served: the shared "needs reset" flag is set and a configuration interrupt raised, so the
//! transport can report DEVICE_NEEDS_RESET. Bad individual requests never get that far; see
//! [`super::request`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskImage;
use super::metrics::BlockMetrics;
use super::request::{process_chain, Failure, RequestLimits, ID_BYTES};
use crate::legacy::LogLimiter;
use crate::virtio::worker::WorkerBody;
use crate::virtio::{AccessPlatform, ErrorHook, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// Everything a [`QueueHandler`] serves requests with.
pub struct QueueHandlerParts {
    /// Device id, for log lines.
    pub id: String,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The request queue, shared with the device so that it can be saved while paused.
    pub queue: Arc<Mutex<Queue>>,
    /// The ioeventfd the driver's notifications arrive on.
    pub kick: EventFd,
    /// How to signal the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The image.
    pub disk: Arc<DiskImage>,
    /// What requests may ask for.
    pub limits: RequestLimits,
    /// The GET_ID answer.
    pub serial: [u8; ID_BYTES],
    /// Counters.
    pub metrics: Arc<BlockMetrics>,
    /// Set when the queue can no longer be served.
    pub needs_reset: Arc<AtomicBool>,
    /// Translates buffer addresses when the device sits behind an IOMMU.
    pub access: Option<Arc<dyn AccessPlatform>>,
    /// Told when the queue breaks (the device then needs a reset).
    pub error_hook: Option<ErrorHook>,
}

/// Serves the block device's request queue; runs on a [`crate::virtio::worker::Worker`], or
/// directly through [`QueueHandler::process_queue`] (tests, benchmarks).
pub struct QueueHandler {
    p: QueueHandlerParts,
    broken: bool,
    invalid_log: LogLimiter,
    io_log: LogLimiter,
    irq_log: LogLimiter,
}

impl QueueHandler {
    /// A handler over `parts`.
    pub fn new(parts: QueueHandlerParts) -> Self {
        Self {
            p: parts,
            broken: false,
            invalid_log: LogLimiter::new(),
            io_log: LogLimiter::new(),
            irq_log: LogLimiter::new(),
        }
    }

    /// Serve every request the driver has made available; returns how many chains were put on
    /// the used ring. Does nothing once the queue was found broken (until the device is reset).
    pub fn process_queue(&mut self) -> usize {
        if self.broken {
            return 0;
        }
        let queue = self.p.queue.clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut completed = 0;
        let result = self.drain(&mut q, &mut completed);
        if completed > 0 {
            self.notify(&mut q);
        }
        if let Err(reason) = result {
            self.mark_broken(&reason);
        }
        completed
    }

    fn drain(&mut self, q: &mut Queue, completed: &mut usize) -> Result<(), String> {
        let mem = &self.p.mem;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("cannot disable notifications: {e}"))?;
            loop {
                let size = q.size();
                let chain = match q.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => return Err(format!("bad available ring: {e}")),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if head >= size {
                    return Err(format!(
                        "available ring names descriptor {head}, the queue has {size}"
                    ));
                }
                let done = process_chain(
                    chain,
                    mem,
                    &self.p.disk,
                    &self.p.limits,
                    &self.p.serial,
                    &self.p.metrics,
                    self.p.access.as_deref(),
                );
                match &done.failure {
                    Some(Failure::Invalid(e)) if self.invalid_log.allow() => log::warn!(
                        "{}: rejected request (descriptor {head}): {e} [{} so far]",
                        self.p.id,
                        self.invalid_log.count()
                    ),
                    Some(Failure::Io(e)) if self.io_log.allow() => log::error!(
                        "{}: I/O error on {}: {e} [{} so far]",
                        self.p.id,
                        self.p.disk.path().display(),
                        self.io_log.count()
                    ),
                    _ => {}
                }
                q.add_used(mem, head, done.used_len)
                    .map_err(|e| format!("cannot write the used ring: {e}"))?;
                *completed += 1;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("cannot enable notifications: {e}"))?
            {
                return Ok(());
            }
        }
    }

    fn notify(&mut self, q: &mut Queue) {
        let mem = &self.p.mem;
        let needed = if q.event_idx_enabled() {
            // A used_event we cannot read: err on the side of an interrupt.
            q.needs_notification(mem).unwrap_or(true)
        } else {
            let flags: u16 = mem
                .read_obj(GuestAddress(q.avail_ring()))
                .map(u16::from_le)
                .unwrap_or(0);
            flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
        };
        if needed {
            self.trigger(VirtioInterruptType::Queue(0));
        }
    }

    fn trigger(&mut self, int: VirtioInterruptType) {
        if let Err(e) = self.p.interrupt.trigger(int) {
            if self.irq_log.allow() {
                log::error!("{}: cannot raise {int:?} interrupt: {e}", self.p.id);
            }
        }
    }

    fn mark_broken(&mut self, reason: &str) {
        self.broken = true;
        log::error!(
            "{}: {reason}; request queue stopped, the device needs a reset",
            self.p.id
        );
        self.p.needs_reset.store(true, Ordering::SeqCst);
        if let Some(hook) = &self.p.error_hook {
            hook(&self.p.id, reason);
        }
        self.trigger(VirtioInterruptType::Config);
    }

    /// Whether the queue was found broken (see the module documentation).
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

impl WorkerBody for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.p.kick, EventSet::IN)) {
            log::error!("{}: cannot watch the queue notification fd: {e}", self.p.id);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Always drain the eventfd (also when broken), or the level-triggered loop would spin.
        let _ = self.p.kick.read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::*;
    use crate::virtio::block::Block;
    use crate::virtio::features::VIRTIO_F_EVENT_IDX;
    use crate::virtio::VirtioDevice;
    use std::sync::Arc;

    fn interrupts(event_idx: bool) -> u64 {
        let img = patterned("evidx");
        let mem = guest_mem();
        let mut blk = super::super::Block::new(config(&img.path, false)).unwrap();
        let mut f = blk.avail_features();
        if !event_idx {
            f &= !VIRTIO_F_EVENT_IDX;
        }
        blk.set_acked_features(f);
        let mut drv = Driver::new(&mem, 64);
        let irq = std::sync::Arc::new(CountingInterrupt::default());
        let mut h = blk
            .queue_handler(mem.clone(), drv.queue(), irq.clone(), None)
            .unwrap();
        // The driver leaves used_event at 0: it only wants to hear about the first completion.
        drv.set_used_event(0);
        for i in 0..5 {
            let r = drv.read(i, 512);
            assert_eq!(h.process_queue(), 1);
            assert_eq!(drv.status(&r), 0);
        }
        // A batch of three in one pass raises at most one interrupt.
        drv.set_used_event(5);
        for i in 0..3 {
            drv.read(i, 512);
        }
        assert_eq!(h.process_queue(), 3);
        irq.queue_count()
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let with = interrupts(true);
        let without = interrupts(false);
        assert_eq!(without, 6, "one per pass without EVENT_IDX");
        assert_eq!(
            with, 2,
            "first completion and the batch crossing used_event"
        );
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let img = patterned("noint");
        let mem = guest_mem();
        let mut blk = super::super::Block::new(config(&img.path, false)).unwrap();
        blk.set_acked_features(blk.avail_features() & !VIRTIO_F_EVENT_IDX);
        let mut drv = Driver::new(&mem, 16);
        let irq = std::sync::Arc::new(CountingInterrupt::default());
        let mut h = blk
            .queue_handler(mem.clone(), drv.queue(), irq.clone(), None)
            .unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL_RING)).unwrap();
        drv.read(0, 512);
        assert_eq!(h.process_queue(), 1);
        assert_eq!(irq.queue_count(), 0);
        mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
        drv.read(0, 512);
        assert_eq!(h.process_queue(), 1);
        assert_eq!(irq.queue_count(), 1);
    }

    #[test]
    fn garbage_avail_index_needs_reset() {
        let img = patterned("garbage");
        let mem = guest_mem();
        let mut blk = Block::new(config(&img.path, false)).unwrap();
        blk.set_acked_features(blk.avail_features());
        let errors = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
        let seen = errors.clone();
        blk.set_error_hook(Arc::new(move |id: &str, reason: &str| {
            seen.lock().unwrap().push((id.into(), reason.into()));
        }));
        let mut drv = Driver::new(&mem, 16);
        let irq = Arc::new(CountingInterrupt::default());
        let mut h = blk
            .queue_handler(mem.clone(), drv.queue(), irq.clone(), None)
            .unwrap();
        let flag = blk.needs_reset_flag();
        drv.read(0, 512);
        assert_eq!(h.process_queue(), 1);
        // The index runs 17 entries ahead of a 16-entry queue.
        drv.set_avail_idx(drv.avail_idx().wrapping_add(17));
        assert_eq!(h.process_queue(), 0);
        assert!(h.is_broken());
        assert!(flag.load(Ordering::SeqCst));
        assert!(blk.needs_reset());
        assert_eq!(irq.config_count(), 1);
        let errors = errors.lock().unwrap().clone();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, blk.id);
        assert!(errors[0].1.contains("available"), "{errors:?}");
        // Nothing is served any more, and no further config interrupts are raised.
        drv.set_avail_idx(drv.avail_idx().wrapping_sub(17));
        drv.read(0, 512);
        assert_eq!(h.process_queue(), 0);
        assert_eq!(irq.config_count(), 1);
        assert_eq!(drv.used_idx(), 1);
    }

    #[test]
    fn head_index_beyond_queue_needs_reset() {
        let img = patterned("badhead");
        let mem = guest_mem();
        let (blk, mut drv, mut h, irq) = setup(&img, false, &mem, 16);
        let r = drv.read(0, 512);
        drv.publish(200);
        // The good request before it completes and is signalled.
        assert_eq!(h.process_queue(), 1);
        assert_eq!(drv.status(&r), 0);
        assert!(blk.needs_reset_flag().load(Ordering::SeqCst));
        assert_eq!(irq.config_count(), 1);
        assert_eq!(irq.queue_count(), 1);
    }
}
