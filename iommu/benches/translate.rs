//! Translation cost per lookup through the virtio-iommu for domains of 1, 1 000 and 100 000
//! mappings: the raw ordered-map lookup (`Domain::translate_each`) and the whole path a device
//! behind the IOMMU takes (`EndpointAccess::translate`: lock, endpoint → domain, lookup, segment
//! out). Lookups hit random mappings so the tree is not walked in cache-friendly order; a 4 KiB
//! buffer crossing into the next mapping is measured too. Prints figures, asserts nothing about
//! time.
//!
//! Run: `cargo bench -p iommu --bench translate`

use std::hint::black_box;
use std::time::{Duration, Instant};

use devices::virtio::{AccessPlatform, DmaAccess};
use iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use iommu::{Access, Domain, IommuConfig, Request, VirtioIommu};
use vm_memory::GuestAddress;

const ENDPOINT: u32 = 0x10;
const PAGE: u64 = 4096;
/// IOVA stride between mappings: one mapped page, one hole page.
const STRIDE: u64 = 2 * PAGE;
const LOOKUPS: usize = 1 << 20;

/// A tiny xorshift generator: reproducible "random" mapping indices without a crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn iovas(mappings: u64, seed: u64) -> Vec<u64> {
    let mut rng = XorShift(seed);
    (0..LOOKUPS)
        .map(|_| (rng.next() % mappings) * STRIDE + (rng.next() % (PAGE - 64)))
        .collect()
}

fn per_lookup(elapsed: Duration) -> f64 {
    elapsed.as_nanos() as f64 / LOOKUPS as f64
}

fn main() {
    println!("virtio-iommu translation cost per lookup ({LOOKUPS} lookups at random mappings)");
    println!(
        "{:>10} {:>16} {:>16} {:>20}",
        "mappings", "domain ns/lookup", "device ns/lookup", "split buffer ns"
    );
    for mappings in [1u64, 1_000, 100_000] {
        // Raw domain lookups.
        let mut domain = Domain::new();
        for i in 0..mappings {
            domain
                .map(
                    i * STRIDE,
                    i * STRIDE + PAGE - 1,
                    0x1000_0000 + i * PAGE,
                    VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
                )
                .expect("map");
        }
        let addrs = iovas(mappings, 0x9e37_79b9_7f4a_7c15);
        let t = Instant::now();
        let mut sum = 0u64;
        for &a in &addrs {
            domain
                .translate_each(a, 64, Access::Read, |p, _| sum = sum.wrapping_add(p))
                .expect("mapped");
        }
        let domain_ns = per_lookup(t.elapsed());
        black_box(sum);

        // The device path: the same mappings made through requests, an endpoint attached.
        let dev =
            VirtioIommu::new("iommu0".into(), IommuConfig::default(), &[ENDPOINT]).expect("device");
        let translator = dev.translator();
        let attach = translator.handle(Request::Attach {
            domain: 1,
            endpoint: ENDPOINT,
            bypass: false,
        });
        assert_eq!(attach.status, iommu::IommuStatus::Ok);
        for i in 0..mappings {
            let r = translator.handle(Request::Map {
                domain: 1,
                virt_start: i * STRIDE,
                virt_end: i * STRIDE + PAGE - 1,
                phys_start: 0x1000_0000 + i * PAGE,
                flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            });
            assert_eq!(r.status, iommu::IommuStatus::Ok);
        }
        let access = dev.endpoint_access(ENDPOINT);
        let mut out: Vec<(GuestAddress, u64)> = Vec::with_capacity(4);
        let t = Instant::now();
        for &a in &addrs {
            out.clear();
            access
                .translate(a, 64, DmaAccess::Write, &mut out)
                .expect("mapped");
            black_box(&out);
        }
        let device_ns = per_lookup(t.elapsed());

        // A buffer spanning two adjacent mappings (needs `mappings` >= 2 contiguous IOVAs):
        // remap pairs as back-to-back pages in a second domain view.
        let mut pair = Domain::new();
        for i in 0..mappings.max(2) {
            pair.map(
                i * PAGE,
                i * PAGE + PAGE - 1,
                0x1000_0000 + 2 * i * PAGE,
                VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            )
            .expect("map");
        }
        let span = mappings.max(2) - 1;
        let mut rng = XorShift(7);
        let starts: Vec<u64> = (0..LOOKUPS)
            .map(|_| (rng.next() % span) * PAGE + PAGE - 512)
            .collect();
        let t = Instant::now();
        let mut segs = 0u64;
        for &a in &starts {
            pair.translate_each(a, 1024, Access::Read, |_, _| segs += 1)
                .expect("mapped");
        }
        let split_ns = per_lookup(t.elapsed());
        assert_eq!(
            segs,
            2 * LOOKUPS as u64,
            "every buffer crossed two mappings"
        );
        println!("{mappings:>10} {domain_ns:>16.1} {device_ns:>16.1} {split_ns:>20.1}");
    }
}
