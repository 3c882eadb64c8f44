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
