//! A minimal driver side of split virtqueues for the device unit tests in this crate: lays out
//! queues in a small guest memory, posts chains (well-formed or hostile), kicks, and reads the
//! used ring back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{ActivatedQueue, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// Descriptor flag: the chain continues (virtio-bindings' `u32`, descriptor flags are `u16`).
pub const F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Guest RAM size of a test environment.
pub const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 256;

/// Counts interrupts per queue.
#[derive(Default)]
pub struct TestIrq {
    /// Triggers per queue index (config at index 15).
    pub counts: [AtomicU64; 16],
}

impl VirtioInterrupt for TestIrq {
    fn trigger(&self, int: VirtioInterruptType) -> std::io::Result<()> {
        let i = match int {
            VirtioInterruptType::Config => 15,
            VirtioInterruptType::Queue(q) => usize::from(q).min(14),
        };
        self.counts[i].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct QState {
    next_desc: u16,
    avail_idx: u16,
}

/// The driver side of one queue.
pub struct TestQueue {
    base: u64,
    data: Mutex<u64>,
    st: Mutex<QState>,
}

impl TestQueue {
    fn desc_addr(&self) -> u64 {
        self.base
    }
    fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    fn used_addr(&self) -> u64 {
        (self.avail_addr() + 6 + 2 * u64::from(QSIZE) + 3) & !3
    }

    /// Reserve `len` bytes of buffer space.
    pub fn alloc(&self, len: u64) -> GuestAddress {
        let mut d = self.data.lock().unwrap();
        let a = *d;
        *d += (len + 15) & !15;
        GuestAddress(a)
    }

    /// Reserve `n` consecutive descriptor slots; returns the first index.
    pub fn alloc_descs(&self, n: u16) -> u16 {
        let mut st = self.st.lock().unwrap();
        if st.next_desc + n > QSIZE {
            st.next_desc = 0;
        }
        let i = st.next_desc;
        st.next_desc += n;
        i
    }

    /// Write descriptor `idx`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = GuestAddress(self.desc_addr() + 16 * u64::from(idx));
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Make `head` available.
    pub fn push_avail(&self, mem: &GuestMemoryMmap, head: u16) {
        let mut st = self.st.lock().unwrap();
        let slot = self.avail_addr() + 4 + 2 * u64::from(st.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        st.avail_idx = st.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(st.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Set the available index directly (hostile drivers).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Post a chain with the given `(addr, len, flags)` descriptors (NEXT added in between).
    pub fn add_descs(&self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        let head = self.alloc_descs(n);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let last = i + 1 == n;
            let f = if last { flags } else { flags | F_NEXT };
            self.write_desc(mem, head + i, addr, len, f, head + i + 1);
        }
        self.push_avail(mem, head);
        head
    }

    /// Post a device-readable chain carrying `parts`.
    pub fn add_readable(&self, mem: &GuestMemoryMmap, parts: &[&[u8]]) -> u16 {
        let descs: Vec<_> = parts
            .iter()
            .map(|p| {
                let a = self.alloc(p.len() as u64);
                mem.write_slice(p, a).unwrap();
                (a.0, p.len() as u32, 0)
            })
            .collect();
        self.add_descs(mem, &descs)
    }

    /// Post a device-writable chain of buffers with the given lengths.
    pub fn add_writable(&self, mem: &GuestMemoryMmap, lens: &[u32]) -> u16 {
        let descs: Vec<_> = lens
            .iter()
            .map(|&l| {
                let a = self.alloc(u64::from(l));
                mem.write_slice(&vec![0u8; l as usize], a).unwrap();
                (a.0, l, F_WRITE)
            })
            .collect();
        self.add_descs(mem, &descs)
    }

    /// The first `len` bytes of the buffers of the chain at `head`.
    pub fn buffer(&self, mem: &GuestMemoryMmap, head: u16, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut idx = head;
        while out.len() < len {
            let a = self.desc_addr() + 16 * u64::from(idx);
            let addr: u64 = mem.read_obj(GuestAddress(a)).unwrap();
            let dlen: u32 = mem.read_obj(GuestAddress(a + 8)).unwrap();
            let flags: u16 = mem.read_obj(GuestAddress(a + 12)).unwrap();
            let next: u16 = mem.read_obj(GuestAddress(a + 14)).unwrap();
            let take = (dlen as usize).min(len - out.len());
            let mut b = vec![0u8; take];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            if flags & F_NEXT == 0 {
                break;
            }
            idx = next;
        }
        out
    }

    /// A device-side queue for this layout.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(self.desc_addr()))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_addr()))
            .unwrap();
        q.set_ready(true);
        q
    }
}

/// Guest memory, queues, kicks and an interrupt counter.
pub struct TestEnv {
    /// Guest RAM (`MEM_SIZE` at address 0).
    pub mem: GuestMemoryMmap,
    /// Interrupt counter.
    pub irq: Arc<TestIrq>,
    queues: Vec<TestQueue>,
    kicks: Vec<EventFd>,
}

impl TestEnv {
    /// An environment with `n` queues.
    pub fn new(n: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let queues = (0..u64::from(n))
            .map(|i| TestQueue {
                base: 0x10000 * (i + 1),
                data: Mutex::new(0x100000 + i * 0x400000),
                st: Mutex::new(QState {
                    next_desc: 0,
                    avail_idx: 0,
                }),
            })
            .collect();
        let kicks = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        Self {
            mem,
            irq: Arc::new(TestIrq::default()),
            queues,
            kicks,
        }
    }

    /// Driver side of queue `i`.
    pub fn q(&self, i: u16) -> &TestQueue {
        &self.queues[usize::from(i)]
    }

    /// Queues as the transport would hand them to `activate`.
    pub fn activated_queues(&self) -> Vec<ActivatedQueue> {
        self.queues
            .iter()
            .zip(&self.kicks)
            .enumerate()
            .map(|(i, (q, k))| ActivatedQueue {
                index: i as u16,
                queue: q.queue(),
                kick: k.try_clone().unwrap(),
            })
            .collect()
    }

    /// Notify queue `i`.
    pub fn kick(&self, i: u16) {
        self.kicks[usize::from(i)].write(1).unwrap();
    }

    /// The used ring's index of queue `i`.
    pub fn used_idx(&self, i: u16) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.q(i).used_addr() + 2))
            .unwrap()
    }

    /// Used element `n` of queue `i`: (id, len).
    pub fn used_elem(&self, i: u16, n: u16) -> (u32, u32) {
        let a = self.q(i).used_addr() + 4 + 8 * u64::from(n % QSIZE);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// Wait (up to 5 s) until queue `i` has at least `n` used entries.
    pub fn wait_used(&self, i: u16, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx(i) < n {
            assert!(
                Instant::now() < deadline,
                "queue {i}: {} used entries, expected {n}",
                self.used_idx(i)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A pipe: (read end, write end), the read end non-blocking.
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// Write all of `data` to `fd`.
pub fn write_fd(fd: &std::os::fd::OwnedFd, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}
