//! The vfio-user client against a scripted fake server. The fake builds and parses every
//! message by hand from the specification's byte layouts (never with `protocol.rs`), so a bug
//! in the encoders cannot hide in the fake too; only fd passing (`sock.rs`) is shared.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sock;
use super::{ClientOptions, VfioUserBackend};
use crate::vfio::{DmaBacking, DmaHandler, DmaProt, VfioBackend, VfioError};

const REPLY: u32 = 1;
const ERROR: u32 = 0x20;

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Little-endian fields, concatenated.
macro_rules! bytes {
    ($($v:expr),* $(,)?) => {{
        let mut v: Vec<u8> = Vec::new();
        $(v.extend_from_slice(&$v.to_le_bytes());)*
        v
    }};
}

/// A header: id, command, size (header included), flags, errno.
fn hdr(id: u16, cmd: u16, payload_len: usize, flags: u32, err: u32) -> Vec<u8> {
    bytes!(id, cmd, (16 + payload_len) as u32, flags, err)
}

struct Msg {
    id: u16,
    cmd: u16,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

struct Fake {
    s: UnixStream,
}

impl Fake {
    /// The next message, or None when the client closed the connection.
    fn recv(&self) -> Option<Msg> {
        let mut fds = Vec::new();
        let mut h = [0u8; 16];
        sock::recv_exact(&self.s, &mut h, &mut fds, 64).ok()?;
        let size = u32le(&h, 4) as usize;
        let mut payload = vec![0u8; size - 16];
        sock::recv_exact(&self.s, &mut payload, &mut fds, 64).ok()?;
        Some(Msg {
            id: u16le(&h, 0),
            cmd: u16le(&h, 2),
            flags: u32le(&h, 8),
            payload,
            fds,
        })
    }

    fn expect(&self, cmd: u16) -> Msg {
        let m = self.recv().expect("client closed the connection");
        assert_eq!(m.cmd, cmd, "fake expected command {cmd}");
        assert_eq!(m.flags & 0xf, 0, "a command from the client");
        m
    }

    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let _ = sock::send_all(&self.s, bytes, fds);
    }

    fn reply_fds(&self, m: &Msg, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut v = hdr(m.id, m.cmd, payload.len(), REPLY, 0);
        v.extend_from_slice(payload);
        self.send(&v, fds);
    }

    fn reply(&self, m: &Msg, payload: &[u8]) {
        self.reply_fds(m, payload, &[]);
    }

    fn reply_err(&self, m: &Msg, errno: u32) {
        self.send(&hdr(m.id, m.cmd, 0, REPLY | ERROR, errno), &[]);
    }

    /// Check the client's VERSION proposal and answer `major.minor` with `data`.
    fn handshake_with(&self, major: u16, minor: u16, data: &[u8]) {
        let m = self.expect(1);
        assert_eq!(u16le(&m.payload, 0), 0, "proposed major");
        assert_eq!(u16le(&m.payload, 2), 1, "proposed minor");
        assert_eq!(*m.payload.last().unwrap(), 0, "JSON ends with NUL");
        let json = &m.payload[4..m.payload.len() - 1];
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(v["capabilities"]["max_msg_fds"], 16);
        assert_eq!(v["capabilities"]["max_data_xfer_size"], 1 << 20);
        let mut p = bytes!(major, minor);
        p.extend_from_slice(data);
        self.reply(&m, &p);
    }

    fn handshake(&self, json: &str) {
        let mut d = json.as_bytes().to_vec();
        d.push(0);
        self.handshake_with(0, 1, &d);
    }

    fn handshake_default(&self) {
        self.handshake(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}"#);
    }

    /// Read until the client closes (the fake then ends).
    fn drain(&self) {
        while self.recv().is_some() {}
    }
}

fn opts(timeout_ms: u64) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

type Started = (Result<VfioUserBackend, VfioError>, JoinHandle<()>);

fn start_with(o: ClientOptions, script: impl FnOnce(Fake) + Send + 'static) -> Started {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let h = std::thread::spawn(move || script(Fake { s: b }));
    (VfioUserBackend::from_stream(a, o), h)
}

