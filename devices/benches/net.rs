//! Device-side cost of the virtio-net TX path, with no guest: a driver-side TX queue in test guest
//! memory holds batches of frames (64 B, 1500 B, and 64 KiB TCP/IPv4 with TSO), the device's worker
//! thread serves them after one kick per batch and writes each frame (header + data, one
//! `writev`) to the backend.
//!
//! Backends: a real TAP (created as `skiff-b<pid>`, brought up; the frames are addressed to
//! another host, so the kernel drops them right after parsing) when `/dev/net/tun` can be used,
//! and `/dev/null` (pure device overhead) always.
//!
//! Run with `cargo bench -p devices --bench net`. Prints figures only.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{features, tun_available, Net, NetBackend, Tap, VNET_HDR_LEN};
use devices::virtio::{
    features as vf, ActivatedQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use devices::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZE: u16 = 256;
/// Layout of each queue (RX at 0, TX at `TX_BASE`).
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const TX_BASE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const RUN_FOR: Duration = Duration::from_millis(1500);

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _int: VirtioInterruptType) -> io::Result<()> {
        Ok(())
    }
}

/// `/dev/null` as a frame sink (never readable for RX: it is not pollable, so it is replaced by
/// an eventfd for the RX side).
struct DevNull {
    out: File,
    never: EventFd,
}

impl AsRawFd for DevNull {
    fn as_raw_fd(&self) -> RawFd {
        self.never.as_raw_fd()
    }
}

impl NetBackend for DevNull {
    fn send(&mut self, frame: &devices::virtio::net::GuestIoVecs<'_>) -> io::Result<usize> {
        frame.writev_to(self.out.as_raw_fd())
    }
    fn recv(&mut self, _buf: &mut devices::virtio::net::GuestIoVecs<'_>) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn describe(&self) -> String {
        "/dev/null".into()
    }
}

fn queue_at(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(base + DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(base + AVAIL_RING))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(base + USED_RING))
        .unwrap();
    q.set_ready(true);
    q
}

/// One frame: virtio-net header + Ethernet + (for TSO) IPv4 + TCP + payload, `len` bytes after
/// the header.
fn build_frame(len: usize, tso: bool) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    // Ethernet: a unicast destination that is not the TAP's, a local source.
    f.extend_from_slice(&[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02, 0, 0, 0, 0, 1]);
    if tso {
        // flags = NEEDS_CSUM, gso_type = TCPV4, hdr_len, gso_size, csum_start, csum_offset.
        f[0] = 1;
        f[1] = 1;
        f[2..4].copy_from_slice(&54u16.to_le_bytes());
        f[4..6].copy_from_slice(&1448u16.to_le_bytes());
        f[6..8].copy_from_slice(&34u16.to_le_bytes());
        f[8..10].copy_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&[0x08, 0x00]);
        let ip_len = (len - 14) as u16;
        let mut ip = [
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 198, 51, 100, 1,
        ];
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        f.extend_from_slice(&ip);
        // TCP: ports, seq, ack, data offset 5, ACK|PSH, window; checksum left to the offload.
        f.extend_from_slice(&[
            0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ]);
    } else {
        f.extend_from_slice(&[0x88, 0xb5]);
    }
    f.resize(VNET_HDR_LEN + len, 0x5a);
    f
}

/// Bring interface `name` up.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = c as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq on our socket.
    let r = unsafe {
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS, &mut ifr);
        }
        r
    };
    let e = io::Error::last_os_error();
    // SAFETY: closing our own socket.
    unsafe { libc::close(s) };
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

fn run(backend: Box<dyn NetBackend>, label: &str, len: usize, tso: bool) {
    let frame = build_frame(len, tso);
    let slot = (frame.len() as u64 + 4095) & !4095;
    let mem_size = DATA + u64::from(QUEUE_SIZE) * slot;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
    // One single-descriptor chain per slot, each with its own copy of the frame.
    let table = DescriptorTable::new(&mem, GuestAddress(TX_BASE + DESC_TABLE), QUEUE_SIZE);
    for i in 0..QUEUE_SIZE {
        let addr = DATA + u64::from(i) * slot;
        mem.write_slice(&frame, GuestAddress(addr)).unwrap();
        let d = Descriptor::new(addr, frame.len() as u32, 0, 0);
        table.store(i, RawDescriptor::from(d)).unwrap();
    }
    let mut net = Net::with_backend("bench", None, false, backend);
    let mut acked = vf::VIRTIO_F_VERSION_1;
    if tso {
        acked |= features::CSUM | features::HOST_TSO4;
    }
    net.set_acked_features(acked);
    let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let queues = vec![
        ActivatedQueue {
            index: 0,
            queue: queue_at(0),
            kick: rx_kick.try_clone().unwrap(),
        },
        ActivatedQueue {
            index: 1,
            queue: queue_at(TX_BASE),
            kick: tx_kick.try_clone().unwrap(),
        },
    ];
    net.activate(mem.clone(), Arc::new(NoInterrupt), queues, None)
        .unwrap();

    let avail = TX_BASE + AVAIL_RING;
    let used_idx = GuestAddress(TX_BASE + USED_RING + 2);
    let mut avail_idx: u16 = 0;
    let mut packets: u64 = 0;
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        for i in 0..QUEUE_SIZE {
            let pos = avail_idx.wrapping_add(i) % QUEUE_SIZE;
            mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(pos)))
                .unwrap();
        }
        avail_idx = avail_idx.wrapping_add(QUEUE_SIZE);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(avail_idx, GuestAddress(avail + 2)).unwrap();
        tx_kick.write(1).unwrap();
        while mem.read_obj::<u16>(used_idx).unwrap() != avail_idx {
            std::thread::yield_now();
        }
        packets += u64::from(QUEUE_SIZE);
    }
    let secs = start.elapsed().as_secs_f64();
    let counters = net.counters();
    let get = |n: &str| {
        counters
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    let errors = get("tx_errors") + get("invalid_descriptors");
    net.reset();
    let pps = packets as f64 / secs;
    println!(
        "net tx {label:<28} frame {:>6} B{}: {:>10.0} packets/s {:>9.1} MiB/s{}",
        len,
        if tso { " (TSO)" } else { "      " },
        pps,
        pps * len as f64 / (1 << 20) as f64,
        if errors > 0 {
            format!("  ({errors} frames refused by the backend)")
        } else {
            String::new()
        }
    );
}

fn main() {
    let cases = [(64usize, false), (1500, false), (65_535 + 14, true)];
    let tap = if tun_available() {
        let name = format!("skiff-b{}", std::process::id() % 10_000_000);
        match Tap::open(&name) {
            Ok(t) => match set_up(&name) {
                Ok(()) => Some((t, name)),
                Err(e) => {
                    println!("net tx: TAP {name} cannot be brought up ({e}); TAP figures skipped");
                    None
                }
            },
            Err(e) => {
                println!("net tx: no TAP ({e}); TAP figures skipped");
                None
            }
        }
    } else {
        println!("net tx: /dev/net/tun unavailable; TAP figures skipped");
        None
    };
    if let Some((t, name)) = tap {
        // One TAP for all cases: the device gives the backend back on reset, so reopen by fd.
        for (len, tso) in cases {
            let b = Tap::from_fd(t.as_raw_fd()).unwrap();
            run(Box::new(b), &format!("backend TAP {name} (up)"), len, tso);
        }
    }
    for (len, tso) in cases {
        let b = DevNull {
            out: OpenOptions::new().write(true).open("/dev/null").unwrap(),
            never: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        run(Box::new(b), "backend /dev/null", len, tso);
    }
}
