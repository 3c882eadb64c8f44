//! Device-side cost of the virtio-blk request path, with no guest: a driver-side queue in test
//! guest memory holds batches of 4 KiB and 64 KiB reads and writes against an image file (in
//! /dev/shm when available, so the figures are the device's overhead rather than the disk's), and
//! the block device's queue handler serves them directly (no worker thread, no eventfd).
//!
//! The 4 KiB cases run a second time with the device behind the virtio-iommu (every buffer
//! address translated through a real `iommu::EndpointAccess`, 4 KiB mappings, plus 100 000
//! unrelated mappings in the same domain), and the ratio to the untranslated run is printed.
//!
//! Run with `cargo bench -p devices --bench block`. Prints figures only.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockConfig, QueueHandler};
use devices::virtio::{AccessPlatform, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use devices::GuestMemoryMmap;
use iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use iommu::{IommuConfig, IommuStatus, Request, VirtioIommu};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
/// Requests made available per pass (three descriptors each).
const BATCH: u16 = 64;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const HEADERS: u64 = 0x3_0000;
const STATUS: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const IMAGE_SIZE: u64 = 256 << 20;
const RUN_FOR: Duration = Duration::from_millis(1500);
/// Device addresses of the IOMMU cases: guest-physical address + this.
const IOVA_OFFSET: u64 = 0x100_0000_0000;
/// Mappings elsewhere in the domain, so lookups walk a realistic tree.
const FILLER_MAPPINGS: u64 = 100_000;
const PAGE: u64 = 4096;
const ENDPOINT: u32 = 0x10;

/// The device's DMA view through a virtio-iommu whose domain maps all of `mem_size` page by page
/// at `IOVA_OFFSET`, plus the filler mappings.
fn iommu_view(mem_size: u64) -> Arc<dyn AccessPlatform> {
    let dev = VirtioIommu::new("iommu0".into(), IommuConfig::default(), &[ENDPOINT]).unwrap();
    let t = dev.translator();
    let ok = |r: Request| assert_eq!(t.handle(r).status, IommuStatus::Ok);
    ok(Request::Attach {
        domain: 1,
        endpoint: ENDPOINT,
        bypass: false,
    });
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    let map = |iova: u64, phys: u64| Request::Map {
        domain: 1,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        phys_start: phys,
        flags: rw,
    };
    for page in 0..mem_size.div_ceil(PAGE) {
        ok(map(IOVA_OFFSET + page * PAGE, page * PAGE));
    }
    for i in 0..FILLER_MAPPINGS {
        ok(map(0x1_0000_0000 + 2 * i * PAGE, i * PAGE % mem_size));
    }
    Arc::new(dev.endpoint_access(ENDPOINT))
}

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _int: VirtioInterruptType) -> io::Result<()> {
        Ok(())
    }
}

struct Bench {
    mem: GuestMemoryMmap,
    handler: QueueHandler,
    avail_idx: u16,
    next_sector: u64,
}

impl Bench {
    /// With `iommu`, descriptors carry device addresses translated through a virtio-iommu.
    fn new(blk: &Block, req_type: u32, len: u32, iommu: bool) -> Self {
        let mem_size = DATA + u64::from(BATCH) * u64::from(len);
        let (access, off) = if iommu {
            (Some(iommu_view(mem_size)), IOVA_OFFSET)
        } else {
            (None, 0)
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        // virtio-queue's mock descriptor table; the rings are placed by hand (MockSplitQueue 0.18
        // overlaps its used ring with a large available ring).
        let table = DescriptorTable::new(&mem, GuestAddress(DESC_TABLE), QUEUE_SIZE);
        let data_flags = if req_type == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let next = VRING_DESC_F_NEXT as u16;
        for i in 0..BATCH {
            let d = 3 * i;
            let hdr = HEADERS + 16 * u64::from(i);
            mem.write_obj(req_type.to_le(), GuestAddress(hdr)).unwrap();
            let descs = [
                Descriptor::new(off + hdr, 16, next, d + 1),
                Descriptor::new(
                    off + DATA + u64::from(i) * u64::from(len),
                    len,
                    data_flags | next,
                    d + 2,
                ),
                Descriptor::new(off + STATUS + u64::from(i), 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (k, desc) in descs.into_iter().enumerate() {
                table
                    .store(d + k as u16, RawDescriptor::from(desc))
                    .unwrap();
            }
        }
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        q.set_ready(true);
        let handler = blk
            .queue_handler(mem.clone(), q, Arc::new(NoInterrupt), access)
            .unwrap();
        Self {
            mem,
            handler,
            avail_idx: 0,
            next_sector: 0,
        }
    }

    /// Make one batch available (advancing the sectors through the image) and serve it.
    fn pass(&mut self, len: u32) -> usize {
        let sectors = u64::from(len / 512);
        for i in 0..BATCH {
            if (self.next_sector + sectors) * 512 > IMAGE_SIZE {
                self.next_sector = 0;
            }
            let hdr = HEADERS + 16 * u64::from(i);
            self.mem
                .write_obj(self.next_sector.to_le(), GuestAddress(hdr + 8))
                .unwrap();
            self.next_sector += sectors;
            let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj((3 * i).to_le(), GuestAddress(slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .unwrap();
        let n = self.handler.process_queue();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        if n != usize::from(BATCH) || status != 0 {
            eprintln!("unexpected: served {n} of {BATCH}, first status {status}");
            std::process::exit(1);
        }
        n
    }
}

fn main() {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("skiff-blk-bench-{}.img", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(IMAGE_SIZE).unwrap();
    drop(file);
    // Fill the image once so that reads hit allocated pages.
    std::fs::write(&path, vec![0x5a; IMAGE_SIZE as usize]).unwrap();

    let mut blk = Block::new(BlockConfig {
        id: "bench0".into(),
        path: path.clone(),
        readonly: false,
        serial: None,
        iommu: false,
    })
    .unwrap();
    blk.set_acked_features(blk.avail_features());

    println!(
        "virtio-blk device path, image in {}, batches of {BATCH} requests, ~{:.1} s per case",
        dir.display(),
        RUN_FOR.as_secs_f64()
    );
    let mut plain_4k = Vec::new();
    for (name, req_type, len, iommu) in [
        ("read   4 KiB", VIRTIO_BLK_T_IN, 4096u32, false),
        ("write  4 KiB", VIRTIO_BLK_T_OUT, 4096, false),
        ("read  64 KiB", VIRTIO_BLK_T_IN, 65536, false),
        ("write 64 KiB", VIRTIO_BLK_T_OUT, 65536, false),
        ("read   4 KiB via IOMMU", VIRTIO_BLK_T_IN, 4096, true),
        ("write  4 KiB via IOMMU", VIRTIO_BLK_T_OUT, 4096, true),
    ] {
        let mut b = Bench::new(&blk, req_type, len, iommu);
        for _ in 0..4 {
            b.pass(len); // warm up
        }
        let start = Instant::now();
        let mut requests = 0u64;
        while start.elapsed() < RUN_FOR {
            requests += b.pass(len) as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        let rps = requests as f64 / secs;
        let mibps = rps * f64::from(len) / f64::from(1u32 << 20);
        print!("{name}: {rps:>10.0} requests/s  {mibps:>8.1} MiB/s  ({requests} requests)");
        if len == 4096 && !iommu {
            plain_4k.push(rps);
        }
        if iommu {
            let base = plain_4k[usize::from(req_type == VIRTIO_BLK_T_OUT)];
            print!("  = {:.2} x untranslated", rps / base);
        }
        println!();
    }
    let _ = std::fs::remove_file(&path);
}
