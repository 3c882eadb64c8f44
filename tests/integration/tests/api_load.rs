//! The API under load while the guest is at its worst: 32 concurrent clients (one connection
//! per request, as skiff-remote does) send 1600 requests while the `serial-stream` guest storms
//! port-I/O exits on two vCPUs; then 80 idle connections — more than the server's connection
//! limit — sit on the socket doing nothing while the clients send 160 more. Every request must
//! be answered with 200 (the second batch once the server has dropped the idle connections
//! after its header read timeout), skiff's memory must stay bounded, and the guest must keep
//! running. Latency figures are printed, never asserted (the host is shared).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use integration::{temp_dir, wait_for_path, SkiffProcess};

const CLIENTS: usize = 32;
const REQUESTS_PER_CLIENT: usize = 50;
/// More than the server's connection limit.
const IDLE_CONNECTIONS: usize = api_server::server::MAX_CONNECTIONS + 16;
/// What skiff's resident memory may grow by under the load.
const RSS_GROWTH_LIMIT_KIB: u64 = 32 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn serial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `CLIENTS` threads each send `per_client` requests (ping, info, counters in turn), each on a
/// new connection; every one must succeed. Returns the latencies (µs) and the wall time.
fn load(socket: &Path, per_client: usize) -> (Vec<f64>, Duration) {
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let client = ApiClient::new(&socket).unwrap();
                let mut us = Vec::new();
                let mut errors = Vec::new();
                for r in 0..per_client {
                    let t = Instant::now();
                    let outcome = match (i + r) % 3 {
                        0 => client.ping().map(|_| ()),
                        1 => client.info().map(|_| ()),
                        _ => client.counters().map(|_| ()),
                    };
                    match outcome {
                        Ok(()) => us.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (us, errors)
            })
        })
        .collect();
    let mut us = Vec::new();
    let mut errors = Vec::new();
    for w in workers {
        let (u, e) = w.join().unwrap();
        us.extend(u);
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert_eq!(us.len(), CLIENTS * per_client);
    (us, started.elapsed())
}

#[test]
fn every_request_is_answered_under_load_with_bounded_memory() {
    let dir = temp_dir("api-load");
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let mut p = SkiffProcess::spawn(&[
        "--api-socket".to_string(),
        socket.display().to_string(),
        "--cpus".to_string(),
        "boot=2".to_string(),
        "--serial".to_string(),
        format!("file={}", serial.display()),
        "--cmdline".to_string(),
        "scenario=serial-stream".to_string(),
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(300);
    while serial_len(&serial) < 64 * 1024 {
        assert!(
            Instant::now() < deadline && !p.has_exited(),
            "the guest never streamed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let warm = ApiClient::new(&socket).unwrap();
    for _ in 0..100 {
        warm.ping().unwrap();
    }
    let rss_before = rss_kib(p.pid());
    let serial_before = serial_len(&serial);

    let (mut us, took) = load(&socket, REQUESTS_PER_CLIENT);
    println!(
        "API under load: {} requests from {CLIENTS} clients in {:.1} s; p50 {:.0} us, p99 {:.0} us, max {:.0} us; errors 0",
        us.len(),
        took.as_secs_f64(),
        percentile(&mut us, 0.5),
        percentile(&mut us, 0.99),
        percentile(&mut us, 1.0),
    );

    let idle: Vec<UnixStream> = (0..IDLE_CONNECTIONS)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let (mut us, took) = load(&socket, 5);
    println!(
        "API beside {IDLE_CONNECTIONS} idle connections: {} requests in {:.1} s; p50 {:.0} us, max {:.0} us \
         (a request waits for a slot until idle connections time out); errors 0",
        us.len(),
        took.as_secs_f64(),
        percentile(&mut us, 0.5),
        percentile(&mut us, 1.0),
    );
    let rss_after = rss_kib(p.pid());
    println!("skiff RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + RSS_GROWTH_LIMIT_KIB,
        "skiff's RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The server closed the idle connections (header read timeout): each reads end-of-file.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 512];
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("the server never closed an idle connection: {e}"),
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            n == 0 || text.starts_with("HTTP/1.1 408"),
            "idle connection got {text:?}"
        );
    }
    // The guest kept running through it all.
    let grown = serial_len(&serial);
    assert!(grown > serial_before, "the guest stopped streaming");
    let _ = ApiClient::new(&socket).unwrap().shutdown_vmm();
    let run = p.wait(Duration::from_secs(60));
    run.assert_code(0);
}
