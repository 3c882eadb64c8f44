//! Test helpers: temporary images, guest memory, a driver-side queue built on virtio-queue's
//! `MockSplitQueue`, and an interrupt that counts.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{Block, BlockConfig};
use crate::virtio::{VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

pub const MEM_SIZE: u64 = 0x100_0000;
pub const DATA_START: u64 = 0x10_0000;
pub const W: u16 = VRING_DESC_F_WRITE as u16;
pub const N: u16 = VRING_DESC_F_NEXT as u16;

/// A file under the temp dir, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(name: &str, contents: &[u8]) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "skiff-blk-test-{}-{n}-{name}.img",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        Self { path }
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// 64 KiB image whose sector `s` is filled with byte `s as u8 + 1`.
pub fn patterned(name: &str) -> TempImage {
    let mut v = vec![0u8; 64 * 1024];
    for (s, chunk) in v.chunks_mut(512).enumerate() {
        chunk.fill(s as u8 + 1);
    }
    TempImage::new(name, &v)
}

pub fn config(path: &Path, readonly: bool) -> BlockConfig {
    BlockConfig {
        id: "blk0".into(),
        path: path.to_path_buf(),
        readonly,
        serial: Some("skiff-serial-1".into()),
        iommu: false,
    }
}

pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU64,
    pub config: AtomicU64,
}

impl CountingInterrupt {
    pub fn queue_count(&self) -> u64 {
        self.queue.load(Ordering::SeqCst)
    }
    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, int: VirtioInterruptType) -> io::Result<()> {
        match int {
            VirtioInterruptType::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
            VirtioInterruptType::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// Descriptor table, available ring and used ring addresses of the test queue.
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1_0000;
pub const USED_RING: u64 = 0x2_0000;

/// The driver's side of a queue: writes descriptors, publishes heads, reads the used ring.
///
/// The descriptor table is virtio-queue's mock `DescriptorTable`. The rings are laid out here:
/// `MockSplitQueue` (0.18) places its used ring right after the first `size` *bytes* of the
/// available ring, so with more than a few chains in flight the two overlap.
pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub table: DescriptorTable<'a, GuestMemoryMmap>,
    pub size: u16,
    next_desc: u16,
    next_data: u64,
}

/// A request as the driver laid it out.
pub struct Sent {
    pub head: u16,
    pub data: u64,
    pub status: u64,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        assert!(u64::from(size) * 16 <= AVAIL_RING);
        mem.write_slice(&vec![0u8; 0x1_0000], GuestAddress(AVAIL_RING))
            .unwrap();
        mem.write_slice(&vec![0u8; 0x1_0000], GuestAddress(USED_RING))
            .unwrap();
        Self {
            mem,
            table: DescriptorTable::new(mem, GuestAddress(DESC_TABLE), size),
            size,
            next_desc: 0,
            next_data: DATA_START,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Reserve `len` bytes of guest memory (filled with 0xee).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_data;
        self.next_data = (a + len + 15) & !15;
        assert!(self.next_data <= MEM_SIZE);
        self.mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(a))
            .unwrap();
        a
    }

    /// Store raw descriptors at consecutive indices (flags/next exactly as given); returns the
    /// first index.
    pub fn store_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let first = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (first + i as u16) % self.size;
            self.table
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        self.next_desc = (first + descs.len() as u16) % self.size;
        first
    }

    /// Store a chain (NEXT links added) and publish it.
    pub fn push(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.next_desc;
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                if i + 1 < descs.len() {
                    (a, l, f | N, (first + i as u16 + 1) % self.size)
                } else {
                    (a, l, f & !N, 0)
                }
            })
            .collect();
        let head = self.store_raw(&raw);
        self.publish(head);
        head
    }

    /// Put `head` on the available ring.
    pub fn publish(&mut self, head: u16) {
        let idx = self.avail_idx();
        let slot = AVAIL_RING + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap()
    }

    pub fn set_avail_idx(&self, v: u16) {
        self.mem.write_obj(v, GuestAddress(AVAIL_RING + 2)).unwrap();
    }

    /// Set `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let a = AVAIL_RING + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(a)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Used ring entry `i` as (id, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let a = USED_RING + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(a)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(a + 4)).unwrap();
        (id, len)
    }

    pub fn header(&mut self, req_type: u32, sector: u64) -> u64 {
        let h = self.alloc(16);
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&req_type.to_le_bytes());
        b[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(h)).unwrap();
        h
    }

    /// A well-formed request: header, optional data (device-writable for reads), status.
    pub fn request(&mut self, req_type: u32, sector: u64, data: &[u8], writable: bool) -> Sent {
        let h = self.header(req_type, sector);
        let d = self.alloc(data.len().max(1) as u64);
        self.mem.write_slice(data, GuestAddress(d)).unwrap();
        let s = self.alloc(1);
        let mut descs = vec![(h, 16, 0)];
        if !data.is_empty() {
            descs.push((d, data.len() as u32, if writable { W } else { 0 }));
        }
        descs.push((s, 1, W));
        let head = self.push(&descs);
        Sent {
            head,
            data: d,
            status: s,
        }
    }

    pub fn read(&mut self, sector: u64, len: usize) -> Sent {
        self.request(
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
            sector,
            &vec![0xee; len],
            true,
        )
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> Sent {
        self.request(
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT,
            sector,
            data,
            false,
        )
    }

    pub fn status(&self, s: &Sent) -> u8 {
        self.mem.read_obj(GuestAddress(s.status)).unwrap()
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A device plus a handler over a fresh queue of `size` entries, all features acked.
pub fn setup<'a>(
    img: &TempImage,
    readonly: bool,
    mem: &'a GuestMemoryMmap,
    size: u16,
) -> (
    Block,
    Driver<'a>,
    super::event_handler::QueueHandler,
    Arc<CountingInterrupt>,
) {
    use crate::virtio::VirtioDevice;
    let mut blk = Block::new(config(&img.path, readonly)).unwrap();
    blk.set_acked_features(blk.avail_features());
    let drv = Driver::new(mem, size);
    let irq = Arc::new(CountingInterrupt::default());
    let h = blk
        .queue_handler(mem.clone(), drv.queue(), irq.clone(), None)
        .unwrap();
    (blk, drv, h, irq)
}
