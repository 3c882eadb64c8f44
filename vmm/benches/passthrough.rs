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
//! The guest part runs `SKIFF_BENCH_RUNS` times (default 3, a fresh VM and devices each time) and
//! prints medians over the runs with their spread. `SKIFF_BENCH_QUICK=1` runs one short guest
//! run; `SKIFF_TESTDEV` points at another `skiff-testdev` binary.

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

mod support;
use support::{loadavg, quick, TempDir};

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
        "guest rdtsc against this process's wall clock over the {secs:.2} s between the guest's \
         first and last tsc-mark lines;\n     cross-checks: host rdtsc over the same interval \
         {:.4} GHz ({:+.0} ppm)",
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

/// One row over all runs: each run's line of `what`/`kind`, with that run's TSC rate.
struct Row<'a> {
    lines: Vec<(&'a Line, f64)>,
}

impl Row<'_> {
    fn find<'a>(runs: &'a [(GuestRun, f64)], what: &str, kind: &str) -> Option<Row<'a>> {
        let lines: Vec<(&Line, f64)> = runs
            .iter()
            .filter_map(|(r, hz)| {
                r.lines
                    .iter()
                    .find(|l| l.what == what && l.kind() == kind)
                    .map(|l| (l, *hz))
            })
            .collect();
        (!lines.is_empty()).then_some(Row { lines })
    }

    /// `f` of every run (cycles converted by `f` itself with the run's TSC rate).
    fn each(&self, f: impl Fn(&Line, f64) -> f64) -> Vec<f64> {
        self.lines.iter().map(|(l, hz)| f(l, *hz)).collect()
    }

    /// Median over the runs of field `k`, in ns.
    fn ns(&self, k: &str) -> f64 {
        median(&mut self.each(|l, hz| l.get(k) / hz * 1e9))
    }

    /// Median over the runs of field `k`, in cycles.
    fn cycles(&self, k: &str) -> f64 {
        median(&mut self.each(|l, _| l.get(k)))
    }

    /// `lo-hi` of the runs' values of `f` (formatted with `prec` decimals), or `-` for one run.
    fn spread(&self, prec: usize, f: impl Fn(&Line, f64) -> f64) -> String {
        let v = self.each(f);
        if v.len() < 2 {
            return "-".into();
        }
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(f64::MIN, f64::max);
        format!("{lo:.prec$}-{hi:.prec$}")
    }
}

