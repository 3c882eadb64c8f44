//! Split virtqueue (virtio 1.x §2.7) in guest memory: descriptor table, available ring, used
//! ring. Completion is found by polling the used ring; interrupt-driven scenarios wait for their
//! vector first and then poll. EVENT_IDX is not used (the driver notifies after every publish and
//! leaves the avail flags at 0, i.e. "interrupt me").
//!
//! Descriptors of a chain stay allocated until the device returns the chain; chains the device
//! never returns are simply leaked (hostile tests), so a late completion cannot corrupt anything.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use crate::arch::time::Deadline;
use crate::dma;

/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (IN) buffer.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn out(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn input(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index the device returned.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// A split virtqueue.
pub struct Virtqueue {
    /// Queue index.
    pub index: u16,
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    notify: u64,
    free: Vec<u16>,
    /// Descriptors owned by each in-flight chain, indexed by head.
    chains: Vec<Option<Vec<u16>>>,
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Allocate (zeroed) rings for `size` descriptors; `notify` is the address the driver writes
    /// the queue index to.
    pub fn new(index: u16, size: u16, notify: u64) -> Virtqueue {
        let n = usize::from(size);
        Virtqueue {
            index,
            size,
            desc: dma::alloc(16 * n, 4096),
            avail: dma::alloc(6 + 2 * n, 4096),
            used: dma::alloc(6 + 8 * n, 4096),
            notify,
            free: (0..size).rev().collect(),
            chains: vec![None; n],
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// `(guest-physical address, length)` of the descriptor table, the available ring and the
    /// used ring.
    pub fn regions(&self) -> [(u64, usize); 3] {
        let n = usize::from(self.size);
        [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ]
    }

    /// Descriptors not owned by any chain.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Take `n` descriptors from the free list.
    pub fn alloc_descs(&mut self, n: usize) -> Option<Vec<u16>> {
        if n > self.free.len() {
            return None;
        }
        Some((0..n).map(|_| self.free.pop().unwrap()).collect())
    }

    /// Write descriptor `i` verbatim (any values: hostile tests build bad chains with it).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.desc, i, addr, len, flags, next);
    }

    /// Make the chain starting at `head` (owning `owned`) available and notify the device.
    pub fn publish(&mut self, head: u16, owned: Vec<u16>) {
        self.chains[usize::from(head)] = Some(owned);
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        dma::write::<u16>(slot, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        dma::write::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.notify();
    }

    /// Publish an available index `ahead` entries past the real one (a hostile driver: more new
    /// entries than the queue has) and notify. The queue is unusable afterwards until reset.
    pub fn publish_bogus_avail_idx(&mut self, ahead: u16) {
        dma::write::<u16>(self.avail + 2, self.avail_idx.wrapping_add(ahead));
        fence(Ordering::SeqCst);
        self.notify();
    }

    /// Write the queue index to the notify address.
    pub fn notify(&self) {
        dma::write::<u16>(self.notify, self.index);
    }

    /// Build a well-formed chain of `bufs`, publish it and notify. Returns the head.
    pub fn submit(&mut self, bufs: &[Buf]) -> Option<u16> {
        let descs = self.alloc_descs(bufs.len())?;
        for (k, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = descs.get(k + 1).copied().unwrap_or(0);
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(descs[k], b.addr, b.len, flags, next);
        }
        let head = descs[0];
        self.publish(head, descs);
        Some(head)
    }

    /// The device's used index as last written.
    pub fn used_idx(&self) -> u16 {
        dma::read::<u16>(self.used + 2)
    }

    /// Take the next used entry, if any, and free the chain it names.
    pub fn poll(&mut self) -> Option<Used> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let used = Used {
            id: dma::read::<u32>(slot),
            len: dma::read::<u32>(slot + 4),
        };
        self.last_used = self.last_used.wrapping_add(1);
        if let Some(owned) = self.chains.get_mut(used.id as usize).and_then(|c| c.take()) {
            self.free.extend(owned);
        }
        Some(used)
    }

    /// Poll until the chain `head` comes back (other completions are dropped) or `ms` pass.
    pub fn wait_for(&mut self, head: u16, ms: u64) -> Option<Used> {
        let deadline = Deadline::after_ms(ms);
        loop {
            while let Some(u) = self.poll() {
                if u.id == u32::from(head) {
                    return Some(u);
                }
            }
            if deadline.expired() {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Submit `bufs` and wait for them to come back.
    pub fn transfer(&mut self, bufs: &[Buf], ms: u64) -> Result<Used, &'static str> {
        let head = self.submit(bufs).ok_or("virtqueue full")?;
        self.wait_for(head, ms).ok_or("request timed out")
    }
}

/// Write descriptor `i` of the table at `table`.
pub fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = table + 16 * u64::from(i);
    dma::write::<u64>(d, addr);
    dma::write::<u32>(d + 8, len);
    dma::write::<u16>(d + 12, flags);
    dma::write::<u16>(d + 14, next);
}
