//! The virtio-iommu device (virtio type 23): a request queue served by a worker thread, an event
//! queue carrying fault reports, and the configuration space from [`IommuConfig`].
//!
//! Guest descriptor chains are validated by [`DescChain::fill`]; the request bytes are parsed by
//! [`parse_request`] and executed on the shared [`IommuState`] through the [`Translator`] that
//! devices behind the IOMMU also use for their DMA. Nothing here panics on guest input: a chain
//! without room for the 4-byte tail is returned with a used length of 0, any other bad request is
//! answered with an error status in its tail.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::log_limit::LogLimiter;
use devices::virtio::common::{
    avail_ok, notify, read_from_ranges, read_queue_states, return_chain, write_queue_states,
    write_to_ranges, DescChain, QueueBody, WorkerSlot,
};
use devices::virtio::worker::WorkerBody;
use devices::virtio::{
    device_type, features, AccessPlatform, ActivatedQueue, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use devices::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use migration::codec::{StateReader, StateWriter};
use migration::{Snapshottable, StateError, StateSection};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::domain::Fault;
use crate::iommu::{fault_event, IommuState, Translator, OFFERED_FEATURES};
use crate::protocol::{
    encode_tail, is_known_request, parse_request, FaultEvent, IommuConfig, IommuStatus,
    FAULT_EVENT_SIZE, REQ_TAIL_SIZE, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_PROBE,
    VIRTIO_IOMMU_T_PROBE,
};

/// Largest size of each of the two queues.
pub const IOMMU_QUEUE_SIZE: u16 = 64;
/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 1;
/// Largest device-readable part of a request the device reads; longer requests get `INVAL`.
pub const MAX_REQUEST: usize = 4096;
/// Fault events waiting for the worker at most; more are counted as dropped.
pub const MAX_PENDING_FAULTS: usize = 64;
/// Version of the device's state section.
pub const IOMMU_DEVICE_STATE_VERSION: u16 = 1;

/// virtio-iommu counters.
#[derive(Debug, Default)]
pub struct IommuMetrics {
    /// Requests answered with a status in their tail.
    pub requests: AtomicU64,
    /// Requests whose status was not `OK`.
    pub request_errors: AtomicU64,
    /// Descriptor chains rejected as malformed (request or event queue).
    pub invalid_descriptors: AtomicU64,
    /// Fault events written to the event queue.
    pub faults_reported: AtomicU64,
    /// Fault events lost (no event buffer, device not active, or too many pending).
    pub faults_dropped: AtomicU64,
}

impl IommuMetrics {
    /// The counters as `(name, value)` pairs.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("requests", g(&self.requests)),
            ("request_errors", g(&self.request_errors)),
            ("invalid_descriptors", g(&self.invalid_descriptors)),
            ("faults_reported", g(&self.faults_reported)),
            ("faults_dropped", g(&self.faults_dropped)),
        ]
    }
}

/// Fault events on their way from [`FaultReporter`]s to the worker.
struct FaultSink {
    pending: Mutex<VecDeque<FaultEvent>>,
    wake: EventFd,
    active: AtomicBool,
    metrics: Arc<IommuMetrics>,
}

impl FaultSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FaultEvent>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drop_fault(&self) {
        self.metrics.faults_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// A cheap, thread-safe handle through which DMA-performing devices report translation faults to
/// the guest on the IOMMU's event queue.
#[derive(Clone)]
pub struct FaultReporter {
    sink: Arc<FaultSink>,
}

impl std::fmt::Debug for FaultReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultReporter")
            .field("active", &self.sink.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl FaultReporter {
    /// Queue a fault event for `fault` by `endpoint` into the next event-queue buffer. Lost (and
    /// counted in `faults_dropped`) when the device is not active, too many events are pending, or
    /// the driver has posted no event buffer.
    pub fn report_fault(&self, endpoint: u32, fault: &Fault) {
        self.report(fault_event(endpoint, fault));
    }

    /// Queue an already-built fault event (see [`FaultReporter::report_fault`]).
    pub fn report(&self, event: FaultEvent) {
        if !self.sink.active.load(Ordering::Acquire) {
            self.sink.drop_fault();
            return;
        }
        {
            let mut p = self.sink.lock();
            if p.len() >= MAX_PENDING_FAULTS {
                drop(p);
                self.sink.drop_fault();
                return;
            }
            p.push_back(event);
        }
        if self.sink.wake.write(1).is_err() {
            // The eventfd counter cannot overflow in practice; the event is delivered with the
            // next wake-up anyway.
            log::debug!("virtio-iommu: cannot wake the worker for a fault event");
        }
    }
}

/// The virtio-iommu device.
pub struct VirtioIommu {
    id: String,
    translator: Translator,
    initial: StateSection,
    acked_features: u64,
    metrics: Arc<IommuMetrics>,
    faults: Arc<FaultSink>,
    worker: WorkerSlot<IommuWorker>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("id", &self.id)
            .field("acked_features", &self.acked_features)
            .field("active", &self.worker.is_active())
            .field("paused", &self.worker.is_paused())
            .finish()
    }
}

impl VirtioIommu {
    /// Serve the request queue once on the calling thread, as the worker does when kicked (fuzz targets).
    pub fn serve_once(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        let mut body = self.worker_body(mem, interrupt, queues, access)?;
        body.process_requests();
        Ok(())
    }

