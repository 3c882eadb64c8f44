//! virtio-rng (entropy device): one request queue whose device-writable buffers are filled from
//! the host's `getrandom(2)`.
//!
//! A single request is served up to [`MAX_REQUEST`] bytes (the used length says how many), so a
//! guest posting gigabytes of buffers cannot make the worker churn through them in one go.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use migration::{Snapshottable, StateError, StateSection};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::common::{
    avail_ok, notify, return_chain, write_to_ranges, ChainError, DescChain, QueueBody, WorkerSlot,
};
use super::worker::WorkerBody;
use super::{
    device_type, features, AccessPlatform, ActivatedQueue, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::legacy::log_limit::LogLimiter;
use crate::GuestMemoryMmap;

/// Largest size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Bytes served for one request at most.
pub const MAX_REQUEST: usize = 64 << 10;
/// Version of the rng state section.
pub const RNG_STATE_VERSION: u16 = 1;

/// Configuration of a virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngConfig {
    /// Device id (counters, API, migration).
    pub id: String,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (the device sits behind the virtual IOMMU).
    pub iommu: bool,
}

/// virtio-rng counters.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Random bytes delivered to the guest.
    pub bytes: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Descriptor chains rejected as malformed.
    pub invalid_descriptors: AtomicU64,
}

impl RngMetrics {
    /// The counters as `(name, value)` pairs.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("bytes", g(&self.bytes)),
            ("requests", g(&self.requests)),
            ("invalid_descriptors", g(&self.invalid_descriptors)),
        ]
    }
}

/// Fill `buf` from getrandom(2) (blocking only until the host pool is initialised, at boot).
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// A virtio-rng device.
pub struct Rng {
    id: String,
    iommu: bool,
    acked_features: u64,
    metrics: Arc<RngMetrics>,
    worker: WorkerSlot<RngWorker>,
}

impl Rng {
    /// Serve the queue once on the calling thread, as the worker does when kicked (fuzz targets).
    pub fn serve_once(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        self.worker_body(mem, interrupt, queues, access)?.process();
        Ok(())
    }

