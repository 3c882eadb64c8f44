//! CLI surface of the `skiff` binary (help and version). Having an integration test here also makes
//! `cargo test --workspace` build the `skiff` binary that `tests/integration` runs.

use std::process::Command;

#[test]
fn help_lists_options_and_exit_statuses() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--disk",
        "--net",
        "--console",
        "--rng",
        "--cpu-template",
        "-v",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}:\n{text}");
    }
    assert!(text.contains("the guest asked for a reboot"), "{text}");
}

#[test]
fn unknown_option_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn version() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("skiff "));
}

#[test]
fn restore_that_nothing_could_resume_is_refused_before_anything_starts() {
    let dir = std::env::temp_dir().join(format!("skiff-cli-restore-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--restore")
        .arg(format!("source_url=file://{}", dir.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skiff: error:") && err.contains("resume=on") && err.contains("--api-socket"),
        "{err}"
    );
    // A restore that fails says why, and nothing about a paused VM.
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--restore")
        .arg(format!("source_url=file://{},resume=on", dir.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert!(!err.contains("paused"), "{err}");
}
