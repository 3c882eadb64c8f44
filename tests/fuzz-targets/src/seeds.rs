//! Well-formed inputs for each target, written to `fuzz/seeds/TARGET/` by the ignored test
//! `write_seeds` (`cargo test -p fuzz-targets -- --ignored write_seeds`): a fuzzer that starts
//! from them reaches past the checksums and magic numbers sooner.

use std::io::Cursor;

use api_server::config::VmConfig;
use api_server::ROUTES;
use devices::GuestMemoryMmap;
use iommu::Request as IommuRequest;
use migration::memory_file::write_memory_file;
use migration::ram::ZeroPages;
use migration::snapshot::write_snapshot;
use migration::stream::{Config, Hello, Message, MigrationSender, PROTOCOL_VERSION};
use pci::vfio::user::protocol::{
    Capabilities, Command, DeviceInfoWire, Header, IrqInfoWire, RegionAccess, RegionInfoWire,
    Version, VERSION_MAJOR, VERSION_MINOR,
};
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::{HEADER, QUEUE_STRIDE};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Guest RAM as a virtio input lays it out, plus the header.
struct VirtioSeed {
    features: u64,
    knob: u8,
    ram: Vec<u8>,
    /// Chains published so far, per queue.
    published: [u16; 2],
}

impl VirtioSeed {
    fn new(knob: u8) -> Self {
        VirtioSeed {
            features: u64::MAX,
            knob,
            ram: vec![0; 0x1000],
            published: [0; 2],
        }
    }

    fn put(&mut self, at: u64, b: &[u8]) {
        let at = at as usize;
        if self.ram.len() < at + b.len() {
            self.ram.resize(at + b.len(), 0);
        }
        self.ram[at..at + b.len()].copy_from_slice(b);
    }

    /// Store `descs` (address, length, WRITE or 0) as one chain at descriptor `first` of queue
    /// `q` and publish it.
    fn chain(&mut self, q: u16, first: u16, descs: &[(u64, u32, u16)]) {
        let base = u64::from(q) * QUEUE_STRIDE;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&(flags | if last { 0 } else { NEXT }).to_le_bytes());
            d.extend_from_slice(&(if last { 0 } else { idx + 1 }).to_le_bytes());
            self.put(base + u64::from(idx) * 16, &d);
        }
        let n = &mut self.published[usize::from(q)];
        let slot = *n;
        *n += 1;
        let avail = base + 0x100;
        let count = *n;
        self.put(avail + 4 + u64::from(slot) * 2, &first.to_le_bytes());
        self.put(avail + 2, &count.to_le_bytes());
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = self.features.to_le_bytes().to_vec();
        v.push(4); // 16-entry queues
        v.push(self.knob);
        debug_assert_eq!(v.len(), HEADER);
        v.extend_from_slice(&self.ram);
        v
    }
}

fn blk_request(kind: u32, sector: u64) -> Vec<u8> {
    let mut v = kind.to_le_bytes().to_vec();
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&sector.to_le_bytes());
    v
}

fn virtio_blk() -> Vec<Vec<u8>> {
    let mut s = VirtioSeed::new(0);
    // read sector 1, write sector 2, flush, get id, discard sectors 4..8
    s.put(0x800, &blk_request(0, 1));
    s.chain(
        0,
        0,
        &[(0x800, 16, 0), (0x1000, 512, WRITE), (0x1400, 1, WRITE)],
    );
    s.put(0x810, &blk_request(1, 2));
    s.chain(
        0,
        3,
        &[(0x810, 16, 0), (0x1000, 512, 0), (0x1401, 1, WRITE)],
    );
    s.put(0x820, &blk_request(4, 0));
    s.chain(0, 5, &[(0x820, 16, 0), (0x1402, 1, WRITE)]);
    s.put(0x830, &blk_request(8, 0));
    s.chain(
        0,
        7,
        &[(0x830, 16, 0), (0x1410, 20, WRITE), (0x1403, 1, WRITE)],
    );
    s.put(0x840, &blk_request(11, 0));
    let mut range = 4u64.to_le_bytes().to_vec();
    range.extend_from_slice(&4u32.to_le_bytes());
    range.extend_from_slice(&0u32.to_le_bytes());
    s.put(0x850, &range);
    s.chain(0, 10, &[(0x840, 16, 0), (0x850, 16, 0), (0x1404, 1, WRITE)]);
    let plain = s.bytes();
    // The same behind the IOMMU: the identity mappings cover these buffers.
    s.knob = 0x80;
    vec![plain, s.bytes()]
}

