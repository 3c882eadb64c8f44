//! Live migration benchmark, figures only — nothing here asserts on time (the host is shared,
//! 2 cores, noisy). Real `skiff` processes (source and target, each with `--api-socket`) driven
//! through `api_server::client`. One run prints:
//!
//! 1. RAM throughput against plain TCP: a single-stream TCP transfer (a sender thread writing
//!    into a socket, a receiver thread reading it) on 127.0.0.1, the receiver reading into one
//!    reused buffer (the reference figure) and, interleaved, writing each read into a fresh
//!    memfd (the least any migration target must do: the data ends in new guest memory; on
//!    this host a fresh page costs far more than the socket copy). Then an idle 1 GiB guest
//!    migrated over `tcp:127.0.0.1:PORT`: RAM bytes sent during pre-copy / pre-copy time (the
//!    `precopy` → `switchover` events of the source's event monitor, ns timestamps), and its
//!    ratio to both figures — and to plain TCP measured again while the source guest runs.
//!    Two idle guests: the `counter` guest, whose vCPU spins (its delays are rdtsc loops, and
//!    this host emulates it, so it takes a whole core from the migration), and a halted guest
//!    (`idle`: the vCPU in HLT, as an idle OS's is). The CPU column splits the source's CPU
//!    time into its vCPU threads and the rest. The counter guest again between two network
//!    namespaces joined by a veth pair (created here with `ip netns` / `ip link`, removed at
//!    the end), when possible. `-- throughput` runs only this part.
//! 2. Downtime: an idle 256 MiB guest (`dirty` scenario at 1 page/s) — the source's
//!    `downtime_ms` (pause → target RESUMED) and the guest's own `max_stall_us` before / after;
//!    then the `dirty` workload at three rates: downtime, iterations, highest throttle, total.
//! 3. Scaling: 1/2/4 connections for the 1 GiB guests (counter and halted); 256 MiB / 1 GiB /
//!    4 GiB guests with one connection (total time, throughput). The 4 GiB guest's image is
//!    removed once its source has restored it: on this host writing fresh pages gets slower the
//!    more memory is in use (a bare TCP-into-memfd receiver: 0.6 s/GiB at 10 GiB, 1.2 s/GiB at
//!    14 GiB), and image + source + target RAM cut the 4 GiB migration to 300-400 MiB/s.
//!    `-- size=MIB` migrates only one filled counter guest of that size this way.
//! 4. `local=on` downtime (`-- local` runs only that).
//! 5. KVM dirty log modes (`-- dirty-log` runs only that): for legacy, manual protection in
//!    chunks and the dirty ring, the time of one dirty sync of in-process 1 GiB and 4 GiB VMs
//!    running the `dirty` workload (a second of writes, and right after a sync), the workload's
//!    rate and stalls while logging, and the downtime of migrating it (skiff processes started
//!    with `SKIFF_DIRTY_LOG=MODE`).
//!
//! Filled guests: the test guest writes RAM slowly on this emulating host (the `dirty` workload
//! initialises ~16 MiB/s, so `dirty.mib=900` would take about a minute per guest), so the guests
//! of parts 1 and 3 are filled from the host instead: a `scenario=counter` guest is booted,
//! paused and snapshotted, every page of its RAM image from 64 MiB up is filled with a non-zero
//! pattern here (`vmm::memory::create_guest_memory` + the RAM image reader/writer), and each
//! migration's source is `skiff --restore source_url=...,resume=on` of that image (the counter
//! keeps running: an idle guest dirtying ~40 pages/s). Snapshots live in /dev/shm.
//!
//! Run with `cargo bench -p vmm --bench migration` (about 2-4 minutes). `SKIFF_BENCH_QUICK=1`
//! skips the 4 GiB guest and the repeats (about 1-2 minutes); `SKIFF_BENCH_NO_NETNS=1` skips the
//! namespace pair.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_server::migration::{
    MigrationPhase, MigrationProgress, MigrationTls, MigrationUrl, ReceiveMigrationRequest,
    SendMigrationRequest,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

mod support;
use support::{free_port, loadavg, quick, wait_for, Skiff, TempDir};

const MIB: u64 = 1 << 20;
/// Host-side fill starts here (the test guest's image, heap, DMA areas and the `dirty`
/// workload's default region all lie below).
const FILL_FROM: u64 = 64 * MIB;
/// One migration (or guest preparation) must end within this.
const DEADLINE: Duration = Duration::from_secs(120);
/// The namespace pair's addresses (inside their own namespaces: no clash with the host's).
const A_ADDR: &str = "10.213.7.1";
const B_ADDR: &str = "10.213.7.2";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn mib_s(bytes_per_s: f64) -> f64 {
    bytes_per_s / MIB as f64
}

/// (user, system) CPU seconds in the `/proc` stat file at `path` (a process's or a thread's).
fn stat_cpu_s(path: &Path) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let user = f.get(11)?.parse::<u64>().ok()? as f64 / hz;
    let system = f.get(12)?.parse::<u64>().ok()? as f64 / hz;
    Some((user, system))
}

/// (user, system) CPU seconds process `pid` used so far.
fn cpu_s(pid: u32) -> Option<(f64, f64)> {
    stat_cpu_s(Path::new(&format!("/proc/{pid}/stat")))
}

/// User + system CPU seconds the vCPU threads (named `vcpuN`) of process `pid` used so far;
/// `None` once they have ended (a migrated source's vCPU threads end before it reports).
fn vcpu_cpu_s(pid: u32) -> Option<f64> {
    let mut total = 0.0;
    let mut found = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        found = true;
        let (user, system) = stat_cpu_s(&task.join("stat"))?;
        total += user + system;
    }
    found.then_some(total)
}

/// CPU seconds one migration cost: the source's vCPU threads, the rest of the source (the
/// migration's threads and everything else), the target.
#[derive(Clone, Copy)]
struct MigrationCpu {
    src_vcpus: f64,
    src_rest: f64,
    dst: f64,
}

