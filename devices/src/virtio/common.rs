//! Helpers shared by the virtio devices that run on a [`Worker`] (net, console, rng, iommu):
//! validating a guest descriptor chain (translating its addresses when the device sits behind an
//! IOMMU), turning it into host iovecs, returning it to the used ring, saving queue state, and
//! owning the worker across pause/resume.
//!
//! [`DescChain::fill`] is the one place where a guest descriptor chain is trusted or rejected.

use std::io;
use std::marker::PhantomData;
use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use migration::{StateError, StateSection};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::legacy::log_limit::LogLimiter;
use crate::legacy::state::{StateReader, StateWriter};
use crate::virtio::worker::{Worker, WorkerBody};
use crate::virtio::{AccessPlatform, DmaAccess, VirtioError, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// Why a guest descriptor chain was rejected.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The head index is out of range or its descriptor cannot be read.
    #[error("descriptor chain head is out of range or unreadable")]
    Empty,
    /// The chain loops, is longer than the queue, or names a descriptor outside the table.
    #[error("descriptor chain loops or runs past the descriptor table")]
    Broken,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    Order,
    /// A buffer lies (partly) outside guest RAM.
    #[error("buffer at {addr:#x} with length {len:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The IOMMU refused to translate a buffer address (a fault event was reported).
    #[error("IOMMU fault on device address {addr:#x} (device-{})", if *write { "writable" } else { "readable" })]
    Fault {
        /// The faulting device address.
        addr: u64,
        /// Whether the buffer was device-writable.
        write: bool,
    },
    /// The chain has buffers of the wrong direction for its queue.
    #[error("chain has device-{0} buffers where none are allowed")]
    Direction(&'static str),
    /// The chain carries fewer bytes than the request needs.
    #[error("chain carries {have} bytes, at least {need} are needed")]
    TooShort {
        /// Bytes in the chain.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The chain carries more bytes than the device accepts.
    #[error("chain carries {have} bytes, at most {max} are accepted")]
    TooLong {
        /// Bytes in the chain.
        have: u64,
        /// The limit.
        max: u64,
    },
}

/// A validated descriptor chain: its head and its device-readable and device-writable buffers,
/// each checked to lie inside guest RAM. Zero-length descriptors are dropped.
#[derive(Debug, Default, Clone)]
pub struct DescChain {
    /// Index of the chain's head descriptor (what goes back into the used ring).
    pub head: u16,
    /// Device-readable buffers, in chain order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<(GuestAddress, u32)>,
    /// Scratch space for the translated segments of one descriptor.
    segs: Vec<(GuestAddress, u64)>,
    /// Total bytes of the readable buffers.
    pub readable_len: u64,
    /// Total bytes of the writable buffers.
    pub writable_len: u64,
}

impl DescChain {
    /// Walk `chain` and validate it, reusing this value's allocations. With `access` (a device
    /// behind an IOMMU) every buffer address is a device address, translated into one or more
    /// guest-physical buffers; a fault fails the chain with [`ChainError::Fault`] (the platform has
    /// reported it). On error `self.head` still names the chain so the caller can return it to the
    /// used ring.
    pub fn fill<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        access: Option<&dyn AccessPlatform>,
    ) -> Result<(), ChainError>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        self.head = chain.head_index();
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        let mut segs = std::mem::take(&mut self.segs);
        let res = self.walk(chain, mem, access, &mut segs);
        self.segs = segs;
        res
    }

    fn walk<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        access: Option<&dyn AccessPlatform>,
        segs: &mut Vec<(GuestAddress, u64)>,
    ) -> Result<(), ChainError>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let mut count = 0usize;
        let mut last_has_next = false;
        // The iterator stops after `queue size` descriptors (loops), at an out-of-table index, at
        // an unreadable descriptor, at a bad indirect table, or when the chain passes 4 GiB; in all
        // of those cases the last descriptor it returned still says "next".
        for desc in chain {
            count += 1;
            last_has_next = desc.has_next();
            let (addr, len) = (desc.addr(), desc.len());
            if len == 0 {
                continue;
            }
            let write = desc.is_write_only();
            if !write && !self.writable.is_empty() {
                return Err(ChainError::Order);
            }
            segs.clear();
            match access {
                Some(platform) => {
                    let dir = if write {
                        DmaAccess::Write
                    } else {
                        DmaAccess::Read
                    };
                    platform
                        .translate(addr.0, u64::from(len), dir, segs)
                        .map_err(|f| ChainError::Fault {
                            addr: f.addr,
                            write,
                        })?;
                }
                None => segs.push((addr, u64::from(len))),
            }
            for &(gpa, seg_len) in segs.iter() {
                // A segment is part of a descriptor, so it fits in u32.
                let seg_len = u32::try_from(seg_len).unwrap_or(u32::MAX);
                if !GuestMemoryBackend::check_range(mem, gpa, seg_len as usize) {
                    return Err(ChainError::OutOfMemory {
                        addr: gpa.0,
                        len: seg_len,
                    });
                }
                if write {
                    self.writable.push((gpa, seg_len));
                    self.writable_len += u64::from(seg_len);
                } else {
                    self.readable.push((gpa, seg_len));
                    self.readable_len += u64::from(seg_len);
                }
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Broken);
        }
        Ok(())
    }
}

