//! `skiff-remote` against a server with a fake VMM.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use api_server::VmState;
use common::Harness;
use serde_json::Value;

fn remote(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .arg("--api-socket")
        .arg(&h.path)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_command() {
    let h = Harness::start("cli");
    let o = remote(&h, &["ping"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pid"], std::process::id());

    // Errors: one line, status and message, exit 1.
    let o = remote(&h, &["pause"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "skiff-remote: error: 409 vm.pause: no VM exists; create one first\n"
    );

    // create from stdin
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .arg("--api-socket")
        .arg(&h.path)
        .args(["create", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cpus": {"boot_vcpus": 3}}"#)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // create from a file with a bad body: the server's 400 message
    let bad = h.path.with_file_name("bad.json");
    std::fs::write(&bad, br#"{"cpus": {"boot": 3}}"#).unwrap();
    let o = remote(&h, &["create", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with(
            "skiff-remote: error: 400 vm.create: invalid JSON body: unknown field `boot`"
        ),
        "{}",
        stderr(&o)
    );
    let o = remote(&h, &["create", "/nonexistent/cfg.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot read /nonexistent/cfg.json"));

    for cmd in [
        &["boot"][..],
        &["pause"],
        &["snapshot", "file:///tmp/x"],
        &["resume"],
        &["reboot"],
        &["power-button"],
    ] {
        let o = remote(&h, cmd);
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    let o = remote(&h, &["info"]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "Running");
    assert_eq!(v["config"]["cpus"]["boot_vcpus"], 3);
    let o = remote(&h, &["counters"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disk0"]["read_ops"], 3);
    let o = remote(&h, &["restore", "file:///tmp/x", "--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("409"), "{}", stderr(&o));
    for cmd in [
        &["shutdown"][..],
        &["delete"],
        &["restore", "file:///tmp/x"],
    ] {
        let o = remote(&h, cmd);
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
    }
    assert_eq!(h.state(), Some(VmState::Paused));
    let o = remote(&h, &["snapshot", "relative/dir"]);
    assert!(
        stderr(&o).contains("400") && stderr(&o).contains("file://"),
        "{}",
        stderr(&o)
    );
    let o = remote(&h, &["shutdown-vmm"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn usage_and_connection_errors() {
    let o = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .args(["--api-socket", "/x", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .arg("info")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "--api-socket is required");
    let o = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .args(["--api-socket", "/nonexistent/skiff.sock", "info"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("skiff-remote: error: cannot connect to /nonexistent/skiff.sock"),
        "{e}"
    );
    assert!(e.contains("is skiff running with --api-socket"), "{e}");
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn running(tag: &str) -> Harness {
    let h = Harness::start(tag);
    let c = h.client();
    c.create(&Default::default()).unwrap();
    c.boot().unwrap();
    h
}

/// send-migration follows the fake VMM through its phases: plain lines (stdout is a pipe), one
/// per phase at least, exit 0 on completed.
#[test]
fn send_migration_completes() {
    let h = running("mig-ok");
    let o = remote(
        &h,
        &[
            "send-migration",
            "tcp:[2001:db8::1]:6000",
            "--downtime-ms",
            "50",
            "--connections",
            "4",
            "--bandwidth-mbps",
            "1000",
            "--max-iterations",
            "9",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        !out.contains('\r'),
        "no terminal control on a pipe: {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    for phase in ["setup", "precopy", "switchover", "completing", "completed"] {
        let n = lines
            .iter()
            .filter(|l| l.starts_with(&format!("migration: {phase} ")))
            .count();
        assert!(n >= 1, "{phase} missing in {out}");
    }
    assert_eq!(
        *lines.last().unwrap(),
        "migration completed in 0.6 s, downtime 42 ms"
    );
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let sent = h.vm.lock().unwrap().sent.clone().unwrap();
    assert_eq!(sent.destination_url.to_string(), "tcp:[2001:db8::1]:6000");
    assert_eq!(
        (
            sent.downtime_limit_ms,
            sent.connections,
            sent.bandwidth_limit_mbps,
            sent.max_iterations
        ),
        (50, 4, Some(1000), Some(9))
    );
    assert!(!sent.local);
    assert_eq!(h.state(), Some(VmState::Migrated));
    // migration-progress prints the (final) progress as JSON.
    let o = remote(&h, &["migration-progress"]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phase"], "completed");
    assert_eq!(v["downtime_ms"], 42);
}

#[test]
fn send_migration_failure_and_cancel_exit_1() {
    let h = running("mig-fail");
    let o = remote(&h, &["send-migration", "tcp:fail.invalid:6000"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "skiff-remote: error: migration failed: the target closed the connection\n"
    );
    assert!(stdout(&o)
        .lines()
        .last()
        .unwrap()
        .starts_with("migration: failed "));
    assert_eq!(h.state(), Some(VmState::Running));

    // Cancelled from another skiff-remote while it follows the migration.
    let child = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .arg("--api-socket")
        .arg(&h.path)
        .args(["send-migration", "unix:/run/slow.sock", "--local"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let o = remote(&h, &["migration-cancel"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "skiff-remote: error: migration cancelled\n");
    assert!(stdout(&o).contains("migration: precopy "), "{}", stdout(&o));
    assert_eq!(h.state(), Some(VmState::Running));
    let o = remote(&h, &["migration-cancel"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("409"), "{}", stderr(&o));

    // The server's checks: exit 1 with the 400 naming the field; nothing started.
    let o = remote(&h, &["send-migration", "tcp:h:1", "--connections", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "skiff-remote: error: 400 vm.send-migration: connections: 0 is out of range (1 to 16)\n"
    );
    let o = remote(&h, &["send-migration", "tcp:h:1", "--local"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("400 vm.send-migration: local: "),
        "{}",
        stderr(&o)
    );
    // A malformed URL is a usage error.
    let o = remote(&h, &["send-migration", "tcp://h:1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("without \"//\""), "{}", stderr(&o));
    // --no-wait returns once started.
    let o = remote(&h, &["send-migration", "tcp:h:1", "--no-wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(h.state(), Some(VmState::Migrating));
}

#[test]
fn receive_migration_with_overrides() {
    let h = Harness::start("mig-recv");
    let o = remote(
        &h,
        &[
            "receive-migration",
            "tcp:0.0.0.0:6000",
            "--override",
            "disk0:path=/new/img",
            "--override",
            "net0:tap=tap1",
            "--override",
            "accel0:socket=/run/x.sock",
            "--override",
            "hostdev0:path=/sys/bus/pci/devices/0000:01:00.0",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = h.vm.lock().unwrap().received.clone().unwrap();
    assert_eq!(
        serde_json::to_value(&got).unwrap(),
        serde_json::json!({"receiver_url": "tcp:0.0.0.0:6000", "overrides": {
            "disk0": {"path": "/new/img"}, "net0": {"tap": "tap1"},
            "accel0": {"socket": "/run/x.sock"},
            "hostdev0": {"path": "/sys/bus/pci/devices/0000:01:00.0"}}})
    );
    for (args, code, want) in [
        (
            &["receive-migration", "unix:/r", "--override", "disk0"][..],
            2,
            "ID:KEY=VALUE",
        ),
        (
            &[
                "receive-migration",
                "unix:/r",
                "--override",
                "disk0:file=/x",
            ],
            2,
            "path, tap or socket",
        ),
        (&["receive-migration", "unix:r"], 2, "must be absolute"),
        (
            &[
                "receive-migration",
                "unix:/r",
                "--override",
                "d:tap=a",
                "--override",
                "d:tap=b",
            ],
            1,
            "--override d:tap is given twice",
        ),
        (
            &[
                "receive-migration",
                "unix:/r",
                "--override",
                "d:tap=a",
                "--override",
                "d:path=/b",
            ],
            1,
            "400 vm.receive-migration: overrides.d: give exactly one of path, tap, socket",
        ),
        (
            &["receive-migration", "unix:/r", "--override", "d:path=rel"],
            1,
            "overrides.d.path",
        ),
    ] {
        let o = remote(&h, args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    // With a VM: 409.
    h.client().create(&Default::default()).unwrap();
    let o = remote(&h, &["receive-migration", "unix:/r"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("409"), "{}", stderr(&o));
}

/// On a terminal send-migration redraws one line with \r and ends it with a newline.
#[test]
fn send_migration_on_a_terminal() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let h = running("mig-tty");
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills in two new descriptors, owned below.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = Command::new(env!("CARGO_BIN_EXE_skiff-remote"))
        .arg("--api-socket")
        .arg(&h.path)
        .args(["send-migration", "unix:/run/m.sock"])
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master ends with EIO once the child closed the terminal.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = reader.join().unwrap();
    assert!(out.starts_with("\rsetup "), "{out:?}");
    assert!(
        out.contains("\rprecopy    iter   1 [############------------]  50%"),
        "{out:?}"
    );
    assert!(out.contains("\x1b[K"), "{out:?}");
    assert!(
        out.contains("\rcompleted  iter   3 [########################] 100%"),
        "{out:?}"
    );
    assert!(
        out.ends_with("migration completed in 0.6 s, downtime 42 ms\r\n"),
        "{out:?}"
    );
    assert!(
        !out.contains("migration: "),
        "no plain lines on a terminal: {out:?}"
    );
}