fn start(script: impl FnOnce(Fake) + Send + 'static) -> (VfioUserBackend, JoinHandle<()>) {
    let (b, h) = start_with(opts(3000), script);
    (b.expect("connect"), h)
}

fn finish(b: VfioUserBackend, h: JoinHandle<()>) {
    drop(b);
    h.join().expect("the fake server failed");
}

fn hook_counter(b: &VfioUserBackend) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    b.set_failure_hook(Arc::new(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    }));
    n
}

fn memfd(size: usize) -> std::fs::File {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size as u64).unwrap();
    f
}

fn is_protocol(r: &Result<impl std::fmt::Debug, VfioError>, needle: &str) -> bool {
    matches!(r, Err(VfioError::Protocol { reason, .. }) if reason.contains(needle))
}

fn is_transport(r: &Result<impl std::fmt::Debug, VfioError>, kind: Option<io::ErrorKind>) -> bool {
    matches!(r, Err(VfioError::Transport { source, .. }) if kind.is_none_or(|k| source.kind() == k))
}

// ---- version negotiation ----

#[test]
fn version_new_capability_shape() {
    let (b, h) = start(|f| {
        f.handshake(
            r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096,"pgsizes":12288,
            "max_dma_maps":128,"migration":{"pgsize":4096,"max_bitmap_size":65536},
            "twin_socket":{"supported":false},"write_multiple":true,"future_key":[1,2]}}"#,
        );
        f.drain();
    });
    let c = b.client();
    assert_eq!(c.version(), (0, 1));
    let caps = c.server_caps();
    assert_eq!(caps.max_msg_fds, 8);
    assert_eq!(caps.max_data_xfer_size, 4096);
    assert_eq!(caps.pgsizes, 12288);
    assert_eq!(caps.max_dma_maps, 128);
    assert!(caps.write_multiple);
    let mig = caps.migration.unwrap();
    assert_eq!((mig.pgsize, mig.max_bitmap_size), (4096, Some(65536)));
    assert_eq!(c.max_xfer(), 4096);
    assert_eq!(b.kind(), "vfio-user");
    finish(b, h);
}

#[test]
fn version_old_capability_shape_and_no_json() {
    // Old libvfio-user: migration.pgsize only, no NUL at the end.
    let old = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
    let (b, h) = start(|f| {
        f.handshake_with(0, 1, old);
        f.drain();
    });
    let caps = *b.client().server_caps();
    assert_eq!(
        (caps.pgsizes, caps.max_dma_maps, caps.max_msg_fds),
        (4096, 65535, 1)
    );
    assert_eq!(caps.migration.unwrap().max_bitmap_size, None);
    finish(b, h);
    // No version data at all: every default, max_msg_fds 1.
    let (b, h) = start(|f| {
        f.handshake_with(0, 1, b"");
        f.drain();
    });
    assert_eq!(b.client().server_caps().max_msg_fds, 1);
    assert_eq!(b.client().server_caps().max_data_xfer_size, 1 << 20);
    finish(b, h);
}

#[test]
fn version_lower_minor_is_accepted() {
    let (b, h) = start(|f| {
        f.handshake_with(0, 0, b"{}\0");
        f.drain();
    });
    assert_eq!(b.client().version(), (0, 0));
    finish(b, h);
}

