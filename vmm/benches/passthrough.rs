//! Passthrough (vfio-user) benchmark, figures only — nothing here asserts on time (the host is
//! shared and noisy). One run prints:
//!
//! 1. the cost of one guest access: a trapped testdev BAR 0 register (guest → KVM → skiff →
//!    vfio-user server → reply → guest) next to a virtio ioeventfd kick, a virtio common-config
//!    register skiff emulates in-process, a read of mapped device memory and a guest RAM read;
//! 2. DMA_WRITE requests served per second: device A P2P_WRITEs into device B's BAR 2 (each
//!    command is one DMA_WRITE request to skiff per MiB, forwarded to B as a REGION_WRITE), 4 KiB
//!    and 64 KiB commands, next to plain DMA into guest RAM (through the RAM memfd, no request);
//! 3. interrupt latency device → guest: doorbell write to MSI-X handler entry, against polling
//!    the completion counter;
//! 4. DMA_MAP (and DMA_UNMAP) time of guest RAM, host side only: a memfd-backed guest memory made
//!    by `vmm::memory::create_guest_memory`, mapped into a `skiff-testdev` through
//!    `VfioUserBackend`, for 256 MiB, 1 GiB and 4 GiB.
//!
//! Parts 1-3 run the built-in test guest's `vfio-bench` scenario with two `skiff-testdev`
//! processes and a virtio-rng; the guest measures in TSC cycles and this program converts them
//! with the guest's TSC rate measured against the wall clock (see `tsc_rate`).
//!
//! Run with `cargo bench -p vmm --bench passthrough`. It needs `skiff-testdev` next to `skiff`
//! (target/<profile>/); when it is missing this program builds it with the same profile.
//! `SKIFF_BENCH_QUICK=1` runs fewer iterations; `SKIFF_TESTDEV` points at another binary.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pci::vfio::user::{ClientOptions, VfioUserBackend};
use pci::vfio::{DmaBacking, DmaProt, VfioBackend};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The whole guest run must end within this.
const GUEST_DEADLINE: Duration = Duration::from_secs(150);
/// vfio-user max_data_xfer_size of skiff's client: a DMA_WRITE carries at most this much.
const MAX_XFER: u64 = 1 << 20;
/// Commands the guest keeps in flight in the DMA streams (the device queues 16).
const WINDOW: u32 = 8;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn quick() -> bool {
    std::env::var_os("SKIFF_BENCH_QUICK").is_some()
}

/// A temporary directory removed at the end.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `skiff-testdev` process, killed when dropped.
struct TestDev {
    socket: PathBuf,
    child: Child,
}

impl TestDev {
    fn start(bin: &Path, dir: &Path, id: &str) -> TestDev {
        let socket = dir.join(format!("{id}.sock"));
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--id")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{id}.log"))).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{id}: no socket after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        TestDev { socket, child }
    }
}

