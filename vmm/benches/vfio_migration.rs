//! Passthrough migration downtime benchmark, figures only — nothing here asserts on time (the
//! host is shared, 2 cores, noisy). Real `skiff` processes (source and target, each with
//! `--api-socket`, driven through `api_server::client`) and real `skiff-testdev` processes (a
//! new one per device on the target, named by `--override`-style receive overrides). One run
//! prints:
//!
//! 1. One device, an idle guest (`scenario=counter`, 128 MiB of RAM), the device memory (BAR 2)
//!    of 4, 8, 16, 64 and 256 MiB, with PRE_COPY (the default) against STOP_COPY only
//!    (`pre_copy=off` on the `--user-device`): the source's `downtime_ms` (pause → target
//!    RESUMED, from `vm.migration-progress`), the ratio and the cut PRE_COPY brings, and the
//!    bytes the device produced on entering STOP_COPY (its log line `STOP_COPY: state saved
//!    (... N bytes to read)`). skiff carries the STOP_COPY data in the switch-over's STATE
//!    frame, which holds at most 16 MiB: from 16 MiB of device memory on STOP_COPY only fails,
//!    and the row says so; 4 and 8 MiB are there to compare the two modes at all.
//! 2. Two devices of 64 MiB each with PRE_COPY, and for reference the same idle guest without
//!    devices.
//!
//! The device memory is really sent: the source devices start with `--fill-memory SEED` (BAR 2
//! filled with the WRITE_PATTERN bytes of SEED by the device process at start; the test guest
//! could only fill it slowly through the BAR on this emulating host). The testdev stream sends
//! every 4 KiB chunk whatever its bytes, so zeroes would cost the same; the fill keeps the figure
//! honest against any zero-page shortcut on the way. Every migration goes over loopback TCP with
//! one connection and a downtime limit of 60 s, the same for both modes, so that the planner
//! never refuses a STOP_COPY-only switch-over for its expected downtime (the device's STOP_COPY
//! size counts in it; with the default 300 ms a large one would give up, as it should).
//!
//! Run with `cargo bench -p vmm --bench vfio_migration` (about 2 minutes). It builds
//! `skiff-testdev` next to `skiff` (target/<profile>/, the same profile) first; `SKIFF_TESTDEV`
//! points at another binary. `SKIFF_BENCH_QUICK=1` does only 16 and 64 MiB in part 1.
//! `SKIFF_BENCH_KEEP=1` keeps the directory with every log (skiff's own need `SKIFF_LOG=info`
//! or `debug`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::migration::{
    DeviceOverride, MigrationPhase, MigrationProgress, MigrationUrl, ReceiveMigrationRequest,
    SendMigrationRequest,
};

mod support;
use support::{free_port, loadavg, quick, wait_for, Skiff, TempDir};

/// Guest RAM of every VM.
const GUEST_RAM: &str = "size=128M";
/// One migration (or guest boot) must end within this.
const DEADLINE: Duration = Duration::from_secs(120);
/// The downtime limit of every migration (see the module comment).
const DOWNTIME_LIMIT_MS: u64 = 60_000;
/// What PRE_COPY should cut from the STOP_COPY-only downtime.
const TARGET_CUT_PERCENT: f64 = 70.0;

/// `skiff-testdev` of the same profile as `skiff`, built (or found fresh) by `cargo build -p
/// testdev` with the profile and target directory of this build; `SKIFF_TESTDEV` names another.
fn testdev_bin(skiff: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_TESTDEV") {
        return PathBuf::from(p);
    }
    let bin = skiff.with_file_name("skiff-testdev");
    let knows_memory = |bin: &Path| {
        Command::new(bin)
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--memory-mib"))
    };
    let profile_dir = skiff.parent().expect("target/<profile>");
    let profile = match profile_dir.file_name().and_then(|s| s.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => "release",
    };
    let target_dir = profile_dir.parent().expect("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    // Always through cargo (a no-op when it is fresh): a stale binary would measure old code.
    let status = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "testdev",
            "--bin",
            "skiff-testdev",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    if !matches!(status, Ok(s) if s.success()) && knows_memory(&bin) {
        println!(
            "building skiff-testdev failed ({status:?}); using {}",
            bin.display()
        );
    } else if !knows_memory(&bin) {
        eprintln!(
            "vfio_migration bench: cannot find or build {} ({status:?}).\n\
             Build it first: `cargo build --release -p testdev` (same profile and target \
             directory as the bench), or set SKIFF_TESTDEV=/path/to/skiff-testdev.",
            bin.display()
        );
        std::process::exit(1);
    }
    bin
}