#[test]
fn version_refusals() {
    type Script = fn(&Fake);
    let cases: [(Script, &str); 7] = [
        (
            |f| f.reply_err(&f.expect(1), libc::EPROTO as u32),
            "refused",
        ),
        (|f| f.handshake_with(1, 0, b""), "version 1.0"),
        (|f| f.handshake_with(0, 7, b""), "version 0.7"),
        (
            |f| f.handshake(r#"{"capabilities":{"max_msg_fds":"many"}}"#),
            "max_msg_fds",
        ),
        (|f| f.handshake("{"), "not JSON"),
        (
            |f| f.handshake(r#"{"capabilities":{"max_data_xfer_size":0}}"#),
            "max_data_xfer_size 0",
        ),
        (|f| drop(f.expect(1)), "closed"),
    ];
    for (script, needle) in cases {
        let t = Instant::now();
        let (r, h) = start_with(opts(2000), move |f| script(&f));
        let r = r.map(drop);
        let ok = match needle {
            "refused" => matches!(&r, Err(VfioError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::EPROTO)),
            "closed" => is_transport(&r, None),
            _ => is_protocol(&r, needle),
        };
        assert!(ok, "{needle}: {r:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{needle}: not prompt");
        h.join().unwrap();
    }
}

#[test]
fn connect_over_a_path_and_missing_socket() {
    let dir = std::env::temp_dir().join(format!("vu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let f = Fake { s };
        f.handshake_default();
        f.reply(&f.expect(13), b"");
        f.drain();
    });
    let b = VfioUserBackend::connect(&path, opts(2000)).unwrap();
    b.reset().unwrap();
    finish(b, h);
    std::fs::remove_file(&path).unwrap();
    let t = Instant::now();
    let r = VfioUserBackend::connect(&path, opts(2000)).map(drop);
    assert!(is_transport(&r, Some(io::ErrorKind::NotFound)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    let _ = std::fs::remove_dir(&dir);
}

// ---- device, region and interrupt info ----

/// A region info reply: fixed part, then `caps` at offset 32 when not empty.
fn region_reply(
    argsz: u32,
    flags: u32,
    index: u32,
    size: u64,
    offset: u64,
    caps: &[u8],
) -> Vec<u8> {
    let cap_offset: u32 = if caps.is_empty() { 0 } else { 32 };
    let mut v = bytes!(argsz, flags, index, cap_offset, size, offset);
    v.extend_from_slice(caps);
    v
}

/// A sparse mmap capability at offset 32 with `next`, and its areas.
fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
    let mut v = bytes!(1u16, 1u16, next, areas.len() as u32, 0u32);
    for (o, s) in areas {
        v.extend_from_slice(&bytes!(*o, *s));
    }
    v
}

#[test]
fn device_region_and_irq_info_with_sparse_mmap() {
    let mem = memfd(0x4000);
    let fd_for_fake = mem.try_clone().unwrap();
    let (b, h) = start(move |f| {
        f.handshake_default();
        let m = f.expect(4);
        assert_eq!(m.payload, bytes!(16u32, 0u32, 0u32, 0u32));
        f.reply(&m, &bytes!(16u32, 3u32, 9u32, 5u32));
        // BAR 0: mappable in two areas; the byte 0xAB at 0x3000 is seen through the map.
        let m = f.expect(5);
        assert_eq!(m.payload.len(), 32);
        assert_eq!(u32le(&m.payload, 8), 0, "index");
        assert!(
            u32le(&m.payload, 0) >= 80,
            "argsz leaves room for the capability"
        );
        let page = [0xABu8];
        std::os::unix::fs::FileExt::write_at(&fd_for_fake, &page, 0x3000).unwrap();
        let cap = sparse_cap(0, &[(0x3000, 0x1000), (0x1000, 0x1000)]);
        let reply = region_reply(80, 0xf, 0, 0x4000, 0, &cap);
        f.reply_fds(&m, &reply, &[fd_for_fake.as_fd()]);
        // Config space: read/write, no mmap.
        let m = f.expect(5);
        assert_eq!(u32le(&m.payload, 8), 7);
        f.reply(&m, &region_reply(32, 3, 7, 256, 0x7000_0000, &[]));
        let m = f.expect(7);
        assert_eq!(m.payload, bytes!(16u32, 0u32, 2u32, 0u32));
        f.reply(&m, &bytes!(16u32, 1u32, 2u32, 8u32));
        f.drain();
    });
    let d = b.device_info().unwrap();
    assert_eq!((d.flags, d.num_regions, d.num_irqs), (3, 9, 5));
    let r = b.region_info(0).unwrap();
    assert_eq!((r.size, r.flags), (0x4000, 0xf));
    let areas = r.mappable_areas();
    assert_eq!(areas.len(), 2);
    assert_eq!(
        (areas[0].offset, areas[1].offset),
        (0x1000, 0x3000),
        "sorted"
    );
    let fd = r.mmap_fd.as_ref().unwrap().as_raw_fd();
    // SAFETY: mapping 4 KiB of a 16 KiB memfd read-only at a page-aligned offset; unmapped
    // below before the fd can go away.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0x3000,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` maps 0x1000 readable bytes.
    let byte = unsafe { *(p as *const u8) };
    // SAFETY: `p` was mapped above with this length.
    unsafe { libc::munmap(p, 0x1000) };
    assert_eq!(byte, 0xAB);
    let c = b.region_info(7).unwrap();
    assert!(c.mmap_fd.is_none() && c.mappable_areas().is_empty());
    assert_eq!((c.size, c.offset), (256, 0x7000_0000));
    let i = b.irq_info(2).unwrap();
    assert_eq!((i.index, i.flags, i.count), (2, 1, 8));
    finish(b, h);
}

#[test]
fn region_info_asks_again_when_capabilities_do_not_fit() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let areas: Vec<(u64, u64)> = (0..40).map(|i| (i * 0x2000, 0x1000)).collect();
        let cap = sparse_cap(0, &areas);
        let need = (32 + cap.len()) as u32;
        let m = f.expect(5);
        assert!(u32le(&m.payload, 0) < need);
        f.reply(&m, &region_reply(need, 0xb, 1, 0x100000, 0, &[])[..32]);
        let m = f.expect(5);
        assert_eq!(
            u32le(&m.payload, 0),
            need,
            "second request asks for what was needed"
        );
        let mut r = region_reply(need, 0xb, 1, 0x100000, 0, &cap);
        r[12..16].copy_from_slice(&32u32.to_le_bytes());
        f.reply(&m, &r);
        f.drain();
    });
    let r = b.region_info(1).unwrap();
    assert_eq!(r.sparse.len(), 40);
    finish(b, h);
}

