use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::time::Duration;

use migration::Snapshottable;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::tests_support::*;
use super::*;
use crate::test_skip::skip_or_fail;
use crate::virtio::features::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::virtio::VirtioDevice;

const RX: u16 = queues::RX;
const TX: u16 = queues::TX;

/// A frame-preserving fake TAP: one end of a datagram socket pair.
struct SockBackend(UnixDatagram);

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for SockBackend {}

/// A backend whose sends always fail and which never has anything to read.
struct FailingBackend(EventFd);

impl AsRawFd for FailingBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for FailingBackend {
    fn send(&mut self, _frame: &GuestIoVecs<'_>) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

fn sock_pair() -> (Box<dyn NetBackend>, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (Box::new(SockBackend(a)), b)
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    // virtio_net_hdr_v1 (no offload) + Ethernet: broadcast dst, local src, ethertype 0x88b5.
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x88, 0xb5]);
    while f.len() < VNET_HDR_LEN + len {
        f.push(tag);
    }
    f
}

fn activate(dev: &mut Net, env: &TestEnv) {
    dev.set_acked_features(VIRTIO_F_VERSION_1 | features::MAC | features::STATUS);
    dev.activate(
        env.mem.clone(),
        env.irq.clone(),
        env.activated_queues(),
        None,
    )
    .unwrap();
}

fn counter(dev: &Net, name: &str) -> u64 {
    dev.counters()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

/// CPU ticks used so far by the thread named `name` (`None` without /proc or no such thread).
fn thread_ticks(name: &str) -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/task").ok()?;
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15; `rest` starts at field 3.
            let field = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            return Some(field(11)? + field(12)?);
        }
    }
    None
}

#[test]
fn features_and_config_space() {
    let (b, _peer) = sock_pair();
    let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
    let dev = Net::with_backend("net0", Some(mac), false, b);
    let f = dev.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_EVENT_IDX,
        features::MAC,
        features::STATUS,
        features::CSUM,
        features::GUEST_CSUM,
        features::HOST_TSO4,
        features::HOST_TSO6,
        features::GUEST_TSO4,
        features::GUEST_TSO6,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} missing");
    }
    assert_eq!(f & VIRTIO_F_ACCESS_PLATFORM, 0);
    let (b, _peer2) = sock_pair();
    let iommu = Net::with_backend("net1", None, true, b);
    assert_ne!(iommu.avail_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    // A random MAC is unicast and locally administered.
    assert_eq!(iommu.mac().0[0] & 0x03, 0x02);

    let mut cfg = [0xaau8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac.0);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(&cfg[10..], &[0, 0]);
    let mut tail = [0xaau8; 4];
    dev.read_config(u64::MAX - 1, &mut tail);
    assert_eq!(tail, [0; 4]);
    assert_eq!(dev.queue_max_sizes(), vec![256, 256]);
    assert_eq!(dev.device_type(), crate::virtio::device_type::NET);
    assert_eq!(mac.to_string(), "52:54:00:01:02:03");
}

#[test]
fn tun_offloads_follow_guest_features() {
    use features::*;
    assert_eq!(Net::tun_offloads(0), 0);
    assert_eq!(Net::tun_offloads(GUEST_TSO4), 0, "TSO needs GUEST_CSUM");
    assert_eq!(
        Net::tun_offloads(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    assert_eq!(Net::tun_offloads(GUEST_CSUM | HOST_TSO4), libc::TUN_F_CSUM);
}

#[test]
fn activation_needs_version_1_and_both_queues() {
    let (b, _peer) = sock_pair();
    let mut dev = Net::with_backend("net0", None, false, b);
    let env = TestEnv::new(2);
    dev.set_acked_features(features::MAC);
    assert!(dev
        .activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            None
        )
        .is_err());
    dev.set_acked_features(VIRTIO_F_VERSION_1);
    let mut qs = env.activated_queues();
    qs.pop();
    assert!(dev
        .activate(env.mem.clone(), env.irq.clone(), qs, None)
        .is_err());
    // The backend survives failed activations.
    activate(&mut dev, &env);
    assert!(
        dev.activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            None
        )
        .is_err(),
        "already active"
    );
    dev.reset();
    activate(&mut dev, &env);
}

