//! The virtio devices' request paths, driven through guest memory the fuzzer writes.
//!
//! Input layout: bytes 0..8 are the features the driver acks (masked by what the device offers;
//! VERSION_1 always), byte 8 picks the queue size (`1 << (b % 5)`, 1 to 16), byte 9 is a
//! per-device knob (received frames, console input; bit 7: the device sits behind a virtio-iommu
//! and its buffer addresses are IOVAs, see [`IOMMU_MAPS`]), and the rest is guest RAM from
//! address 0.
//! RAM is two regions with a hole between them, so buffers can straddle a gap. Queue `i` has its
//! descriptor table at `i * 0x400`, its available ring 0x100 further and its used ring 0x200
//! further; buffers may point anywhere, rings included. Each device serves its queues once on
//! the calling thread with the worker's code ([`devices`]' `serve_once`, the block device's
//! [`QueueHandler`](devices::virtio::block::QueueHandler)).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::console::Console;
use devices::virtio::features::VIRTIO_F_VERSION_1;
use devices::virtio::net::{Net, NetBackend};
use devices::virtio::rng::{Rng, RngConfig};
use devices::virtio::AccessPlatform;
use devices::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use devices::GuestMemoryMmap;
use iommu::{IommuConfig, Request as IommuRequest, VirtioIommu};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes before guest RAM in an input.
pub const HEADER: usize = 10;
/// Guest RAM regions: (start, size).
pub const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0x9000, 0x7000)];
/// Distance between two queues' rings.
pub const QUEUE_STRIDE: u64 = 0x400;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _int: VirtioInterruptType) -> io::Result<()> {
        Ok(())
    }
}

/// One decoded input.
struct Setup {
    features: u64,
    queue_size: u16,
    knob: u8,
    mem: GuestMemoryMmap,
}

fn setup(data: &[u8]) -> Option<Setup> {
    let (head, ram) = (data.get(..HEADER)?, &data[HEADER..]);
    let features = u64::from_le_bytes(head[..8].try_into().ok()?);
    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).ok()?;
    for &(start, len) in &REGIONS {
        let from = start as usize;
        if let Some(part) = ram.get(from..) {
            mem.write_slice(&part[..part.len().min(len)], GuestAddress(start))
                .ok()?;
        }
    }
    Some(Setup {
        features,
        queue_size: 1 << (head[8] % 5),
        knob: head[9],
        mem,
    })
}

impl Setup {
    /// Queue `index` of a device whose largest queue is `max`, as the driver set it up.
    fn queue(&self, index: u16, max: u16) -> Queue {
        let base = u64::from(index) * QUEUE_STRIDE;
        let mut q = Queue::new(max).expect("a valid maximum queue size");
        q.set_size(self.queue_size.min(max));
        let _ = q.try_set_desc_table_address(GuestAddress(base));
        let _ = q.try_set_avail_ring_address(GuestAddress(base + 0x100));
        let _ = q.try_set_used_ring_address(GuestAddress(base + 0x200));
        q.set_ready(true);
        q
    }

    /// The device's queues, activated (each with its ioeventfd).
    fn queues(&self, dev: &dyn VirtioDevice) -> Vec<ActivatedQueue> {
        dev.queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(i, &max)| ActivatedQueue {
                index: i as u16,
                queue: self.queue(i as u16, max),
                kick: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
            })
            .collect()
    }

    fn ack(&self, dev: &mut dyn VirtioDevice) {
        let f = (self.features | VIRTIO_F_VERSION_1) & dev.avail_features();
        dev.set_acked_features(f);
    }
}

/// With knob bit 7, the IOMMU mappings buffers are translated through: (first IOVA, last IOVA,
/// guest-physical address, `VIRTIO_IOMMU_MAP_F_*`). RAM is split over several mappings, one
/// reaches past the end of RAM and one is read-only.
pub const IOMMU_MAPS: [(u64, u64, u64, u32); 4] = [
    (0x0, 0x3fff, 0x0, 3),
    (0x4000, 0x7fff, 0x4000, 3),
    (0x8000, 0xffff, 0x9000, 3),
    (0x10000, 0x10fff, 0x2000, 1),
];

impl Setup {
    fn behind_iommu(&self) -> bool {
        self.knob & 0x80 != 0
    }

    /// The endpoint view a device behind the IOMMU translates through (knob bit 7).
    fn access(&self) -> Option<Arc<dyn AccessPlatform>> {
        if !self.behind_iommu() {
            return None;
        }
        let iommu =
            VirtioIommu::new("iommu0".into(), IommuConfig::default(), &[8]).expect("an eventfd");
        let t = iommu.translator();
        t.handle(IommuRequest::Attach {
            domain: 1,
            endpoint: 8,
            bypass: false,
        });
        for (virt_start, virt_end, phys_start, flags) in IOMMU_MAPS {
            t.handle(IommuRequest::Map {
                domain: 1,
                virt_start,
                virt_end,
                phys_start,
                flags,
            });
        }
        Some(Arc::new(iommu.endpoint_access(8)))
    }
}

fn irq() -> Arc<dyn VirtioInterrupt> {
    Arc::new(NoInterrupt)
}