#[test]
fn hostile_region_info_is_refused() {
    // A region-type capability pointing at itself.
    let loop_cap = bytes!(2u16, 1u16, 32u32, 0u32, 0u32);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (region_reply(32, 3, 0, u64::MAX, 0, &[]), "absurd"),
        (region_reply(32, 3, 0, 1 << 41, 0, &[]), "absurd"),
        (
            region_reply(
                80,
                0xf,
                0,
                0x4000,
                0,
                &sparse_cap(0, &[(0, 0x2000), (0x1000, 0x1000)]),
            ),
            "overlaps",
        ),
        (
            region_reply(64, 0xf, 0, 0x4000, 0, &sparse_cap(0, &[(0x3000, 0x2000)])),
            "outside the region",
        ),
        (
            region_reply(48, 0xf, 0, 0x4000, 0, &loop_cap),
            "chain longer",
        ),
        (
            region_reply(
                48,
                0xf,
                0,
                0x4000,
                0,
                &bytes!(1u16, 1u16, 0u32, 1000u32, 0u32),
            ),
            "1000 sparse",
        ),
        (region_reply(32, 3, 5, 0x4000, 0, &[]), "got region 5"),
        (vec![0u8; 20], "bytes, at least 32"),
    ];
    let n = cases.len();
    let (b, h) = start(move |f| {
        f.handshake_default();
        for (reply, _) in cases.iter() {
            let m = f.expect(5);
            f.reply(&m, reply);
        }
        f.drain();
    });
    for needle in [
        "absurd",
        "absurd",
        "overlaps",
        "outside the region",
        "chain longer",
        "1000 sparse",
        "got region 5",
        "bytes, at least 32",
    ]
    .iter()
    .take(n)
    {
        let r = b.region_info(0).map(drop);
        assert!(is_protocol(&r, needle), "{needle}: {r:?}");
    }
    assert!(
        !b.client().is_failed(),
        "a bad reply fails the request, not the connection"
    );
    finish(b, h);
}

// ---- region access ----

