//! The virtio-net device as the transport sees it: features, configuration space, activation,
//! reset, pause/resume and snapshot.

use std::sync::Arc;

use migration::{Snapshottable, StateError, StateSection};
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

use super::event_handler::NetWorker;
use super::features as nf;
use super::metrics::NetMetrics;
use super::persist::NetState;
use super::tap::Tap;
use super::{queues, MacAddr, NetBackend, NetConfig, NetError, TapSource, NET_QUEUE_SIZE};
use crate::legacy::log_limit::LogLimiter;
use crate::virtio::common::WorkerSlot;
use crate::virtio::features::{self, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::virtio::{
    device_type, AccessPlatform, ActivatedQueue, VirtioDevice, VirtioError, VirtioInterrupt,
};
use crate::GuestMemoryMmap;

/// A virtio-net device with one RX/TX queue pair.
///
/// While active, the backend lives on the worker thread; it comes back on reset and moves to the
/// next activation.
pub struct Net {
    id: String,
    mac: MacAddr,
    iommu: bool,
    backend: Option<Box<dyn NetBackend>>,
    acked_features: u64,
    metrics: Arc<NetMetrics>,
    worker: WorkerSlot<NetWorker>,
    bad_config: LogLimiter,
}

impl Net {
    /// Serve both queues once on the calling thread, as the worker does when kicked (fuzz targets).
    pub fn serve_once(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        let mut body = self.worker_body(mem, interrupt, queues, access)?;
        body.process_tx();
        body.process_rx(None);
        self.backend = Some(body.backend);
        Ok(())
    }

    fn worker_body(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<NetWorker, VirtioError> {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::activate(
                &self.id,
                "the driver did not accept VIRTIO_F_VERSION_1",
            ));
        }
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                queues::RX => rx = Some(q),
                queues::TX => tx = Some(q),
                i => return Err(VirtioError::activate(&self.id, format!("no queue {i}"))),
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(VirtioError::activate(
                &self.id,
                "needs both the RX and the TX queue",
            ));
        };
        let event_idx = self.acked_features & VIRTIO_F_EVENT_IDX != 0;
        let rx_q = self
            .worker
            .prepare_queue(rx.queue, queues::RX, event_idx, &mem)?;
        let tx_q = self
            .worker
            .prepare_queue(tx.queue, queues::TX, event_idx, &mem)?;
        let Some(mut backend) = self.backend.take() else {
            return Err(VirtioError::activate(
                &self.id,
                "the backend was lost when a worker thread failed",
            ));
        };
        let offloads = Self::tun_offloads(self.acked_features);
        if let Err(e) = backend.set_offload(offloads) {
            let err = VirtioError::activate(
                &self.id,
                format!(
                    "cannot set offloads {offloads:#x} on {}: {e}",
                    backend.describe()
                ),
            );
            self.backend = Some(backend);
            return Err(err);
        }
        let body = NetWorker::new(
            self.id.clone(),
            mem,
            interrupt,
            rx_q,
            tx_q,
            rx.kick,
            tx.kick,
            backend,
            self.metrics.clone(),
        )
        .with_access(access);
        Ok(body)
    }

    /// Open the configured TAP and build the device.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = match &config.tap {
            TapSource::Name(name) => Tap::open(name)?,
            TapSource::Fd(fd) => Tap::from_fd(*fd)?,
        };
        let dev = Self::with_backend(config.id, config.mac, config.iommu, Box::new(tap));
        log::info!(
            "{}: virtio-net on {}, MAC {}",
            dev.id,
            dev.backend_description(),
            dev.mac
        );
        Ok(dev)
    }

    /// Build the device on any backend (tests, benchmarks, other frame transports).
    pub fn with_backend(
        id: impl Into<String>,
        mac: Option<MacAddr>,
        iommu: bool,
        backend: Box<dyn NetBackend>,
    ) -> Self {
        let id = id.into();
        Self {
            worker: WorkerSlot::new(id.clone()),
            id,
            mac: mac.unwrap_or_else(MacAddr::random_local),
            iommu,
            backend: Some(backend),
            acked_features: 0,
            metrics: Arc::new(NetMetrics::default()),
            bad_config: LogLimiter::new(),
        }
    }

    /// The guest-visible MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The device's counters (shared with its worker).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn backend_description(&self) -> String {
        self.backend
            .as_ref()
            .map(|b| b.describe())
            .unwrap_or_else(|| "its backend".into())
    }

    /// `TUN_F_*` offloads the guest can receive, from its acked features.
    pub(crate) fn tun_offloads(acked: u64) -> u32 {
        let mut f = 0;
        if acked & nf::GUEST_CSUM != 0 {
            f |= libc::TUN_F_CSUM;
            if acked & nf::GUEST_TSO4 != 0 {
                f |= libc::TUN_F_TSO4;
            }
            if acked & nf::GUEST_TSO6 != 0 {
                f |= libc::TUN_F_TSO6;
            }
            if acked & (nf::GUEST_TSO4 | nf::GUEST_TSO6) != 0 && acked & nf::GUEST_ECN != 0 {
                f |= libc::TUN_F_TSO_ECN;
            }
        }
        f
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac.0);
        // The `status` field is 16 bits wide; virtio-bindings gives the bit as a u32.
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::common(self.iommu)
            | VIRTIO_F_EVENT_IDX
            | nf::MAC
            | nf::STATUS
            | nf::CSUM
            | nf::GUEST_CSUM
            | nf::GUEST_TSO4
            | nf::GUEST_TSO6
            | nf::GUEST_ECN
            | nf::HOST_TSO4
            | nf::HOST_TSO6
            | nf::HOST_ECN
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for modern drivers (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
        if self.bad_config.allow() {
            log::debug!(
                "{}: ignoring a {}-byte configuration write at {offset:#x}",
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
        if self.worker.is_active() {
            return Err(VirtioError::activate(&self.id, "already active"));
        }
        let body = self.worker_body(mem, interrupt, queues, access)?;
        self.worker.start(body)
    }

    fn reset(&mut self) {
        match self.worker.reset() {
            Some(body) => self.backend = Some(body.backend),
            None if self.backend.is_none() => {
                log::error!("{}: worker thread lost its backend", self.id)
            }
            None => {}
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.metrics.values()
    }
}

crate::worker_device_state!(Net);

impl Snapshottable for Net {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let state = NetState {
            acked_features: self.acked_features,
            mac: self.mac,
            queues: self.worker.saved_queues()?,
        };
        Ok(state.encode(&self.id))
    }

    /// Restores features, MAC and queue positions. On an activated (paused) device the queues are
    /// replaced at once; otherwise they are applied when the transport activates the device.
    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let state = NetState::decode(section, &self.id)?;
        let saved = self.worker.check_restore(
            state.acked_features,
            self.avail_features(),
            state.queues,
            2,
        )?;
        self.acked_features = saved.acked_features;
        self.mac = state.mac;
        // Active here but the saved device was not: back to the reset state.
        if let Some(body) = self.worker.apply_restore(saved) {
            self.backend = Some(body.backend);
        }
        Ok(())
    }
}