fn print_guest(runs: &[(GuestRun, f64)]) {
    let nruns = runs.len();
    let first = &runs[0].0;
    let any = first.lines.iter().find(|l| l.what == "access");
    let (n, batches) = any
        .map(|l| (l.get("n"), l.get("batches")))
        .unwrap_or_default();
    println!();
    println!(
        "1. one guest access (per access; median/mean over {batches} batches of {n} in each run, \
         then the median over the {nruns} runs; \"runs\": the runs' medians, lo-hi)"
    );
    println!(
        "   {:<50} {:>9} {:>9} {:>9} {:>9} {:>15}",
        "", "median", "mean", "min", "cycles", "runs ns"
    );
    println!(
        "   {:<50} {:>9} {:>9} {:>9} {:>9}",
        "", "ns", "ns", "ns", "median"
    );
    let rows = [
        ("ram-read", "guest RAM read (floor: emulated guest code)"),
        ("bar2-read", "testdev BAR 2 read (mapped device memory)"),
        ("virtio-common-read", "virtio common-config read (in skiff)"),
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
        let Some(r) = Row::find(runs, "access", kind) else {
            println!("   {name:<50} (not measured)");
            continue;
        };
        let m = r.ns("median");
        med.insert(kind, m);
        let lo = r
            .each(|l, hz| l.get("min") / hz * 1e9)
            .into_iter()
            .fold(f64::MAX, f64::min);
        println!(
            "   {name:<50} {m:>9.0} {:>9.0} {lo:>9.0} {:>9.0} {:>15}",
            r.ns("mean"),
            r.cycles("median"),
            r.spread(0, |l, hz| l.get("median") / hz * 1e9)
        );
    }
    if let (Some(v), Some(c), Some(k)) = (
        med.get("testdev-reg-read"),
        med.get("virtio-common-read"),
        med.get("virtio-kick"),
    ) {
        println!(
            "   ratios (medians): vfio-user register read = {:.1}x the in-skiff register read \
             = {:.1}x the ioeventfd kick; in-skiff read = {:.1}x the kick",
            v / c,
            v / k,
            c / k
        );
    }

    println!();
    println!(
        "2. DMA command streams, at most {WINDOW} commands in flight (median over the runs; \
         requests = DMA_WRITEs to skiff = commands x ceil(len / 1 MiB))"
    );
    println!(
        "   {:<40} {:>6} {:>9} {:>9} {:>12} {:>8} {:>13}",
        "", "cmds", "ms", "cmds/s", "DMA_WRITE/s", "MB/s", "runs MB/s"
    );
    let mut mbs = HashMap::new();
    for len in [4096.0f64, 65536.0] {
        for kind in ["p2p", "ram"] {
            let Some(r) = runs
                .iter()
                .map(|(g, hz)| {
                    g.lines
                        .iter()
                        .find(|l| l.what == "dma" && l.kind() == kind && l.get("len") == len)
                        .map(|l| (l, *hz))
                })
                .collect::<Option<Vec<_>>>()
                .map(|lines| Row { lines })
            else {
                continue;
            };
            let cmds = r.cycles("cmds");
            let secs = r.cycles("cycles") / r.lines[0].1;
            let per_s = median(&mut r.each(|l, hz| l.get("cmds") / (l.get("cycles") / hz)));
            let mb_of = |l: &Line, hz: f64| l.get("cmds") * len / (l.get("cycles") / hz) / 1e6;
            let mb = median(&mut r.each(mb_of));
            mbs.insert((kind, len as u64), mb);
            let p2p = kind == "p2p";
            let name = if p2p {
                format!("P2P_WRITE A -> B's BAR 2, {} KiB", len as u64 / 1024)
            } else {
                format!("WRITE_PATTERN to guest RAM, {} KiB", len as u64 / 1024)
            };
            let requests = if p2p {
                format!("{:.0}", per_s * (len / MAX_XFER as f64).ceil())
            } else {
                "- (direct)".into()
            };
            println!(
                "   {name:<40} {cmds:>6.0} {:>9.1} {per_s:>9.0} {requests:>12} {mb:>8.1} {:>13}",
                secs * 1e3,
                r.spread(1, mb_of)
            );
            if p2p {
                let l = r.lines[0].0;
                println!(
                    "   {:<40} (run 1: B counted {} REGION_WRITEs from skiff, A wrote {} bytes)",
                    "",
                    l.get("peer_writes"),
                    l.get("dma_written")
                );
            }
        }
    }
    for len in [4096u64, 65536] {
        if let (Some(p), Some(r)) = (mbs.get(&("p2p", len)), mbs.get(&("ram", len))) {
            println!(
                "   {} KiB: P2P through skiff = {:.0} % of the direct-DMA throughput",
                len / 1024,
                p / r * 100.0
            );
        }
    }

    println!();
    let n = Row::find(runs, "irq", "msix")
        .map(|r| r.cycles("n"))
        .unwrap_or_default();
    println!(
        "3. completion of an 8-byte WRITE_PATTERN into guest RAM, from the doorbell write \
         ({n} per run; median over the runs)"
    );
    println!(
        "   {:<50} {:>9} {:>9} {:>9} {:>9} {:>15}",
        "", "median", "mean", "min", "max", "runs us"
    );
    println!(
        "   {:<50} {:>9} {:>9} {:>9} {:>9}",
        "", "us", "us", "us", "us"
    );
    for (kind, name) in [
        ("msix", "doorbell -> MSI-X handler entry"),
        ("poll", "doorbell -> REG_COMPLETED changed (polled)"),
        ("doorbell-write", "the doorbell write alone (no interrupt)"),
    ] {
        if let Some(r) = Row::find(runs, "irq", kind) {
            println!(
                "   {name:<50} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>15}",
                r.ns("median") / 1e3,
                r.ns("mean") / 1e3,
                r.ns("min") / 1e3,
                r.ns("max") / 1e3,
                r.spread(1, |l, hz| l.get("median") / hz * 1e6)
            );
        }
    }
    if let (Some(i), Some(p)) = (
        Row::find(runs, "irq", "msix"),
        Row::find(runs, "irq", "poll"),
    ) {
        println!(
            "   interrupt / polling (medians): {:.2}x",
            i.ns("median") / p.ns("median")
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
        "   {:<10} {:>8} {:>12} {:>12} {:>16}",
        "RAM", "regions", "map ms", "unmap ms", "map us/region"
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
            "   {name:<10} {:>8} {m:>12.3} {:>12.3} {:>16.1}",
            mem.num_regions(),
            median(&mut unmap),
            m * 1e3 / mem.num_regions() as f64
        );
    }
    println!(
        "   (one DMA_MAP per RAM region, with the memfd; the server mmaps it lazily: the cost is \
         per mapping, not per byte)"
    );
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
         two skiff-testdev (A, B) + virtio-rng; a fresh VM and devices per run"
    );
    println!(
        "  host: {} CPUs, 1-minute load average {} at the start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        println!(
            "  note: this host's KVM emulates guest kernel code (kvm_pvm): every guest instruction \
             is slow, so guest-side figures are upper bounds dominated by emulation"
        );
    }
    let nruns: usize = std::env::var("SKIFF_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick() { 1 } else { 3 })
        .max(1);
    let mut runs = Vec::new();
    for i in 0..nruns {
        let run = run_guest(&skiff, &testdev, &dir.0, &params)
            .unwrap_or_else(|(why, transcript)| fail(&why, &transcript, &dir.0));
        let (hz, how) = tsc_rate(&run);
        println!(
            "  guest run {}: {:.1} s wall clock; TSC {:.4} GHz: {how}",
            i + 1,
            run.wall.as_secs_f64(),
            hz / 1e9
        );
        if i == 0 {
            if let Some(d) = run.lines.iter().find(|l| l.what == "devices") {
                println!(
                    "  devices: testdev A at {}, B at {}",
                    d.kv.get("a").map(String::as_str).unwrap_or("?"),
                    d.kv.get("b").map(String::as_str).unwrap_or("?")
                );
            }
        }
        runs.push((run, hz));
    }
    print_guest(&runs);
    dma_map_times(&testdev, &dir.0);
    println!();
    println!(
        "whole benchmark: {:.1} s; 1-minute load average {} at the end",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