/// Host iovecs covering guest buffers, valid while the guest memory they were built from is
/// borrowed (`'a`). Handed to backends that do vectored I/O on guest memory without copying.
#[derive(Debug)]
pub struct GuestIoVecs<'a> {
    iov: Vec<libc::iovec>,
    len: usize,
    _mem: PhantomData<&'a GuestMemoryMmap>,
}

impl<'a> GuestIoVecs<'a> {
    /// Cover at most `cap` bytes of `ranges` (validated by [`DescChain::fill`]) in `mem`.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        ranges: &[(GuestAddress, u32)],
        cap: usize,
    ) -> Result<Self, ChainError> {
        let mut iov = Vec::with_capacity(ranges.len());
        let mut len = 0usize;
        'outer: for &(addr, rlen) in ranges {
            for slice in GuestMemoryBackend::get_slices(mem, addr, rlen as usize) {
                if len >= cap {
                    break 'outer;
                }
                let slice = slice.map_err(|_| ChainError::OutOfMemory {
                    addr: addr.0,
                    len: rlen,
                })?;
                let n = slice.len().min(cap - len);
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: n,
                });
                len += n;
            }
        }
        Ok(Self {
            iov,
            len,
            _mem: PhantomData,
        })
    }

    /// The iovecs; each points into mapped guest memory for `'a`.
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Total bytes covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `writev(2)` the covered bytes to `fd`.
    pub fn writev_to(&self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let cnt = self.iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec points at `iov_len` bytes of mapped guest memory that stays mapped
        // while `'a` (the borrow of the guest memory) lasts; writev only reads them.
        let r = unsafe { libc::writev(fd, self.iov.as_ptr(), cnt) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// `readv(2)` from `fd` into the covered bytes. The caller marks them dirty
    /// ([`mark_dirty`]).
    pub fn readv_from(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let cnt = self.iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec points at `iov_len` bytes of writable mapped guest memory that stays
        // mapped while `'a` lasts; the guest gave these buffers to the device to fill.
        let r = unsafe { libc::readv(fd, self.iov.as_ptr(), cnt) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// Mark the first `n` bytes of `ranges` dirty in guest memory's bitmap (for writes done through
/// raw pointers, which vm-memory does not see).
pub fn mark_dirty(mem: &GuestMemoryMmap, ranges: &[(GuestAddress, u32)], mut n: usize) {
    for &(addr, len) in ranges {
        if n == 0 {
            return;
        }
        let take = n.min(len as usize);
        for s in GuestMemoryBackend::get_slices(mem, addr, take).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
        n -= take;
    }
}

/// Copy `data` into `ranges` of guest memory (marking them dirty); returns the bytes written.
pub fn write_to_ranges(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, u32)],
    data: &[u8],
) -> usize {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for &(addr, len) in ranges {
        if done == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Copy `ranges` of guest memory into a vector (at most `cap` bytes).
pub fn read_from_ranges(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, u32)],
    cap: usize,
) -> Vec<u8> {
    use vm_memory::Bytes;
    let mut out = Vec::new();
    for &(addr, len) in ranges {
        let n = (len as usize).min(cap - out.len());
        if n == 0 {
            break;
        }
        let start = out.len();
        out.resize(start + n, 0);
        if mem.read_slice(&mut out[start..], addr).is_err() {
            out.truncate(start);
            break;
        }
    }
    out
}

/// Whether the driver's available index is plausible (at most one queue size ahead of what the
/// device consumed). When it is not, virtio-queue would refuse to iterate (and log each time), so
/// the device skips the queue instead.
pub fn avail_ok(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => (idx - Wrapping(queue.next_avail())).0 <= queue.size(),
        Err(_) => false,
    }
}

/// Put `head` into the used ring with `len` written bytes; a head outside the queue (which only a
/// broken driver produces) is dropped.
pub fn return_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    if head >= queue.size() {
        return Ok(());
    }
    queue.add_used(mem, head, len)
}

