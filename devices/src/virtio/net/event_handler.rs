//! The virtio-net worker: which fds wake it and what it does then.
//!
//! - TX kick: send every available TX chain to the backend (one `writev` each), return the chains,
//!   signal the driver if it asked.
//! - Backend readable: receive frames into RX chains until the backend is empty, the RX ring is
//!   empty or the batch budget is used. With no RX buffer the backend fd is removed from the epoll
//!   set (so a waiting frame does not make the worker spin) and added back on the next RX kick.
//! - RX kick: re-watch the backend.
//!
//! A malformed chain is returned to the guest with length 0 and counted; the worker keeps going.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::metrics::NetMetrics;
use super::{queues, NetBackend, MAX_TX_FRAME, MIN_TX_FRAME, NET_QUEUE_SIZE, VNET_HDR_LEN};
use crate::legacy::log_limit::LogLimiter;
use crate::virtio::common::QueueBody;
use crate::virtio::common::{
    avail_ok, mark_dirty, notify, return_chain, ChainError, DescChain, GuestIoVecs,
};
use crate::virtio::worker::WorkerBody;
use crate::virtio::{AccessPlatform, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// Frames handled per wake-up before other fds get a turn.
const BUDGET: usize = NET_QUEUE_SIZE as usize;
/// Smallest RX chain accepted: the header plus an Ethernet header.
const MIN_RX_BUFFER: u64 = (VNET_HDR_LEN + 14) as u64;

#[derive(Default)]
struct Limits {
    invalid: LogLimiter,
    tx_error: LogLimiter,
    rx_error: LogLimiter,
    queue: LogLimiter,
    irq: LogLimiter,
}

/// The device-specific part of the net worker thread.
pub(crate) struct NetWorker {
    pub id: String,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub backend: Box<dyn NetBackend>,
    pub metrics: Arc<NetMetrics>,
    /// Whether the backend fd is in the epoll set.
    backend_watched: bool,
    chain: DescChain,
    access: Option<Arc<dyn AccessPlatform>>,
    limits: Limits,
}

impl NetWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        rx: Queue,
        tx: Queue,
        rx_kick: EventFd,
        tx_kick: EventFd,
        backend: Box<dyn NetBackend>,
        metrics: Arc<NetMetrics>,
    ) -> Self {
        Self {
            id,
            mem,
            interrupt,
            rx,
            tx,
            rx_kick,
            tx_kick,
            backend,
            metrics,
            backend_watched: false,
            chain: DescChain::default(),
            access: None,
            limits: Limits::default(),
        }
    }

    /// Translate the guest's buffer addresses through `access` (a device behind an IOMMU).
    pub fn with_access(mut self, access: Option<Arc<dyn AccessPlatform>>) -> Self {
        self.access = access;
        self
    }

    fn invalid(&mut self, queue: &str, e: ChainError) {
        NetMetrics::add(&self.metrics.invalid_descriptors, 1);
        if self.limits.invalid.allow() {
            log::warn!(
                "{}: dropping malformed {queue} descriptor chain: {e}",
                self.id
            );
        }
    }

    fn queue_error(&mut self, what: &str, e: impl std::fmt::Display) {
        if self.limits.queue.allow() {
            log::warn!("{}: {what}: {e}", self.id);
        }
    }

    /// Send every available TX chain. Returns the number of chains handled.
    pub fn process_tx(&mut self) -> usize {
        let mem = self.mem.clone();
        let mut handled = 0;
        loop {
            if let Err(e) = self.tx.disable_notification(&mem) {
                self.queue_error("TX ring unreadable", e);
                return handled;
            }
            if !avail_ok(&self.tx, &mem) {
                NetMetrics::add(&self.metrics.invalid_descriptors, 1);
                self.queue_error("TX ring", "available index out of range; queue ignored");
                return handled;
            }
            while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
                handled += 1;
                let res = self
                    .chain
                    .fill(chain, &mem, self.access.as_deref())
                    .and_then(|_| {
                        if !self.chain.writable.is_empty() {
                            return Err(ChainError::Direction("writable"));
                        }
                        let have = self.chain.readable_len;
                        if have < MIN_TX_FRAME as u64 {
                            return Err(ChainError::TooShort {
                                have,
                                need: MIN_TX_FRAME as u64,
                            });
                        }
                        if have > MAX_TX_FRAME as u64 {
                            return Err(ChainError::TooLong {
                                have,
                                max: MAX_TX_FRAME as u64,
                            });
                        }
                        GuestIoVecs::new(&mem, &self.chain.readable, MAX_TX_FRAME)
                    });
                match res {
                    Ok(iov) => match self.backend.send(&iov) {
                        Ok(_) => {
                            NetMetrics::add(&self.metrics.tx_packets, 1);
                            NetMetrics::add(
                                &self.metrics.tx_bytes,
                                (iov.len() - VNET_HDR_LEN) as u64,
                            );
                        }
                        Err(e) => {
                            NetMetrics::add(&self.metrics.tx_errors, 1);
                            if self.limits.tx_error.allow() {
                                log::warn!(
                                    "{}: {} refused a frame: {e}",
                                    self.id,
                                    self.backend.describe()
                                );
                            }
                        }
                    },
                    Err(e) => self.invalid("TX", e),
                }
                let head = self.chain.head;
                if let Err(e) = return_chain(&mut self.tx, &mem, head, 0) {
                    self.queue_error("TX used ring", e);
                    return handled;
                }
            }
            match self.tx.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.queue_error("TX ring unreadable", e);
                    break;
                }
            }
        }
        if handled > 0 {
            notify(
                &mut self.tx,
                &mem,
                &*self.interrupt,
                queues::TX,
                &mut self.limits.irq,
                &self.id,
            );
        }
        handled
    }

    /// Receive frames into RX chains. Returns the number of frames delivered.
    pub fn process_rx(&mut self, ops: Option<&mut EventOps>) -> usize {
        let mem = self.mem.clone();
        let mut delivered = 0;
        let mut used = false;
        let mut stop_watching = false;
        for _ in 0..BUDGET {
            if !avail_ok(&self.rx, &mem) {
                NetMetrics::add(&self.metrics.invalid_descriptors, 1);
                self.queue_error(
                    "RX ring",
                    "available index out of range; waiting for the next RX kick",
                );
                stop_watching = true;
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                // Out of buffers: ask for a kick, and look once more in case some arrived meanwhile.
                match self.rx.enable_notification(&mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => self.queue_error("RX ring unreadable", e),
                }
                stop_watching = true;
                break;
            };
            let res = self
                .chain
                .fill(chain, &mem, self.access.as_deref())
                .and_then(|_| {
                    if !self.chain.readable.is_empty() {
                        return Err(ChainError::Direction("readable"));
                    }
                    if self.chain.writable_len < MIN_RX_BUFFER {
                        return Err(ChainError::TooShort {
                            have: self.chain.writable_len,
                            need: MIN_RX_BUFFER,
                        });
                    }
                    GuestIoVecs::new(&mem, &self.chain.writable, MAX_TX_FRAME)
                });
            let head = self.chain.head;
            let len = match res {
                Ok(mut iov) => match self.backend.recv(&mut iov) {
                    Ok(n) => {
                        drop(iov);
                        mark_dirty(&mem, &self.chain.writable, n);
                        NetMetrics::add(&self.metrics.rx_packets, 1);
                        NetMetrics::add(
                            &self.metrics.rx_bytes,
                            n.saturating_sub(VNET_HDR_LEN) as u64,
                        );
                        delivered += 1;
                        n as u32
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        self.rx.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        // The frame did not fit (EINVAL/EFAULT/EMSGSIZE; the kernel dropped it) or
                        // the backend failed. Give the buffer back for the next frame.
                        NetMetrics::add(&self.metrics.rx_dropped, 1);
                        if self.limits.rx_error.allow() {
                            log::warn!(
                                "{}: receiving from {} failed: {e}",
                                self.id,
                                self.backend.describe()
                            );
                        }
                        self.rx.go_to_previous_position();
                        let frame_specific = matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL) | Some(libc::EFAULT) | Some(libc::EMSGSIZE)
                        );
                        if !frame_specific {
                            stop_watching = true;
                            break;
                        }
                        continue;
                    }
                },
                Err(e) => {
                    self.invalid("RX", e);
                    0
                }
            };
            used = true;
            if let Err(e) = return_chain(&mut self.rx, &mem, head, len) {
                self.queue_error("RX used ring", e);
                stop_watching = true;
                break;
            }
        }
        if used {
            notify(
                &mut self.rx,
                &mem,
                &*self.interrupt,
                queues::RX,
                &mut self.limits.irq,
                &self.id,
            );
        }
        if stop_watching {
            if let Some(ops) = ops {
                self.unwatch_backend(ops);
            }
        }
        delivered
    }

    fn watch_backend(&mut self, ops: &mut EventOps) {
        if self.backend_watched {
            return;
        }
        match ops.add(Events::new_raw(self.backend.as_raw_fd(), EventSet::IN)) {
            Ok(()) => self.backend_watched = true,
            Err(e) => self.queue_error("cannot watch the backend", format!("{e:?}")),
        }
    }

    fn unwatch_backend(&mut self, ops: &mut EventOps) {
        if !self.backend_watched {
            return;
        }
        match ops.remove(Events::new_raw(self.backend.as_raw_fd(), EventSet::IN)) {
            Ok(()) => self.backend_watched = false,
            Err(e) => self.queue_error("cannot unwatch the backend", format!("{e:?}")),
        }
    }
}

impl QueueBody for NetWorker {
    fn queues_mut(&mut self) -> Vec<&mut Queue> {
        vec![&mut self.rx, &mut self.tx]
    }
}

impl WorkerBody for NetWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.rx_kick.as_raw_fd(), self.tx_kick.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("{}: cannot watch a queue eventfd: {e:?}", self.id);
            }
        }
        self.backend_watched = false;
        self.watch_backend(ops);
        // Serve whatever the driver queued while no worker ran (activation, resume, restore).
        self.process_tx();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.tx_kick.as_raw_fd() {
            let _ = self.tx_kick.read();
            self.process_tx();
        } else if fd == self.rx_kick.as_raw_fd() {
            let _ = self.rx_kick.read();
            self.watch_backend(ops);
        } else if fd == self.backend.as_raw_fd() {
            if events
                .event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP)
                && !events.event_set().contains(EventSet::IN)
            {
                if self.limits.rx_error.allow() {
                    log::warn!(
                        "{}: {} reported an error; not watching it until the next RX kick",
                        self.id,
                        self.backend.describe()
                    );
                }
                self.unwatch_backend(ops);
                return;
            }
            self.process_rx(Some(ops));
        }
    }
}
