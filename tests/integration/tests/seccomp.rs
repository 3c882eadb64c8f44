//! Seccomp: every thread of a running VM carries a filter by default (its own on top of the one
//! it inherited), a forbidden syscall in any thread kind is reported with the thread and the
//! syscall number and ends the process, and `--seccomp false|log|junk` behave as documented.
//! (The rest of the suite runs with the default, so every error path it exercises runs under
//! the filters too.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::{remote, run_command, temp_dir, wait_for_path, Run, SkiffProcess, TestDevice};

const DEADLINE: Duration = Duration::from_secs(300);
/// getppid: what the test knob makes a thread call (`sandbox::PROVOKED_SYSCALL`).
const GETPPID: u32 = 110;
/// 128 + SIGSYS: skiff's status after a seccomp violation.
const EXIT_SECCOMP: i32 = 159;

/// (name, seccomp mode, filter count) of every thread of process `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {status}"))
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

/// A 1 MiB disk image in `dir`; its `--disk` option (id `disk0`).
fn disk(dir: &Path) -> String {
    let path = dir.join("disk0.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    format!("path={},id=disk0", path.display())
}

/// The guest that activates the virtio-blk disk (whose worker then starts) and then waits.
const GUEST: &str = "scenario=dirty-log";
/// What it prints once the disk is active.
const READY: &str = "dirty: ready";

/// A VM with an API socket, two vCPUs, a virtio-blk disk in use (its worker running) and a
/// vfio-user device.
fn start_vm(dir: &Path, dev: &TestDevice, extra: &[&str]) -> SkiffProcess {
    let api = dir.join("api.sock");
    let mut args: Vec<String> = [
        "--api-socket",
        api.to_str().unwrap(),
        "--cpus",
        "boot=2",
        "--disk",
        &disk(dir),
        "--user-device",
        &dev.option(",id=dev0"),
        "--cmdline",
        GUEST,
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = SkiffProcess::spawn(&args);
    p.wait_for_output(READY, DEADLINE);
    p
}

#[test]
fn every_thread_has_its_own_filter_by_default() {
    let dir = temp_dir("seccomp-default");
    let dev = TestDevice::start(&dir, "dev0", &[]);
    let mut p = start_vm(&dir, &dev, &[]);
    let threads = threads(p.pid());
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for expected in [
        "skiff",
        "vcpu0",
        "vcpu1",
        "skiff-api",
        "blk-disk0",
        "vfio-user-rx",
        "vfio-user-dma",
    ] {
        assert!(
            names.contains(&expected),
            "no {expected} thread in {threads:?}"
        );
    }
    for (name, mode, filters) in &threads {
        assert_eq!(
            *mode, 2,
            "thread {name} is not in seccomp filter mode: {threads:?}"
        );
        // The control thread has its own filter; every other thread adds its kind's filter to
        // the one it inherited.
        let least = if name == "skiff" { 1 } else { 2 };
        assert!(
            *filters >= least,
            "thread {name} has {filters} filter(s), expected at least {least}: {threads:?}"
        );
    }
    p.signal("TERM");
    let run = p.wait(Duration::from_secs(60));
    run.assert_code(128 + 15);
}

#[test]
fn seccomp_false_runs_without_filters_and_junk_is_refused() {
    let dir = temp_dir("seccomp-off");
    let dev = TestDevice::start(&dir, "dev0", &[]);
    let mut p = start_vm(&dir, &dev, &["--seccomp", "false"]);
    let threads = threads(p.pid());
    assert!(
        threads.iter().all(|t| t.1 == 0),
        "--seccomp false left a filter: {threads:?}"
    );
    p.signal("TERM");
    let run = p.wait(Duration::from_secs(60));
    run.assert_code(128 + 15);
    assert!(
        run.stderr
            .contains("--seccomp false: skiff runs without seccomp filters"),
        "{}",
        run.log()
    );

    let run = integration::run_skiff(&["--seccomp", "maybe"], Duration::from_secs(30));
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("--seccomp \"maybe\": expected true, false or log"),
        "{}",
        run.log()
    );
}

/// Run a VM whose `kind` threads make a forbidden syscall; returns how it ended.
fn provoke(kind: &str, dir: &Path, dev: &TestDevice) -> Run {
    let api = dir.join(format!("{kind}.sock"));
    let mut cmd = Command::new(integration::skiff_bin());
    cmd.env("SKIFF_TEST_FORBIDDEN_SYSCALL", kind)
        .arg("--api-socket")
        .arg(&api)
        .args(["--disk", &disk(dir), "--cmdline", GUEST])
        .arg("--user-device")
        .arg(dev.option(",id=dev0"));
    run_command(&mut cmd, DEADLINE)
}

/// `run` ended on a violation reported for one of `threads` (the first of them to start) with
/// `kind`'s filter.
fn assert_reported(run: &Run, threads: &[&str], kind: &str) {
    assert_reported_as(run, threads, kind, &format!("{GETPPID}; exiting"));
}

/// [`assert_reported`] for a violation reported as `what` (after "made the forbidden syscall ").
fn assert_reported_as(run: &Run, threads: &[&str], kind: &str, what: &str) {
    run.assert_code(EXIT_SECCOMP);
    let needles: Vec<String> = threads
        .iter()
        .map(|t| format!("thread '{t}' ({kind} filter, tid "))
        .collect();
    assert!(
        needles.iter().any(|n| run.stderr.contains(n)),
        "none of {needles:?} in\n{}",
        run.log()
    );
    let number = format!("made the forbidden syscall {what}");
    assert!(
        run.stderr.contains(&number),
        "no {number:?} in\n{}",
        run.log()
    );
}

#[test]
fn a_forbidden_syscall_is_reported_with_thread_and_number_in_every_kind() {
    let dir = temp_dir("seccomp-provoke");
    for (kind, thread) in [
        ("control", &["main"][..]),
        ("api", &["skiff-api"]),
        ("vcpu", &["vcpu0"]),
        ("device-worker", &["blk-disk0"]),
        ("passthrough", &["vfio-user-rx", "vfio-user-dma"]),
    ] {
        let dev = TestDevice::start(&dir, &format!("dev-{kind}"), &[]);
        let run = provoke(kind, &dir, &dev);
        assert_reported(&run, thread, kind);
    }
}

/// The vCPU, device-worker and API filters allow ioctls by request (KVM, VFIO, a TUN offload,
/// descriptor flags): any other request, here FIONREAD, is refused and reported with its number.
#[test]
fn a_forbidden_ioctl_request_is_reported_with_its_number() {
    let dir = temp_dir("seccomp-ioctl");
    for (kind, thread) in [
        ("vcpu", &["vcpu0"][..]),
        ("device-worker", &["blk-disk0"]),
        ("api", &["skiff-api"]),
    ] {
        let dev = TestDevice::start(&dir, &format!("dev-{kind}"), &[]);
        let run = provoke(&format!("{kind}:ioctl"), &dir, &dev);
        let ioctl = format!("{} (ioctl request 0x541b); exiting", libc::SYS_ioctl);
        assert_reported_as(&run, thread, kind, &ioctl);
    }
}

#[test]
fn a_forbidden_syscall_in_a_migration_thread_is_reported() {
    let dir = temp_dir("seccomp-migration");
    let api = dir.join("target.sock");
    let mut cmd = Command::new(integration::skiff_bin());
    cmd.env("SKIFF_TEST_FORBIDDEN_SYSCALL", "migration")
        .arg("--api-socket")
        .arg(&api);
    let mut target = SkiffProcess::spawn_command(cmd);
    wait_for_path(&api, Duration::from_secs(30));
    let url = format!("unix:{}", dir.join("mig.sock").display());
    // The receiving thread dies at its start; the reply may or may not make it out first.
    let _ = remote(&api, &["receive-migration", &url]);
    let run = target.wait(Duration::from_secs(60));
    // Thread names are cut to 15 bytes (the kernel's comm).
    assert_reported(&run, &["skiff-migrate-i"], "migration");
}

#[test]
fn the_forbidden_syscall_knob_is_refused_for_unknown_kinds() {
    let mut cmd = Command::new(integration::skiff_bin());
    cmd.env("SKIFF_TEST_FORBIDDEN_SYSCALL", "gpu");
    let run = run_command(&mut cmd, Duration::from_secs(30));
    run.assert_code(2);
    assert!(
        run.stderr.contains("expected one of control, vcpu"),
        "{}",
        run.log()
    );
}
