//! API and snapshot benchmark (figures only, no assertions):
//! - latency of `vmm.ping` and `vm.info` over 1000 requests each (p50/p99), one connection per
//!   request as `skiff-remote` does, with `ApiClient` and with a minimal blocking client (what
//!   the server alone costs); first beside an idle guest, then beside the `serial-stream` guest
//!   storming port-I/O exits on two vCPUs;
//! - `vmm.ping` on skiff against a reference server built like Cloud Hypervisor's API
//!   (`support/reference_api.rs`), in interleaved blocks in the same run, ratio printed;
//! - snapshot and restore of a 256 MiB guest whose RAM was filled with data (time and MiB/s).
//!
//! Run with `cargo bench -p vmm --bench api` (`-- ping` runs only the comparison with the
//! reference server).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::client::ApiClient;

#[path = "support/reference_api.rs"]
mod reference_api;

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

/// `vmm.ping` one connection per request, on skiff (`sock`) and on the reference server, in
/// alternating blocks so that both see the same host load; p50/p99 of each and the ratio.
fn ping_against_reference(dir: &Path, sock: &Path, skiff_pid: u32) {
    let reference = dir.join("reference.sock");
    reference_api::start(&reference);
    let (mut ours, mut theirs, mut info) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_cpu, mut theirs_cpu) = (0.0, 0.0);
    let me = std::process::id();
    for _ in 0..40 {
        for (s, v, cpu, pid, threads) in [
            (sock, &mut ours, &mut ours_cpu, skiff_pid, "skiff"),
            (
                reference.as_path(),
                &mut theirs,
                &mut theirs_cpu,
                me,
                "ref-",
            ),
        ] {
            let before = cpu_seconds(pid, threads);
            for _ in 0..50 {
                let t = Instant::now();
                raw_get(s, "vmm.ping");
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            *cpu += cpu_seconds(pid, threads) - before;
        }
        for _ in 0..50 {
            let t = Instant::now();
            raw_get(sock, "vm.info");
            info.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let per_req = |cpu: f64, n: usize| cpu * 1e6 / n as f64;
    let (ours_cpu, theirs_cpu) = (
        per_req(ours_cpu, ours.len()),
        per_req(theirs_cpu, theirs.len()),
    );
    let (o50, o99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
    let (r50, r99) = (percentile(&mut theirs, 0.5), percentile(&mut theirs, 0.99));
    println!(
        "vmm.ping, one connection per request, {} requests each, interleaved (load {}):",
        ours.len(),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_default()
    );
    println!(
        "  skiff      p50 {o50:>7.1} us   p99 {o99:>7.1} us   server CPU {ours_cpu:>5.1} us per request"
    );
    println!(
        "  reference  p50 {r50:>7.1} us   p99 {r99:>7.1} us   server CPU {theirs_cpu:>5.1} us per request   (Cloud Hypervisor's design)"
    );
    println!("  skiff / reference p50: {:.2}", o50 / r50);
    let (i50, i99) = (percentile(&mut info, 0.5), percentile(&mut info, 0.99));
    println!(
        "  skiff vm.info (through the control thread) p50 {i50:>7.1} us   p99 {i99:>7.1} us   / reference ping p50: {:.2}",
        i50 / r50
    );
}

/// CPU time (user + system, seconds) of the threads of `pid` whose name starts with `prefix`,
/// from `/proc/PID/task/*/stat` (for skiff: its control and API threads, not the vCPUs).
fn cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn main() {
    let dir = std::env::temp_dir().join(format!("skiff-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if std::env::args().skip(1).any(|a| a == "ping") {
        let sock = dir.join("idle.sock");
        let mut child = spawn(&[
            "--api-socket",
            sock.to_str().unwrap(),
            "--cmdline",
            "scenario=idle",
        ]);
        wait_for(&sock);
        ping_against_reference(&dir, &sock, child.id());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
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
    ping_against_reference(&dir, &sock, child.id());

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
