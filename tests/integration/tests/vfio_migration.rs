//! Migrating passthrough devices end to end: real `skiff-testdev` processes (the vfio-user test
//! device with the VFIO v2 migration state machine) under a live-migrated and a snapshotted VM.
//! The target always gets new device processes (the receive request names each socket by
//! device id), which take the source devices' state through RESUMING.

use std::path::Path;
use std::time::Duration;

use integration::node::{
    assert_continuous, counters, send_migration, wait_for_counter, Node, DEADLINE,
};
use integration::{remote_ok, temp_dir, wait_for_path, SkiffProcess, TestDevice, TwoHosts};

/// The device's log, once it has exited (its client went away).
fn device_log(td: &mut TestDevice) -> String {
    td.wait(Duration::from_secs(30)).1
}

/// `dst` receives on `url` with its devices' sockets (`(id, socket)`), `src` sends there and
/// must succeed and exit 0; returns send-migration's output and the source's log (stderr).
fn migrate(src: &mut Node, dst: &Node, url: &str, sockets: &[(&str, &Path)]) -> (String, String) {
    let mut args = vec!["receive-migration".to_string(), url.to_string()];
    for (id, socket) in sockets {
        args.push("--override".into());
        args.push(format!("{id}:socket={}", socket.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = dst.remote(&args);
    assert_eq!(code, Some(0), "receive-migration: {out}{err}");
    let (code, out) = send_migration(src, url, &[]);
    assert_eq!(
        code,
        Some(0),
        "send-migration failed: {out}\n{}",
        src.process.wait(Duration::from_secs(5)).log()
    );
    let run = src.process.wait(Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{}", run.log());
    (out, run.stderr)
}

/// A source running the `counter` guest with one `--user-device` per `(device, options)`.
fn counter_source(dir: &Path, devices: &[(&TestDevice, &str)]) -> (Node, std::path::PathBuf) {
    let serial = dir.join("serial.log");
    let serial_arg = format!("file={}", serial.display());
    let mut args: Vec<String> = [
        "--memory",
        "size=128M",
        "--serial",
        &serial_arg,
        "--cmdline",
        // 8 MiB of non-zero RAM: empty RAM is skipped, and the cancel case needs a pre-copy
        // that lasts (8 s at its 8 Mbit/s limit).
        "scenario=counter counter.every=1 counter.fill_mb=8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (td, extra) in devices {
        args.push("--user-device".into());
        args.push(td.option(extra));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Node::start(dir, "src", None, &args), serial)
}

/// One device migrates with its VM to a new device process; the guest goes on counting, and
/// the new device went through RESUMING and is RUNNING.
#[test]
fn a_passthrough_device_migrates_to_a_new_device_process() {
    let dir = temp_dir("vfio-mig-one");
    let mut td_src = TestDevice::start(&dir, "td-src", &[]);
    let mut td_dst = TestDevice::start(&dir, "td-dst", &[]);
    let (mut src, serial) = counter_source(&dir, &[(&td_src, ",id=accel0")]);
    wait_for_counter(&serial, 3);
    let dst = Node::start(&dir, "dst", None, &[]);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    migrate(&mut src, &dst, &url, &[("accel0", &td_dst.socket)]);
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    let (code, info, _) = dst.remote(&["counters"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&info).expect("counters JSON");
    assert_eq!(v["accel0"]["failed"], 0, "{info}");
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let mut dst = dst;
    let run = dst.process.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
    let log = device_log(&mut td_dst);
    for arc in [
        "Running -> RunningP2p",
        "Stop -> Resuming",
        "Resuming -> Stop",
    ] {
        assert!(
            log.contains(arc),
            "the target device never took {arc}:\n{log}"
        );
    }
    let log = device_log(&mut td_src);
    assert!(
        log.contains("-> StopCopy"),
        "the source device was never stopped for copy:\n{log}"
    );
}

/// Two devices, one without the P2P quiescent state: migration is refused with a message
/// naming it and the remedy, and the VM keeps running; with `p2p=off` on it, it migrates.
#[test]
fn a_device_without_p2p_needs_p2p_off_to_migrate() {
    let dir = temp_dir("vfio-mig-nop2p");
    let td0 = TestDevice::start(&dir, "td0", &[]);
    let td1 = TestDevice::start(&dir, "td1", &["--migration", "stop-copy"]);
    let (mut src, serial) = counter_source(&dir, &[(&td0, ",id=fast0"), (&td1, ",id=old1")]);
    wait_for_counter(&serial, 2);
    let url = format!("unix:{}", dir.join("never.sock").display());
    let (code, out) = send_migration(&src, &url, &[]);
    assert_ne!(code, Some(0), "the migration was not refused: {out}");
    assert!(
        out.contains("old1") && out.contains("p2p=off"),
        "the refusal does not name the device and the remedy: {out}"
    );
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 2);
    remote_ok(&src.api, &["shutdown-vmm"]);
    src.process.wait(Duration::from_secs(30));

    // The same devices, the old one with p2p=off: it migrates.
    let dir = temp_dir("vfio-mig-p2poff");
    let td0 = TestDevice::start(&dir, "td0", &[]);
    let td1 = TestDevice::start(&dir, "td1", &["--migration", "stop-copy"]);
    let td0_dst = TestDevice::start(&dir, "td0-dst", &[]);
    let td1_dst = TestDevice::start(&dir, "td1-dst", &["--migration", "stop-copy"]);
    let (mut src, serial) =
        counter_source(&dir, &[(&td0, ",id=fast0"), (&td1, ",id=old1,p2p=off")]);
    wait_for_counter(&serial, 2);
    let dst = Node::start(&dir, "dst", None, &[]);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    migrate(
        &mut src,
        &dst,
        &url,
        &[("fast0", &td0_dst.socket), ("old1", &td1_dst.socket)],
    );
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 2);
    assert_continuous(&serial);
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let mut dst = dst;
    dst.process.wait(Duration::from_secs(30));
}

/// Snapshot a VM with a passthrough device, kill everything, restore with a new device process:
/// the guest goes on from the snapshot.
#[test]
fn snapshot_kill_restore_with_a_new_device_process() {
    let dir = temp_dir("vfio-snap");
    let mut td = TestDevice::start(&dir, "td0", &[]);
    let (mut src, serial) = counter_source(&dir, &[(&td, ",id=accel0")]);
    wait_for_counter(&serial, 3);
    remote_ok(&src.api, &["pause"]);
    let snap = dir.join("snap");
    remote_ok(
        &src.api,
        &["snapshot", &format!("file://{}", snap.display())],
    );
    let at_pause = counters(&serial).last().copied().unwrap_or(0);
    src.process.signal("KILL");
    src.process.wait(Duration::from_secs(10));
    td.kill();
    // A new device process on the same socket path.
    let _td2 = TestDevice::start(&dir, "td0", &[]);
    let api = dir.join("restored.sock");
    let mut restored = SkiffProcess::spawn(&[
        "--api-socket",
        api.to_str().unwrap(),
        "--restore",
        &format!("source_url=file://{},resume=on", snap.display()),
    ]);
    wait_for_path(&api, Duration::from_secs(30));
    let deadline = std::time::Instant::now() + DEADLINE;
    while counters(&serial).last().copied().unwrap_or(0) < at_pause + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored guest did not go on from {at_pause}:\n{}\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default(),
            restored.stdout_now()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    remote_ok(&api, &["shutdown-vmm"]);
    let run = restored.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

/// A failure at each phase of a passthrough migration — the source device refusing the arc into
/// PRE_COPY, into PRE_COPY_P2P (the grace step) or into STOP_COPY, its STOP_COPY data failing
/// at the first read or mid-stream (a device without pre-copy, whose whole memory is read then),
/// the target device rejecting the data, the target device dying on RESUMING, a cancel during
/// pre-copy — leaves the source VM running and its devices back in RUNNING, and loses no DMA:
/// the `vfio-migrate` guest's two devices stream sequence numbers into guest RAM and into each
/// other's BAR throughout, and after the failure the guest finds no gap or duplicate in any of
/// them and no device counted a violation. After the cancel, a second attempt to a good target
/// succeeds, with the same verdict.
#[test]
fn a_failure_at_each_phase_leaves_the_source_and_its_device_running() {
    // (name, source dev0 faults, target dev0 faults, cancel)
    let cases: &[(&str, &[&str], &[&str], bool)] = &[
        (
            "precopy-arc",
            &["--fail-arc", "RUNNING:PRE_COPY"],
            &[],
            false,
        ),
        (
            "grace-arc",
            &["--fail-arc", "PRE_COPY:PRE_COPY_P2P"],
            &[],
            false,
        ),
        (
            "stopcopy-arc",
            &["--fail-arc", "PRE_COPY_P2P:STOP_COPY"],
            &[],
            false,
        ),
        ("read-error", &["--fail-read-after", "0"], &[], false),
        (
            "read-error-mid-stream",
            &["--migration", "stop-copy,p2p", "--fail-read-after", "65536"],
            &[],
            false,
        ),
        ("target-rejects", &[], &["--reject-resume"], false),
        (
            "target-dies",
            &[],
            &["--exit-on-arc", "STOP:RESUMING"],
            false,
        ),
        ("cancel", &[], &[], true),
    ];
    for (name, src_faults, dst_faults, cancel) in cases {
        let dir = temp_dir(&format!("vfio-mig-fail-{name}"));
        let srcs = [
            TestDevice::start(&dir, "src0", src_faults),
            TestDevice::start(&dir, "src1", &[]),
        ];
        let dsts = [
            TestDevice::start(&dir, "dst0", dst_faults),
            TestDevice::start(&dir, "dst1", &[]),
        ];
        // Long enough for the failure and, after the cancel, the second migration; the rings
        // of the cancel case fill 1 MiB of RAM so its pre-copy at 8 Mbit/s outlasts the cancel.
        let params = if *cancel {
            format!("vfio_migrate.seconds=20 vfio_migrate.ring=65536 {STREAM_PARAMS}")
        } else {
            format!("vfio_migrate.seconds=6 {STREAM_PARAMS}")
        };
        let refs: Vec<&TestDevice> = srcs.iter().collect();
        let (mut src, serial) = vfio_migrate_source(&dir, None, &refs, "", &params, &[]);
        wait_serial(&serial, "vfio-migrate: t=1 ");
        let dst = Node::start(&dir, "dst", None, &[]);
        let url = format!("unix:{}", dir.join("mig.sock").display());
        receive(&dst, &url, &dsts, name);
        attempt_failing_migration(&src, &url, *cancel, name);
        assert_streaming(&serial, name);
        // The source goes on, its devices back in RUNNING.
        let (_, info, _) = src.remote(&["info"]);
        assert!(info.contains("\"Running\""), "{name}: {info}");
        for td in &srcs {
            // No state change logged: the device never left RUNNING.
            assert_eq!(
                td.last_state().as_deref().unwrap_or("Running"),
                "Running",
                "{name}: a source device was not brought back to RUNNING:\n{}",
                td.log_now()
            );
        }
        let mut devices: Vec<&TestDevice> = srcs.iter().collect();
        let good_devs;
        let good = if *cancel {
            // A second attempt to a good target (new device processes) succeeds.
            good_devs = [
                TestDevice::start(&dir, "good0", &[]),
                TestDevice::start(&dir, "good1", &[]),
            ];
            let good = Node::start(&dir, "good", None, &[]);
            let url = format!("unix:{}", dir.join("mig2.sock").display());
            let _ = migrate(&mut src, &good, &url, &sockets_of(&good_devs));
            devices.extend(good_devs.iter());
            Some(good)
        } else {
            None
        };
        // The guest streams on to its verdict: no write lost or duplicated by the failure.
        let text = wait_serial(&serial, "result: ");
        assert_no_lost_write_by(&text, &devices, name);
        match good {
            Some(good) => {
                remote_ok(&good.api, &["shutdown-vmm"]);
                let mut good = good;
                good.process.wait(Duration::from_secs(30));
            }
            None => {
                remote_ok(&src.api, &["shutdown-vmm"]);
                src.process.wait(Duration::from_secs(30));
            }
        }
        drop(dst);
    }
}

/// The `(id, socket)` overrides that give the guest's `dev0`, `dev1`, ... these devices.
fn sockets_of(devices: &[TestDevice]) -> Vec<(&str, &Path)> {
    const IDS: [&str; 2] = ["dev0", "dev1"];
    IDS.iter()
        .copied()
        .zip(devices.iter().map(|td| td.socket.as_path()))
        .collect()
}

/// `dst` receives on `url`, the guest's devices going to `devices`.
fn receive(dst: &Node, url: &str, devices: &[TestDevice], name: &str) {
    let mut args = vec!["receive-migration".to_string(), url.to_string()];
    for (id, socket) in sockets_of(devices) {
        args.push("--override".into());
        args.push(format!("{id}:socket={}", socket.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = dst.remote(&args);
    assert_eq!(code, Some(0), "{name}: {out}{err}");
}

/// A migration from `src` to `url` that must fail, or with `cancel` one cancelled during its
/// pre-copy (paced to 8 Mbit/s); returns once the source says so.
fn attempt_failing_migration(src: &Node, url: &str, cancel: bool, name: &str) {
    if !cancel {
        let (code, out) = send_migration(src, url, &[]);
        assert_ne!(code, Some(0), "{name}: the migration succeeded: {out}");
        return;
    }
    let (code, out, err) =
        src.remote(&["send-migration", url, "--bandwidth-mbps", "8", "--no-wait"]);
    assert_eq!(code, Some(0), "{name}: {out}{err}");
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out, err) = src.remote(&["migration-cancel"]);
    assert_eq!(code, Some(0), "{name}: {out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, p, _) = src.remote(&["migration-progress"]);
        if p.contains("\"cancelled\"") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: not cancelled: {p}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The failure is over while the guest still streams: its verdict covers the streams across
/// the failure (and the recovery), not only before it.
fn assert_streaming(serial: &Path, name: &str) {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(
        !text.contains("vfio-migrate: final check"),
        "{name}: the guest stopped its streams before the failure was over (lengthen vfio_migrate.seconds):\n{text}"
    );
}

/// The `vfio-migrate` guest on a source whose two devices stream DMA sequence numbers into
/// guest RAM and peer-to-peer into each other's BAR2; `extra` is appended to each device's
/// `--user-device` options and `params` to the guest command line.
fn vfio_migrate_source(
    dir: &Path,
    ns: Option<&str>,
    devices: &[&TestDevice],
    extra: &str,
    params: &str,
    env: &[(&str, &str)],
) -> (Node, std::path::PathBuf) {
    let serial = dir.join("serial.log");
    let serial_arg = format!("file={}", serial.display());
    let seconds = if params.contains("vfio_migrate.seconds=") {
        ""
    } else {
        "vfio_migrate.seconds=30"
    };
    let cmdline = format!(
        "scenario=vfio-migrate vfio_migrate.devices={} {seconds} {params}",
        devices.len()
    );
    let mut args: Vec<String> = [
        "--memory",
        "size=128M",
        "--serial",
        &serial_arg,
        "--cmdline",
        &cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, td) in devices.iter().enumerate() {
        args.push("--user-device".into());
        args.push(td.option(&format!(",id=dev{i}{extra}")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Node::start_env(dir, "src", ns, &args, env), serial)
}

/// Wait until the serial file contains `needle` (failing with the file on a FAIL or timeout).
fn wait_serial(serial: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            !text.contains("result: FAIL") && !text.contains("PANIC"),
            "the guest failed before {needle:?}:\n{text}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} from the guest:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The violation counters the guest printed, per device.
fn violations(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("vfio-migrate: violations"))
        .map(str::to_string)
        .collect()
}

/// What [`migrate_streaming_guest`] saw.
struct Streamed {
    /// The guest's serial output.
    text: String,
    /// send-migration's output.
    out: String,
    /// The source's log.
    src_log: String,
    /// The source devices, then the target devices.
    devices: Vec<TestDevice>,
}

/// Migrate the `vfio-migrate` guest with two devices (fresh device processes on the target)
/// and wait for its verdict. `params` go before the common [`STREAM_PARAMS`] (the first of a
/// key wins).
fn migrate_streaming_guest(
    name: &str,
    hosts: Option<&TwoHosts>,
    extra: &str,
    params: &str,
    env: &[(&str, &str)],
) -> Streamed {
    let testdev_args: &[&str] = &[];
    let dir = temp_dir(name);
    let srcs: Vec<TestDevice> = (0..2)
        .map(|i| TestDevice::start(&dir, &format!("src{i}"), testdev_args))
        .collect();
    let dsts: Vec<TestDevice> = (0..2)
        .map(|i| TestDevice::start(&dir, &format!("dst{i}"), testdev_args))
        .collect();
    let (ns_a, ns_b) = match hosts {
        Some(h) => (Some(h.a.as_str()), Some(h.b.as_str())),
        None => (None, None),
    };
    let refs: Vec<&TestDevice> = srcs.iter().collect();
    let params = format!("{params} {STREAM_PARAMS}");
    let (mut src, serial) = vfio_migrate_source(&dir, ns_a, &refs, extra, &params, env);
    let dst = Node::start(&dir, "dst", ns_b, &[]);
    wait_serial(&serial, "vfio-migrate: t=1 ");
    let url = match hosts {
        Some(_) => format!("tcp:{}:6100", TwoHosts::B_ADDR),
        None => format!("unix:{}", dir.join("mig.sock").display()),
    };
    let ids: Vec<String> = (0..dsts.len()).map(|i| format!("dev{i}")).collect();
    let sockets: Vec<(&str, &Path)> = ids
        .iter()
        .zip(&dsts)
        .map(|(id, td)| (id.as_str(), td.socket.as_path()))
        .collect();
    let (out, src_log) = migrate(&mut src, &dst, &url, &sockets);
    let text = wait_serial(&serial, "result: ");
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let mut dst = dst;
    dst.process.wait(Duration::from_secs(30));
    let mut devices = srcs;
    devices.extend(dsts);
    Streamed {
        text,
        out,
        src_log,
        devices,
    }
}

/// The headline: two devices streaming DMA into guest RAM and P2P into each other's BARs are
/// migrated between two network-namespace hosts. Afterwards no sequence has a gap or a
/// duplicate (in RAM or in either BAR) and no device, source or target, counted a violation.
#[test]
fn streaming_devices_migrate_between_hosts_without_losing_a_write() {
    let hosts = match TwoHosts::create("vfmig") {
        Ok(h) => h,
        Err(why) => return integration::skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let Streamed {
        text, out, devices, ..
    } = migrate_streaming_guest("vfio-mig-stream", Some(&hosts), "", "", &[]);
    assert_no_lost_write(&text, &devices);
    eprintln!(
        "vfio-migrate: {} | {}",
        out.lines().last().unwrap_or(""),
        text.lines()
            .find(|l| l.contains("longest stall"))
            .unwrap_or("")
    );
}

/// The `vfio-migrate` guest verified every sequence and no device counted a violation.
fn assert_no_lost_write(text: &str, devices: &[TestDevice]) {
    assert_no_lost_write_by(text, &devices.iter().collect::<Vec<_>>(), "");
}

/// [`assert_no_lost_write`] for the devices of case `name`.
fn assert_no_lost_write_by(text: &str, devices: &[&TestDevice], name: &str) {
    assert!(
        text.contains("vfio-migrate: ok ") && text.contains("result: PASS"),
        "{name}: the guest found a lost or stale write:\n{text}"
    );
    let v = violations(text);
    assert_eq!(v.len(), 2, "{name}: {text}");
    assert!(v.iter().all(|l| l.contains("total=0")), "{name}: {v:?}");
    for td in devices {
        let log = td.log_now();
        assert!(
            !log.contains("violation"),
            "{name}: a device counted a violation:\n{log}"
        );
    }
}

/// The stream parameters of every streaming test: a write every 20 µs per device, so a device
/// stopped while a peer still streams is certain to miss a write.
const STREAM_PARAMS: &str = "vfio_migrate.period_us=20";

/// The same migration with the P2P grace step skipped (a test-only knob): the devices' violation
/// counters see peer writes that arrived after a device was stopped — the bug the grace step
/// prevents, caught.
#[test]
fn without_the_grace_step_the_devices_count_lost_writes() {
    let Streamed { text, devices, .. } = migrate_streaming_guest(
        "vfio-mig-nograce",
        None,
        ",pre_copy=off",
        "vfio_migrate.violations_ok=1",
        &[("SKIFF_TEST_SKIP_P2P_GRACE", "1")],
    );
    // Counted by the guest (what travelled with the devices' state) or by the source devices
    // after their state was read (their logs).
    let v = violations(&text);
    assert_eq!(v.len(), 2, "{text}");
    let by_guest: u64 = v
        .iter()
        .filter_map(|l| {
            l.split("late_peer=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let logs: Vec<String> = devices.iter().map(TestDevice::log_now).collect();
    let by_devices = logs
        .iter()
        .map(|l| l.matches("violation: late peer write").count())
        .sum::<usize>();
    eprintln!("without the grace step: {by_guest} late peer write(s) seen by the guest, {by_devices} logged by the devices");
    assert!(
        by_guest > 0 || by_devices > 0,
        "no late peer write counted without the grace step:\n{text}\n{}",
        logs.join("\n")
    );
}

/// The counterpart of the test above with the grace step: the same STOP_COPY-only devices
/// (`pre_copy=off`: their whole memory is read after they stop) lose nothing.
#[test]
fn stop_copy_only_devices_lose_no_write_with_the_grace_step() {
    let Streamed { text, devices, .. } =
        migrate_streaming_guest("vfio-mig-stopcopy", None, ",pre_copy=off", "", &[]);
    assert_no_lost_write(&text, &devices);
}

/// Devices behind the virtio-iommu migrate and keep DMA-ing through the same IOVAs (the
/// target replays the IOMMU's mappings into each new device's DMA space). The devices' DMA
/// dirty logs are used (over IOVA space, translated through the guest's mappings), not "all
/// RAM again after the stop". The rings are large and written slowly enough never to wrap
/// (16384 slots, one write per ms, 14 s): a ring page the device wrote after it was last sent
/// and that the final pass missed — a wrong translation of the log — keeps stale slots on the
/// target that nothing rewrites, and the guest's final check finds them. Meanwhile each device
/// also writes 400 fresh pages, one every 10 ms or so, through one IOVA window the guest maps to
/// the page before and unmaps after (`vfio_migrate.remap_pages`): a page whose mapping was gone
/// (or moved on) when the log was read must still be sent.
#[test]
fn devices_behind_the_iommu_migrate_and_keep_their_iovas() {
    let Streamed {
        text,
        out,
        src_log,
        devices,
    } = migrate_streaming_guest(
        "vfio-mig-iommu",
        None,
        ",iommu=on",
        "vfio_migrate.iommu=1 vfio_migrate.ring=16384 vfio_migrate.period_us=1000 vfio_migrate.seconds=14 vfio_migrate.remap_pages=400 vfio_migrate.remap_ms=10",
        &[],
    );
    eprintln!(
        "vfio-migrate behind the vIOMMU: {}",
        out.lines().last().unwrap_or("")
    );
    assert_no_lost_write(&text, &devices);
    assert!(
        text.contains("dma 0x1000000000"),
        "not through IOVAs:\n{text}"
    );
    // The remapping went on across the migration (it starts after the `t=1` line).
    let remap_at_t2 = text
        .lines()
        .find(|l| l.starts_with("vfio-migrate: t=2 "))
        .and_then(|l| l.split(" remap=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        remap_at_t2.is_some_and(|n| n < 400),
        "the remapping writes were over before the migration (remap={remap_at_t2:?}):\n{text}"
    );
    assert!(
        !src_log.contains("no DMA dirty logging"),
        "a device fell back to re-sending all RAM:\n{src_log}"
    );
    for dev in ["dev0", "dev1"] {
        assert!(
            src_log
                .lines()
                .any(|l| l.contains(&format!("{dev}: DMA dirty logging on"))
                    && l.contains("translated through the vIOMMU")),
            "{dev} did not log its DMA over IOVA space:\n{src_log}"
        );
    }
    let finals: Vec<&str> = src_log
        .lines()
        .filter(|l| l.contains("DMA log after the stop"))
        .collect();
    assert!(!finals.is_empty(), "no final DMA log sync:\n{src_log}");
    eprintln!("vfio-migrate behind the vIOMMU: {finals:?}");
}

/// Snapshot the streaming guest with two devices, kill the VM and both device processes,
/// restore with new device processes on the same sockets: the sequences continue with no lost
/// or stale write and no violation.
#[test]
fn snapshot_kill_restore_continues_the_device_sequences() {
    let dir = temp_dir("vfio-snap-stream");
    let mut srcs: Vec<TestDevice> = (0..2)
        .map(|i| TestDevice::start(&dir, &format!("td{i}"), &[]))
        .collect();
    let refs: Vec<&TestDevice> = srcs.iter().collect();
    let params = format!("{STREAM_PARAMS} vfio_migrate.seconds=20");
    let (mut src, serial) = vfio_migrate_source(&dir, None, &refs, "", &params, &[]);
    wait_serial(&serial, "vfio-migrate: t=1 ");
    remote_ok(&src.api, &["pause"]);
    let snap = dir.join("snap");
    remote_ok(
        &src.api,
        &["snapshot", &format!("file://{}", snap.display())],
    );
    src.process.signal("KILL");
    src.process.wait(Duration::from_secs(10));
    for td in &mut srcs {
        td.kill();
    }
    let news: Vec<TestDevice> = (0..2)
        .map(|i| TestDevice::start(&dir, &format!("td{i}"), &[]))
        .collect();
    let api = dir.join("restored.sock");
    let mut restored = SkiffProcess::spawn(&[
        "--api-socket",
        api.to_str().unwrap(),
        "--restore",
        &format!("source_url=file://{},resume=on", snap.display()),
    ]);
    wait_for_path(&api, Duration::from_secs(30));
    let text = wait_serial(&serial, "result: ");
    assert_no_lost_write(&text, &news);
    remote_ok(&api, &["shutdown-vmm"]);
    let run = restored.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

/// The link between two hosts cut while a device's STOP_COPY data is on its way (64 MiB devices
/// without pre-copy, over a link paced to 40 Mbit/s): the source notices, brings its devices
/// back to RUNNING and resumes the guest. The `vfio-migrate` guest's two devices stream into
/// guest RAM and into each other's BAR throughout: after the failure no sequence has a gap or a
/// duplicate and no device counted a violation.
#[test]
fn a_link_cut_during_stop_copy_leaves_the_source_and_its_device_running() {
    let hosts = match TwoHosts::create("vfcut") {
        Ok(h) => h,
        Err(why) => return integration::skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let dir = temp_dir("vfio-mig-cut");
    // Both 64 MiB (the guest expects one BAR size), the first filled.
    let big = ["--memory-mib", "64", "--fill-memory", "7"];
    let srcs = [
        TestDevice::start(&dir, "src0", &big),
        TestDevice::start(&dir, "src1", &big[..2]),
    ];
    let dsts = [
        TestDevice::start(&dir, "dst0", &big[..2]),
        TestDevice::start(&dir, "dst1", &big[..2]),
    ];
    let refs: Vec<&TestDevice> = srcs.iter().collect();
    let params = format!("vfio_migrate.seconds=10 vfio.mem_size=0x4000000 {STREAM_PARAMS}");
    let (src, serial) =
        vfio_migrate_source(&dir, Some(&hosts.a), &refs, ",pre_copy=off", &params, &[]);
    let dst = Node::start(&dir, "dst", Some(&hosts.b), &[]);
    wait_serial(&serial, "vfio-migrate: t=1 ");
    let url = format!("tcp:{}:6101", TwoHosts::B_ADDR);
    receive(&dst, &url, &dsts, "link cut");
    let (code, out, err) = src.remote(&[
        "send-migration",
        &url,
        "--downtime-ms",
        "600000",
        "--bandwidth-mbps",
        "40",
        "--no-wait",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Wait until the big device is in STOP_COPY, then cut.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !srcs[0].log_now().contains("-> StopCopy") {
        let (_, p, _) = src.remote(&["migration-progress"]);
        assert!(!p.contains("\"failed\""), "the migration failed early: {p}");
        assert!(
            std::time::Instant::now() < deadline,
            "never in STOP_COPY: {p}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.cut();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, p, _) = src.remote(&["migration-progress"]);
        if p.contains("\"failed\"") {
            break;
        }
        assert!(
            !p.contains("\"completed\""),
            "the migration completed although the link was cut: {p}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the source did not notice the cut: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, info, _) = src.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    for td in &srcs {
        assert_eq!(
            td.last_state().as_deref(),
            Some("Running"),
            "a source device was not brought back:\n{}",
            td.log_now()
        );
    }
    // The guest streams on to its verdict: nothing lost or duplicated across the cut.
    let text = wait_serial(&serial, "result: ");
    assert_no_lost_write(&text, &srcs);
    remote_ok(&src.api, &["shutdown-vmm"]);
}