/// A phase event of the source's event monitor: (seconds since skiff's start, bytes sent).
fn phase_event(events: &Path, phase: &str) -> Option<(f64, u64)> {
    let text = std::fs::read_to_string(events).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        if v["source"] != "migration" || v["event"] != phase {
            return None;
        }
        let t = v["timestamp"]["secs"].as_f64()? + v["timestamp"]["nanos"].as_f64()? / 1e9;
        Some((t, v["properties"]["bytes_sent"].as_u64().unwrap_or(0)))
    })
}

/// What one migration measured.
struct Migration {
    last: MigrationProgress,
    /// Pre-copy: (seconds, bytes) from the `precopy` and `switchover` events.
    precopy: Option<(f64, u64)>,
    max_throttle: u8,
    /// CPU seconds the source and the target used during the migration.
    cpu: Option<MigrationCpu>,
    error: Option<String>,
}

impl Migration {
    fn ok(&self) -> bool {
        self.error.is_none() && self.last.phase == MigrationPhase::Completed
    }

    /// Pre-copy RAM throughput, bytes/s.
    fn precopy_rate(&self) -> Option<f64> {
        self.precopy
            .filter(|(s, b)| *s > 0.0 && *b > 0)
            .map(|(s, b)| b as f64 / s)
    }

    fn total_s(&self) -> f64 {
        self.last.elapsed_ms as f64 / 1e3
    }

    fn downtime(&self) -> String {
        self.last
            .downtime_ms
            .map_or_else(|| "?".into(), |d| d.to_string())
    }

    fn cpu(&self) -> String {
        self.cpu.map_or_else(
            || "?".into(),
            |c| format!("{:.2} + {:.2} / {:.2}", c.src_vcpus, c.src_rest, c.dst),
        )
    }

    fn status(&self) -> String {
        match &self.error {
            Some(e) => format!("FAILED: {e}"),
            None => "ok".into(),
        }
    }
}

/// Migrate `src` to `tgt` over `url`, following the source's progress until the end.
fn migrate(src: &mut Skiff, tgt: &Skiff, url: &str, connections: u32) -> Migration {
    migrate_tls(src, tgt, url, connections, None)
}

/// [`migrate`], with TLS when `tls` gives the (source, target) sides.
fn migrate_tls(
    src: &mut Skiff,
    tgt: &Skiff,
    url: &str,
    connections: u32,
    tls: Option<&(MigrationTls, MigrationTls)>,
) -> Migration {
    let url = MigrationUrl::parse(url).expect("url");
    let mut rx = ReceiveMigrationRequest::new(url.clone());
    rx.tls = tls.map(|t| t.1.clone());
    tgt.client()
        .receive_migration(&rx)
        .expect("receive-migration");
    let mut req = SendMigrationRequest::new(url);
    req.connections = connections;
    req.tls = tls.map(|t| t.0.clone());
    send_and_follow(src, tgt, &req)
}

/// A `local` migration (the guest-RAM memfds handed over) of `src` to `tgt` over a `unix:` URL.
fn migrate_local(src: &mut Skiff, tgt: &Skiff, url: &str) -> Migration {
    let url = MigrationUrl::parse(url).expect("url");
    tgt.client()
        .receive_migration(&ReceiveMigrationRequest::new(url.clone()))
        .expect("receive-migration");
    let mut req = SendMigrationRequest::new(url);
    req.local = true;
    send_and_follow(src, tgt, &req)
}