fn virtio_net() -> Vec<Vec<u8>> {
    let mut s = VirtioSeed::new(8);
    s.chain(0, 0, &[(0x800, 1526, WRITE)]);
    s.chain(0, 1, &[(0x1000, 12, WRITE), (0x1100, 1514, WRITE)]);
    s.put(0xe00, &[0x11; 72]);
    s.chain(1, 0, &[(0xe00, 12, 0), (0xe0c, 60, 0)]);
    let plain = s.bytes();
    s.knob |= 0x80;
    vec![plain, s.bytes()]
}

fn virtio_console() -> Vec<Vec<u8>> {
    let mut s = VirtioSeed::new(5);
    s.chain(0, 0, &[(0x800, 64, WRITE)]);
    s.put(0xe00, b"hello");
    s.chain(1, 0, &[(0xe00, 5, 0)]);
    let plain = s.bytes();
    s.knob |= 0x80;
    vec![plain, s.bytes()]
}

fn virtio_rng() -> Vec<Vec<u8>> {
    let mut s = VirtioSeed::new(0);
    s.chain(0, 0, &[(0x800, 64, WRITE)]);
    s.chain(0, 1, &[(0x900, 16, WRITE), (0x9000, 32, WRITE)]);
    let plain = s.bytes();
    s.knob |= 0x80;
    vec![plain, s.bytes()]
}

fn virtio_iommu() -> Vec<Vec<u8>> {
    let mut s = VirtioSeed::new(0);
    let reqs = [
        IommuRequest::Attach {
            domain: 1,
            endpoint: 8,
            bypass: false,
        },
        IommuRequest::Map {
            domain: 1,
            virt_start: 0x10000,
            virt_end: 0x10fff,
            phys_start: 0x1000,
            flags: 3,
        },
        IommuRequest::Probe { endpoint: 8 },
        IommuRequest::Unmap {
            domain: 1,
            virt_start: 0x10000,
            virt_end: 0x10fff,
        },
        IommuRequest::Detach {
            domain: 1,
            endpoint: 8,
        },
    ];
    for (i, r) in reqs.iter().enumerate() {
        let at = 0x800 + i as u64 * 0x100;
        let b = r.encode();
        s.put(at, &b);
        let tail = if matches!(r, IommuRequest::Probe { .. }) {
            0x200 + 4
        } else {
            4
        };
        let out = 0x1000 + i as u64 * 0x300;
        s.chain(
            0,
            i as u16 * 2,
            &[(at, b.len() as u32, 0), (out, tail, WRITE)],
        );
    }
    vec![s.bytes()]
}

fn api_request() -> Vec<Vec<u8>> {
    let vm = serde_json::to_vec(&VmConfig::default()).expect("json");
    ROUTES
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = vec![i as u8];
            let body: &[u8] = if r.path.ends_with("vm.create") {
                &vm
            } else {
                b"{}"
            };
            v.extend_from_slice(body);
            v
        })
        .collect()
}

fn vm_config() -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut cfg = [0u8].to_vec();
    cfg.extend_from_slice(&serde_json::to_vec(&VmConfig::default()).expect("json"));
    out.push(cfg);
    let options: [(u8, &str); 11] = [
        (1, "boot=2"),
        (2, "size=512M"),
        (3, "file=/tmp/serial.log"),
        (
            4,
            "path=/tmp/disk.img,readonly=on,iommu=on,serial=abc,id=disk0",
        ),
        (5, "tap=tap0,mac=52:54:00:12:34:56,iommu=off"),
        (6, "pty,iommu=on"),
        (7, "iommu=on"),
        (
            8,
            "socket=/tmp/vfio-user.sock,id=dev0,pci_address=0000:00:05.0",
        ),
        (9, "path=/sys/bus/pci/devices/0000:01:00.0,managed=on"),
        (10, "2G"),
        (11, "source_url=file:///tmp/snap,resume=on"),
    ];
    for (pick, s) in options {
        let mut v = vec![pick];
        v.extend_from_slice(s.as_bytes());
        out.push(v);
    }
    out
}

fn sections() -> Vec<migration::StateSection> {
    crate::virtio::fresh_devices()
        .iter_mut()
        .filter_map(|d| d.snapshot().ok())
        .collect()
}

fn snapshot_state() -> Vec<Vec<u8>> {
    vec![write_snapshot(Vec::new(), &sections()).expect("snapshot")]
}