impl Drop for TestDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skiff-testdev` of the same profile as `skiff`: next to it, or `SKIFF_TESTDEV`, or built now
/// (`cargo build -p testdev` with the profile and target directory of this build).
fn testdev_bin(skiff: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_TESTDEV") {
        return PathBuf::from(p);
    }
    let bin = skiff.with_file_name("skiff-testdev");
    if bin.exists() {
        return bin;
    }
    let profile_dir = skiff.parent().expect("target/<profile>");
    let profile = profile_dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("release");
    let target_dir = profile_dir.parent().expect("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    println!(
        "{} is missing: building it (`cargo build --profile {} -p testdev`)",
        bin.display(),
        if profile == "debug" { "dev" } else { profile }
    );
    let status = Command::new(&cargo)
        .args(["build", "-p", "testdev", "--profile"])
        .arg(if profile == "debug" { "dev" } else { profile })
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    if !matches!(status, Ok(s) if s.success()) || !bin.exists() {
        eprintln!(
            "passthrough bench: cannot find or build {} ({status:?}).\n\
             Build it first: `cargo build --release -p testdev` (same profile and target \
             directory as the bench), or set SKIFF_TESTDEV=/path/to/skiff-testdev.",
            bin.display()
        );
        std::process::exit(1);
    }
    bin
}

/// One `vfio-bench: <what> key=value ...` line.
#[derive(Debug)]
struct Line {
    what: String,
    kv: HashMap<String, String>,
}

impl Line {
    fn parse(text: &str) -> Option<Line> {
        let rest = text.strip_prefix("vfio-bench: ")?;
        let mut words = rest.split_whitespace();
        let what = words.next()?.to_string();
        let kv = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Line { what, kv })
    }

    fn get(&self, k: &str) -> f64 {
        self.kv
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {k}= in {self:?}"))
    }

    fn kind(&self) -> &str {
        self.kv.get("kind").map(String::as_str).unwrap_or("")
    }
}

/// What the guest run produced.
struct GuestRun {
    lines: Vec<Line>,
    /// `tsc-mark` lines: (guest TSC, when the line arrived here, host TSC then).
    marks: Vec<(u64, Instant, u64)>,
    wall: Duration,
}

/// Run the guest; Err((why, transcript)) when it fails (the device processes are gone then).
fn run_guest(
    skiff: &Path,
    testdev: &Path,
    dir: &Path,
    params: &str,
) -> Result<GuestRun, (String, String)> {
    let a = TestDev::start(testdev, dir, "tda");
    let b = TestDev::start(testdev, dir, "tdb");
    let cmdline = format!("scenario=vfio-bench {params}");
    let t0 = Instant::now();
    let mut child = Command::new(skiff)
        .arg("--rng")
        .arg("--user-device")
        .arg(format!("socket={}", a.socket.display()))
        .arg("--user-device")
        .arg(format!("socket={}", b.socket.display()))
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("skiff.log")).expect("log file"))
        .spawn()
        .expect("spawn skiff");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let (at, host_tsc) = (Instant::now(), rdtsc());
            if tx.send((line, at, host_tsc)).is_err() {
                break;
            }
        }
    });
    let mut run = GuestRun {
        lines: Vec::new(),
        marks: Vec::new(),
        wall: Duration::ZERO,
    };
    let mut transcript = String::new();
    let deadline = t0 + GUEST_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((line, at, host_tsc)) => {
                transcript.push_str(&line);
                transcript.push('\n');
                if let Some(l) = Line::parse(&line) {
                    if l.what == "tsc-mark" {
                        run.marks.push((l.get("tsc") as u64, at, host_tsc));
                    }
                    run.lines.push(l);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let why = format!("the guest did not finish within {GUEST_DEADLINE:?}");
                return Err((why, transcript));
            }
        }
    }
    let status = child.wait().expect("wait skiff");
    run.wall = t0.elapsed();
    if !status.success() || !transcript.contains("result: PASS") {
        return Err((format!("skiff exited with {status}"), transcript));
    }
    Ok(run)
}

/// Print why the guest run failed, with every log, and exit 1 (`dir` is left for inspection).
fn fail(why: &str, transcript: &str, dir: &Path) -> ! {
    let log = std::fs::read_to_string(dir.join("skiff.log")).unwrap_or_default();
    eprintln!(
        "passthrough bench: {why} (logs in {})\n--- guest output ---\n{transcript}--- skiff log ---\n{log}",
        dir.display()
    );
    for id in ["tda", "tdb", "tdmap"] {
        if let Ok(l) = std::fs::read_to_string(dir.join(format!("{id}.log"))) {
            eprintln!("--- {id} log ---\n{l}");
        }
    }
    std::process::exit(1);
}

/// The guest's TSC rate (Hz) and how it was found.
///
/// The guest prints its TSC at the start and at the end of the run (`tsc-mark`); the rate is
/// the TSC difference over the wall-clock time between the two lines' arrival here. Both lines
/// have the same length and path (COM1 → skiff's unbuffered stdout → this pipe), so their
/// delivery delay cancels out; over tens of seconds the jitter is far below 0.1 %. The host's
/// own TSC over the same interval and CPUID 0x15/0x16 (when the host passes them through) are
/// printed as cross-checks.
fn tsc_rate(run: &GuestRun) -> (f64, String) {
    let (g0, i0, h0) = run.marks[0];
    let (g1, i1, h1) = run.marks[run.marks.len() - 1];
    let secs = (i1 - i0).as_secs_f64();
    let guest = (g1 - g0) as f64 / secs;
    let host = (h1 - h0) as f64 / secs;
    let mut how = format!(
        "guest rdtsc against this process's wall clock between the guest's first and last \
         tsc-mark lines ({secs:.1} s apart): {:.4} GHz;\n     cross-checks: host rdtsc over the same \
         interval {:.4} GHz ({:+.0} ppm)",
        guest / 1e9,
        host / 1e9,
        (host / guest - 1.0) * 1e6
    );
    if let Some(c) = run.lines.iter().find(|l| l.what == "cpuid") {
        let (den, num, hz) = (
            c.get("leaf15_denominator"),
            c.get("leaf15_numerator"),
            c.get("leaf15_crystal_hz"),
        );
        let mhz = c.get("leaf16_base_mhz");
        if den > 0.0 && num > 0.0 && hz > 0.0 {
            how += &format!(", CPUID 0x15 {:.4} GHz", hz * num / den / 1e9);
        } else {
            how += ", CPUID 0x15 gives no crystal frequency";
        }
        if mhz > 0.0 {
            how += &format!(", CPUID 0x16 base {mhz} MHz");
        }
    }
    (guest, how)
}

fn ns(cycles: f64, hz: f64) -> f64 {
    cycles / hz * 1e9
}

fn print_guest(run: &GuestRun, hz: f64) {
    let find = |what: &str, kind: &str| {
        run.lines
            .iter()
            .find(|l| l.what == what && l.kind() == kind)
    };
    let any = run.lines.iter().find(|l| l.what == "access");
    let (n, batches) = any
        .map(|l| (l.get("n"), l.get("batches")))
        .unwrap_or_default();
    println!();
    println!(
        "1. one guest access, cycles and ns per access (median / mean / min over {batches} batches of {n})"
    );
    println!(
        "   {:<52} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "", "median", "mean", "min", "median ns", "mean ns"
    );
    let rows = [
        (
            "ram-read",
            "guest RAM read (the floor: emulated guest code)",
        ),
        ("bar2-read", "testdev BAR 2 read (mapped device memory)"),
        (
            "virtio-common-read",
            "virtio common-config read (skiff, in-process)",
        ),
        ("virtio-kick", "virtio queue notify (ioeventfd kick)"),
        (
            "testdev-reg-read",
            "testdev BAR 0 REG_MAGIC read (vfio-user)",
        ),
        (
            "testdev-reg-write",
            "testdev BAR 0 REG_SEED write (vfio-user)",
        ),
    ];
    let mut med = HashMap::new();
    for (kind, name) in rows {
        let Some(l) = find("access", kind) else {
            println!("   {name:<52} (not measured)");
            continue;
        };
        let (m, a, lo) = (l.get("median"), l.get("mean"), l.get("min"));
        med.insert(kind, m);
        println!(
            "   {name:<52} {m:>9.0} {a:>9.0} {lo:>9.0}   {:>9.0} {:>9.0}",
            ns(m, hz),
            ns(a, hz)
        );
    }
    if let (Some(v), Some(c), Some(k)) = (
        med.get("testdev-reg-read"),
        med.get("virtio-common-read"),
        med.get("virtio-kick"),
    ) {
        println!(
            "   ratios (medians): vfio-user register read = {:.1}x the in-process register read, \
             {:.1}x the ioeventfd kick; in-process read = {:.1}x the kick",
            v / c,
            v / k,
            c / k
        );
    }

    println!();
    println!(
        "2. DMA command streams (at most {WINDOW} commands in flight; requests = DMA_WRITEs to skiff, \
         commands x ceil(len / 1 MiB))"
    );
    println!(
        "   {:<44} {:>6} {:>9} {:>10} {:>13} {:>9}",
        "", "cmds", "ms", "cmds/s", "DMA_WRITE/s", "MB/s"
    );
    let mut mbs = HashMap::new();
    for l in run.lines.iter().filter(|l| l.what == "dma") {
        let (len, cmds, cycles) = (l.get("len"), l.get("cmds"), l.get("cycles"));
        let secs = cycles / hz;
        let p2p = l.kind() == "p2p";
        let requests = if p2p {
            cmds * (len / MAX_XFER as f64).ceil()
        } else {
            0.0
        };
        let mb = cmds * len / secs / 1e6;
        mbs.insert((l.kind().to_string(), len as u64), mb);
        let name = if p2p {
            format!("P2P_WRITE A -> B's BAR 2, {} KiB", len as u64 / 1024)
        } else {
            format!("WRITE_PATTERN into guest RAM, {} KiB", len as u64 / 1024)
        };
        println!(
            "   {name:<44} {cmds:>6.0} {:>9.1} {:>10.0} {:>13} {mb:>9.1}",
            secs * 1e3,
            cmds / secs,
            if p2p {
                format!("{:.0}", requests / secs)
            } else {
                "- (direct)".into()
            }
        );
        if p2p {
            println!(
                "   {:<44} (B counted {} REGION_WRITEs from skiff, A wrote {} bytes)",
                "",
                l.get("peer_writes"),
                l.get("dma_written")
            );
        }
    }
    for len in [4096u64, 65536] {
        if let (Some(p), Some(r)) = (
            mbs.get(&("p2p".to_string(), len)),
            mbs.get(&("ram".to_string(), len)),
        ) {
            println!(
                "   {} KiB: P2P through skiff reaches {:.0} % of the direct-DMA throughput",
                len / 1024,
                p / r * 100.0
            );
        }
    }

    println!();
    let irq = find("irq", "msix");
    let n = irq.map(|l| l.get("n")).unwrap_or_default();
    println!("3. device -> guest completion of an 8-byte WRITE_PATTERN, from the doorbell write ({n} each)");
    println!(
        "   {:<52} {:>9} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "", "median", "mean", "min", "max", "median us", "mean us"
    );
    for (kind, name) in [
        ("msix", "doorbell -> MSI-X handler entry"),
        ("poll", "doorbell -> REG_COMPLETED changed (polled)"),
        (
            "doorbell-write",
            "the doorbell write alone (no interrupt enabled)",
        ),
    ] {
        if let Some(l) = find("irq", kind) {
            let (m, a) = (l.get("median"), l.get("mean"));
            println!(
                "   {name:<52} {m:>9.0} {a:>9.0} {:>9.0} {:>9.0}   {:>9.1} {:>9.1}",
                l.get("min"),
                l.get("max"),
                ns(m, hz) / 1e3,
                ns(a, hz) / 1e3
            );
        }
    }
    if let (Some(i), Some(p)) = (find("irq", "msix"), find("irq", "poll")) {
        println!(
            "   interrupt / polling (medians): {:.2}x",
            i.get("median") / p.get("median")
        );
    }
}

/// Median of `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Part 4: DMA_MAP/DMA_UNMAP of guest RAM into a `skiff-testdev`.
fn dma_map_times(testdev: &Path, dir: &Path) {
    let td = TestDev::start(testdev, dir, "tdmap");
    let backend =
        VfioUserBackend::connect(&td.socket, ClientOptions::default()).expect("connect testdev");
    let reps = if quick() { 3 } else { 7 };
    println!();
    println!(
        "4. DMA_MAP / DMA_UNMAP of memfd-backed guest RAM into a skiff-testdev (host side, median of {reps})"
    );
    println!(
        "   {:<10} {:>8} {:>12} {:>12} {:>12}",
        "RAM", "regions", "map ms", "unmap ms", "map GiB/s"
    );
    for (name, size) in [
        ("256 MiB", 256u64 << 20),
        ("1 GiB", 1 << 30),
        ("4 GiB", 4 << 30),
    ] {
        let (mem, _file) = vmm::memory::create_guest_memory(size).expect("guest memory");
        let rw = DmaProt {
            read: true,
            write: true,
        };
        let (mut map, mut unmap) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            for r in mem.iter() {
                let fo = r.file_offset().expect("file-backed");
                backend
                    .dma_map(
                        r.start_addr().0,
                        r.len(),
                        DmaBacking::Memory {
                            fd: fo.file().as_fd(),
                            offset: fo.start(),
                            host_addr: r.as_ptr() as u64,
                        },
                        rw,
                    )
                    .expect("DMA_MAP");
            }
            map.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            for r in mem.iter() {
                backend
                    .dma_unmap(r.start_addr().0, r.len())
                    .expect("DMA_UNMAP");
            }
            unmap.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let m = median(&mut map);
        println!(
            "   {name:<10} {:>8} {m:>12.3} {:>12.3} {:>12.0}",
            mem.num_regions(),
            median(&mut unmap),
            size as f64 / (1u64 << 30) as f64 / (m / 1e3)
        );
    }
    println!("   (the server mmaps the memfd per region: the cost is per mapping, not per byte)");
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let skiff = PathBuf::from(env!("CARGO_BIN_EXE_skiff"));
    let testdev = testdev_bin(&skiff);
    let dir = TempDir(std::env::temp_dir().join(format!("skiff-bench-pt-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let started = Instant::now();
    let params = format!(
        "{} vb.window={WINDOW}",
        if quick() {
            "vb.n=100 vb.batches=5 vb.cmds_4k=200 vb.cmds_64k=100 vb.irqs=100 vb.calib_ms=500"
        } else {
            "vb.n=1000 vb.batches=20 vb.cmds_4k=2000 vb.cmds_64k=1000 vb.irqs=1000 vb.calib_ms=2000"
        }
    );
    println!("skiff passthrough benchmark (vfio-user)");
    println!("  skiff:         {}", skiff.display());
    println!("  skiff-testdev: {}", testdev.display());
    println!(
        "  guest: built-in test guest, scenario=vfio-bench {params}; 1 vCPU, 512 MiB, \
         two skiff-testdev (A = 00:01.0, B = 00:02.0) + virtio-rng"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        println!(
            "  note: this host's KVM emulates guest kernel code (kvm_pvm): every guest instruction \
             is slow, so guest-side figures are upper bounds dominated by emulation"
        );
    }
    let run = run_guest(&skiff, &testdev, &dir.0, &params)
        .unwrap_or_else(|(why, transcript)| fail(&why, &transcript, &dir.0));
    let (hz, how) = tsc_rate(&run);
    println!(
        "  guest run: {:.1} s wall clock; TSC {:.4} GHz from {how}",
        run.wall.as_secs_f64(),
        hz / 1e9
    );
    print_guest(&run, hz);
    dma_map_times(&testdev, &dir.0);
    println!();
    println!("whole benchmark: {:.1} s", started.elapsed().as_secs_f64());
}