#[test]
fn tx_frames_reach_the_backend() {
    let (b, peer) = sock_pair();
    let mut dev = Net::with_backend("net0", None, false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    let f = frame(60, 0x11);
    // Header and frame in separate descriptors, as Linux does without ANY_LAYOUT.
    env.q(TX)
        .add_readable(&env.mem, &[&f[..VNET_HDR_LEN], &f[VNET_HDR_LEN..]]);
    let big = frame(1500, 0x22);
    env.q(TX).add_readable(&env.mem, &[&big]);
    env.kick(TX);
    env.wait_used(TX, 2);
    let mut buf = vec![0u8; 70000];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &big[..]);
    assert_eq!(env.used_elem(TX, 0).1, 0);
    assert_eq!(counter(&dev, "tx_packets"), 2);
    assert_eq!(counter(&dev, "tx_bytes"), 1560);
    assert!(env.irq.counts[usize::from(TX)].load(Ordering::SeqCst) >= 1);
}

#[test]
fn hostile_tx_chains_are_dropped_and_serving_continues() {
    let (b, peer) = sock_pair();
    let mut dev = Net::with_backend("net0", None, false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    let q = env.q(TX);
    let mem = &env.mem;
    // 1. Outside guest RAM.
    q.add_descs(mem, &[(MEM_SIZE - 16, 100, 0)]);
    // 2. Huge length.
    q.add_descs(mem, &[(0x100000, u32::MAX, 0)]);
    // 3. Device-writable buffer on the TX queue.
    q.add_descs(mem, &[(0x100000, 100, F_WRITE)]);
    // 4. Shorter than header + Ethernet header.
    q.add_readable(mem, &[&[0u8; 20]]);
    // 5. Longer than a 64 KiB GSO frame.
    let a = q.alloc(80000);
    q.add_descs(mem, &[(a.0, 40000, 0), (a.0 + 40000, 40000, 0)]);
    // 6. A loop.
    let i = q.alloc_descs(1);
    q.write_desc(mem, i, 0x100000, 64, F_NEXT, i);
    q.push_avail(mem, i);
    // 7. Readable after writable.
    q.add_descs(mem, &[(0x100000, 64, F_WRITE), (0x100100, 64, 0)]);
    // 8. Zero-length descriptors only.
    q.add_descs(mem, &[(0x100000, 0, 0), (0x100000, 0, 0)]);
    // And a good frame.
    let f = frame(100, 0x33);
    q.add_readable(mem, &[&f]);
    env.kick(TX);
    env.wait_used(TX, 9);
    assert_eq!(counter(&dev, "invalid_descriptors"), 8);
    assert_eq!(counter(&dev, "tx_packets"), 1);
    let mut buf = vec![0u8; 2000];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    peer.set_nonblocking(true).unwrap();
    assert!(peer.recv(&mut buf).is_err(), "only the good frame was sent");
}

#[test]
fn backend_errors_are_counted() {
    let backend = Box::new(FailingBackend(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut dev = Net::with_backend("net0", None, false, backend);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    let f = frame(60, 1);
    env.q(TX).add_readable(&env.mem, &[&f]);
    env.q(TX).add_readable(&env.mem, &[&f]);
    env.kick(TX);
    env.wait_used(TX, 2);
    assert_eq!(counter(&dev, "tx_errors"), 2);
    assert_eq!(counter(&dev, "tx_packets"), 0);
}

#[test]
fn rx_waits_for_buffers_without_spinning() {
    let (b, peer) = sock_pair();
    let mut dev = Net::with_backend("rxspin", None, false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    let f = frame(200, 0x44);
    peer.send(&f).unwrap();
    let mut before = None;
    for _ in 0..100 {
        before = thread_ticks("skiff-rxspin");
        if before.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    match (before, thread_ticks("skiff-rxspin")) {
        // A spinning worker would use ~30 ticks (100 Hz) in 300 ms.
        (Some(b), Some(a)) => assert!(a - b <= 5, "worker used {} ticks while waiting", a - b),
        (b, a) => panic!("cannot read the worker's CPU time in /proc (before {b:?}, after {a:?})"),
    }
    assert_eq!(env.used_idx(RX), 0);

    let head = env
        .q(RX)
        .add_writable(&env.mem, &[VNET_HDR_LEN as u32, 1514]);
    let region = env.mem.find_region(GuestAddress(0)).unwrap();
    let bitmap = std::ops::Deref::deref(region).bitmap();
    bitmap.reset();
    env.kick(RX);
    env.wait_used(RX, 1);
    assert_eq!(env.used_elem(RX, 0), (u32::from(head), f.len() as u32));
    assert_eq!(env.q(RX).buffer(&env.mem, head, f.len()), f);
    assert_eq!(counter(&dev, "rx_packets"), 1);
    assert_eq!(counter(&dev, "rx_bytes"), 200);
    assert!(env.irq.counts[usize::from(RX)].load(Ordering::SeqCst) >= 1);
    // The bytes written through readv are in the dirty bitmap (for migration).
    let data = env.q(RX).alloc(0).0; // the data area grows upwards: the buffer lies below
    let dirty = (0x100000..data)
        .step_by(4096)
        .any(|a| bitmap.dirty_at(a as usize));
    assert!(dirty, "RX buffer not marked dirty");

    // With buffers posted, frames flow as they come.
    let heads: Vec<u16> = (0..3)
        .map(|_| env.q(RX).add_writable(&env.mem, &[2048]))
        .collect();
    env.kick(RX);
    for i in 0..3u8 {
        peer.send(&frame(64, i)).unwrap();
    }
    env.wait_used(RX, 4);
    for (n, h) in heads.iter().enumerate() {
        let (id, len) = env.used_elem(RX, n as u16 + 1);
        assert_eq!((id, len), (u32::from(*h), (VNET_HDR_LEN + 64) as u32));
    }
}

#[test]
fn hostile_rx_chains_are_dropped_and_serving_continues() {
    let (b, peer) = sock_pair();
    let mut dev = Net::with_backend("net0", None, false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    let q = env.q(RX);
    let mem = &env.mem;
    q.add_readable(mem, &[&[0u8; 100]]); // wrong direction
    q.add_descs(mem, &[(MEM_SIZE, 1500, F_WRITE)]); // outside RAM
    q.add_writable(mem, &[10]); // too small for a header
    let good = q.add_writable(mem, &[1600]);
    env.kick(RX);
    let f = frame(80, 0x55);
    peer.send(&f).unwrap();
    env.wait_used(RX, 4);
    assert_eq!(counter(&dev, "invalid_descriptors"), 3);
    for n in 0..3 {
        assert_eq!(env.used_elem(RX, n).1, 0);
    }
    assert_eq!(env.used_elem(RX, 3), (u32::from(good), f.len() as u32));

    // An available index far ahead of the device is ignored until the driver behaves.
    q.set_avail_idx(mem, 4 + 1000);
    env.kick(RX);
    peer.send(&f).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(env.used_idx(RX), 4);
}

#[test]
fn state_round_trip_and_restore_continues_where_it_stopped() {
    let (b, peer) = sock_pair();
    let mac = MacAddr([0x52, 0x54, 0, 9, 9, 9]);
    let mut dev = Net::with_backend("net0", Some(mac), false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    env.q(TX).add_readable(&env.mem, &[&frame(60, 1)]);
    env.kick(TX);
    env.wait_used(TX, 1);
    let mut buf = vec![0u8; 2000];
    peer.recv(&mut buf).unwrap();

    assert!(dev.snapshot().is_err(), "snapshot needs a paused device");
    migration::Pausable::pause(&mut dev).unwrap();
    let s = dev.snapshot().unwrap();
    assert_eq!(s.id, "net0");
    assert_eq!(s.version, NET_STATE_VERSION);

    // Restore into a fresh device (random MAC) on the "destination".
    let (b2, peer2) = sock_pair();
    let mut fresh = Net::with_backend("net0", None, false, b2);
    fresh.restore(&s).unwrap();
    assert_eq!(fresh.mac(), mac);
    assert_eq!(fresh.snapshot().unwrap(), s);
    dev.reset();
    // The transport hands over queues with fresh indices; the device continues at 1.
    fresh
        .activate(
            env.mem.clone(),
            env.irq.clone(),
            env.activated_queues(),
            None,
        )
        .unwrap();
    let f = frame(70, 2);
    env.q(TX).add_readable(&env.mem, &[&f]);
    env.kick(TX);
    env.wait_used(TX, 2);
    let n = peer2.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..], "only the new frame is sent");

    // Bad sections.
    let mut bad = s.clone();
    bad.data.truncate(10);
    assert!(
        fresh.restore(&bad).is_err(),
        "restore into a running device"
    );
    migration::Pausable::pause(&mut fresh).unwrap();
    assert!(fresh.restore(&bad).is_err(), "truncated");
    let mut bad = s.clone();
    bad.data[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(fresh.restore(&bad).is_err(), "features not offered");
    let mut bad = s.clone();
    bad.version = 99;
    assert!(fresh.restore(&bad).is_err(), "version");
    // Restoring into the paused, active device replaces its queues.
    fresh.restore(&s).unwrap();
    migration::Pausable::resume(&mut fresh).unwrap();
}

#[test]
fn pause_holds_tx_until_resume() {
    let (b, peer) = sock_pair();
    let mut dev = Net::with_backend("net0", None, false, b);
    let env = TestEnv::new(2);
    activate(&mut dev, &env);
    migration::Pausable::pause(&mut dev).unwrap();
    env.q(TX).add_readable(&env.mem, &[&frame(60, 9)]);
    env.kick(TX);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(env.used_idx(TX), 0);
    migration::Pausable::resume(&mut dev).unwrap();
    env.wait_used(TX, 1);
    let mut buf = vec![0u8; 2000];
    assert_eq!(peer.recv(&mut buf).unwrap(), VNET_HDR_LEN + 60);
}

// ---- real TAP ----

fn tap_name() -> String {
    format!("skiff-t{}", std::process::id() % 100_000_000)
}

/// Bring interface `name` up (the user's job in production).
fn set_up(name: &str) -> io::Result<i32> {
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
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write one ifreq; the socket is ours.
    let idx = unsafe {
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS, &mut ifr);
        }
        if r == 0 {
            r = libc::ioctl(s, libc::SIOCGIFINDEX, &mut ifr);
        }
        let e = io::Error::last_os_error();
        libc::close(s);
        if r != 0 {
            return Err(e);
        }
        ifr.ifr_ifru.ifru_ifindex
    };
    Ok(idx)
}

/// An AF_PACKET socket on interface `ifindex` for ethertype 0x88b5.
fn packet_socket(ifindex: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let proto = (0x88b5u16).to_be();
    // SAFETY: plain socket(2).
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(s) };
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: bind reads one sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads one timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

#[test]
fn tap_errors_are_clear() {
    assert!(matches!(
        Tap::open("this-name-is-far-too-long"),
        Err(NetError::InvalidTapName { .. })
    ));
    assert!(matches!(
        Tap::open("a/b"),
        Err(NetError::InvalidTapName { .. })
    ));
    let (r, _w) = pipe();
    let e = Tap::from_fd(r.as_raw_fd()).unwrap_err();
    assert!(matches!(e, NetError::TapFd { .. }), "{e}");
    assert!(e.to_string().contains("TUNGETIFF"), "{e}");
    let e = Tap::from_fd(987_654).unwrap_err();
    assert!(e.to_string().contains("not an open file descriptor"), "{e}");
    let msg = NetError::TapPermission {
        name: "tap0".into(),
    }
    .to_string();
    assert!(
        msg.contains("CAP_NET_ADMIN") && msg.contains("tap0"),
        "{msg}"
    );
}

#[test]
fn real_tap_carries_frames_both_ways() {
    if !tun_available() && skip_or_fail("SKIFF_SKIP_TAP", "/dev/net/tun is not available") {
        return;
    }
    let name = tap_name();
    let mut dev = match Net::new(NetConfig {
        id: "tapnet".into(),
        tap: TapSource::Name(name.clone()),
        mac: None,
        iommu: false,
    }) {
        Ok(d) => d,
        Err(e) => {
            skip_or_fail("SKIFF_SKIP_TAP", &format!("cannot create TAP {name}: {e}"));
            return;
        }
    };
    // An inherited fd of the same TAP validates (TUNGETIFF) and can be used instead.
    let ifindex = match set_up(&name) {
        Ok(i) => i,
        Err(e) => {
            skip_or_fail("SKIFF_SKIP_TAP", &format!("cannot bring {name} up: {e}"));
            return;
        }
    };
    let pkt = packet_socket(ifindex).expect("AF_PACKET socket");
    let env = TestEnv::new(2);
    dev.set_acked_features(
        VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | features::CSUM
            | features::GUEST_CSUM
            | features::GUEST_TSO4
            | features::HOST_TSO4,
    );
    dev.activate(
        env.mem.clone(),
        env.irq.clone(),
        env.activated_queues(),
        None,
    )
    .unwrap();

    // Guest → host: the frame shows up on the interface.
    let f = frame(100, 0x66);
    env.q(TX).add_readable(&env.mem, &[&f]);
    env.kick(TX);
    env.wait_used(TX, 1);
    let mut buf = vec![0u8; 2000];
    // SAFETY: recv writes at most buf.len() bytes.
    let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, 100, "{}", io::Error::last_os_error());
    assert_eq!(&buf[..100], &f[VNET_HDR_LEN..]);

    // Host → guest: a frame sent on the interface lands in an RX buffer behind a header.
    env.q(RX).add_writable(&env.mem, &[65562]);
    env.kick(RX);
    let out = frame(90, 0x77);
    // SAFETY: send reads the slice.
    let n = unsafe {
        libc::send(
            pkt.as_raw_fd(),
            out[VNET_HDR_LEN..].as_ptr().cast(),
            out.len() - VNET_HDR_LEN,
            0,
        )
    };
    assert_eq!(n as usize, 90, "{}", io::Error::last_os_error());
    // IPv6 autoconfiguration may put other frames first: look for ours.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut found = false;
    let mut seen = 0u16;
    while !found && std::time::Instant::now() < deadline {
        if env.used_idx(RX) > seen {
            let (id, len) = env.used_elem(RX, seen);
            let got = env.q(RX).buffer(&env.mem, id as u16, len as usize);
            found = got.len() == 102 && got[VNET_HDR_LEN..] == out[VNET_HDR_LEN..];
            seen += 1;
            if !found {
                env.q(RX).add_writable(&env.mem, &[65562]);
                env.kick(RX);
            }
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(found, "frame from the TAP not delivered");
    assert!(counter(&dev, "rx_packets") >= 1);
    assert_eq!(counter(&dev, "tx_packets"), 1);

    // A second attach is refused while the device holds the TAP.
    assert!(matches!(Tap::open(&name), Err(NetError::TapBusy { .. })));
    drop(dev);

    // An inherited descriptor: validated with TUNGETIFF, duplicated, usable for a device.
    let t = Tap::open(&name).expect("the TAP vanished with the device and is created again");
    let dup = Tap::from_fd(t.as_raw_fd()).unwrap();
    assert_eq!(dup.name(), name);
    drop(dup);
    let dev = Net::new(NetConfig {
        id: "tapnet".into(),
        tap: TapSource::Fd(t.as_raw_fd()),
        mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
        iommu: false,
    })
    .unwrap();
    drop(t);
    assert_eq!(dev.mac().to_string(), "02:00:00:00:00:01");
}