/// Raise queue `index`'s interrupt if the driver wants one (event index or flags).
pub fn notify(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    limiter: &mut LogLimiter,
    id: &str,
) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
                if limiter.allow() {
                    log::warn!("{id}: cannot signal queue {index}: {e}");
                }
            }
        }
    }
}

/// Append a queue's state to `w`.
pub fn write_queue_state(w: &mut StateWriter, q: &QueueState) {
    w.u16(q.max_size)
        .u16(q.next_avail)
        .u16(q.next_used)
        .u8(q.event_idx_enabled as u8)
        .u16(q.size)
        .u8(q.ready as u8)
        .u64(q.desc_table)
        .u64(q.avail_ring)
        .u64(q.used_ring);
}

/// Read a queue's state written by [`write_queue_state`].
pub fn read_queue_state(r: &mut StateReader<'_>) -> Result<QueueState, StateError> {
    Ok(QueueState {
        max_size: r.u16()?,
        next_avail: r.u16()?,
        next_used: r.u16()?,
        event_idx_enabled: r.u8()? != 0,
        size: r.u16()?,
        ready: r.u8()? != 0,
        desc_table: r.u64()?,
        avail_ring: r.u64()?,
        used_ring: r.u64()?,
    })
}

/// Read `count` queue states (count stored as a `u8`, at most `max`).
pub fn read_queue_states(
    r: &mut StateReader<'_>,
    max: usize,
) -> Result<Vec<QueueState>, StateError> {
    let n = r.u8()? as usize;
    if n > max {
        return Err(r.malformed(format!("{n} queues, the device has {max}")));
    }
    (0..n).map(|_| read_queue_state(r)).collect()
}

/// Append `queues`' states (count first).
pub fn write_queue_states(w: &mut StateWriter, queues: &[QueueState]) {
    w.u8(queues.len() as u8);
    for q in queues {
        write_queue_state(w, q);
    }
}

/// A queue rebuilt from saved state, validated by virtio-queue.
pub fn queue_from_state(id: &str, s: QueueState) -> Result<Queue, StateError> {
    Queue::try_from(s).map_err(|e| StateError::Malformed {
        id: id.to_string(),
        reason: format!("queue state: {e}"),
    })
}

/// Refuse to snapshot device `id` while its worker is `running`: queue positions would move
/// under the snapshot.
pub fn require_quiescent(id: &str, running: bool) -> Result<(), StateError> {
    if running {
        return Err(StateError::Pause {
            id: id.to_string(),
            reason: "snapshot of a running device; pause it first".into(),
        });
    }
    Ok(())
}

/// A worker body whose queues are saved by a snapshot and replaced by a restore.
pub trait QueueBody: WorkerBody {
    /// The body's queues, in queue-index order.
    fn queues_mut(&mut self) -> Vec<&mut Queue>;
}

/// Acked features and queue positions taken from a saved section, checked against the device
/// by [`WorkerSlot::check_restore`] and applied by [`WorkerSlot::apply_restore`].
#[derive(Debug)]
pub struct SavedQueues {
    /// Features the driver had accepted.
    pub acked_features: u64,
    states: Vec<QueueState>,
    queues: Vec<Queue>,
}

