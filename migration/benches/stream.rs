//! Migration stream throughput without a VM: guest RAM sent as one pre-copy pass (RAM frames
//! over one TCP loopback connection) and applied by a receiver into a second guest memory,
//! against plain TCP carrying the same number of bytes in the same run. Figures only. The
//! receiving memory is, as skiff's guest RAM, a shared mapping of a tmpfs file. Each pass also
//! prints the CPU time of its sending and its receiving thread per GiB.
//! `SKIFF_BENCH_STREAM_MIB` sets the RAM size (default 512), `SKIFF_BENCH_FRAME_KIB` the RAM
//! frame size (default: the sender's).
//!
//! Run with `cargo bench -p migration --bench stream`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use migration::ram::ZeroPages;
use migration::stream::{
    Config, Hello, Message, MigrationReceiver, MigrationSender, RamApplier, FEATURE_PRECOPY,
    PROTOCOL_VERSION,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;

/// User and system CPU seconds in the `/proc` stat file at `path`.
fn stat_cpu(path: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (tick(11), tick(12))
}

/// User and system CPU seconds of this process so far.
fn cpu() -> (f64, f64) {
    stat_cpu("/proc/self/stat")
}

/// User + system CPU seconds of the calling thread so far.
fn thread_cpu() -> f64 {
    let (user, system) = stat_cpu("/proc/thread-self/stat");
    user + system
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

/// Seconds to push `bytes` through plain TCP in 1 MiB writes.
fn plain_tcp(bytes: usize) -> f64 {
    let (mut tx, mut rx) = pair();
    let t = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            let n = rx.read(&mut buf).expect("read");
            assert!(n > 0, "plain TCP ended early");
            got += n;
        }
    });
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        tx.write_all(&chunk[..n]).expect("write");
        sent += n;
    }
    reader.join().expect("reader");
    t.elapsed().as_secs_f64()
}

/// Guest RAM as skiff has it: a shared mapping of a tmpfs file (skiff uses a memfd).
fn shared_ram(size: usize) -> GuestMemoryMmap {
    let path = std::env::temp_dir().join(format!("skiff-stream-bench-{}", std::process::id()));
    let dir = std::path::Path::new("/dev/shm");
    let path = if dir.is_dir() {
        dir.join(path.file_name().expect("name"))
    } else {
        path
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("RAM file");
    let _ = std::fs::remove_file(&path);
    file.set_len(size as u64).expect("RAM size");
    GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("RAM")
}

fn hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: "skiff bench".into(),
        features: vec![FEATURE_PRECOPY.into(), "connections=1".into()],
        connection: 0,
        connections: 1,
    })
}

/// What one pass measured.
struct Pass {
    seconds: f64,
    stream_bytes: u64,
    /// CPU seconds of the sending and the receiving thread.
    sender_cpu: f64,
    receiver_cpu: f64,
}

/// Send `src` as one pass and apply it into `dst`.
fn stream(src: &GuestMemoryMmap, dst: &GuestMemoryMmap, layout: &[(u64, u64)]) -> Pass {
    let (tx, rx) = pair();
    let layout_rx = layout.to_vec();
    let t = Instant::now();
    let received = std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let c0 = thread_cpu();
            let mut rx = MigrationReceiver::new(rx).expect("receiver");
            let mut applier = RamApplier::new(&layout_rx).expect("applier");
            applier.write_through_files(true);
            loop {
                match rx.recv().expect("recv") {
                    Message::Ram(frame) => {
                        applier.apply(dst, &frame).expect("apply");
                        rx.recycle(frame);
                    }
                    Message::Complete(_) => return (rx.bytes_received(), thread_cpu() - c0),
                    _ => {}
                }
            }
        });
        let c0 = thread_cpu();
        let mut tx = MigrationSender::new(tx).expect("sender");
        if let Some(kib) = std::env::var("SKIFF_BENCH_FRAME_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            tx.set_ram_frame_bytes(kib << 10);
        }
        tx.send(&hello()).expect("hello");
        tx.send(&Message::Config(Config {
            vm_config: b"{}".to_vec(),
            host: Vec::new(),
            ram: layout.to_vec(),
            devices: Vec::new(),
        }))
        .expect("config");
        tx.send_ram(src, layout.iter().copied(), ZeroPages::Skip)
            .expect("send RAM");
        tx.end_iteration().expect("end");
        tx.send(&Message::State(Vec::new())).expect("state");
        tx.complete().expect("complete");
        let sender_cpu = thread_cpu() - c0;
        let (stream_bytes, receiver_cpu) = receiver.join().expect("receiver thread");
        (stream_bytes, sender_cpu, receiver_cpu)
    });
    Pass {
        seconds: t.elapsed().as_secs_f64(),
        stream_bytes: received.0,
        sender_cpu: received.1,
        receiver_cpu: received.2,
    }
}

fn main() {
    let mib: usize = std::env::var("SKIFF_BENCH_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let size = mib << 20;
    let layout = vec![(0u64, size as u64)];
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("guest RAM");
    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    for p in 0..size / PAGE {
        src.write_slice(&page, GuestAddress((p * PAGE) as u64))
            .expect("fill");
    }
    let mb = |bytes: f64, s: f64| bytes / (1 << 20) as f64 / s;

    let c0 = cpu();
    let tcp_s = plain_tcp(size);
    let c1 = cpu();
    let fresh = shared_ram(size);
    let fresh_pass = stream(&src, &fresh, &layout);
    let c2 = cpu();
    // The same memory again: its pages are now present.
    let warm_pass = stream(&src, &fresh, &layout);
    let c3 = cpu();
    let tcp = mb(size as f64, tcp_s);
    let cpu_of =
        |a: (f64, f64), b: (f64, f64)| format!("user {:.2} s, sys {:.2} s", b.0 - a.0, b.1 - a.1);
    println!("stream bench, {mib} MiB of non-zero RAM, one TCP loopback connection");
    println!(
        "  plain TCP            {tcp:7.0} MiB/s  ({})",
        cpu_of(c0, c1)
    );
    let gib = size as f64 / (1u64 << 30) as f64;
    for (name, pass, a, b) in [
        ("stream, fresh target", &fresh_pass, c1, c2),
        ("stream, warm target ", &warm_pass, c2, c3),
    ] {
        let r = mb(pass.stream_bytes as f64, pass.seconds);
        println!(
            "  {name} {r:7.0} MiB/s  {:3.0} % of plain TCP  ({}; per GiB: sender thread {:.2} s, receiver thread {:.2} s)",
            100.0 * r / tcp,
            cpu_of(a, b),
            pass.sender_cpu / gib,
            pass.receiver_cpu / gib
        );
    }
}