/// A `skiff-testdev` process, killed when dropped (it exits by itself when its VMM goes).
struct TestDev {
    id: String,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

impl TestDev {
    /// Starts device `name` with `mib` MiB of device memory, filled with `fill`'s pattern.
    fn start(bin: &Path, dir: &Path, name: &str, id: &str, mib: u64, fill: Option<u32>) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--id", name, "--memory-mib", &mib.to_string()]);
        if let Some(seed) = fill {
            cmd.args(["--fill-memory", &seed.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        wait_for(&format!("{name}: socket"), Duration::from_secs(30), || {
            socket.exists()
        });
        TestDev {
            id: id.into(),
            socket,
            log,
            child,
        }
    }

    /// Milliseconds of the day at which the device logged its last line containing `what`
    /// (the test device logs with millisecond timestamps: `[2026-12-06T11:12:13.743Z ...`).
    fn logged_at(&self, what: &str) -> Option<u64> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text.lines().rev().find(|l| l.contains(what))?;
        let time = line.split('T').nth(1)?.split('Z').next()?;
        let (hms, millis) = time.split_once('.')?;
        let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
        let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
        Some(((h * 60 + m) * 60 + s) * 1000 + millis.parse::<u64>().ok()?)
    }

    /// N of the device's `STOP_COPY: state saved (..., N bytes to read)` log line.
    fn stop_copy_bytes(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("STOP_COPY: state saved"))?;
        let before = line.split(" bytes to read").next()?;
        before.rsplit(' ').next()?.parse().ok()
    }
}

impl Drop for TestDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Last `counter: N` value on the guest's serial output.
fn last_counter(serial: &Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("counter: "))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one migration measured.
struct Outcome {
    progress: MigrationProgress,
    /// Each source device's STOP_COPY bytes (from its log), in device order.
    stop_copy_bytes: Vec<Option<u64>>,
    /// The first device's arcs inside the downtime, from its two processes' logs.
    arcs: Option<DeviceArcs>,
    error: Option<String>,
}

/// Where the first device's share of the downtime went, from the test devices' logs (ms).
struct DeviceArcs {
    /// Source device: from the grace state (RUNNING_P2P / PRE_COPY_P2P) to STOP.
    source_stop: u64,
    /// From the source device's STOP to the target device's RESUMING -> STOP: the rest of the
    /// stream, and the target device applying its state and memory.
    to_target_loaded: u64,
    /// Target device: from STOP to RUNNING (through RUNNING_P2P).
    target_run: u64,
}

impl DeviceArcs {
    fn read(src: &TestDev, dst: &TestDev) -> Option<Self> {
        let grace = src
            .logged_at("-> PreCopyP2p")
            .or_else(|| src.logged_at("-> RunningP2p"))?;
        let stopped = src.logged_at("StopCopy -> Stop")?;
        let loaded = dst.logged_at("Resuming -> Stop")?;
        let running = dst.logged_at("RunningP2p -> Running")?;
        Some(DeviceArcs {
            source_stop: stopped.checked_sub(grace)?,
            to_target_loaded: loaded.checked_sub(stopped)?,
            target_run: running.checked_sub(loaded)?,
        })
    }