#[test]
fn region_read_write_round_trip_split_at_the_transfer_limit() {
    let (b, h) = start(|f| {
        f.handshake(r#"{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":8}}"#);
        let mut mem = [0u8; 64];
        let mut writes = 0;
        while let Some(m) = f.recv() {
            let off = u64le(&m.payload, 0) as usize;
            assert_eq!(u32le(&m.payload, 8), 2, "region");
            let count = u32le(&m.payload, 12) as usize;
            assert!(count <= 8, "split at the server's max_data_xfer_size");
            let mut r = m.payload[..16].to_vec();
            match m.cmd {
                10 => {
                    mem[off..off + count].copy_from_slice(&m.payload[16..]);
                    writes += 1;
                }
                9 => r.extend_from_slice(&mem[off..off + count]),
                c => panic!("command {c}"),
            }
            f.reply(&m, &r);
        }
        assert_eq!(writes, 3);
    });
    let data: Vec<u8> = (1..=20).collect();
    b.region_write(2, 4, &data).unwrap();
    let mut back = [0u8; 20];
    b.region_read(2, 4, &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
    finish(b, h);
}

#[test]
fn region_read_reply_must_match_the_request() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(9);
        f.reply(&m, &bytes!(0u64, 0u32, 4u32, 1u16)); // 2 data bytes for 4
        let m = f.expect(9);
        f.reply(&m, &bytes!(8u64, 0u32, 4u32, 1u32)); // wrong offset
        let m = f.expect(9);
        f.reply_err(&m, libc::EINVAL as u32);
        f.drain();
    });
    let mut buf = [0u8; 4];
    let r = b.region_read(0, 0, &mut buf);
    assert!(is_protocol(&r, "2 data bytes"), "{r:?}");
    let r = b.region_read(0, 0, &mut buf);
    assert!(is_protocol(&r, "reply for"), "{r:?}");
    let r = b.region_read(0, 0, &mut buf);
    assert!(
        matches!(&r, Err(VfioError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EINVAL))
    );
    finish(b, h);
}

// ---- interrupts ----

