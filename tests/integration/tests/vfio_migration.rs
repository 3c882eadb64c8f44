//! Migrating passthrough devices end to end: real `skiff-testdev` processes (the vfio-user test
//! device with the VFIO v2 migration state machine) under a live-migrated and a snapshotted VM.
//! The target always gets new device processes (the receive request names each socket by
//! device id), which take the source devices' state through RESUMING.

use std::path::Path;
use std::time::Duration;

use integration::node::{
    assert_continuous, counters, send_migration, wait_for_counter, Node, DEADLINE,
};
use integration::{remote_ok, temp_dir, wait_for_path, SkiffProcess, TestDevice};

/// The device's log, once it has exited (its client went away).
fn device_log(td: &mut TestDevice) -> String {
    td.wait(Duration::from_secs(30)).1
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
        "scenario=counter counter.every=1",
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
    let over = format!("accel0:socket={}", td_dst.socket.display());
    let (code, out, err) = dst.remote(&["receive-migration", &url, "--override", &over]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out) = send_migration(&src, &url, &[]);
    assert_eq!(
        code,
        Some(0),
        "send-migration failed: {out}\n{}",
        src.process.wait(Duration::from_secs(5)).log()
    );
    let run = src.process.wait(Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{}", run.log());
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
    let o0 = format!("fast0:socket={}", td0_dst.socket.display());
    let o1 = format!("old1:socket={}", td1_dst.socket.display());
    let (code, out, err) = dst.remote(&[
        "receive-migration",
        &url,
        "--override",
        &o0,
        "--override",
        &o1,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out) = send_migration(&src, &url, &[]);
    assert_eq!(code, Some(0), "{out}");
    src.process.wait(Duration::from_secs(30));
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
/// at the first read or mid-stream (a device without pre-copy, whose whole memory is read then), the target device rejecting the data, the target device dying on RESUMING, a
/// cancel during pre-copy — leaves the source VM running and its device back in RUNNING; after
/// the last one, a second attempt to a good target succeeds.
#[test]
fn a_failure_at_each_phase_leaves_the_source_and_its_device_running() {
    // (name, source device faults, target device faults, cancel)
    let cases: &[(&str, &[&str], &[&str], bool)] = &[
        ("precopy-arc", &["--fail-arc", "RUNNING:PRE_COPY"], &[], false),
        ("grace-arc", &["--fail-arc", "PRE_COPY:PRE_COPY_P2P"], &[], false),
        ("stopcopy-arc", &["--fail-arc", "PRE_COPY_P2P:STOP_COPY"], &[], false),
        ("read-error", &["--fail-read-after", "0"], &[], false),
        (
            "read-error-mid-stream",
            &["--migration", "stop-copy,p2p", "--fail-read-after", "65536"],
            &[],
            false,
        ),
        ("target-rejects", &[], &["--reject-resume"], false),
        ("target-dies", &[], &["--exit-on-arc", "STOP:RESUMING"], false),
        ("cancel", &[], &[], true),
    ];
    for (name, src_faults, dst_faults, cancel) in cases {
        let dir = temp_dir(&format!("vfio-mig-fail-{name}"));
        let td = TestDevice::start(&dir, "td-src", src_faults);
        let td_dst = TestDevice::start(&dir, "td-dst", dst_faults);
        let (mut src, serial) = counter_source(&dir, &[(&td, ",id=accel0")]);
        wait_for_counter(&serial, 2);
        let dst = Node::start(&dir, "dst", None, &[]);
        let url = format!("unix:{}", dir.join("mig.sock").display());
        let over = format!("accel0:socket={}", td_dst.socket.display());
        let (code, out, err) = dst.remote(&["receive-migration", &url, "--override", &over]);
        assert_eq!(code, Some(0), "{name}: {out}{err}");
        if *cancel {
            let (code, out, err) = src.remote(&[
                "send-migration",
                &url,
                "--bandwidth-mbps",
                "8",
                "--no-wait",
            ]);
            assert_eq!(code, Some(0), "{name}: {out}{err}");
            std::thread::sleep(Duration::from_millis(1500));
            let (code, out, err) = src.remote(&["migration-cancel"]);
            assert_eq!(code, Some(0), "{name}: {out}{err}");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let (_, p, _) = src.remote(&["migration-progress"]);
                if p.contains("\"cancelled\"") {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{name}: not cancelled: {p}");
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            let (code, out) = send_migration(&src, &url, &[]);
            assert_ne!(code, Some(0), "{name}: the migration succeeded: {out}");
        }
        // The source goes on, its device back in RUNNING.
        let last = counters(&serial).last().copied().unwrap_or(0);
        wait_for_counter(&serial, last + 2);
        assert_continuous(&serial);
        // No state change logged: the device never left RUNNING.
        assert_eq!(
            td.last_state().as_deref().unwrap_or("Running"),
            "Running",
            "{name}: the source device was not brought back to RUNNING:\n{}",
            td.log_now()
        );
        let (_, info, _) = src.remote(&["info"]);
        assert!(info.contains("\"Running\""), "{name}: {info}");
        if *name == "cancel" {
            // A second attempt to a good target (new device process) succeeds.
            let td_good = TestDevice::start(&dir, "td-good", &[]);
            let good = Node::start(&dir, "good", None, &[]);
            let url = format!("unix:{}", dir.join("mig2.sock").display());
            let over = format!("accel0:socket={}", td_good.socket.display());
            let (code, out, err) =
                good.remote(&["receive-migration", &url, "--override", &over]);
            assert_eq!(code, Some(0), "{out}{err}");
            let (code, out) = send_migration(&src, &url, &[]);
            assert_eq!(code, Some(0), "the second attempt failed: {out}");
            src.process.wait(Duration::from_secs(30));
            let last = counters(&serial).last().copied().unwrap_or(0);
            wait_for_counter(&serial, last + 2);
            assert_continuous(&serial);
            remote_ok(&good.api, &["shutdown-vmm"]);
            let mut good = good;
            good.process.wait(Duration::from_secs(30));
        } else {
            remote_ok(&src.api, &["shutdown-vmm"]);
            src.process.wait(Duration::from_secs(30));
        }
        drop(dst);
    }
}
