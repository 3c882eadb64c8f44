//! Live migration over mutually authenticated TLS: with good certificates the `counter` guest
//! moves between two network-namespace hosts and continues; a source whose certificate comes
//! from another CA, a target whose certificate has expired, and a source without TLS are each
//! refused during the handshake — before the target reads any state — and the source VM keeps
//! running; then the same source migrates with good certificates. Plain TCP between the hosts
//! is logged as a warning on both sides.

use std::path::Path;
use std::time::Duration;

use integration::certs::{remote_args, write_side, TestCa};
use integration::node::{
    assert_continuous, counters, send_migration as send, wait_for_counter, Node,
};
use integration::{remote_ok, skip_or_fail, temp_dir, TwoHosts};

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `receive-migration URL` on `dst` with the TLS options `rx`; must be accepted.
fn receive(dst: &Node, url: &str, rx: &[String], why: &str) {
    let mut receive = vec!["receive-migration", url];
    receive.extend(args(rx));
    let (code, out, err) = dst.remote(&receive);
    assert_eq!(code, Some(0), "{why}: receive-migration: {out}{err}");
}

/// One migration attempt that must fail, leaving the source running and counting.
fn refused(
    src: &Node,
    dst: &Node,
    serial: &Path,
    url: &str,
    rx: &[String],
    tx: &[String],
    why: &str,
) {
    receive(dst, url, rx, why);
    let (code, out) = send(src, url, &args(tx));
    assert_ne!(code, Some(0), "{why}: the migration went through:\n{out}");
    let lower = out.to_lowercase();
    assert!(
        ["tls", "handshake", "alert", "certificate"]
            .iter()
            .any(|w| lower.contains(w)),
        "{why}: the failure does not say it was TLS: {out}"
    );
    let (_, info, _) = src.remote(&["info"]);
    assert!(
        info.contains("\"Running\""),
        "{why}: the source is not running: {info}"
    );
    let before = counters(serial).last().copied().unwrap_or(0);
    wait_for_counter(serial, before + 2);
    // The target refused before reading any state: it has no VM and reports why.
    let (_, progress, _) = dst.remote(&["migration-progress"]);
    assert!(
        progress.contains("\"failed\""),
        "{why}: target progress {progress}"
    );
    let (_, info, _) = dst.remote(&["info"]);
    assert!(
        !info.contains("\"Running\""),
        "{why}: the target runs a VM: {info}"
    );
}

#[test]
fn tls_migration_authenticates_both_sides_and_refuses_bad_certificates() {
    let hosts = match TwoHosts::create("tls") {
        Ok(h) => h,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let dir = temp_dir("migration-tls");
    let ca = TestCa::new("skiff test CA");
    let foreign = TestCa::new("some other CA");
    let side = |name: &str, leaf| remote_args(&write_side(&dir, name, &leaf, &ca));
    let target_ok = side("target", ca.leaf(TwoHosts::B_ADDR, false));
    let target_expired = side("target-expired", ca.leaf(TwoHosts::B_ADDR, true));
    let source_ok = side("source", ca.leaf("skiff-source", false));
    // Signed by another CA, but trusting ours: only the target can tell.
    let source_foreign = side("source-foreign", foreign.leaf("skiff-source", false));

    let (mut src, serial) = Node::guest(
        &dir,
        "src",
        Some(&hosts.a),
        "size=256M",
        // 64 MiB of non-zero RAM: enough TLS records that a socket read completes several at
        // once (which once overflowed rustls's decrypted-data buffer on the target).
        "scenario=counter counter.every=1 counter.fill_mb=64",
    );
    let mut dst = Node::start(&dir, "dst", Some(&hosts.b), &[]);
    wait_for_counter(&serial, 3);
    let url = format!("tcp:{}:6001", TwoHosts::B_ADDR);

    refused(
        &src,
        &dst,
        &serial,
        &url,
        &target_ok,
        &source_foreign,
        "a source certificate from another CA",
    );
    refused(
        &src,
        &dst,
        &serial,
        &url,
        &target_expired,
        &source_ok,
        "an expired target certificate",
    );
    refused(
        &src,
        &dst,
        &serial,
        &url,
        &target_ok,
        &[],
        "a source without TLS",
    );

    receive(&dst, &url, &target_ok, "good certificates");
    let (code, out) = send(&src, &url, &args(&source_ok));
    assert_eq!(code, Some(0), "send-migration over TLS failed: {out}");
    assert!(out.contains("migration completed"), "{out}");
    let run = src.process.wait(Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{}", run.log());
    // The plain attempt was warned about; so was nothing else.
    assert_eq!(
        run.stderr.matches("over plain TCP").count(),
        1,
        "{}",
        run.log()
    );
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    let (_, info, _) = dst.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let run = dst.process.wait(Duration::from_secs(30));
    assert!(
        run.stderr.contains("TLS handshake with the source failed"),
        "{}",
        run.log()
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}