#[test]
fn set_irqs_passes_eventfds_split_at_max_msg_fds() {
    let (b, h) = start(|f| {
        f.handshake(r#"{"capabilities":{"max_msg_fds":2}}"#);
        let expect = |start: u32, count: u32, nfds: usize| {
            let m = f.expect(8);
            assert_eq!(m.payload, bytes!(20u32, 0x24u32, 2u32, start, count));
            assert_eq!(m.fds.len(), nfds, "fds of vectors {start}+{count}");
            f.reply(&m, b"");
            m
        };
        expect(0, 2, 2);
        let m = expect(2, 1, 1);
        // Signal vector 2 through the eventfd that came with it.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
        let n = unsafe { libc::write(m.fds[0].as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
        expect(3, 1, 0);
        let m = f.expect(8);
        assert_eq!(
            m.payload,
            bytes!(20u32, 0x21u32, 2u32, 0u32, 0u32),
            "disable"
        );
        f.reply(&m, b"");
        let m = f.expect(8);
        assert_eq!(
            m.payload,
            bytes!(20u32, 0x14u32, 0u32, 0u32, 1u32),
            "INTx unmask"
        );
        assert_eq!(m.fds.len(), 1);
        f.reply(&m, b"");
        f.drain();
    });
    let e: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    b.set_irq_eventfds(2, 0, &[Some(&e[0]), Some(&e[1]), Some(&e[2]), None])
        .unwrap();
    assert_eq!(e[2].read().unwrap(), 1, "the server signalled vector 2");
    assert!(e[0].read().is_err(), "vector 0 not signalled");
    b.disable_irqs(2).unwrap();
    b.set_intx_unmask_eventfd(&e[3]).unwrap();
    finish(b, h);
}

// ---- DMA ----

#[test]
fn dma_map_with_memfd_trapped_and_unmap() {
    let ram = memfd(0x3000);
    std::os::unix::fs::FileExt::write_at(&ram, b"guest ram", 0x1000).unwrap();
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(2);
        assert_eq!(
            m.payload,
            bytes!(32u32, 3u32, 0x1000u64, 0x10000u64, 0x2000u64)
        );
        assert_eq!(m.fds.len(), 1);
        let mut buf = [0u8; 9];
        // SAFETY: reading 9 bytes into a live buffer from the received fd.
        let n = unsafe { libc::pread(m.fds[0].as_raw_fd(), buf.as_mut_ptr().cast(), 9, 0x1000) };
        assert_eq!(n, 9);
        assert_eq!(
            &buf, b"guest ram",
            "the server reads guest memory through the fd"
        );
        f.reply(&m, b"");
        let m = f.expect(2);
        assert_eq!(
            m.payload,
            bytes!(32u32, 1u32, 0u64, 0xE000_0000u64, 0x1000u64)
        );
        assert!(m.fds.is_empty(), "trapped: no fd");
        f.reply(&m, b"");
        let m = f.expect(3);
        assert_eq!(m.payload, bytes!(24u32, 0u32, 0x10000u64, 0x2000u64));
        let echo = m.payload.clone();
        f.reply(&m, &echo); // the spec: the entry is echoed
        let m = f.expect(3);
        f.reply(&m, b""); // libvfio-user: header only
        f.drain();
    });
    let rw = DmaProt {
        read: true,
        write: true,
    };
    let backing = DmaBacking::Memory {
        fd: ram.as_fd(),
        offset: 0x1000,
        host_addr: 0,
    };
    b.dma_map(0x10000, 0x2000, backing, rw).unwrap();
    let ro = DmaProt {
        read: true,
        write: false,
    };
    b.dma_map(0xE000_0000, 0x1000, DmaBacking::Trapped, ro)
        .unwrap();
    b.dma_unmap(0x10000, 0x2000).unwrap();
    b.dma_unmap(0xE000_0000, 0x1000).unwrap();
    let r = b.dma_map(u64::MAX, 2, DmaBacking::Trapped, ro);
    assert!(matches!(r, Err(VfioError::Invalid { .. })));
    finish(b, h);
}

/// Guest memory of 0x100 bytes at 0x1000; anything else fails.
struct TestMem(Mutex<Vec<u8>>);

impl TestMem {
    fn range(addr: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = addr
            .checked_sub(0x1000)
            .ok_or(io::ErrorKind::InvalidInput)? as usize;
        if start + len > 0x100 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(start..start + len)
    }
}

impl DmaHandler for TestMem {
    fn dma_read(&self, addr: u64, data: &mut [u8]) -> io::Result<()> {
        let r = Self::range(addr, data.len())?;
        data.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        let r = Self::range(addr, data.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn server_dma_is_served_while_a_request_is_in_flight() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let pending = f.expect(4);
        // Server-initiated requests, each answered before the client's request is.
        let ask = |id: u16, cmd: u16, payload: &[u8]| -> (u32, u32, Vec<u8>) {
            let mut v = hdr(id, cmd, payload.len(), 0, 0);
            v.extend_from_slice(payload);
            f.send(&v, &[]);
            let r = f.recv().expect("a reply");
            assert_eq!((r.id, r.cmd, r.flags & 0xf), (id, cmd, 1));
            (r.flags, r.flags & ERROR, r.payload)
        };
        let mut w = bytes!(0x1010u64, 4u64);
        w.extend_from_slice(&[1, 2, 3, 4]);
        let (_, e, p) = ask(100, 12, &w);
        assert_eq!((e, p), (0, bytes!(0x1010u64, 4u64)), "DMA_WRITE reply");
        let (_, e, p) = ask(101, 11, &bytes!(0x100Eu64, 8u64));
        let mut want = bytes!(0x100Eu64, 8u64);
        want.extend_from_slice(&[0, 0, 1, 2, 3, 4, 0, 0]);
        assert_eq!((e, p), (0, want), "DMA_READ reply");
        // The 4-byte count reading: the reply keeps that width.
        let (_, e, p) = ask(102, 11, &bytes!(0x1010u64, 2u32));
        assert_eq!((e, p), (0, bytes!(0x1010u64, 2u32, 0x0201u16)));
        // Failing handler: EFAULT; oversized: EINVAL; malformed: EINVAL; unknown: error.
        let mut w = bytes!(0x9000u64, 1u64);
        w.push(7);
        let (fl, _, p) = ask(103, 12, &w);
        assert!(fl & ERROR != 0 && p.is_empty());
        let (fl, _, _) = ask(104, 11, &bytes!(0x1000u64, (2u64 << 20)));
        assert!(fl & ERROR != 0);
        let (fl, _, _) = ask(105, 12, &bytes!(0x1000u64, 9u64, 1u8));
        assert!(fl & ERROR != 0);
        let (fl, _, _) = ask(106, 5, &[]);
        assert!(fl & ERROR != 0);
        f.reply(&pending, &bytes!(16u32, 0u32, 9u32, 5u32));
        f.drain();
    });
    let mem = Arc::new(TestMem(Mutex::new(vec![0u8; 0x100])));
    b.set_dma_handler(mem.clone());
    let d = b.device_info().unwrap();
    assert_eq!(d.num_regions, 9);
    assert_eq!(&mem.0.lock().unwrap()[0x10..0x14], &[1, 2, 3, 4]);
    assert!(!b.client().is_failed());
    finish(b, h);
}

#[test]
fn dma_error_replies_carry_the_errno() {
    // Read the raw header to see the errno values (EFAULT, EINVAL).
    let (b, h) = start(|f| {
        f.handshake_default();
        let pending = f.expect(13);
        for (id, payload, errno) in [
            (7u16, bytes!(0x9000u64, 4u64), libc::EFAULT),
            (8u16, bytes!(0x1000u64, (1u64 << 21)), libc::EINVAL),
        ] {
            let mut v = hdr(id, 11, payload.len(), 0, 0);
            v.extend_from_slice(&payload);
            f.send(&v, &[]);
            let mut raw = [0u8; 16];
            sock::recv_exact(&f.s, &mut raw, &mut Vec::new(), 4).unwrap();
            assert_eq!(u16le(&raw, 0), id);
            assert_eq!(u32le(&raw, 4), 16, "an error reply is the header only");
            assert_eq!(u32le(&raw, 8), REPLY | ERROR);
            assert_eq!(u32le(&raw, 12), errno as u32);
        }
        f.reply(&pending, b"");
        f.drain();
    });
    b.set_dma_handler(Arc::new(TestMem(Mutex::new(vec![0u8; 0x100]))));
    b.reset().unwrap();
    finish(b, h);
}

// ---- hostile peers ----

#[test]
fn server_closing_mid_session_fails_everything_once() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let _ = f.expect(4);
    });
    let hooks = hook_counter(&b);
    let r = b.device_info();
    assert!(is_transport(&r, None), "{r:?}");
    let t = Instant::now();
    let r = b.irq_info(0);
    assert!(is_transport(&r, None), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "later requests fail at once"
    );
    assert!(b.client().is_failed());
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    // A hook set after the failure is called once, at once.
    let late = hook_counter(&b);
    assert_eq!(late.load(Ordering::SeqCst), 1);
    finish(b, h);
}