/// Where a device's worker is: not started, running, or stopped by a pause (its body, with the
/// queues, kept for snapshot and resume). It also holds the queue positions of a restore until
/// the next activation applies them.
///
/// A pause stops the worker thread and keeps its body rather than parking it, so that the device
/// can read (snapshot) and replace (restore) the queue state while paused. This is the one place
/// of the worker-served devices' (console, net, rng, iommu) pause/resume and the checks of their
/// snapshot/restore.
pub struct WorkerSlot<B: WorkerBody> {
    state: SlotState<B>,
    paused: bool,
    id: String,
    /// Queue states from a restore, applied by the next activation.
    restored: Option<Vec<QueueState>>,
}

enum SlotState<B: WorkerBody> {
    Idle,
    Running(Worker<B>),
    Stopped(B),
}

impl<B: WorkerBody> WorkerSlot<B> {
    /// An empty slot for device `id` (its threads are named `skiff-<id>`).
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            state: SlotState::Idle,
            paused: false,
            id: id.into(),
            restored: None,
        }
    }

    /// Start serving `body` (or keep it stopped when the device is paused). Restored queue
    /// positions are consumed: the body's queues were built with them
    /// ([`WorkerSlot::prepare_queue`]).
    pub fn start(&mut self, body: B) -> Result<(), VirtioError> {
        self.restored = None;
        if self.paused {
            self.state = SlotState::Stopped(body);
            return Ok(());
        }
        let w =
            Worker::spawn(format!("skiff-{}", self.id), body).map_err(|e| VirtioError::Worker {
                id: self.id.clone(),
                reason: format!("cannot start thread: {e}"),
            })?;
        self.state = SlotState::Running(w);
        Ok(())
    }

    /// Stop the worker (if any) and return its body; the slot becomes idle.
    pub fn take(&mut self) -> Option<B> {
        match std::mem::replace(&mut self.state, SlotState::Idle) {
            SlotState::Idle => None,
            SlotState::Running(w) => w.stop(),
            SlotState::Stopped(b) => Some(b),
        }
    }

    /// Driver reset: stop the worker, forget restored queue positions, return the body.
    pub fn reset(&mut self) -> Option<B> {
        self.restored = None;
        self.take()
    }

    /// Whether a body exists (the device is activated).
    pub fn is_active(&self) -> bool {
        !matches!(self.state, SlotState::Idle)
    }

    /// Whether the slot is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Refuse to save state while the worker runs: queue positions would move under the
    /// snapshot.
    pub fn require_quiescent(&self) -> Result<(), StateError> {
        require_quiescent(&self.id, self.is_active() && !self.is_paused())
    }

    /// The body while paused.
    pub fn body_mut(&mut self) -> Option<&mut B> {
        match &mut self.state {
            SlotState::Stopped(b) => Some(b),
            _ => None,
        }
    }

    /// Stop processing: the thread ends, the body is kept (the device's [`migration::Pausable`]).
    pub fn pause(&mut self) -> Result<(), StateError> {
        self.paused = true;
        if let SlotState::Running(_) = self.state {
            match self.take() {
                Some(b) => self.state = SlotState::Stopped(b),
                None => {
                    return Err(StateError::Pause {
                        id: self.id.clone(),
                        reason: "worker thread panicked".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Continue after [`WorkerSlot::pause`].
    pub fn resume(&mut self) -> Result<(), StateError> {
        self.paused = false;
        if let SlotState::Stopped(_) = self.state {
            if let Some(b) = self.take() {
                return self.start(b).map_err(|e| StateError::Resume {
                    id: self.id.clone(),
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Queue `index` as the transport handed it over, ready for the worker: at the restored
    /// position when there is one, with `event_idx`, and checked to lie in guest memory.
    pub fn prepare_queue(
        &self,
        mut queue: Queue,
        index: u16,
        event_idx: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<Queue, VirtioError> {
        let restored = self.restored.as_ref();
        if let Some(s) = restored.and_then(|r| r.get(usize::from(index))) {
            queue.set_next_avail(s.next_avail);
            queue.set_next_used(s.next_used);
        }
        queue.set_event_idx(event_idx);
        if !queue.is_valid(mem) {
            return Err(VirtioError::activate(
                &self.id,
                format!("queue {index} is not ready or lies outside guest memory"),
            ));
        }
        Ok(queue)
    }
}

impl<B: QueueBody> WorkerSlot<B> {
    /// The queue states to save: the paused worker's, or those of a restore not yet activated.
    /// Refused while the worker runs ([`WorkerSlot::require_quiescent`]).
    pub fn saved_queues(&mut self) -> Result<Vec<QueueState>, StateError> {
        self.require_quiescent()?;
        Ok(match self.body_mut() {
            Some(b) => b.queues_mut().into_iter().map(|q| q.state()).collect(),
            None => self.restored.clone().unwrap_or_default(),
        })
    }

    /// Check saved `acked` features (a subset of `avail`) and queue `states` (none, or all
    /// `count` of the device's queues) before anything is applied; refused while the worker
    /// runs.
    pub fn check_restore(
        &self,
        acked: u64,
        avail: u64,
        states: Vec<QueueState>,
        count: usize,
    ) -> Result<SavedQueues, StateError> {
        let malformed = |reason: String| StateError::Malformed {
            id: self.id.clone(),
            reason,
        };
        if self.is_active() && !self.is_paused() {
            return Err(malformed(
                "restore into a running device; pause it first".into(),
            ));
        }
        if acked & !avail != 0 {
            return Err(malformed(format!(
                "saved features {acked:#x} include some this device does not offer ({avail:#x})"
            )));
        }
        if !(states.is_empty() || states.len() == count) {
            return Err(malformed(format!(
                "{} queues saved, expected 0 or {count}",
                states.len()
            )));
        }
        let queues = states
            .iter()
            .map(|s| queue_from_state(&self.id, *s))
            .collect::<Result<_, _>>()?;
        Ok(SavedQueues {
            acked_features: acked,
            states,
            queues,
        })
    }

    /// Apply checked queue state: a paused worker gets the saved queues at once; otherwise they
    /// wait for the next activation. When this device is activated but the saved one was not,
    /// the worker is stopped and its body returned (the device takes its resources back).
    pub fn apply_restore(&mut self, saved: SavedQueues) -> Option<B> {
        let mut stopped = None;
        if let Some(body) = self.body_mut() {
            if !saved.queues.is_empty() {
                for (slot, q) in body.queues_mut().into_iter().zip(saved.queues) {
                    *slot = q;
                }
                return None;
            }
            stopped = self.take();
        }
        self.restored = (!saved.states.is_empty()).then_some(saved.states);
        stopped
    }

    /// The section of a device whose whole state is its acked features and queue positions:
    /// acked features `u64`, queue count `u8`, queue states ([`write_queue_states`]).
    pub fn save_queue_section(
        &mut self,
        acked: u64,
        version: u16,
    ) -> Result<StateSection, StateError> {
        let queues = self.saved_queues()?;
        let mut w = StateWriter::new();
        w.u64(acked);
        write_queue_states(&mut w, &queues);
        Ok(w.into_section(&self.id, version))
    }

    /// Read and check a section written by [`WorkerSlot::save_queue_section`] for a device that
    /// offers `avail` and has `count` queues.
    pub fn load_queue_section(
        &self,
        section: &StateSection,
        version: u16,
        avail: u64,
        count: usize,
    ) -> Result<SavedQueues, StateError> {
        let mut r = StateReader::open(section, &self.id, version)?;
        let acked = r.u64()?;
        let states = read_queue_states(&mut r, count)?;
        r.finish()?;
        self.check_restore(acked, avail, states, count)
    }
}

/// Implements `migration::Pausable` for a virtio device whose only activity is its worker thread
/// (a `worker: WorkerSlot` field: pause parks it, resume wakes it) and an empty
/// `migration::Migratable` (such a device writes guest memory only through the VMM's
/// dirty-tracked guest memory and has no pre-copy state). One definition for console, rng, net
/// and the virtio-iommu instead of a copy in each.
#[macro_export]
macro_rules! worker_device_state {
    ($device:ty) => {
        impl migration::Pausable for $device {
            fn pause(&mut self) -> Result<(), migration::StateError> {
                self.worker.pause()
            }

            fn resume(&mut self) -> Result<(), migration::StateError> {
                self.worker.resume()
            }
        }

        impl migration::Migratable for $device {}
    };
}