    fn worker_body(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<RngWorker, VirtioError> {
        let mut queues = queues.into_iter();
        let (Some(q), None) = (queues.next(), queues.next()) else {
            return Err(VirtioError::activate(&self.id, "needs exactly one queue"));
        };
        if q.index != 0 {
            return Err(VirtioError::activate(
                &self.id,
                format!("no queue {}", q.index),
            ));
        }
        let queue = self.worker.prepare_queue(q.queue, 0, false, &mem)?;
        let body = RngWorker {
            id: self.id.clone(),
            mem,
            interrupt,
            queue,
            kick: q.kick,
            metrics: self.metrics.clone(),
            chain: DescChain::default(),
            access,
            buf: vec![0; MAX_REQUEST],
            invalid: LogLimiter::new(),
            irq: LogLimiter::new(),
            entropy: LogLimiter::new(),
        };
        Ok(body)
    }

    /// Build the device.
    pub fn new(config: RngConfig) -> Self {
        Self {
            worker: WorkerSlot::new(config.id.clone()),
            id: config.id,
            iommu: config.iommu,
            acked_features: 0,
            metrics: Arc::new(RngMetrics::default()),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![RNG_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::common(self.iommu)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        if self.worker.is_active() {
            return Err(VirtioError::activate(&self.id, "already active"));
        }
        let body = self.worker_body(mem, interrupt, queues, access)?;
        self.worker.start(body)
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics.values()
    }
}

crate::worker_device_state!(Rng);

impl Snapshottable for Rng {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Layout (version 1): acked features `u64`, queue count `u8` (0 or 1), queue state.
    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        self.worker
            .save_queue_section(self.acked_features, RNG_STATE_VERSION)
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let saved =
            self.worker
                .load_queue_section(section, RNG_STATE_VERSION, self.avail_features(), 1)?;
        self.acked_features = saved.acked_features;
        self.worker.apply_restore(saved);
        Ok(())
    }
}

/// The rng worker thread body.
struct RngWorker {
    id: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
    kick: EventFd,
    metrics: Arc<RngMetrics>,
    chain: DescChain,
    access: Option<Arc<dyn AccessPlatform>>,
    buf: Vec<u8>,
    invalid: LogLimiter,
    irq: LogLimiter,
    entropy: LogLimiter,
}

impl RngWorker {
    fn process(&mut self) {
        let mem = self.mem.clone();
        if !avail_ok(&self.queue, &mem) {
            self.metrics
                .invalid_descriptors
                .fetch_add(1, Ordering::Relaxed);
            if self.invalid.allow() {
                log::warn!("{}: available index out of range; queue ignored", self.id);
            }
            return;
        }
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&mem) {
            let res = match self.chain.fill(chain, &mem, self.access.as_deref()) {
                Ok(()) if !self.chain.readable.is_empty() => Err(ChainError::Direction("readable")),
                r => r,
            };
            let len = match res {
                Ok(()) => {
                    let n = (self.chain.writable_len as usize).min(MAX_REQUEST);
                    match fill_random(&mut self.buf[..n]) {
                        Ok(()) => {
                            let n = write_to_ranges(&mem, &self.chain.writable, &self.buf[..n]);
                            self.metrics.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                            n as u32
                        }
                        Err(e) => {
                            if self.entropy.allow() {
                                log::warn!("{}: getrandom failed: {e}", self.id);
                            }
                            0
                        }
                    }
                }
                Err(e) => {
                    self.metrics
                        .invalid_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                    if self.invalid.allow() {
                        log::warn!("{}: dropping malformed descriptor chain: {e}", self.id);
                    }
                    0
                }
            };
            used = true;
            let head = self.chain.head;
            if return_chain(&mut self.queue, &mem, head, len).is_err() {
                break;
            }
        }
        if used {
            notify(
                &mut self.queue,
                &mem,
                &*self.interrupt,
                0,
                &mut self.irq,
                &self.id,
            );
        }
    }
}

impl QueueBody for RngWorker {
    fn queues_mut(&mut self) -> Vec<&mut Queue> {
        vec![&mut self.queue]
    }
}

impl WorkerBody for RngWorker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.kick.as_raw_fd(), EventSet::IN)) {
            log::error!("{}: cannot watch the queue eventfd: {e:?}", self.id);
        }
        self.process();
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        RngWorker::process(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::tests_support::*;

    fn active() -> (Rng, TestEnv) {
        let mut dev = Rng::new(RngConfig {
            id: "rng0".into(),
            iommu: false,
        });
        let env = TestEnv::new(1);
        dev.set_acked_features(features::VIRTIO_F_VERSION_1);
        dev.activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            None,
        )
        .unwrap();
        (dev, env)
    }

    #[test]
    fn buffers_are_filled_with_random_bytes() {
        let (dev, env) = active();
        let head = env.q(0).add_writable(&env.mem, &[100, 28]);
        env.kick(0);
        env.wait_used(0, 1);
        assert_eq!(env.used_elem(0, 0), (u32::from(head), 128));
        let data = env.q(0).buffer(&env.mem, head, 128);
        assert!(
            data.iter().any(|&b| b != data[0]),
            "random bytes are not all equal"
        );
        assert_eq!(dev.metrics().bytes.load(Ordering::Relaxed), 128);
        assert!(env.irq.counts[0].load(Ordering::SeqCst) >= 1);
        assert_eq!(dev.counters()[0], ("bytes", 128));
    }

    #[test]
    fn iommu_translated_buffers_are_split_and_faults_fail_only_the_request() {
        use crate::virtio::access::test_support::TableAccess;
        use vm_memory::{Address, Bytes};

        let mut dev = Rng::new(RngConfig {
            id: "rng0".into(),
            iommu: true,
        });
        assert_ne!(dev.avail_features() & features::VIRTIO_F_ACCESS_PLATFORM, 0);
        let env = TestEnv::new(1);
        let q = env.q(0);
        let g1 = q.alloc(64);
        let _gap = q.alloc(64);
        let g2 = q.alloc(64);
        env.mem.write_slice(&[0u8; 192], g1).unwrap();
        // 128 bytes at device address 0x9000_0000: two mappings, non-adjacent in guest RAM.
        let access = Arc::new(TableAccess::new(&[
            (0x9000_0000, g1.0, 64),
            (0x9000_0040, g2.0, 64),
        ]));
        dev.set_acked_features(features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_ACCESS_PLATFORM);
        dev.activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            Some(access.clone()),
        )
        .unwrap();
        let head = q.add_descs(&env.mem, &[(0x9000_0000, 128, F_WRITE)]);
        env.kick(0);
        env.wait_used(0, 1);
        assert_eq!(env.used_elem(0, 0), (u32::from(head), 128));
        let mut gap = [0u8; 64];
        env.mem.read_slice(&mut gap, g1.unchecked_add(64)).unwrap();
        assert_eq!(gap, [0u8; 64], "the gap between the mappings is untouched");
        // Past the second mapping: the chain is returned empty and the fault reported.
        q.add_descs(&env.mem, &[(0x9000_0040, 128, F_WRITE)]);
        let good = q.add_descs(&env.mem, &[(0x9000_0000, 16, F_WRITE)]);
        env.kick(0);
        env.wait_used(0, 3);
        assert_eq!(env.used_elem(0, 1).1, 0);
        assert_eq!(env.used_elem(0, 2), (u32::from(good), 16));
        let faults = access.faults.lock().unwrap().clone();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].addr, 0x9000_0080);
    }

    #[test]
    fn huge_requests_are_capped() {
        let (dev, env) = active();
        // 4 MiB of buffers (inside guest RAM): only MAX_REQUEST bytes are served.
        let a = env.q(0).alloc(4 << 20);
        env.q(0).add_descs(&env.mem, &[(a.0, 4 << 20, F_WRITE)]);
        env.kick(0);
        env.wait_used(0, 1);
        assert_eq!(env.used_elem(0, 0).1 as usize, MAX_REQUEST);
        assert_eq!(
            dev.metrics().bytes.load(Ordering::Relaxed) as usize,
            MAX_REQUEST
        );
    }

    #[test]
    fn hostile_chains_are_rejected_and_serving_continues() {
        let (dev, env) = active();
        let q = env.q(0);
        let mem = &env.mem;
        // Out of guest RAM.
        q.add_descs(mem, &[(MEM_SIZE - 8, 64, F_WRITE)]);
        // Huge length.
        q.add_descs(mem, &[(0x200000, u32::MAX, F_WRITE)]);
        // Wrong direction (device-readable).
        q.add_readable(mem, &[b"not for the device"]);
        // A loop: a descriptor that points at itself.
        let i = q.alloc_descs(1);
        q.write_desc(mem, i, 0x200000, 16, F_WRITE | F_NEXT, i);
        q.push_avail(mem, i);
        // Next index beyond the queue.
        let i = q.alloc_descs(1);
        q.write_desc(mem, i, 0x200000, 16, F_WRITE | F_NEXT, 999);
        q.push_avail(mem, i);
        // Indirect table outside RAM.
        let i = q.alloc_descs(1);
        q.write_desc(mem, i, MEM_SIZE + 0x1000, 64, F_INDIRECT, 0);
        q.push_avail(mem, i);
        // Zero-length buffer: served with 0 bytes.
        q.add_descs(mem, &[(0x200000, 0, F_WRITE)]);
        // And a good one afterwards.
        let good = q.add_writable(mem, &[32]);
        env.kick(0);
        env.wait_used(0, 8);
        for n in 0..7 {
            assert_eq!(env.used_elem(0, n).1, 0, "hostile chain {n} got bytes");
        }
        assert_eq!(env.used_elem(0, 7), (u32::from(good), 32));
        assert_eq!(dev.metrics().invalid_descriptors.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn bogus_avail_index_is_ignored() {
        let (dev, env) = active();
        env.q(0).set_avail_idx(&env.mem, 1000);
        env.kick(0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(env.used_idx(0), 0);
        assert!(dev.metrics().invalid_descriptors.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn pause_snapshot_restore() {
        let (mut dev, env) = active();
        env.q(0).add_writable(&env.mem, &[8]);
        env.kick(0);
        env.wait_used(0, 1);
        migration::Pausable::pause(&mut dev).unwrap();
        // Requests while paused wait for resume.
        env.q(0).add_writable(&env.mem, &[8]);
        env.kick(0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(env.used_idx(0), 1);
        let s = dev.snapshot().unwrap();
        let mut fresh = Rng::new(RngConfig {
            id: "rng0".into(),
            iommu: false,
        });
        fresh.restore(&s).unwrap();
        assert_eq!(fresh.snapshot().unwrap(), s);
        // Restore into the paused device itself, then resume: the pending request is served.
        dev.restore(&s).unwrap();
        migration::Pausable::resume(&mut dev).unwrap();
        env.wait_used(0, 2);
        // Another id or a truncated section is refused.
        let mut other = Rng::new(RngConfig {
            id: "rng1".into(),
            iommu: false,
        });
        assert!(other.restore(&s).is_err());
        let mut bad = s.clone();
        bad.data.pop();
        assert!(fresh.restore(&bad).is_err());
    }

    #[test]
    fn snapshot_restore_as_the_transport_does() {
        let (mut dev, env) = active();
        env.q(0).add_writable(&env.mem, &[8]);
        env.kick(0);
        env.wait_used(0, 1);
        // A running device refuses to save.
        assert!(matches!(dev.snapshot(), Err(StateError::Pause { .. })));
        migration::Pausable::pause(&mut dev).unwrap();
        env.q(0).add_writable(&env.mem, &[16]);
        let saved = dev.snapshot().unwrap();
        assert_eq!(
            (saved.id.as_str(), saved.version),
            ("rng0", RNG_STATE_VERSION)
        );

        // A fresh device, paused before it is activated, as the transport's restore does.
        let mut fresh = Rng::new(RngConfig {
            id: "rng0".into(),
            iommu: false,
        });
        let mut bad = saved.clone();
        bad.data.truncate(3);
        assert!(fresh.restore(&bad).is_err());
        let mut newer = saved.clone();
        newer.version += 1;
        assert!(matches!(
            fresh.restore(&newer),
            Err(StateError::Version { .. })
        ));
        fresh.restore(&saved).unwrap();
        migration::Pausable::pause(&mut fresh).unwrap();
        drop(dev);
        // Queues as a fresh transport builds them (positions 0): the saved positions win.
        let env2 = TestEnv::new(1);
        let mut ram = vec![0u8; MEM_SIZE as usize];
        vm_memory::Bytes::read_slice(&env.mem, &mut ram, vm_memory::GuestAddress(0)).unwrap();
        vm_memory::Bytes::write_slice(&env2.mem, &ram, vm_memory::GuestAddress(0)).unwrap();
        let queues = env2.activated_queues();
        fresh
            .activate(env2.mem.clone(), env2.irq.clone(), queues, None)
            .unwrap();
        assert_eq!(fresh.snapshot().unwrap(), saved);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(env2.used_idx(0), 1, "restored paused but served");
        migration::Pausable::resume(&mut fresh).unwrap();
        env2.kick(0);
        env2.wait_used(0, 2);
    }
}