    fn worker_body(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        _access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<IommuWorker, VirtioError> {
        let mut req = None;
        let mut evt = None;
        for q in queues {
            let slot = match q.index {
                REQUEST_QUEUE => &mut req,
                EVENT_QUEUE => &mut evt,
                i => return Err(VirtioError::activate(&self.id, format!("no queue {i}"))),
            };
            if slot.replace(q).is_some() {
                return Err(VirtioError::activate(&self.id, "queue given twice"));
            }
        }
        let (Some(req), Some(evt)) = (req, evt) else {
            return Err(VirtioError::activate(
                &self.id,
                "needs the request and the event queue",
            ));
        };
        let requestq = self
            .worker
            .prepare_queue(req.queue, REQUEST_QUEUE, false, &mem)?;
        let eventq = self
            .worker
            .prepare_queue(evt.queue, EVENT_QUEUE, false, &mem)?;
        let body = IommuWorker {
            id: self.id.clone(),
            mem,
            interrupt,
            requestq,
            eventq,
            req_kick: req.kick,
            evt_kick: evt.kick,
            translator: self.translator.clone(),
            faults: self.faults.clone(),
            metrics: self.metrics.clone(),
            chain: DescChain::default(),
            invalid: LogLimiter::new(),
            irq: LogLimiter::new(),
        };
        Ok(body)
    }

    /// A device `id` with `config`, translating for the PCI requester ids (BDFs) in `endpoints`.
    ///
    /// Fails only if the host cannot create an eventfd (out of file descriptors).
    pub fn new(id: String, config: IommuConfig, endpoints: &[u32]) -> std::io::Result<Self> {
        let mut state = IommuState::new(config);
        for &ep in endpoints {
            state.add_endpoint(ep);
        }
        // The state a device reset returns to (no domains, initial bypass), replayed through
        // `IommuState::restore` so external listeners follow the reset too.
        let initial = state.save();
        let metrics = Arc::new(IommuMetrics::default());
        let faults = Arc::new(FaultSink {
            pending: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            active: AtomicBool::new(false),
            metrics: metrics.clone(),
        });
        Ok(Self {
            worker: WorkerSlot::new(id.clone()),
            id,
            translator: Translator::new(state),
            initial,
            acked_features: 0,
            metrics,
            faults,
        })
    }

    /// The handle devices behind this IOMMU use to translate their DMA addresses.
    pub fn translator(&self) -> Translator {
        self.translator.clone()
    }

    /// A handle for reporting faults from other threads (see [`VirtioIommu::report_fault`]).
    pub fn fault_reporter(&self) -> FaultReporter {
        FaultReporter {
            sink: self.faults.clone(),
        }
    }

    /// Report `fault` by `endpoint` to the guest on the event queue (counted as dropped when no
    /// event buffer is available).
    pub fn report_fault(&self, endpoint: u32, fault: &Fault) {
        self.fault_reporter().report_fault(endpoint, fault);
    }

    /// The DMA view of `endpoint` for a device behind this IOMMU: translation through the
    /// endpoint's domain, faults reported on this device's event queue.
    pub fn endpoint_access(&self, endpoint: u32) -> crate::endpoint::EndpointAccess {
        crate::endpoint::EndpointAccess::new(endpoint, self.translator(), self.fault_reporter())
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<IommuMetrics> {
        self.metrics.clone()
    }

    /// The worker stopped (reset, or a restore of a device saved before activation): fault
    /// events pending for it are dropped and counted.
    fn worker_stopped(&mut self) {
        self.faults.active.store(false, Ordering::Release);
        let n = {
            let mut p = self.faults.lock();
            let n = p.len();
            p.clear();
            n
        };
        self.metrics
            .faults_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        device_type::IOMMU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![IOMMU_QUEUE_SIZE, IOMMU_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::VIRTIO_F_VERSION_1 | OFFERED_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
        self.translator
            .write()
            .set_acked_features(self.acked_features & OFFERED_FEATURES);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.translator.read().config().encode();
        devices::virtio::read_config_bytes(&cfg, offset, data);
    }

    /// Only the `bypass` byte is writable, and only once `VIRTIO_IOMMU_F_BYPASS_CONFIG` is acked.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.acked_features & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0 {
            return;
        }
        let Some(at) = (IommuConfig::BYPASS_OFFSET as u64).checked_sub(offset) else {
            return;
        };
        let Some(&v) = usize::try_from(at).ok().and_then(|i| data.get(i)) else {
            return;
        };
        let status = self.translator.write().set_bypass(v & 1 != 0);
        if status != IommuStatus::Ok {
            log::warn!("{}: bypass change not fully applied: {status:?}", self.id);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        _access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        if self.worker.is_active() {
            return Err(VirtioError::activate(&self.id, "already active"));
        }
        let body = self.worker_body(mem, interrupt, queues, _access)?;
        self.worker.start(body)?;
        self.faults.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Stop serving and return the IOMMU to its initial state (no domains, initial `bypass`).
    fn reset(&mut self) {
        self.worker.reset();
        self.worker_stopped();
        let mut state = self.translator.write();
        // The `bypass` config field survives a device reset (virtio 1.x 5.13.4); domains,
        // attachments and negotiated features do not.
        let bypass = state.config().bypass;
        if let Err(e) = state.restore(&self.initial) {
            log::error!("{}: cannot reset the IOMMU state: {e}", self.id);
        }
        state.set_bypass(bypass);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics.values()
    }
}

devices::worker_device_state!(VirtioIommu);

impl Snapshottable for VirtioIommu {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Layout (version 1): acked features `u64`, queue count `u8` (0 or 2) and queue states, the
    /// IOMMU state's version `u16` and its payload as length-prefixed bytes.
    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let queues = self.worker.saved_queues()?;
        let inner = self.translator.read().save();
        let mut w = StateWriter::new();
        w.u64(self.acked_features);
        write_queue_states(&mut w, &queues);
        w.u16(inner.version).bytes(&inner.data);
        Ok(w.into_section(&self.id, IOMMU_DEVICE_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, &self.id, IOMMU_DEVICE_STATE_VERSION)?;
        let acked = r.u64()?;
        let queues = read_queue_states(&mut r, 2)?;
        let inner_version = r.u16()?;
        let inner_len = r.remaining();
        let inner = StateSection {
            id: crate::iommu::STATE_ID.to_string(),
            version: inner_version,
            data: r.bytes(inner_len)?.to_vec(),
        };
        r.finish()?;
        let saved = self
            .worker
            .check_restore(acked, self.avail_features(), queues, 2)?;
        // Validated everything else first: on error the IOMMU state is left unchanged.
        self.translator.write().restore(&inner)?;
        self.acked_features = saved.acked_features;
        if self.worker.apply_restore(saved).is_some() {
            self.worker_stopped();
        }
        Ok(())
    }
}

/// The worker thread body: serves the request queue and delivers pending fault events.
struct IommuWorker {
    id: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    requestq: Queue,
    eventq: Queue,
    req_kick: EventFd,
    evt_kick: EventFd,
    translator: Translator,
    faults: Arc<FaultSink>,
    metrics: Arc<IommuMetrics>,
    chain: DescChain,
    invalid: LogLimiter,
    irq: LogLimiter,
}

impl IommuWorker {
    fn invalid(&mut self, what: &dyn std::fmt::Display) {
        self.metrics
            .invalid_descriptors
            .fetch_add(1, Ordering::Relaxed);
        if self.invalid.allow() {
            log::warn!("{}: {what}", self.id);
        }
    }

    fn process_requests(&mut self) {
        let mem = self.mem.clone();
        if !avail_ok(&self.requestq, &mem) {
            self.invalid(&"request queue: available index out of range; queue ignored");
            return;
        }
        let mut used = false;
        while let Some(chain) = self.requestq.pop_descriptor_chain(&mem) {
            let len = match self.chain.fill(chain, &mem, None) {
                Ok(()) => self.serve(&mem),
                Err(e) => {
                    self.invalid(&format_args!("dropping malformed request chain: {e}"));
                    0
                }
            };
            used = true;
            let head = self.chain.head;
            if return_chain(&mut self.requestq, &mem, head, len).is_err() {
                break;
            }
        }
        if used {
            notify(
                &mut self.requestq,
                &mem,
                &*self.interrupt,
                REQUEST_QUEUE,
                &mut self.irq,
                &self.id,
            );
        }
    }

    /// Execute the request in `self.chain`; returns the bytes written to its writable part.
    fn serve(&mut self, mem: &GuestMemoryMmap) -> u32 {
        let writable_len = self.chain.writable_len;
        if writable_len < REQ_TAIL_SIZE as u64 {
            self.invalid(&format_args!(
                "request chain has {writable_len} device-writable bytes, no room for the tail"
            ));
            return 0;
        }
        let probe_size = self.translator.read().config().probe_size as usize;
        let (tail_off, status, payload) = if self.chain.readable_len > MAX_REQUEST as u64 {
            let n = self.chain.readable_len;
            self.invalid(&format_args!(
                "request of {n} bytes exceeds {MAX_REQUEST}; answered INVAL"
            ));
            (0, IommuStatus::Inval, Vec::new())
        } else {
            let bytes = read_from_ranges(mem, &self.chain.readable, MAX_REQUEST);
            // An unknown type, or PROBE without F_PROBE: not written, used length 0 (virtio 1.x
            // 5.13.6.2 and 5.13.6.7.2).
            let unknown = match bytes.first() {
                Some(&t) if !is_known_request(t) => true,
                Some(&VIRTIO_IOMMU_T_PROBE) => !self.translator.read().acked(VIRTIO_IOMMU_F_PROBE),
                _ => false,
            };
            if unknown {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                self.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            let tail_off = if bytes.first() == Some(&VIRTIO_IOMMU_T_PROBE) {
                probe_size
            } else {
                0
            };
            if (tail_off + REQ_TAIL_SIZE) as u64 > writable_len {
                // Only PROBE has a payload: its properties buffer is too small.
                (tail_off, IommuStatus::Inval, Vec::new())
            } else {
                match parse_request(&bytes) {
                    Ok(req) => {
                        let resp = self.translator.handle(req);
                        (tail_off, resp.status, resp.payload)
                    }
                    Err(s) => (tail_off, s, Vec::new()),
                }
            }
        };
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if status != IommuStatus::Ok {
            self.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
        }
        // The tail follows the properties (PROBE) or starts the writable part. A writable part too
        // small for the layout gets the tail in its last bytes, where drivers read it.
        let total = (tail_off + REQ_TAIL_SIZE).min(writable_len as usize);
        let mut out = vec![0u8; total];
        let n = payload.len().min(total - REQ_TAIL_SIZE);
        out[..n].copy_from_slice(&payload[..n]);
        out[total - REQ_TAIL_SIZE..].copy_from_slice(&encode_tail(status));
        write_to_ranges(mem, &self.chain.writable, &out) as u32
    }

    fn deliver_faults(&mut self) {
        let events: Vec<FaultEvent> = self.faults.lock().drain(..).collect();
        if events.is_empty() {
            return;
        }
        let mem = self.mem.clone();
        if !avail_ok(&self.eventq, &mem) {
            self.invalid(&"event queue: available index out of range; queue ignored");
            for _ in &events {
                self.faults.drop_fault();
            }
            return;
        }
        let mut used = false;
        'events: for ev in events {
            loop {
                let Some(chain) = self.eventq.pop_descriptor_chain(&mem) else {
                    self.faults.drop_fault();
                    continue 'events;
                };
                let ok = match self.chain.fill(chain, &mem, None) {
                    Ok(())
                        if self.chain.readable.is_empty()
                            && self.chain.writable_len >= FAULT_EVENT_SIZE as u64 =>
                    {
                        true
                    }
                    Ok(()) => {
                        self.invalid(&"event buffer is device-readable or too small");
                        false
                    }
                    Err(e) => {
                        self.invalid(&format_args!("dropping malformed event chain: {e}"));
                        false
                    }
                };
                let len = if ok {
                    write_to_ranges(&mem, &self.chain.writable, &ev.encode()) as u32
                } else {
                    0
                };
                used = true;
                let head = self.chain.head;
                if return_chain(&mut self.eventq, &mem, head, len).is_err() {
                    self.faults.drop_fault();
                    break 'events;
                }
                if ok {
                    self.metrics.faults_reported.fetch_add(1, Ordering::Relaxed);
                    continue 'events;
                }
            }
        }
        if used {
            notify(
                &mut self.eventq,
                &mem,
                &*self.interrupt,
                EVENT_QUEUE,
                &mut self.irq,
                &self.id,
            );
        }
    }
}

impl QueueBody for IommuWorker {
    fn queues_mut(&mut self) -> Vec<&mut Queue> {
        vec![&mut self.requestq, &mut self.eventq]
    }
}

impl WorkerBody for IommuWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.req_kick.as_raw_fd(),
            self.evt_kick.as_raw_fd(),
            self.faults.wake.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("{}: cannot watch an eventfd: {e:?}", self.id);
            }
        }
        self.process_requests();
        self.deliver_faults();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.req_kick.as_raw_fd() {
            let _ = self.req_kick.read();
            self.process_requests();
        } else if fd == self.evt_kick.as_raw_fd() {
            // New event buffers; events are only ever waiting in `faults` between wake-ups.
            let _ = self.evt_kick.read();
        } else if fd == self.faults.wake.as_raw_fd() {
            let _ = self.faults.wake.read();
            self.deliver_faults();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Access, FaultReason};
    use crate::protocol::CONFIG_SIZE;
    use crate::protocol::{
        Request, MSI_WINDOW_END, MSI_WINDOW_START, VIRTIO_IOMMU_FAULT_R_MAPPING,
        VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_PROBE_T_RESV_MEM,
        VIRTIO_IOMMU_RESV_MEM_T_MSI,
    };
    use devices::virtio::VirtioInterruptType;
    use std::time::{Duration, Instant};
    use vm_memory::{Address, Bytes, GuestAddress};