fn memory(layout: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = layout.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("memory");
    mem.write_slice(&[0x42; 100], GuestAddress(0x1000))
        .expect("write");
    mem.write_slice(&[0x17; 10], GuestAddress(layout[1].0 + 0x20))
        .expect("write");
    mem
}

fn memory_file() -> Vec<Vec<u8>> {
    let mem = memory(&crate::migration_files::MEMORY_LAYOUT);
    let mut file = Cursor::new(Vec::new());
    write_memory_file(&mem, &mut file).expect("memory file");
    let file = file.into_inner();
    [0u8, 1]
        .iter()
        .map(|&f| {
            let mut v = vec![f];
            v.extend_from_slice(&file);
            v
        })
        .collect()
}

fn migration_stream() -> Vec<Vec<u8>> {
    let layout = crate::migration_stream::RAM_LAYOUT;
    let mem = memory(&layout);
    let mut tx = MigrationSender::new(Vec::new()).expect("sender");
    tx.send(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: "skiff fuzz".into(),
        features: vec![],
        connection: 0,
        connections: 1,
    }))
    .expect("hello");
    tx.send(&Message::Config(Config {
        vm_config: b"{}".to_vec(),
        host: vec![("vendor".into(), "fuzz".into())],
        ram: layout.iter().map(|&(a, l)| (a, l as u64)).collect(),
        devices: vec![],
    }))
    .expect("config");
    let ranges: Vec<(u64, u64)> = layout.iter().map(|&(a, l)| (a, l as u64)).collect();
    tx.send_ram(&mem, ranges.clone(), ZeroPages::Skip)
        .expect("ram");
    tx.end_iteration().expect("end");
    tx.send_ram(&mem, ranges[..1].to_vec(), ZeroPages::Send)
        .expect("ram");
    tx.end_iteration().expect("end");
    tx.send(&Message::State(sections())).expect("state");
    let (out, _) = tx.complete().expect("complete");
    vec![out]
}

fn message(id: u16, command: Command, payload: &[u8], reply: bool) -> Vec<u8> {
    let mut h = Header::command(id, command, payload.len()).expect("header");
    if reply {
        h = h.reply(payload.len(), None).expect("reply header");
    }
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn version() -> Vec<u8> {
    Version {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
        caps: Capabilities::default(),
    }
    .encode()
}

fn vfio_user_client() -> Vec<Vec<u8>> {
    let mut v = message(0, Command::Version, &version(), true);
    let info: Vec<u8> = [16u32, 3, 9, 5]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    v.extend(message(1, Command::DeviceGetInfo, &info, true));
    let mut dma = 0x1000u64.to_le_bytes().to_vec();
    dma.extend_from_slice(&16u64.to_le_bytes());
    v.extend(message(9, Command::DmaRead, &dma, false));
    let mut w = 0x1010u64.to_le_bytes().to_vec();
    w.extend_from_slice(&4u64.to_le_bytes());
    w.extend_from_slice(b"abcd");
    v.extend(message(10, Command::DmaWrite, &w, false));
    let ra = RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
        data: vec![1, 2, 3, 4],
    };
    v.extend(message(4, Command::RegionRead, &ra.encode(), true));
    vec![v]
}

fn testdev_request() -> Vec<Vec<u8>> {
    let mut v = message(0, Command::Version, &version(), false);
    v.extend(message(
        1,
        Command::DeviceGetInfo,
        &DeviceInfoWire::request(),
        false,
    ));
    v.extend(message(
        2,
        Command::DeviceGetRegionInfo,
        &RegionInfoWire::request(0, 32),
        false,
    ));
    v.extend(message(
        3,
        Command::DeviceGetIrqInfo,
        &IrqInfoWire::request(4),
        false,
    ));
    let read = RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
        data: vec![],
    };
    v.extend(message(4, Command::RegionRead, &read.encode(), false));
    let write = RegionAccess {
        offset: 0x10,
        region: 0,
        count: 4,
        data: vec![1, 0, 0, 0],
    };
    v.extend(message(5, Command::RegionWrite, &write.encode(), false));
    vec![v]
}

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("virtio_blk", virtio_blk()),
        ("virtio_net", virtio_net()),
        ("virtio_console", virtio_console()),
        ("virtio_rng", virtio_rng()),
        ("virtio_iommu", virtio_iommu()),
        ("api_request", api_request()),
        ("vm_config", vm_config()),
        ("snapshot_state", snapshot_state()),
        ("memory_file", memory_file()),
        ("migration_stream", migration_stream()),
        ("vfio_user_client", vfio_user_client()),
        ("testdev_request", testdev_request()),
    ]
}