/// A 64 KiB disk image, one per process: an unlinked temp file reached through
/// `/proc/self/fd`, so nothing is left behind.
fn disk_image() -> PathBuf {
    static IMAGE: OnceLock<(std::fs::File, PathBuf)> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let p = std::env::temp_dir().join(format!("skiff-fuzz-blk-{}.img", std::process::id()));
            std::fs::write(&p, vec![0x5a; 64 << 10]).expect("writing the fuzz disk image");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .expect("opening the fuzz disk image");
            let _ = std::fs::remove_file(&p);
            let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            (f, path)
        })
        .1
        .clone()
}

/// virtio-blk: the request queue, requests parsed and executed against a 64 KiB image (knob bit
/// 0: read-only; bit 7: behind the IOMMU).
pub fn blk(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let cfg = BlockConfig {
        id: "blk0".into(),
        path: disk_image(),
        readonly: s.knob & 1 != 0,
        serial: Some("fuzz".into()),
        iommu: s.behind_iommu(),
    };
    let mut dev = Block::new(cfg).expect("opening the fuzz disk image");
    s.ack(&mut dev);
    let mut queues = s.queues(&dev);
    let q = queues.remove(0).queue;
    // What `Block::activate` checks before it starts the worker.
    if !q.is_valid(&s.mem) {
        return;
    }
    let mut handler = dev
        .queue_handler(s.mem.clone(), q, irq(), s.access())
        .expect("an eventfd");
    handler.process_queue();
}

/// A datagram socket as the net backend (frame boundaries kept, like a TAP).
struct DgramBackend(UnixDatagram);

impl AsRawFd for DgramBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for DgramBackend {}

/// virtio-net: the TX queue (frames from the guest), then the RX queue filled with frames from
/// the network (the knob sets their lengths; bit 7: behind the IOMMU).
pub fn net(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let (ours, theirs) = UnixDatagram::pair().expect("a socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    theirs.set_nonblocking(true).expect("non-blocking");
    let k = usize::from(s.knob);
    for len in [k * 8, k * 16 + 14, 60] {
        let _ = theirs.send(&vec![0xab; len]);
    }
    let backend = Box::new(DgramBackend(ours));
    let mut dev = Net::with_backend("net0", None, s.behind_iommu(), backend);
    s.ack(&mut dev);
    let queues = s.queues(&dev);
    let _ = dev.serve_once(s.mem.clone(), irq(), queues, s.access());
}

/// virtio-console: the transmit queue (output to a sink) and the receive queue, with `knob & 0x7f`
/// bytes of input waiting (bit 7: behind the IOMMU).
pub fn console(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        panic!("pipe2: {}", io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both descriptors; each is owned once, here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut input = std::fs::File::from(wr);
    let _ = input.write_all(&vec![b'k'; usize::from(s.knob & 0x7f)]);
    drop(input);
    let mut dev = Console::with_io("con0", s.behind_iommu(), Box::new(io::sink()), Some(rd));
    s.ack(&mut dev);
    let queues = s.queues(&dev);
    let _ = dev.serve_once(s.mem.clone(), irq(), queues, s.access());
}

/// virtio-rng: the request queue (knob bit 7: behind the IOMMU).
pub fn rng(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let mut dev = Rng::new(RngConfig {
        id: "rng0".into(),
        iommu: s.behind_iommu(),
    });
    s.ack(&mut dev);
    let queues = s.queues(&dev);
    let _ = dev.serve_once(s.mem.clone(), irq(), queues, s.access());
}

/// virtio-iommu: the request queue (attach, detach, map, unmap, probe) for endpoints 8 and 16;
/// knob bit 0 is written to the `bypass` config byte first.
pub fn iommu(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let mut dev =
        VirtioIommu::new("iommu0".into(), IommuConfig::default(), &[8, 16]).expect("an eventfd");
    s.ack(&mut dev);
    dev.write_config(IommuConfig::BYPASS_OFFSET as u64, &[s.knob & 1]);
    let queues = s.queues(&dev);
    let _ = dev.serve_once(s.mem.clone(), irq(), queues, None);
}

/// One fresh device of each virtio kind (and the IOMMU), for the snapshot target's state
/// sections.
pub(crate) fn fresh_devices() -> Vec<Box<dyn migration::Snapshottable>> {
    let (ours, _theirs) = UnixDatagram::pair().expect("a socket pair");
    let blk = BlockConfig {
        id: "blk0".into(),
        path: disk_image(),
        readonly: false,
        serial: None,
        iommu: false,
    };
    vec![
        Box::new(Block::new(blk).expect("opening the fuzz disk image")),
        Box::new(Net::with_backend(
            "net0",
            None,
            false,
            Box::new(DgramBackend(ours)),
        )),
        Box::new(Console::with_io("con0", false, Box::new(io::sink()), None)),
        Box::new(Rng::new(RngConfig {
            id: "rng0".into(),
            iommu: false,
        })),
        Box::new(
            VirtioIommu::new("iommu0".into(), IommuConfig::default(), &[8, 16])
                .expect("an eventfd"),
        ),
    ]
}