    const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const QSIZE: u16 = IOMMU_QUEUE_SIZE;
    const MEM_SIZE: u64 = 4 << 20;
    const EP: u32 = 0x08;

    #[derive(Default)]
    struct Irq {
        counts: [AtomicU64; 3],
    }

    impl VirtioInterrupt for Irq {
        fn trigger(&self, int: VirtioInterruptType) -> std::io::Result<()> {
            let i = match int {
                VirtioInterruptType::Queue(q) => usize::from(q).min(1),
                VirtioInterruptType::Config => 2,
            };
            self.counts[i].fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The driver side of one split queue.
    struct Tq {
        base: u64,
        data: Mutex<u64>,
        next_desc: Mutex<u16>,
        avail_idx: Mutex<u16>,
    }

    impl Tq {
        fn avail(&self) -> u64 {
            self.base + 16 * u64::from(QSIZE)
        }
        fn used(&self) -> u64 {
            (self.avail() + 6 + 2 * u64::from(QSIZE) + 3) & !3
        }
        fn alloc(&self, len: u64) -> u64 {
            let mut d = self.data.lock().unwrap();
            let a = *d;
            *d += (len + 15) & !15;
            a
        }
        /// Post a chain of `(addr, len, flags)`; returns the head.
        fn add(&self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
            let n = descs.len() as u16;
            let head = {
                let mut nd = self.next_desc.lock().unwrap();
                if *nd + n > QSIZE {
                    *nd = 0;
                }
                let h = *nd;
                *nd += n;
                h
            };
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let i = i as u16;
                let f = if i + 1 == n { flags } else { flags | F_NEXT };
                let a = GuestAddress(self.base + 16 * u64::from(head + i));
                mem.write_obj(addr, a).unwrap();
                mem.write_obj(len, a.unchecked_add(8)).unwrap();
                mem.write_obj(f, a.unchecked_add(12)).unwrap();
                mem.write_obj(head + i + 1, a.unchecked_add(14)).unwrap();
            }
            let mut idx = self.avail_idx.lock().unwrap();
            let slot = self.avail() + 4 + 2 * u64::from(*idx % QSIZE);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            *idx = idx.wrapping_add(1);
            std::sync::atomic::fence(Ordering::SeqCst);
            mem.write_obj(*idx, GuestAddress(self.avail() + 2)).unwrap();
            head
        }
        /// Post a request: `req` readable, then `wlen` writable bytes. Returns the writable address.
        fn request(&self, mem: &GuestMemoryMmap, req: &[u8], wlen: u32) -> u64 {
            let r = self.alloc(req.len() as u64);
            mem.write_slice(req, GuestAddress(r)).unwrap();
            let w = self.alloc(u64::from(wlen));
            mem.write_slice(&vec![0xaa; wlen as usize], GuestAddress(w))
                .unwrap();
            self.add(mem, &[(r, req.len() as u32, 0), (w, wlen, F_WRITE)]);
            w
        }
        fn queue(&self) -> Queue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.try_set_desc_table_address(GuestAddress(self.base))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail()))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used()))
                .unwrap();
            q.set_ready(true);
            q
        }
    }

    struct Env {
        mem: GuestMemoryMmap,
        irq: Arc<Irq>,
        qs: [Tq; 2],
        kicks: [EventFd; 2],
    }

    impl Env {
        fn new() -> Self {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let tq = |i: u64| Tq {
                base: 0x10000 * (i + 1),
                data: Mutex::new(0x100000 + i * 0x100000),
                next_desc: Mutex::new(0),
                avail_idx: Mutex::new(0),
            };
            Self {
                mem,
                irq: Arc::new(Irq::default()),
                qs: [tq(0), tq(1)],
                kicks: [
                    EventFd::new(EFD_NONBLOCK).unwrap(),
                    EventFd::new(EFD_NONBLOCK).unwrap(),
                ],
            }
        }
        fn queues(&self) -> Vec<ActivatedQueue> {
            (0..2)
                .map(|i| ActivatedQueue {
                    index: i as u16,
                    queue: self.qs[i].queue(),
                    kick: self.kicks[i].try_clone().unwrap(),
                })
                .collect()
        }
        fn kick(&self, i: usize) {
            self.kicks[i].write(1).unwrap();
        }
        fn used_idx(&self, i: usize) -> u16 {
            self.mem
                .read_obj(GuestAddress(self.qs[i].used() + 2))
                .unwrap()
        }
        fn used_elem(&self, i: usize, n: u16) -> (u32, u32) {
            let a = self.qs[i].used() + 4 + 8 * u64::from(n % QSIZE);
            (
                self.mem.read_obj(GuestAddress(a)).unwrap(),
                self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
            )
        }
        fn wait_used(&self, i: usize, n: u16) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.used_idx(i) < n {
                assert!(Instant::now() < deadline, "queue {i}: no used entry {n}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }
        /// Send `req` with `wlen` writable bytes and wait for it; returns (used len, writable bytes).
        fn call(&self, req: &[u8], wlen: u32) -> (u32, Vec<u8>) {
            let n = self.used_idx(0);
            let w = self.qs[0].request(&self.mem, req, wlen);
            self.kick(0);
            self.wait_used(0, n + 1);
            (self.used_elem(0, n).1, self.read(w, wlen as usize))
        }
        /// Send `req` with just a tail; returns the status byte.
        fn status(&self, req: Request) -> u8 {
            let (len, tail) = self.call(&req.encode(), 4);
            assert_eq!(len, 4);
            tail[0]
        }
    }

    fn cfg() -> IommuConfig {
        IommuConfig {
            probe_size: 64,
            ..Default::default()
        }
    }

    fn active() -> (VirtioIommu, Env) {
        let mut dev = VirtioIommu::new("iommu0".into(), cfg(), &[EP, 0x10]).unwrap();
        let env = Env::new();
        dev.set_acked_features(dev.avail_features());
        dev.activate(env.mem.clone(), env.irq.clone(), env.queues(), None)
            .unwrap();
        (dev, env)
    }

    fn attach(domain: u32, endpoint: u32) -> Request {
        Request::Attach {
            domain,
            endpoint,
            bypass: false,
        }
    }

    fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> Request {
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        }
    }

    #[test]
    fn identity_features_and_config() {
        let mut dev = VirtioIommu::new("iommu0".into(), cfg(), &[EP]).unwrap();
        assert_eq!(dev.device_type(), 23);
        assert_eq!(dev.queue_max_sizes(), vec![64, 64]);
        assert_eq!(
            dev.avail_features(),
            features::VIRTIO_F_VERSION_1 | OFFERED_FEATURES
        );
        let mut all = [0u8; CONFIG_SIZE + 8];
        dev.read_config(0, &mut all);
        assert_eq!(&all[..CONFIG_SIZE], &cfg().encode());
        assert!(all[CONFIG_SIZE..].iter().all(|&b| b == 0));
        let mut b = [0xffu8; 4];
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);

        // The bypass byte is ignored until BYPASS_CONFIG is acked.
        dev.write_config(IommuConfig::BYPASS_OFFSET as u64, &[1]);
        assert!(!dev.translator().read().config().bypass);
        dev.set_acked_features(dev.avail_features());
        dev.write_config(0, &[0xff; 8]);
        assert!(!dev.translator().read().config().bypass);
        dev.write_config(IommuConfig::BYPASS_OFFSET as u64 - 2, &[0, 0, 1, 0]);
        assert!(dev.translator().read().config().bypass);
        let mut one = [0u8];
        dev.read_config(IommuConfig::BYPASS_OFFSET as u64, &mut one);
        assert_eq!(one, [1]);
        assert!(dev
            .translator()
            .translate(EP, 0x1000, 8, Access::Read)
            .is_ok());
        dev.write_config(IommuConfig::BYPASS_OFFSET as u64, &[0]);
        assert!(!dev.translator().read().config().bypass);
    }

    #[test]
    fn attach_map_unmap_through_the_queue() {
        let (dev, env) = active();
        let t = dev.translator();
        assert!(t.translate(EP, 0x4000, 16, Access::Read).is_err());
        assert_eq!(env.status(attach(1, EP)), 0);
        assert_eq!(env.status(map(1, 0x4000, 0x5fff, 0x20_0000)), 0);
        assert_eq!(
            t.translate(EP, 0x4ff8, 16, Access::Write).unwrap(),
            vec![(0x20_0ff8, 16)]
        );
        assert_eq!(
            env.status(Request::Unmap {
                domain: 1,
                virt_start: 0x4000,
                virt_end: 0x5fff
            }),
            0
        );
        let f = t.translate(EP, 0x4000, 16, Access::Read).unwrap_err();
        assert_eq!(f.iova, 0x4000);
        // Errors from the state machine come back in the tail: unknown endpoint, bad alignment.
        assert_eq!(env.status(attach(1, 0x99)), IommuStatus::NoEnt.as_u8());
        assert_eq!(
            env.status(map(1, 0x4001, 0x5fff, 0)),
            IommuStatus::Range.as_u8()
        );
        assert!(env.irq.counts[0].load(Ordering::SeqCst) >= 1);
        assert_eq!(dev.counters()[0], ("requests", 5));
        assert_eq!(dev.counters()[1], ("request_errors", 2));
    }

    #[test]
    fn probe_returns_the_msi_window() {
        let (_dev, env) = active();
        let req = Request::Probe { endpoint: EP }.encode();
        let (len, out) = env.call(&req, 64 + 4);
        assert_eq!(len, 68);
        assert_eq!(
            u16::from_le_bytes([out[0], out[1]]),
            VIRTIO_IOMMU_PROBE_T_RESV_MEM
        );
        assert_eq!(out[4], VIRTIO_IOMMU_RESV_MEM_T_MSI);
        assert_eq!(
            u64::from_le_bytes(out[8..16].try_into().unwrap()),
            MSI_WINDOW_START
        );
        assert_eq!(
            u64::from_le_bytes(out[16..24].try_into().unwrap()),
            MSI_WINDOW_END
        );
        assert!(out[24..64].iter().all(|&b| b == 0));
        assert_eq!(&out[64..], &[0, 0, 0, 0]);

        // Unknown endpoint: NOENT in the tail after an empty property area.
        let req = Request::Probe { endpoint: 0x77 }.encode();
        let (len, out) = env.call(&req, 68);
        assert_eq!(len, 68);
        assert_eq!(out[64], IommuStatus::NoEnt.as_u8());
        // A property area smaller than probe_size: INVAL in the last bytes.
        let req = Request::Probe { endpoint: EP }.encode();
        let (len, out) = env.call(&req, 16);
        assert_eq!(len, 16);
        assert_eq!(out[12], IommuStatus::Inval.as_u8());
        assert!(out[..12].iter().all(|&b| b == 0));
    }

    #[test]
    fn unknown_and_malformed_requests() {
        let (dev, env) = active();
        // An unknown type is returned unwritten with a used length of 0.
        let (len, out) = env.call(&[42u8; 20], 4);
        assert_eq!((len, out[0]), (0, 0xaa));
        // Truncated ATTACH.
        let (len, out) = env.call(&attach(1, EP).encode()[..10], 4);
        assert_eq!((len, out[0]), (4, IommuStatus::Inval.as_u8()));
        // Oversized request: INVAL without executing it.
        let mut big = attach(1, EP).encode();
        big.resize(MAX_REQUEST + 1, 0);
        let (len, out) = env.call(&big, 4);
        assert_eq!((len, out[0]), (4, IommuStatus::Inval.as_u8()));
        assert_eq!(dev.translator().read().endpoint_domain(EP), None);
        // No readable part at all.
        let w = env.qs[0].alloc(4);
        env.qs[0].add(&env.mem, &[(w, 4, F_WRITE)]);
        env.kick(0);
        env.wait_used(0, 4);
        assert_eq!(env.used_elem(0, 3).1, 4);
        assert_eq!(env.read(w, 1)[0], IommuStatus::Inval.as_u8());
    }

    #[test]
    fn chains_without_a_tail_are_returned_empty_and_serving_continues() {
        let (dev, env) = active();
        let q = &env.qs[0];
        let mem = &env.mem;
        // Readable only.
        let r = q.alloc(64);
        mem.write_slice(&attach(1, EP).encode(), GuestAddress(r))
            .unwrap();
        q.add(mem, &[(r, 20, 0)]);
        // Writable part too short for the tail.
        q.request(mem, &attach(1, EP).encode(), 3);
        // Out of guest RAM.
        q.add(mem, &[(r, 20, 0), (MEM_SIZE - 2, 4, F_WRITE)]);
        // Readable after writable.
        q.add(mem, &[(r + 32, 4, F_WRITE), (r, 20, 0)]);
        // Next index beyond the queue.
        let head = q.add(mem, &[(r, 20, 0)]);
        let a = GuestAddress(q.base + 16 * u64::from(head));
        mem.write_obj(F_NEXT, a.unchecked_add(12)).unwrap();
        mem.write_obj(999u16, a.unchecked_add(14)).unwrap();
        env.kick(0);
        env.wait_used(0, 5);
        for n in 0..5 {
            assert_eq!(env.used_elem(0, n).1, 0, "hostile chain {n} got bytes");
        }
        assert_eq!(dev.translator().read().endpoint_domain(EP), None);
        assert_eq!(env.status(attach(1, EP)), 0);
        assert_eq!(dev.translator().read().endpoint_domain(EP), Some(1));
        assert_eq!(dev.metrics().invalid_descriptors.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn faults_go_to_the_event_queue_or_are_dropped() {
        let (dev, env) = active();
        let fault = Fault {
            iova: 0xdead_b000,
            access: Access::Write,
            reason: FaultReason::Unmapped,
        };
        // No event buffer: dropped.
        dev.report_fault(EP, &fault);
        let deadline = Instant::now() + Duration::from_secs(5);
        while dev.metrics().faults_dropped.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        let b = env.qs[1].alloc(32);
        env.qs[1].add(&env.mem, &[(b, 32, F_WRITE)]);
        env.kick(1);
        dev.fault_reporter().report_fault(EP, &fault);
        env.wait_used(1, 1);
        assert_eq!(env.used_elem(1, 0).1, FAULT_EVENT_SIZE as u32);
        let ev = env.read(b, FAULT_EVENT_SIZE);
        assert_eq!(ev[0], VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(u32::from_le_bytes(ev[8..12].try_into().unwrap()), EP);
        assert_eq!(
            u64::from_le_bytes(ev[16..24].try_into().unwrap()),
            0xdead_b000
        );
        assert!(env.irq.counts[1].load(Ordering::SeqCst) >= 1);
        assert_eq!(dev.metrics().faults_reported.load(Ordering::Relaxed), 1);
        assert_eq!(dev.metrics().faults_dropped.load(Ordering::Relaxed), 1);
        // An inactive device drops.
        let idle = VirtioIommu::new("iommu1".into(), cfg(), &[EP]).unwrap();
        idle.report_fault(EP, &fault);
        assert_eq!(idle.metrics().faults_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn activation_errors() {
        let mut dev = VirtioIommu::new("iommu0".into(), cfg(), &[EP]).unwrap();
        let env = Env::new();
        let mut qs = env.queues();
        qs.pop();
        assert!(dev
            .activate(env.mem.clone(), env.irq.clone(), qs, None)
            .is_err());
        let mut qs = env.queues();
        qs[1].index = 2;
        assert!(dev
            .activate(env.mem.clone(), env.irq.clone(), qs, None)
            .is_err());
        dev.activate(env.mem.clone(), env.irq.clone(), env.queues(), None)
            .unwrap();
        assert!(dev
            .activate(env.mem.clone(), env.irq.clone(), env.queues(), None)
            .is_err());
    }

    #[test]
    fn reset_clears_domains_but_keeps_bypass() {
        let (mut dev, env) = active();
        assert_eq!(env.status(attach(1, EP)), 0);
        dev.write_config(IommuConfig::BYPASS_OFFSET as u64, &[1]);
        dev.reset();
        assert_eq!(dev.translator().read().domain_count(), 0);
        assert_eq!(dev.translator().read().endpoint_domain(EP), None);
        let mut one = [0u8];
        dev.read_config(IommuConfig::BYPASS_OFFSET as u64, &mut one);
        assert_eq!(one, [1], "bypass survives a device reset");
    }

    #[test]
    fn map_over_the_msi_window_is_refused() {
        let (_dev, env) = active();
        assert_eq!(env.status(attach(1, EP)), 0);
        let inval = IommuStatus::Inval.as_u8();
        assert_eq!(
            env.status(map(1, 0xfee0_0000, 0xfee0_0fff, 0x10_0000)),
            inval
        );
        assert_eq!(
            env.status(map(1, 0xfe00_0000, 0xffff_ffff, 0x10_0000)),
            inval
        );
        assert_eq!(env.status(map(1, 0xfed0_0000, 0xfedf_ffff, 0x10_0000)), 0);
    }

    #[test]
    fn probe_without_the_probe_feature_is_returned_unwritten() {
        let mut dev = VirtioIommu::new("iommu0".into(), cfg(), &[EP]).unwrap();
        let env = Env::new();
        dev.set_acked_features(dev.avail_features() & !(1 << VIRTIO_IOMMU_F_PROBE));
        dev.activate(env.mem.clone(), env.irq.clone(), env.queues(), None)
            .unwrap();
        let (len, _) = env.call(&Request::Probe { endpoint: EP }.encode(), 68);
        assert_eq!(len, 0);
        assert_eq!(env.status(attach(1, EP)), 0, "the device keeps serving");
    }

    #[test]
    fn state_round_trip() {
        let (mut dev, env) = active();
        assert_eq!(env.status(attach(3, EP)), 0);
        assert_eq!(env.status(map(3, 0x1_0000, 0x1_ffff, 0x30_0000)), 0);
        // A running device refuses to save.
        assert!(matches!(dev.snapshot(), Err(StateError::Pause { .. })));
        migration::Pausable::pause(&mut dev).unwrap();
        // A request posted while paused waits.
        env.qs[0].request(&env.mem, &attach(4, 0x10).encode(), 4);
        env.kick(0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(env.used_idx(0), 2);
        let saved = dev.snapshot().unwrap();
        assert_eq!(
            (saved.id.as_str(), saved.version),
            ("iommu0", IOMMU_DEVICE_STATE_VERSION)
        );

        // A fresh device with the same endpoints restores, then activates with the saved positions.
        let mut fresh = VirtioIommu::new("iommu0".into(), cfg(), &[EP, 0x10]).unwrap();
        let mut bad = saved.clone();
        bad.data.truncate(5);
        assert!(fresh.restore(&bad).is_err());
        let mut newer = saved.clone();
        newer.version += 1;
        assert!(matches!(
            fresh.restore(&newer),
            Err(StateError::Version { .. })
        ));
        assert!(VirtioIommu::new("iommu1".into(), cfg(), &[EP, 0x10])
            .unwrap()
            .restore(&saved)
            .is_err());
        // Endpoints unknown to the new device are refused.
        assert!(VirtioIommu::new("iommu0".into(), cfg(), &[0x10])
            .unwrap()
            .restore(&saved)
            .is_err());
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.snapshot().unwrap(), saved.clone());
        assert_eq!(
            fresh
                .translator()
                .translate(EP, 0x1_0010, 4, Access::Read)
                .unwrap(),
            vec![(0x30_0010, 4)]
        );
        drop(dev);
        fresh
            .activate(env.mem.clone(), env.irq.clone(), env.queues(), None)
            .unwrap();
        // The pending request is served from the restored queue position.
        env.kick(0);
        env.wait_used(0, 3);
        assert_eq!(env.used_elem(0, 2).1, 4);
        assert_eq!(fresh.translator().read().endpoint_domain(0x10), Some(4));

        // Restore into a paused, active device replaces its queues and state.
        migration::Pausable::pause(&mut fresh).unwrap();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.translator().read().endpoint_domain(0x10), None);
        assert_eq!(fresh.snapshot().unwrap(), saved);
        migration::Pausable::resume(&mut fresh).unwrap();
    }
}