#[test]
fn malformed_messages_fail_the_connection() {
    type Script = fn(&Fake, &Msg);
    let cases: [(Script, &str); 5] = [
        (
            |f, m| f.send(&bytes!(m.id, 4u16, 8u32, 1u32, 0u32), &[]),
            "smaller than its header",
        ),
        (
            |f, m| {
                let mut v = bytes!(m.id, 4u16, 100u32, 1u32, 0u32);
                v.extend_from_slice(&[0; 10]);
                f.send(&v, &[]);
            },
            "truncated",
        ),
        (
            |f, m| f.send(&bytes!(m.id, 4u16, 0x7fff_ffffu32, 1u32, 0u32), &[]),
            "exceeds",
        ),
        (
            |f, m| f.send(&bytes!(m.id, 4u16, 16u32, 7u32, 0u32), &[]),
            "message type",
        ),
        (|f, _| f.send(&[1, 2, 3], &[]), "truncated"),
    ];
    for (script, needle) in cases {
        let (b, h) = start(move |f| {
            f.handshake_default();
            let m = f.expect(4);
            script(&f, &m);
            // Closing makes "truncated" a truncation, not a stall.
        });
        let hooks = hook_counter(&b);
        let t = Instant::now();
        let r = b.device_info();
        assert!(is_protocol(&r, needle), "{needle}: {r:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(hooks.load(Ordering::SeqCst), 1, "{needle}");
        finish(b, h);
    }
}

#[test]
fn short_reply_payload_fails_only_the_request() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(4);
        f.reply(&m, &bytes!(16u32, 0u32));
        let m = f.expect(4);
        f.reply(&m, &bytes!(16u32, 0u32, 1000u32, 1u32));
        f.drain();
    });
    let r = b.device_info();
    assert!(is_protocol(&r, "8 bytes, at least 16"), "{r:?}");
    let r = b.device_info();
    assert!(is_protocol(&r, "1000 regions"), "{r:?}");
    assert!(!b.client().is_failed());
    finish(b, h);
}