/// Send `req` from `src` (the target listens already), following the source's progress until
/// the end; the figures and whether both ends finished as they should.
fn send_and_follow(src: &mut Skiff, tgt: &Skiff, req: &SendMigrationRequest) -> Migration {
    let client = src.client();
    let (src_pid, tgt_pid) = (src.child.id(), tgt.child.id());
    let cpu0 = cpu_s(src_pid).zip(cpu_s(tgt_pid));
    // The vCPU threads' time, sampled while they exist (they end with the migrated source).
    let vcpu0 = vcpu_cpu_s(src_pid);
    let mut vcpu1 = vcpu0;
    client.send_migration(req).expect("send-migration");
    let end = Instant::now() + DEADLINE;
    let mut max_throttle = 0;
    let last = loop {
        match client.migration_progress() {
            Ok(p) => {
                vcpu1 = vcpu_cpu_s(src_pid).or(vcpu1);
                max_throttle = max_throttle.max(p.throttle_percent);
                if p.phase.is_final() {
                    break p;
                }
            }
            Err(e) => {
                return Migration {
                    last: MigrationProgress::default(),
                    precopy: None,
                    max_throttle,
                    cpu: None,
                    error: Some(format!("progress: {e}\n{}", src.log_tail())),
                }
            }
        }
        if Instant::now() > end {
            let _ = client.migration_cancel();
            return Migration {
                last: MigrationProgress::default(),
                precopy: None,
                max_throttle,
                cpu: None,
                error: Some(format!("not finished within {DEADLINE:?}")),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The source lingers until its final progress is read: both processes are still there.
    let cpu = match (cpu0, cpu_s(src_pid).zip(cpu_s(tgt_pid)), vcpu0.zip(vcpu1)) {
        (Some((s0, t0)), Some((s1, t1)), Some((v0, v1))) => {
            let src = (s1.0 + s1.1) - (s0.0 + s0.1);
            Some(MigrationCpu {
                src_vcpus: v1 - v0,
                src_rest: src - (v1 - v0),
                dst: (t1.0 + t1.1) - (t0.0 + t0.1),
            })
        }
        _ => None,
    };
    let precopy = match (
        phase_event(&src.events, "precopy"),
        phase_event(&src.events, "switchover"),
    ) {
        (Some((t0, _)), Some((t1, bytes))) => Some((t1 - t0, bytes)),
        _ => None,
    };
    let mut error = last.error.clone();
    if last.phase == MigrationPhase::Completed {
        if !src.wait_exit(Duration::from_secs(15)) {
            error = Some(format!("{}: the migrated source did not exit", src.name));
        }
        match tgt.client().info() {
            Ok(info) if format!("{:?}", info.state) == "Running" => {}
            Ok(info) => error = Some(format!("target state {:?}", info.state)),
            Err(e) => error = Some(format!("target info: {e}\n{}", tgt.log_tail())),
        }
    } else if error.is_none() {
        error = Some(format!("phase {:?}", last.phase));
    }
    Migration {
        last,
        precopy,
        max_throttle,
        cpu,
        error,
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// Two network namespaces joined by a veth pair, removed when dropped.
struct NsPair {
    a: String,
    b: String,
}

impl NsPair {
    fn create() -> Result<NsPair, String> {
        if std::env::var_os("SKIFF_BENCH_NO_NETNS").is_some() {
            return Err("SKIFF_BENCH_NO_NETNS is set".into());
        }
        let id = std::process::id();
        let pair = NsPair {
            a: format!("skiff-mbench-a-{id}"),
            b: format!("skiff-mbench-b-{id}"),
        };
        let (va, vb) = (
            format!("mba{}", id % 100_000),
            format!("mbb{}", id % 100_000),
        );
        let (a_cidr, b_cidr) = (format!("{A_ADDR}/24"), format!("{B_ADDR}/24"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &pair.a],
            vec!["netns", "add", &pair.b],
            vec![
                "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
                &pair.b,
            ],
            vec!["-n", &pair.a, "addr", "add", &a_cidr, "dev", &va],
            vec!["-n", &pair.b, "addr", "add", &b_cidr, "dev", &vb],
            vec!["-n", &pair.a, "link", "set", &va, "up"],
            vec!["-n", &pair.b, "link", "set", &vb, "up"],
            vec!["-n", &pair.a, "link", "set", "lo", "up"],
            vec!["-n", &pair.b, "link", "set", "lo", "up"],
        ];
        for args in steps {
            match Command::new("ip").args(&args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                Err(e) => return Err(format!("cannot run ip: {e}")),
            }
        }
        Ok(pair)
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Move the calling thread into network namespace `ns` (a thread's own attribute).
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Plain TCP

/// One TCP stream of `mib` MiB from a sender thread to a receiver thread listening on `addr`
/// (the receiver in namespace `ns.1`, the sender in `ns.0`). Bytes/s seen by the receiver,
/// from accept to EOF.
/// Where the plain TCP receiver puts what it reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// One reused 1 MiB buffer (the usual single-stream figure).
    Buffer,
    /// A fresh memfd of the transfer's size, `pwrite` after each read: what a migration target
    /// must do at least (the data ends in new guest memory), with no framing, checks or VMM.
    FreshMemfd,
}

/// One single-stream TCP transfer of `mib` MiB to `addr` (sender in `ns.0`, receiver in `ns.1`
/// when given): bytes/s as the receiver saw them.
fn plain_tcp(addr: &str, ns: Option<(&str, &str)>, mib: u64, sink: Sink) -> f64 {
    let (tx, rx) = mpsc::channel();
    let recv_ns = ns.map(|n| n.1.to_string());
    let listen_addr = format!("{addr}:0");
    let receiver = std::thread::spawn(move || {
        if let Some(ns) = recv_ns {
            enter_netns(&ns);
        }
        let memfd = (sink == Sink::FreshMemfd).then(|| {
            // SAFETY: memfd_create with a valid C string; the returned fd is owned below.
            let fd = unsafe { libc::memfd_create(c"bench-sink".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor nobody else owns.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(mib * MIB).expect("size the memfd");
            f
        });
        let l = TcpListener::bind(&listen_addr).expect("bind");
        tx.send(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        let t = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(f) = &memfd {
                        std::os::unix::fs::FileExt::write_all_at(f, &buf[..n], total)
                            .expect("pwrite");
                    }
                    total += n as u64
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        total as f64 / t.elapsed().as_secs_f64()
    });
    let to = rx.recv().unwrap();
    let send_ns = ns.map(|n| n.0.to_string());
    let sender = std::thread::spawn(move || {
        if let Some(ns) = send_ns {
            enter_netns(&ns);
        }
        let mut s = TcpStream::connect(to).expect("connect");
        let buf: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
        for _ in 0..mib {
            s.write_all(&buf).expect("write");
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Guests

/// What the filled guests run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FilledGuest {
    /// `scenario=counter`: a spinning vCPU (its delays are rdtsc loops) that dirties ~40 pages/s.
    Counter,
    /// `scenario=idle`: the vCPU halts, as an idle OS's does; it takes no host CPU.
    Halted,
}

impl FilledGuest {
    /// (tag, kernel command line, the serial line saying it runs).
    fn boot(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Counter => ("counter", "scenario=counter", "counter: start"),
            Self::Halted => ("idle", "scenario=idle", "idle: halting"),
        }
    }
}

/// A `guest` of `size` bytes, paused and snapshotted, whose RAM image then has every page from
/// [`FILL_FROM`] up filled with non-zero data. Returns the snapshot URL and the non-zero RAM
/// bytes.
fn filled_snapshot(dir: &Path, size: u64, guest: FilledGuest) -> (String, u64) {
    let mib = size / MIB;
    let (tag, cmdline, marker) = guest.boot();
    let snap = dir.join(format!("snap-{tag}-{mib}M"));
    let serial = dir.join(format!("prep-{tag}-{mib}M.serial"));
    {
        let s = Skiff::spawn(
            dir,
            &format!("prep-{tag}-{mib}M"),
            None,
            &[
                "--memory",
                &format!("size={mib}M"),
                "--serial",
                &format!("file={}", serial.display()),
                "--cmdline",
                cmdline,
            ],
        );
        wait_for("filled guest start", DEADLINE, || {
            std::fs::read_to_string(&serial).is_ok_and(|t| t.contains(marker))
        });
        let c = s.client();
        c.pause().expect("pause");
        c.snapshot(&format!("file://{}", snap.display()))
            .expect("snapshot");
    }
    let (mem, _fd) = vmm::memory::create_guest_memory(size).expect("guest memory");
    let image = snap.join("memory.bin");
    let mut f = std::fs::File::open(&image).expect("memory.bin");
    migration::ram::restore_memory_image(&mem, &mut f, true).expect("read the RAM image");
    drop(f);
    let mut buf = vec![0u8; MIB as usize];
    let mut filled = 0u64;
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    for (start, len) in regions {
        let mut a = start.max(FILL_FROM);
        while a < start + len {
            let n = (start + len - a).min(MIB);
            for (i, w) in buf[..n as usize].chunks_exact_mut(8).enumerate() {
                let v = (a + i as u64 * 8) ^ 0x5a5a_5a5a_0000_0001;
                w.copy_from_slice(&v.to_le_bytes());
            }
            mem.write_slice(&buf[..n as usize], GuestAddress(a))
                .expect("fill");
            filled += n;
            a += n;
        }
    }
    let mut out = BufWriter::with_capacity(4 << 20, std::fs::File::create(&image).unwrap());
    migration::ram::write_memory_image(&mem, &mut out).expect("write the RAM image");
    out.flush().unwrap();
    (format!("file://{}", snap.display()), filled)
}

/// Migrate a guest restored from `snap` (running) over `url_for(port)`, source in `ns.0` and
/// target in `ns.1` when given.
fn migrate_snapshot(
    dir: &Path,
    tag: &str,
    snap: &str,
    ns: Option<(&str, &str)>,
    host: &str,
    connections: u32,
) -> Migration {
    migrate_snapshot_beside_tcp(dir, tag, snap, ns, host, connections, None).0
}

/// A source skiff (`{tag}-src`, in `ns` when given) restored from `snap`, running.
fn spawn_restored(dir: &Path, tag: &str, snap: &str, ns: Option<&str>) -> Skiff {
    let restore = format!("source_url={snap},resume=on");
    let src = Skiff::spawn(dir, &format!("{tag}-src"), ns, &["--restore", &restore]);
    // The restore ends before the API answers; make sure the guest runs.
    wait_for("restored source running", DEADLINE, || {
        src.client()
            .info()
            .is_ok_and(|i| format!("{:?}", i.state) == "Running")
    });
    src
}

/// [`migrate_snapshot`] over loopback with one connection, removing the snapshot once the
/// source has restored it: a big guest's image then does not sit in /dev/shm beside the source's
/// and the target's RAM (on this host, fresh pages get slower the more memory is in use).
fn migrate_snapshot_dropping(dir: &Path, tag: &str, snap: &str) -> Migration {
    let mut src = spawn_restored(dir, tag, snap, None);
    if let Some(path) = snap.strip_prefix("file://") {
        let _ = std::fs::remove_dir_all(path);
    }
    let tgt = Skiff::spawn(dir, &format!("{tag}-dst"), None, &[]);
    let url = format!("tcp:127.0.0.1:{}", free_port());
    migrate(&mut src, &tgt, &url, 1)
}

/// A migration and the plain TCP rate measured beside its running source guest.
type BesideTcp = (Migration, Option<f64>);

/// [`migrate_snapshot`], measuring first plain TCP of `tcp_mib` MiB to `host` while the source
/// guest runs (its vCPU spins on this host, taking a core from both transfers alike).
fn migrate_snapshot_beside_tcp(
    dir: &Path,
    tag: &str,
    snap: &str,
    ns: Option<(&str, &str)>,
    host: &str,
    connections: u32,
    tcp_mib: Option<u64>,
) -> BesideTcp {
    let mut src = spawn_restored(dir, tag, snap, ns.map(|n| n.0));
    let tcp = tcp_mib.map(|mib| plain_tcp(host, ns, mib, Sink::Buffer));
    let tgt = Skiff::spawn(dir, &format!("{tag}-dst"), ns.map(|n| n.1), &[]);
    let url = format!("tcp:{host}:{}", free_port());
    (migrate(&mut src, &tgt, &url, connections), tcp)
}

/// Certificates for a TLS migration on 127.0.0.1 (a CA, a target and a source leaf), written
/// to `dir`; the (source, target) sides.
fn tls_sides(dir: &Path) -> (MigrationTls, MigrationTls) {
    use integration::certs::{write_side, TestCa};
    let ca = TestCa::new("skiff bench CA");
    (
        write_side(dir, "tls-source", &ca.leaf("skiff-source", false), &ca),
        write_side(dir, "tls-target", &ca.leaf("127.0.0.1", false), &ca),
    )
}

/// 1b: the idle filled guest migrated over loopback with and without TLS, one after the other,
/// `runs` times each; pre-copy throughput and the TLS / plain ratio.
fn tls_against_plain(dir: &Path, snap: &str, filled: u64, runs: usize) {
    println!();
    println!("== 1b. TLS: the same 1 GiB guest ({} MiB non-zero), loopback, 1 connection, plain and TLS in turn", filled / MIB);
    let sides = tls_sides(dir);
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (k, tls) in [None, Some(&sides)].into_iter().enumerate() {
            let restore = format!("source_url={snap},resume=on");
            let tag = format!("tls{k}-{i}");
            let mut src = Skiff::spawn(dir, &format!("{tag}-src"), None, &["--restore", &restore]);
            wait_for("restored source running", DEADLINE, || {
                src.client()
                    .info()
                    .is_ok_and(|i| format!("{:?}", i.state) == "Running")
            });
            let tgt = Skiff::spawn(dir, &format!("{tag}-dst"), None, &[]);
            let url = format!("tcp:127.0.0.1:{}", free_port());
            let m = migrate_tls(&mut src, &tgt, &url, 1, tls);
            let name = if tls.is_some() { "TLS 1.3" } else { "plain" };
            println!(
                "{name:<8} pre-copy {:>7} MiB/s  total {:>6.2} s  downtime {:>4} ms  CPU s src vCPU + rest / dst {:>21}  {}",
                m.precopy_rate().map_or("?".into(), |r| format!("{:.0}", mib_s(r))),
                m.total_s(),
                m.downtime(),
                m.cpu(),
                m.status()
            );
            if let Some(r) = m.precopy_rate().filter(|_| m.ok()) {
                rates[k].push(r);
            }
        }
    }
    if rates.iter().all(|r| !r.is_empty()) {
        let (plain, tls) = (median(rates[0].clone()), median(rates[1].clone()));
        println!(
            "TLS / plain pre-copy throughput: {:.0} / {:.0} MiB/s = {:.0} % (medians of {runs})",
            mib_s(tls),
            mib_s(plain),
            100.0 * tls / plain
        );
    }
}

/// One `dirty:` progress line's fields.
#[derive(Debug, Clone, Copy)]
struct DirtyLine {
    report: u64,
    rate: u64,
    max_stall_us: u64,
    recent_stall_us: u64,
}

fn dirty_lines(serial: &Path) -> Vec<DirtyLine> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let mut out = Vec::new();
    // Only complete lines.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    for l in complete.lines() {
        let Some(rest) = l.strip_prefix("dirty: gen ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let field = |k: &str| -> Option<u64> {
            let i = words.iter().position(|w| *w == k)?;
            words.get(i + 1)?.trim_end_matches("/s").parse().ok()
        };
        if let (Some(report), Some(rate), Some(max), Some(recent)) = (
            field("report"),
            field("rate"),
            field("max_stall_us"),
            field("recent_stall_us"),
        ) {
            out.push(DirtyLine {
                report,
                rate,
                max_stall_us: max,
                recent_stall_us: recent,
            });
        }
    }
    out
}

/// What a migration of the `dirty` workload measured.
struct DirtyRun {
    m: Migration,
    /// Guest rewrite rate before the migration (pages/s, last line).
    guest_rate: u64,
    /// `max_stall_us` before the migration and on the target after it.
    stall_before: u64,
    stall_after: Option<u64>,
    /// The longest `recent_stall_us` of the lines printed from the migration's start on.
    stall_during: Option<u64>,
    /// Median `recent_stall_us` before the migration (the host's scheduling baseline).
    baseline: u64,
}

/// A 256 MiB guest running the `dirty` workload over `mib` MiB at `rate` pages/s, migrated over
/// loopback TCP once it has printed a few progress lines.
fn dirty_migration(dir: &Path, tag: &str, mib: u64, rate: u64) -> DirtyRun {
    let serial = dir.join(format!("{tag}.serial"));
    let cmdline = format!(
        "scenario=dirty dirty.mib={mib} dirty.rate={rate} dirty.report_ms=200 dirty.verify_every=0"
    );
    let mut src = Skiff::spawn(
        dir,
        &format!("{tag}-src"),
        None,
        &[
            "--memory",
            "size=256M",
            "--serial",
            &format!("file={}", serial.display()),
            "--cmdline",
            &cmdline,
        ],
    );
    wait_for("dirty workload progress lines", DEADLINE, || {
        dirty_lines(&serial).len() >= 4
    });
    let before = dirty_lines(&serial);
    let last = *before.last().unwrap();
    let baseline = median(
        before[1..]
            .iter()
            .map(|l| l.recent_stall_us as f64)
            .collect(),
    ) as u64;
    let tgt = Skiff::spawn(dir, &format!("{tag}-dst"), None, &[]);
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let m = migrate(&mut src, &tgt, &url, 1);
    let (mut stall_after, mut stall_during) = (None, None);
    if m.ok() {
        // Two more lines from the target.
        let n = dirty_lines(&serial).len();
        let end = Instant::now() + Duration::from_secs(30);
        while dirty_lines(&serial).len() < n + 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = dirty_lines(&serial);
        stall_after = after.last().map(|l| l.max_stall_us);
        stall_during = after
            .iter()
            .filter(|l| l.report > last.report)
            .map(|l| l.recent_stall_us)
            .max();
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("FAIL") {
            eprintln!("{tag}: the guest reports damaged memory:\n{text}");
        }
    }
    DirtyRun {
        m,
        guest_rate: last.rate,
        stall_before: last.max_stall_us,
        stall_after,
        stall_during,
        baseline,
    }
}

// ---------------------------------------------------------------------------------------------

/// Section 4: `local=on` migrations of a running 1 GiB guest restored from `snap`, one after the
/// other from each target to a new one; downtime of each and the median against the target.
fn local_downtime(dir: &Path, snap: &str, runs: usize) {
    println!();
    println!("== 4. local=on: a 1 GiB guest ({runs} migrations in a row, each target the next source), RAM handed over as memfds");
    let restore = format!("source_url={snap},resume=on");
    let mut src = Skiff::spawn(dir, "local-0", None, &["--restore", &restore]);
    wait_for("restored source running", DEADLINE, || {
        src.client()
            .info()
            .is_ok_and(|i| format!("{:?}", i.state) == "Running")
    });
    let mut downtimes = Vec::new();
    for i in 1..=runs {
        let tgt = Skiff::spawn(dir, &format!("local-{i}"), None, &[]);
        let url = format!(
            "unix:{}",
            dir.join(format!("migration-local-{i}.sock")).display()
        );
        let m = migrate_local(&mut src, &tgt, &url);
        println!(
            "run {i}: downtime {} ms, {} bytes sent, total {:.3} s  {}",
            m.downtime(),
            m.last.bytes_sent,
            m.total_s(),
            m.status()
        );
        if let Some(d) = m.last.downtime_ms.filter(|_| m.ok()) {
            downtimes.push(d as f64);
        }
        src = tgt;
    }
    if downtimes.is_empty() {
        println!("local=on: no migration completed");
        return;
    }
    let med = median(downtimes);
    println!(
        "local=on 1 GiB: median downtime {med:.0} ms (target <= 10 ms: {})",
        if med <= 10.0 { "met" } else { "NOT met" }
    );
}

// ---------------------------------------------------------------------------------------------
// Section 5: KVM dirty log modes

/// What one in-process VM measured for one dirty log mode and guest size.
struct SyncFigures {
    /// `start_dirty_log` (slots flagged, the first sync dropping everything), ms.
    start_ms: f64,
    /// (ms, pages) of syncs one second after the previous one.
    many: Vec<(f64, u64)>,
    /// (ms, pages) of syncs right after the previous one.
    few: Vec<(f64, u64)>,
    /// Guest rewrite rate (pages/s): median before logging, median while logging.
    rate_off: u64,
    rate_on: u64,
    /// Longest `recent_stall_us` of the guest while logging, and the median before.
    stall_on: u64,
    stall_off: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An in-process `size`-byte VM in `mode` running the `dirty` workload at full speed over 64 MiB:
/// start logging, then every second one timed sync ("many": a second of writes) and one right
/// after it ("few"), for `rounds` rounds; the guest's own rate and stall figures around it.
fn sync_figures(
    dir: &Path,
    mode: vmm::dirty_log::DirtyLogMode,
    size: u64,
    rounds: usize,
) -> Result<SyncFigures, String> {
    vmm::dirty_log::set_mode_override(Some(mode));
    let serial = dir.join(format!("sync-{}-{}M.serial", mode.name(), size / MIB));
    let config: vmm::config::VmConfig = serde_json::from_value(serde_json::json!({
        "cpus": { "boot_vcpus": 1 },
        "memory": { "size": size },
        "serial": { "file": serial },
        "payload": { "cmdline": "scenario=dirty dirty.mib=64 dirty.rate=0 dirty.report_ms=200 dirty.verify_every=0" },
    }))
    .map_err(|e| e.to_string())?;
    let mut vm = vmm::vm::Vm::new(config).map_err(|e| e.to_string())?;
    vmm::dirty_log::set_mode_override(None);
    if vm.dirty_log_mode() != mode {
        return Err(format!("host gave mode {}", vm.dirty_log_mode().name()));
    }
    vm.start().map_err(|e| e.to_string())?;
    wait_for("dirty workload progress lines", DEADLINE, || {
        dirty_lines(&serial).len() >= 6
    });
    let before = dirty_lines(&serial);
    let last_before = before.last().map_or(0, |l| l.report);
    let t = Instant::now();
    vm.start_dirty_log().map_err(|e| e.to_string())?;
    let start_ms = ms(t.elapsed());
    let (mut many, mut few) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_secs(1));
        for out in [&mut many, &mut few] {
            let t = Instant::now();
            let set = vm.dirty_pages().map_err(|e| e.to_string())?;
            out.push((ms(t.elapsed()), set.count()));
        }
    }
    if let Some(reason) = vm.exit_event().reason() {
        vm.shutdown();
        return Err(format!(
            "the guest's vCPU ended ({reason:?}) while logging; syncs before: many {:?}, few {:?}",
            many, few
        ));
    }
    let during: Vec<DirtyLine> = dirty_lines(&serial)
        .into_iter()
        .filter(|l| l.report > last_before + 1)
        .collect();
    vm.stop_dirty_log().map_err(|e| e.to_string())?;
    vm.shutdown();
    let _ = std::fs::remove_file(&serial);
    let med = |v: Vec<u64>| median(v.into_iter().map(|x| x as f64).collect()) as u64;
    Ok(SyncFigures {
        start_ms,
        many,
        few,
        rate_off: med(before[2..].iter().map(|l| l.rate).collect()),
        rate_on: if during.is_empty() {
            0
        } else {
            med(during.iter().map(|l| l.rate).collect())
        },
        stall_on: during.iter().map(|l| l.recent_stall_us).max().unwrap_or(0),
        stall_off: med(before[2..].iter().map(|l| l.recent_stall_us).collect()),
    })
}

/// Section 5: the three KVM dirty log modes (legacy, manual protection in chunks, dirty ring)
/// compared: sync time for 1 GiB and 4 GiB guests with many and few dirty pages, the effect on a
/// dirtying guest, and migration downtime of the `dirty` workload.
fn dirty_log_modes(dir: &Path, quick: bool) {
    use vmm::dirty_log::{DirtyLogMode, MODE_VAR};
    println!();
    println!("== 5. KVM dirty log modes (in-process VMs for the syncs; skiff processes with {MODE_VAR}=MODE for the migrations), load average {}", loadavg());
    let rounds = if quick { 3 } else { 5 };
    println!(
        "{:<8} {:>6} {:>9} {:>22} {:>22} {:>14} {:>12}",
        "mode",
        "guest",
        "start ms",
        "sync many ms (pages)",
        "sync few ms (pages)",
        "guest pg/s",
        "stall max"
    );
    for size in [1u64 << 30, 4 << 30] {
        for mode in DirtyLogMode::ALL {
            match sync_figures(dir, mode, size, rounds) {
                Ok(f) => {
                    let show = |v: &[(f64, u64)]| {
                        let t = median(v.iter().map(|x| x.0).collect());
                        let p = median(v.iter().map(|x| x.1 as f64).collect());
                        format!("{t:.2} ({p:.0})")
                    };
                    println!(
                        "{:<8} {:>4} G {:>9.2} {:>22} {:>22} {:>14} {:>9.1} ms",
                        mode.name(),
                        size >> 30,
                        f.start_ms,
                        show(&f.many),
                        show(&f.few),
                        format!("{} -> {}", f.rate_off, f.rate_on),
                        f.stall_on as f64 / 1e3,
                    );
                    let _ = f.stall_off;
                }
                Err(e) => println!("{:<8} {:>4} G failed: {e}", mode.name(), size >> 30),
            }
        }
    }
    println!("(median of {rounds} syncs each; many: one second of the guest's writes, few: a sync right after one; guest pg/s: the dirty workload's rewrite rate before -> while logging with a sync a second; stall max: its longest recent_stall_us while logging. On this PVM host KVM's emulator pushes a ring entry per emulated store, so a ring overflows within about a second of writes: the in-process ring rows are forced and end the vCPU)");
    println!(
        "{:<8} {:<26} {:>11} {:>11} {:>6} {:>9} {:>8} {:>11}  status",
        "mode", "workload", "guest pg/s", "downtime", "iters", "throttle", "total s", "stall migr"
    );
    for mode in DirtyLogMode::ALL {
        if mode == DirtyLogMode::Ring && vmm::dirty_log::pvm_host() {
            println!(
                "ring     skipped: skiff refuses the ring on this PVM host (it would run manual)"
            );
            continue;
        }
        std::env::set_var(MODE_VAR, mode.name());
        for (name, mib, rate) in [
            ("idle (16 MiB, 1 page/s)", 16, 1),
            ("32 MiB, rate 0 (max)", 32, 0),
        ] {
            let r = dirty_migration(dir, &format!("dl-{}-{rate}", mode.name()), mib, rate);
            println!(
                "{:<8} {:<26} {:>11} {:>8} ms {:>6} {:>8}% {:>8.2} {:>11}  {}",
                mode.name(),
                name,
                r.guest_rate,
                r.m.downtime(),
                r.m.last.iteration,
                r.m.max_throttle,
                r.m.total_s(),
                r.stall_during
                    .map_or("?".into(), |v| format!("{:.1} ms", v as f64 / 1e3)),
                r.m.status()
            );
        }
    }
    std::env::remove_var(MODE_VAR);
    println!("(256 MiB guests migrated over loopback TCP, 1 connection, default downtime limit; load average {} now)", loadavg());
}

/// Plain single-stream TCP figures of one path, bytes/s.
#[derive(Clone, Copy)]
struct PlainTcp {
    /// Into a reused buffer: the usual figure, and the throughput target's reference.
    buffer: f64,
    /// Into a fresh memfd: the bound for any receiver that stores the data in new memory.
    memfd: f64,
}

impl PlainTcp {
    /// Medians of 3 transfers of `mib` MiB of each kind, interleaved.
    fn measure(addr: &str, ns: Option<(&str, &str)>, mib: u64) -> PlainTcp {
        let (mut buffer, mut memfd) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            buffer.push(plain_tcp(addr, ns, mib, Sink::Buffer));
            memfd.push(plain_tcp(addr, ns, mib, Sink::FreshMemfd));
        }
        PlainTcp {
            buffer: median(buffer),
            memfd: median(memfd),
        }
    }
}

/// Part 1's table.
fn print_throughput(rows: &[(String, PlainTcp, Vec<BesideTcp>)]) {
    println!(
        "{:<24} {:>10} {:>11} {:>9} {:>9} {:>18} {:>8} {:>9} {:>6} {:>28}  status",
        "path, guest",
        "plain TCP",
        "into memfd",
        "beside",
        "pre-copy",
        "% of plain/memfd/beside",
        "total s",
        "downtime",
        "iters",
        "CPU s src vCPU + rest / dst"
    );
    for (name, tcp, migs) in rows {
        for (m, beside) in migs {
            let rate = m.precopy_rate();
            let pct = |base: Option<f64>| match (rate, base) {
                (Some(r), Some(b)) => format!("{:.0}", 100.0 * r / b),
                _ => "?".into(),
            };
            println!(
                "{:<24} {:>10.0} {:>11.0} {:>9} {:>9} {:>18} {:>8.2} {:>6} ms {:>6} {:>28}  {}",
                name,
                mib_s(tcp.buffer),
                mib_s(tcp.memfd),
                beside.map_or("?".into(), |b| format!("{:.0}", mib_s(b))),
                rate.map_or("?".into(), |r| format!("{:.0}", mib_s(r))),
                format!(
                    "{} / {} / {} %",
                    pct(Some(tcp.buffer)),
                    pct(Some(tcp.memfd)),
                    pct(*beside)
                ),
                m.total_s(),
                m.downtime(),
                m.last.iteration,
                m.cpu(),
                m.status()
            );
        }
    }
}

fn main() {
    let quick = quick();
    let runs = if quick { 1 } else { 2 };
    let t_start = Instant::now();
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = TempDir(base.join(format!("skiff-bench-migration-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let dir = &dir.0;
    println!(
        "skiff live migration bench (load average {} at start, {} CPUs{})",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { ", SKIFF_BENCH_QUICK" } else { "" }
    );

    if std::env::args().skip(1).any(|a| a == "dirty-log") {
        dirty_log_modes(dir, quick);
        return;
    }
    if let Some(mib) = std::env::args()
        .skip(1)
        .find_map(|a| a.strip_prefix("size=").and_then(|m| m.parse::<u64>().ok()))
    {
        let (snap, filled) = filled_snapshot(dir, mib * MIB, FilledGuest::Counter);
        let m = migrate_snapshot_dropping(dir, &format!("s{mib}m"), &snap);
        println!(
            "{mib} MiB guest, 1 connection: {} MiB non-zero, pre-copy {} MiB/s, total {:.2} s, downtime {} ms, CPU s src vCPU + rest / dst {}  {}",
            filled / MIB,
            m.precopy_rate().map_or("?".into(), |r| format!("{:.0}", mib_s(r))),
            m.total_s(),
            m.downtime(),
            m.cpu(),
            m.status()
        );
        return;
    }
    // Guests filled from the host.
    let t = Instant::now();
    let (snap_1g, filled_1g) = filled_snapshot(dir, 1 << 30, FilledGuest::Counter);
    if std::env::args().skip(1).any(|a| a == "local") {
        local_downtime(dir, &snap_1g, 5);
        return;
    }
    let (snap_256m, filled_256m) = filled_snapshot(dir, 256 * MIB, FilledGuest::Counter);
    println!(
        "prepared filled 1 GiB ({} MiB non-zero) and 256 MiB ({} MiB non-zero) guest images in {:.1} s",
        filled_1g / MIB,
        filled_256m / MIB,
        t.elapsed().as_secs_f64()
    );

    // ---- 1. throughput against plain TCP
    let (snap_idle, _) = filled_snapshot(dir, 1 << 30, FilledGuest::Halted);
    println!();
    println!("== 1. RAM throughput: idle 1 GiB guest ({} MiB non-zero RAM, filled from the host), 1 connection, against one plain TCP stream", filled_1g / MIB);
    let tcp_mib = 1024;
    let lo_tcp = PlainTcp::measure("127.0.0.1", None, tcp_mib);
    let mut rows: Vec<(String, PlainTcp, Vec<BesideTcp>)> = Vec::new();
    for (name, tag, snap) in [
        ("loopback, counter guest", "counter", &snap_1g),
        ("loopback, halted guest", "halted", &snap_idle),
    ] {
        let migs = (0..runs)
            .map(|i| {
                migrate_snapshot_beside_tcp(
                    dir,
                    &format!("lo1g-{tag}-{i}"),
                    snap,
                    None,
                    "127.0.0.1",
                    1,
                    Some(tcp_mib),
                )
            })
            .collect();
        rows.push((name.into(), lo_tcp, migs));
    }
    let netns_note = match NsPair::create() {
        Ok(pair) => {
            let ns = Some((pair.a.as_str(), pair.b.as_str()));
            let tcp = PlainTcp::measure(B_ADDR, ns, tcp_mib);
            let migs = (0..runs)
                .map(|i| {
                    migrate_snapshot_beside_tcp(
                        dir,
                        &format!("ns1g-{i}"),
                        &snap_1g,
                        ns,
                        B_ADDR,
                        1,
                        Some(tcp_mib),
                    )
                })
                .collect();
            rows.push(("veth, counter guest".into(), tcp, migs));
            None
        }
        Err(why) => Some(why),
    };
    print_throughput(&rows);
    if let Some(why) = netns_note {
        println!("veth between two netns: skipped ({why})");
    }
    if std::env::args().skip(1).any(|a| a == "throughput") {
        return;
    }
    println!("(plain TCP: median of 3 single-stream transfers of {tcp_mib} MiB, the receiver reading into one reused buffer; into memfd: the same, the receiver writing each read into a fresh memfd (the least a target must do: the data ends in new guest memory), interleaved with the first; beside guest: one plain transfer while the source guest runs; pre-copy: bytes sent between the source's precopy and switchover events / that time; % of: pre-copy against plain / into memfd / beside guest, target >= 80 % of plain; CPU: seconds of the source's vCPU threads + the rest of the source / the target, from send-migration to the end; counter guest: a spinning vCPU, halted guest: a vCPU in HLT)");

    tls_against_plain(dir, &snap_1g, filled_1g, runs);

    // ---- 2. downtime
    println!();
    println!("== 2. Downtime: 256 MiB guest running the dirty workload, loopback TCP, 1 connection, downtime limit 300 ms (default)");
    let mut dirty_rows = vec![(
        "idle (16 MiB set, 1 page/s)".to_string(),
        dirty_migration(dir, "idle", 16, 1),
    )];
    for rate in [1000u64, 5000, 0] {
        let name = if rate == 0 {
            "32 MiB set, rate 0 (max)".to_string()
        } else {
            format!("32 MiB set, rate {rate}/s")
        };
        dirty_rows.push((name, dirty_migration(dir, &format!("rate{rate}"), 32, rate)));
    }
    println!(
        "{:<28} {:>11} {:>11} {:>6} {:>9} {:>8} {:>11} {:>11} {:>11} {:>10}  status",
        "workload",
        "guest pg/s",
        "downtime",
        "iters",
        "throttle",
        "total s",
        "stall pre",
        "stall post",
        "stall migr",
        "baseline"
    );
    for (name, r) in &dirty_rows {
        let us = |v: Option<u64>| v.map_or("?".into(), |v| format!("{:.1} ms", v as f64 / 1e3));
        println!(
            "{:<28} {:>11} {:>8} ms {:>6} {:>8}% {:>8.2} {:>11} {:>11} {:>11} {:>10}  {}",
            name,
            r.guest_rate,
            r.m.downtime(),
            r.m.last.iteration,
            r.m.max_throttle,
            r.m.total_s(),
            us(Some(r.stall_before)),
            us(r.stall_after),
            us(r.stall_during),
            us(Some(r.baseline)),
            r.m.status()
        );
    }
    let idle = &dirty_rows[0].1;
    println!(
        "idle guest: source downtime_ms {} (target <= 10 ms: {}); guest max_stall_us after - before = {}",
        idle.m.downtime(),
        match idle.m.last.downtime_ms {
            Some(d) if d <= 10 => "met",
            Some(_) => "NOT met",
            None => "?",
        },
        match idle.stall_after {
            Some(a) => format!("{} us", a as i64 - idle.stall_before as i64),
            None => "?".into(),
        }
    );
    println!("(downtime: source pause -> target RESUMED, ms; stall pre/post: the guest's max_stall_us before the migration / on the target after it; stall migr: longest recent_stall_us of the guest's lines from the migration's start on; baseline: median recent_stall_us before — host scheduling gaps)");

    // ---- 3. scaling
    println!();
    println!("== 3. Scaling over loopback TCP");
    println!(
        "{:<38} {:>10} {:>16} {:>10} {:>10} {:>6} {:>28}  status",
        "guest / connections",
        "RAM MiB",
        "pre-copy MiB/s",
        "total s",
        "downtime",
        "iters",
        "CPU s src vCPU + rest / dst"
    );
    let print_row = |name: &str, filled: u64, m: &Migration| {
        println!(
            "{:<38} {:>10} {:>16} {:>10.2} {:>7} ms {:>6} {:>28}  {}",
            name,
            filled / MIB,
            m.precopy_rate()
                .map_or("?".into(), |r| format!("{:.0}", mib_s(r))),
            m.total_s(),
            m.downtime(),
            m.last.iteration,
            m.cpu(),
            m.status()
        );
    };
    let one_conn_1g = &rows[0].2[0].0;
    println!("-- connections");
    for (part1, tag, snap) in [(0, "counter", &snap_1g), (1, "halted", &snap_idle)] {
        let name = |n: u32| {
            format!(
                "1 GiB {tag}, {n} connection{}",
                if n > 1 { "s" } else { "" }
            )
        };
        print_row(
            &format!("{} (part 1)", name(1)),
            filled_1g,
            &rows[part1].2[0].0,
        );
        for n in [2u32, 4] {
            let m = migrate_snapshot(dir, &format!("c{n}-{tag}"), snap, None, "127.0.0.1", n);
            print_row(&name(n), filled_1g, &m);
        }
    }
    println!("-- guest size");
    let m = migrate_snapshot(dir, "s256", &snap_256m, None, "127.0.0.1", 1);
    print_row("256 MiB, 1 connection", filled_256m, &m);
    print_row("1 GiB, 1 connection (part 1)", filled_1g, one_conn_1g);
    local_downtime(dir, &snap_1g, if quick { 3 } else { 5 });
    for snap in ["snap-counter-1024M", "snap-counter-256M", "snap-idle-1024M"] {
        let _ = std::fs::remove_dir_all(dir.join(snap));
    }
    if quick {
        println!("4 GiB, 1 connection: skipped (SKIFF_BENCH_QUICK)");
    } else {
        let (snap_4g, filled_4g) = filled_snapshot(dir, 4 << 30, FilledGuest::Counter);
        let m = migrate_snapshot_dropping(dir, "s4g", &snap_4g);
        print_row("4 GiB, 1 connection", filled_4g, &m);
    }
    dirty_log_modes(dir, quick);
    println!(
        "\nwhole bench: {:.0} s, load average {} at the end",
        t_start.elapsed().as_secs_f64(),
        loadavg()
    );
}