    fn show(a: Option<&DeviceArcs>) -> String {
        a.map_or_else(
            || "?".into(),
            |a| {
                format!(
                    "{} + {} + {}",
                    a.source_stop, a.to_target_loaded, a.target_run
                )
            },
        )
    }
}

impl Outcome {
    fn downtime(&self) -> Option<u64> {
        self.progress.downtime_ms.filter(|_| self.error.is_none())
    }
}

/// Migrates `src` to `tgt` over loopback TCP, the target's devices named by `overrides`;
/// follows the source's progress to the end. `Err` when it did not complete.
fn migrate(
    src: &mut Skiff,
    tgt: &Skiff,
    overrides: BTreeMap<String, DeviceOverride>,
) -> Result<MigrationProgress, String> {
    let url = MigrationUrl::parse(&format!("tcp:127.0.0.1:{}", free_port())).expect("url");
    let mut recv = ReceiveMigrationRequest::new(url.clone());
    recv.overrides = overrides;
    tgt.client()
        .receive_migration(&recv)
        .map_err(|e| format!("receive-migration: {e}"))?;
    let mut req = SendMigrationRequest::new(url);
    req.downtime_limit_ms = DOWNTIME_LIMIT_MS;
    let client = src.client();
    client
        .send_migration(&req)
        .map_err(|e| format!("send-migration: {e}"))?;
    let end = Instant::now() + DEADLINE;
    let last = loop {
        match client.migration_progress() {
            Ok(p) if p.phase.is_final() => break p,
            Ok(_) => {}
            Err(e) => return Err(format!("progress: {e}\n{}", src.log_tail())),
        }
        if Instant::now() > end {
            let _ = client.migration_cancel();
            return Err(format!("not finished within {DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if last.phase != MigrationPhase::Completed {
        return Err(format!("phase {:?}: {:?}", last.phase, last.error));
    }
    if !src.wait_exit(Duration::from_secs(15)) {
        return Err("the migrated source did not exit".into());
    }
    match tgt.client().info() {
        Ok(info) if format!("{:?}", info.state) == "Running" => Ok(last),
        Ok(info) => Err(format!("target state {:?}", info.state)),
        Err(e) => Err(format!("target info: {e}\n{}", tgt.log_tail())),
    }
}

/// One device of a case: its memory in MiB and whether PRE_COPY is used.
#[derive(Clone, Copy)]
struct Dev {
    mib: u64,
    pre_copy: bool,
}

/// Boots an idle `counter` guest with `devs` (source devices filled), migrates it to a new
/// skiff with new device processes, and reports what it measured.
fn run_case(testdev: &Path, dir: &Path, tag: &str, devs: &[Dev]) -> Outcome {
    let case = dir.join(tag);
    std::fs::create_dir_all(&case).expect("case directory");
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let id = format!("td{i}");
        let seed = 0x5eed_0000 + i as u32;
        sources.push(TestDev::start(
            testdev,
            &case,
            &format!("{id}-src"),
            &id,
            d.mib,
            Some(seed),
        ));
        targets.push(TestDev::start(
            testdev,
            &case,
            &format!("{id}-dst"),
            &id,
            d.mib,
            None,
        ));
    }
    let serial = case.join("serial.log");
    let mut args: Vec<String> = [
        "--memory",
        GUEST_RAM,
        "--serial",
        &format!("file={}", serial.display()),
        "--cmdline",
        "scenario=counter counter.every=1",
    ]
    .map(String::from)
    .to_vec();
    for (td, d) in sources.iter().zip(devs) {
        args.push("--user-device".into());
        let pre = if d.pre_copy { "" } else { ",pre_copy=off" };
        args.push(format!("socket={},id={}{pre}", td.socket.display(), td.id));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Skiff::spawn(&case, "src", None, &args);
    wait_for("the guest counting", DEADLINE, || {
        last_counter(&serial) >= 2
    });
    let tgt = Skiff::spawn(&case, "dst", None, &[]);
    let overrides = targets
        .iter()
        .map(|t| {
            let o = DeviceOverride {
                socket: Some(t.socket.clone()),
                ..DeviceOverride::default()
            };
            (t.id.clone(), o)
        })
        .collect();
    let res = migrate(&mut src, &tgt, overrides);
    let stop_copy_bytes = sources.iter().map(TestDev::stop_copy_bytes).collect();
    let arcs = sources
        .first()
        .zip(targets.first())
        .and_then(|(s, t)| DeviceArcs::read(s, t));
    let mut out = Outcome {
        progress: MigrationProgress::default(),
        stop_copy_bytes,
        arcs,
        error: None,
    };
    match res {
        Ok(p) => {
            out.progress = p;
            // The guest goes on counting on the target.
            let n = last_counter(&serial);
            let end = Instant::now() + Duration::from_secs(30);
            while last_counter(&serial) <= n && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if last_counter(&serial) <= n {
                out.error = Some("the guest did not go on counting on the target".into());
            }
        }
        Err(e) => out.error = Some(e),
    }
    out
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v} ms"))
}

/// Bytes, as bytes below 1 MiB and as MiB above.
fn bytes(v: Option<u64>) -> String {
    match v {
        None => "?".into(),
        Some(b) if b < 1 << 20 => format!("{b} B"),
        Some(b) => format!("{:.2} MiB", b as f64 / (1 << 20) as f64),
    }
}

/// Seconds from send-migration to completed (`-` when it failed).
fn total_s(o: &Outcome) -> String {
    match o.error {
        None => format!("{:.1}", o.progress.elapsed_ms as f64 / 1e3),
        Some(_) => "-".into(),
    }
}

/// `ok`, or why the migration failed (skiff's frame limit shortened to the figures).
fn status(o: &Outcome) -> String {
    match &o.error {
        None => "ok".into(),
        Some(e) if e.contains("a frame holds at most") => {
            let n = e
                .split("STATE: ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok());
            format!("FAILED: STATE of {} > 16 MiB frame", bytes(n))
        }
        Some(e) => format!("FAILED: {e}"),
    }
}

/// Part 1: one device of each size, PRE_COPY against STOP_COPY only.
fn part_one(testdev: &Path, dir: &Path, sizes: &[u64]) {
    println!(
        "== 1. One device, idle guest: device downtime, PRE_COPY against STOP_COPY only (pre_copy=off)"
    );
    println!(
        "{:>8} {:>13} {:>13} {:>7} {:>9} {:>6} {:>28} {:>15} {:>22}  status",
        "BAR2",
        "PRE_COPY",
        "STOP_COPY",
        "ratio",
        "cut",
        "≥70 %",
        "STOP_COPY bytes (pre / off)",
        "total s",
        "PRE_COPY arcs ms"
    );
    for &size in sizes {
        let pre = run_case(
            testdev,
            dir,
            &format!("pre{size}"),
            &[Dev {
                mib: size,
                pre_copy: true,
            }],
        );
        let off = run_case(
            testdev,
            dir,
            &format!("off{size}"),
            &[Dev {
                mib: size,
                pre_copy: false,
            }],
        );
        let (ratio, cut, met) = match (pre.downtime(), off.downtime()) {
            (Some(p), Some(o)) if o > 0 => {
                let cut = 100.0 * (o as f64 - p as f64) / o as f64;
                (
                    format!("{:.2}", p as f64 / o as f64),
                    format!("{cut:.1} %"),
                    if cut >= TARGET_CUT_PERCENT {
                        "met"
                    } else {
                        "NOT"
                    },
                )
            }
            _ => ("?".into(), "?".into(), "?"),
        };
        println!(
            "{:>4} MiB {:>13} {:>13} {:>7} {:>9} {:>6} {:>28} {:>15} {:>22}  {} / {}",
            size,
            ms(pre.downtime()),
            ms(off.downtime()),
            ratio,
            cut,
            met,
            format!(
                "{} / {}",
                bytes(pre.stop_copy_bytes[0]),
                bytes(off.stop_copy_bytes[0])
            ),
            format!("{} / {}", total_s(&pre), total_s(&off)),
            DeviceArcs::show(pre.arcs.as_ref()),
            status(&pre),
            status(&off)
        );
    }
    println!("(downtime: the source's downtime_ms, pause -> target RESUMED; ratio: PRE_COPY / STOP_COPY only; cut: what PRE_COPY saves, target >= {TARGET_CUT_PERCENT:.0} %; STOP_COPY bytes: what the source device produced on entering STOP_COPY, from its log; total: send-migration to completed, PRE_COPY / off; PRE_COPY arcs, from the devices' logs: source grace state -> STOP + source STOP -> target RESUMING->STOP done (the rest of the stream and the target device applying its memory) + target STOP -> RUNNING)");
}

/// Part 2: two devices with PRE_COPY, and no device at all.
fn part_two(testdev: &Path, dir: &Path) {
    println!();
    println!(
        "== 2. Whole downtime: two devices of 64 MiB with PRE_COPY; the guest without devices"
    );
    println!(
        "{:<34} {:>10} {:>32} {:>8}  status",
        "VM", "downtime", "STOP_COPY bytes per device", "total s"
    );
    let d = Dev {
        mib: 64,
        pre_copy: true,
    };
    let two = run_case(testdev, dir, "two64", &[d, d]);
    let none = run_case(testdev, dir, "none", &[]);
    for (name, o) in [("2 x 64 MiB, PRE_COPY", &two), ("no device", &none)] {
        let bytes: Vec<String> = o.stop_copy_bytes.iter().map(|b| bytes(*b)).collect();
        println!(
            "{:<34} {:>10} {:>32} {:>8}  {}",
            name,
            ms(o.downtime()),
            if bytes.is_empty() {
                "-".into()
            } else {
                bytes.join(" / ")
            },
            total_s(o),
            status(o)
        );
    }
}

fn main() {
    let t_start = Instant::now();
    let skiff = PathBuf::from(env!("CARGO_BIN_EXE_skiff"));
    let testdev = testdev_bin(&skiff);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = TempDir(base.join(format!("skiff-bench-vfio-mig-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("bench directory");
    println!(
        "skiff passthrough migration bench (load average {} at start, {} CPUs{})",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick() { ", SKIFF_BENCH_QUICK" } else { "" }
    );
    println!(
        "  skiff: {}\n  skiff-testdev: {}\n  guest: scenario=counter, {GUEST_RAM} RAM; loopback TCP, 1 connection, downtime limit {DOWNTIME_LIMIT_MS} ms; source device memory filled (--fill-memory)",
        skiff.display(),
        testdev.display()
    );
    println!();
    // 4 and 8 MiB: STOP_COPY-only data that fits one STATE frame (16 MiB), for a comparison.
    let sizes: &[u64] = if quick() {
        &[16, 64]
    } else {
        &[4, 8, 16, 64, 256]
    };
    part_one(&testdev, &dir.0, sizes);
    part_two(&testdev, &dir.0);
    println!(
        "\nwhole bench: {:.0} s, load average {} at the end",
        t_start.elapsed().as_secs_f64(),
        loadavg()
    );
}