#[test]
fn replies_with_wrong_id_or_command_are_dropped() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(4);
        let good = bytes!(16u32, 0u32, 9u32, 5u32);
        let mut wrong_id = hdr(m.id.wrapping_add(7), 4, 16, REPLY, 0);
        wrong_id.extend_from_slice(&good);
        f.send(&wrong_id, &[]);
        let mut wrong_cmd = hdr(m.id, 7, 16, REPLY, 0);
        wrong_cmd.extend_from_slice(&good);
        f.send(&wrong_cmd, &[]);
        f.reply(&m, &good);
        f.drain();
    });
    assert_eq!(b.device_info().unwrap().num_irqs, 5);
    assert!(!b.client().is_failed());
    finish(b, h);
}

#[test]
fn too_many_fds_fail_the_connection() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(5);
        let files: Vec<std::fs::File> = (0..20).map(|_| memfd(4096)).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        f.reply_fds(&m, &region_reply(32, 7, 0, 4096, 0, &[]), &fds);
        f.drain();
    });
    let hooks = hook_counter(&b);
    let r = b.region_info(0).map(drop);
    assert!(is_protocol(&r, "file descriptors"), "{r:?}");
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    finish(b, h);
}

#[test]
fn a_server_that_stops_answering_times_out() {
    let (b, h) = start_with(opts(200), |f| {
        f.handshake_default();
        let _ = f.expect(4);
        f.drain(); // never answers; ends when the client gives up and shuts the socket
    });
    let b = b.unwrap();
    let hooks = hook_counter(&b);
    let t = Instant::now();
    let r = b.device_info();
    assert!(is_transport(&r, Some(io::ErrorKind::TimedOut)), "{r:?}");
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(200) && e < Duration::from_secs(2),
        "{e:?}"
    );
    assert!(is_transport(&b.reset(), None));
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    finish(b, h);
}

#[test]
fn a_server_dying_with_requests_pending_fails_them_all() {
    let (b, h) = start(|f| {
        f.handshake_default();
        for _ in 0..4 {
            let _ = f.expect(4);
        }
        // Dies without answering.
    });
    let hooks = hook_counter(&b);
    let t = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| b.device_info())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert!(is_transport(r, None), "{r:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    finish(b, h);
}

#[test]
fn migration_messages_round_trip() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(16);
        assert_eq!(m.payload, bytes!(16u32, (1u32 | 1 << 16)));
        f.reply(&m, &bytes!(16u32, (1u32 | 1 << 16), 5u64));
        let m = f.expect(17);
        assert_eq!(m.payload, bytes!(8u32 + 64, 64u32));
        let mut r = bytes!(11u32, 3u32);
        r.extend_from_slice(b"abc");
        f.reply(&m, &r);
        let m = f.expect(18);
        assert_eq!(&m.payload[..8], &bytes!(8u32, 3u32)[..]);
        assert_eq!(&m.payload[8..], b"xyz");
        f.reply(&m, b"");
        f.drain();
    });
    let data = b.device_feature(1 | 1 << 16, &[], 8).unwrap();
    assert_eq!(data, bytes!(5u64));
    assert_eq!(b.mig_data_read(64).unwrap(), b"abc");
    b.mig_data_write(b"xyz").unwrap();
    finish(b, h);
}

mod migration;
