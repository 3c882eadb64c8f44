//! API and snapshot benchmark (figures only, no assertions):
//! - latency of `vmm.ping` and `vm.info` over 1000 requests each (p50/p99), one connection per
//!   request as `skiff-remote` does, with `ApiClient` and with a minimal blocking client (what
//!   the server alone costs); first beside an idle guest, then beside the `serial-stream` guest
//!   storming port-I/O exits on two vCPUs;
//! - snapshot and restore of a 256 MiB guest whose RAM was filled with data (time and MiB/s).
//!
//! Run with `cargo bench -p vmm --bench api`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::client::ApiClient;

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn latency(client: &ApiClient, name: &str, f: impl Fn(&ApiClient)) {
    let mut us = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        f(client);
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "{name:<10} p50 {:>7.1} us   p99 {:>7.1} us   ({} requests)",
        percentile(&mut us, 0.5),
        percentile(&mut us, 0.99),
        us.len()
    );
}

/// One request on a fresh connection with a minimal blocking client (no runtime, no HTTP
/// library): what the server costs, without `ApiClient`'s own set-up.
fn raw_get(sock: &Path, endpoint: &str) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "GET /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::with_capacity(1024);
    s.read_to_end(&mut reply).unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn skiff")
}

/// Ping and info latency beside a guest storming port-I/O exits (`serial-stream`, 2 vCPUs).
fn busy_guest_latency(dir: &Path) {
    let sock = dir.join("busy.sock");
    let serial = format!("file={}", dir.join("busy-serial.log").display());
    let mut child = spawn(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--cpus",
        "boot=2",
        "--serial",
        &serial,
        "--cmdline",
        "scenario=serial-stream",
    ]);
    wait_for(&sock);
    std::thread::sleep(Duration::from_secs(2));
    let client = ApiClient::new(&sock).unwrap();
    println!("beside a busy guest (serial-stream, 2 vCPUs):");
    latency(&client, "vmm.ping", |c| {
        c.ping().unwrap();
    });
    latency(&client, "vm.info", |c| {
        c.info().unwrap();
    });
    latency(&client, "raw ping", |_| raw_get(&sock, "vmm.ping"));
    let _ = client.shutdown_vmm();
    let _ = child.wait();
}

fn main() {
    let dir = std::env::temp_dir().join(format!("skiff-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let fill_mb = 200;
    let cmdline = format!("scenario=counter counter.fill_mb={fill_mb}");
    let mut child = spawn(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--memory",
        "size=256M",
        "--cmdline",
        &cmdline,
    ]);
    wait_for(&sock);
    busy_guest_latency(&dir);
    let client = ApiClient::new(&sock).unwrap();
    println!("beside an idle guest (counter):");
    latency(&client, "vmm.ping", |c| {
        c.ping().unwrap();
    });
    latency(&client, "vm.info", |c| {
        c.info().unwrap();
    });
    latency(&client, "raw ping", |_| raw_get(&sock, "vmm.ping"));
    latency(&client, "raw info", |_| raw_get(&sock, "vm.info"));

    // Let the guest dirty its RAM, then snapshot it.
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("counter: filled") {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen.contains("counter: filled")
    });
    assert!(reader.join().unwrap(), "the guest did not fill its memory");
    client.pause().unwrap();
    let snap = dir.join("snap");
    let url = format!("file://{}", snap.display());
    let t = Instant::now();
    client.snapshot(&url).unwrap();
    let snap_s = t.elapsed().as_secs_f64();
    let mem_bytes = std::fs::metadata(snap.join("memory.bin")).unwrap().len() as f64;
    let _ = child.kill();
    let _ = child.wait();

    let sock2 = dir.join("api2.sock");
    let restore = format!("source_url={url}");
    let t = Instant::now();
    let mut child2 = spawn(&[
        "--api-socket",
        sock2.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    wait_for(&sock2);
    let client2 = ApiClient::new(&sock2).unwrap();
    let info = client2.info().unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(format!("{:?}", info.state), "Paused");
    let _ = client2.shutdown_vmm();
    let _ = child2.wait();
    let mib = mem_bytes / (1 << 20) as f64;
    println!(
        "snapshot   256 MiB guest ({fill_mb} MiB written by it): {:>7.1} ms  {:>7.0} MiB/s of guest RAM",
        snap_s * 1e3,
        mib / snap_s
    );
    println!(
        "restore    256 MiB guest, process start to Paused:     {:>7.1} ms  {:>7.0} MiB/s of guest RAM",
        restore_s * 1e3,
        mib / restore_s
    );
    let _ = std::fs::remove_dir_all(&dir);
}
