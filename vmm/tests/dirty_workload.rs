//! The `dirty` test-guest workload (`tests/guest/src/scenario/dirty.rs`, the guest side of the
//! live-migration tests) measures its own stalls and loses nothing across a pause: run it on a
//! 16 MiB working set, pause the VM for about a second after a few progress lines, resume, and
//! the guest must then report a longest stall of at least ~0.9 s, keep counting from where it was
//! (generation and pages written never go back), pass a full verification sweep after the pause
//! and power off with `result: PASS` when its time is up.

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::vm::Vm;

/// Emulated guests are slow here (HOST.md): generous waits, failing with the serial log.
const GUEST_WAIT: Duration = Duration::from_secs(300);
/// How long the VM stays paused.
const PAUSE: Duration = Duration::from_millis(1000);
/// The stall the guest must see: the pause, less generous slack for timer granularity.
const MIN_STALL_US: u64 = 900_000;
/// Guest run time (TSC seconds after its set-up): enough for the reports before and after.
const GUEST_SECONDS: u64 = 12;

/// A `dirty: gen G pages_written W rate R/s max_stall_us S ...` line.
#[derive(Debug, Clone, Copy)]
struct Progress {
    gen: u64,
    written: u64,
    rate: u64,
    max_stall_us: u64,
    max_stall_ticks: u64,
    report: u64,
}

fn field(line: &str, key: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.trim_end_matches("/s").parse().ok();
        }
    }
    None
}

/// Every complete progress line (the last line of the file may still be being written).
fn progress(log: &str) -> Vec<Progress> {
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.starts_with("dirty: gen "))
        .map(|l| Progress {
            gen: field(l, "gen").unwrap_or_else(|| panic!("no gen in {l:?}")),
            written: field(l, "pages_written").unwrap_or_else(|| panic!("bad line {l:?}")),
            rate: field(l, "rate").unwrap_or_else(|| panic!("bad line {l:?}")),
            max_stall_us: field(l, "max_stall_us").unwrap_or_else(|| panic!("bad line {l:?}")),
            max_stall_ticks: field(l, "max_stall_ticks")
                .unwrap_or_else(|| panic!("bad line {l:?}")),
            report: field(l, "report").unwrap_or_else(|| panic!("bad line {l:?}")),
        })
        .collect()
}

/// Wait until `done(log)`; fail with the log on timeout or if the VM ended.
fn wait_until(vm: &Vm, serial: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + GUEST_WAIT;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if done(&text) {
            return text;
        }
        let exited = vm.exit_event().reason();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "serial output never showed {what} (VM exit: {exited:?})\n----- serial -----\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VM running the test guest with `cmdline`, and its serial file.
fn start(name: &str, cmdline: &str) -> (Vm, std::path::PathBuf, std::path::PathBuf) {
    let (config, dir, serial) =
        vmm::testing::guest_config(name, cmdline, |_| serde_json::json!({}));
    let mut vm = Vm::new(config).expect("build VM");
    vm.start().expect("start vCPUs");
    (vm, dir, serial)
}

/// Wait for `result: PASS` and an ACPI power-off; return the log.
fn wait_power_off(vm: &Vm, serial: &Path) -> String {
    let log = wait_until(vm, serial, "result: PASS", |t| t.contains("result: PASS"));
    let deadline = Instant::now() + GUEST_WAIT;
    while vm.exit_event().reason().is_none() {
        assert!(
            Instant::now() < deadline,
            "the guest did not power off:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(serial).unwrap_or_default();
    assert_eq!(
        vm.exit_event().reason(),
        Some(devices::ExitReason::PowerOff),
        "{log}"
    );
    assert!(!log.contains("FAIL"), "{log}");
    log
}

/// `dirty.rate=` paces the guest (against its PIT-calibrated TSC).
#[test]
fn dirty_workload_keeps_its_rate() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let (mut vm, dir, serial) = start(
        "dirty-rate",
        "scenario=dirty dirty.mib=4 dirty.rate=500 dirty.report_ms=500 dirty.seconds=4",
    );
    let log = wait_power_off(&vm, &serial);
    let all = progress(&log);
    assert!(all.len() >= 6, "too few progress lines:\n{log}");
    // The first interval includes the start; the others must be close to the target.
    for p in &all[1..] {
        assert!(
            (350..=650).contains(&p.rate),
            "rate {} pages/s, asked for 500: {p:?}\n{log}",
            p.rate
        );
    }
    vm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dirty_workload_sees_a_pause_as_a_stall_and_loses_nothing() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let cmdline = format!(
        "scenario=dirty dirty.mib=16 dirty.report_ms=500 dirty.verify_every=4 dirty.seconds={GUEST_SECONDS}"
    );
    let (mut vm, dir, serial) = start("dirty-workload", &cmdline);

    // A few reports and one full sweep before the pause.
    let log = wait_until(&vm, &serial, "3 progress lines and a sweep", |t| {
        progress(t).len() >= 3 && t.contains("dirty: verified 4096 pages ok")
    });
    assert!(
        log.contains("dirty: start mib 16 pages 4096 "),
        "unexpected start line:\n{log}"
    );
    vm.pause().expect("pause");
    std::thread::sleep(PAUSE);
    let paused_log = std::fs::read_to_string(&serial).unwrap_or_default();
    let before = progress(&paused_log);
    let last_before = *before.last().unwrap();
    assert!(
        last_before.max_stall_us < MIN_STALL_US,
        "the guest saw a stall of {} us before the pause: nothing to prove\n{paused_log}",
        last_before.max_stall_us
    );
    let sweeps_before = paused_log.matches("dirty: verified 4096 pages ok").count();
    vm.resume().expect("resume");

    // The pause shows up as the longest stall, and a sweep after it passes.
    let log = wait_until(&vm, &serial, "the stall and a sweep after the pause", |t| {
        progress(t)
            .iter()
            .any(|p| p.report > last_before.report && p.max_stall_us >= MIN_STALL_US)
            && t.matches("dirty: verified 4096 pages ok").count() > sweeps_before
    });
    let after = progress(&log)
        .into_iter()
        .find(|p| p.report > last_before.report && p.max_stall_us >= MIN_STALL_US)
        .unwrap();
    assert!(
        after.max_stall_ticks > last_before.max_stall_ticks,
        "max_stall_ticks did not grow: {last_before:?} -> {after:?}\n{log}"
    );
    // Generous upper bound: the stall is the pause, not the whole run.
    assert!(
        after.max_stall_us < 30_000_000,
        "implausible stall {after:?}\n{log}"
    );

    // The guest powers off after its last sweep.
    let log = wait_power_off(&vm, &serial);
    // Counters never go back, reports are consecutive.
    let all = progress(&log);
    for pair in all.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            b.report == a.report + 1
                && b.gen >= a.gen
                && b.written >= a.written
                && b.max_stall_ticks >= a.max_stall_ticks,
            "progress went back: {a:?} -> {b:?}\n{log}"
        );
    }
    assert!(
        log.contains("dirty: done"),
        "no final sweep / done line:\n{log}"
    );
    vm.shutdown();
    println!("{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A page the VMM "loses" (zeroes behind the guest's back, as a migration that never sent it
/// would leave it) is caught the next time the guest touches it: the exact FAIL line, then a
/// panic (a failing VM exit).
#[test]
fn dirty_workload_catches_a_lost_page() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let (mut vm, dir, serial) = start(
        "dirty-lost",
        "scenario=dirty dirty.mib=4 dirty.report_ms=200 dirty.verify_every=2",
    );
    // Generation 2 is being written: every page holds generation 1 or 2.
    let log = wait_until(&vm, &serial, "generation 2", |t| {
        progress(t).iter().any(|p| p.gen >= 2)
    });
    let pages_at = log
        .lines()
        .find_map(|l| l.strip_prefix("dirty: start "))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            while let Some(k) = w.next() {
                if k == "pages_at" {
                    return w.next();
                }
            }
            None
        })
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no pages_at in the start line:\n{log}"));
    let table = pages_at - 4 * 256 * 8; // 1024 pages, one u64 each (whole pages)
    let page = 5u64;
    vm.pause().expect("pause");
    let gen: u64 = vm
        .memory()
        .read_obj(GuestAddress(table + page * 8))
        .expect("read the table");
    assert!(gen >= 1, "page {page} still at generation 0:\n{log}");
    vm.memory()
        .write_slice(&[0u8; 4096], GuestAddress(pages_at + page * 4096))
        .expect("zero the page");
    vm.resume().expect("resume");
    let want = format!("dirty: FAIL page {page} expected gen {gen} found gen 0");
    let deadline = Instant::now() + GUEST_WAIT;
    while vm.exit_event().reason().is_none() {
        assert!(
            Instant::now() < deadline,
            "the guest did not fail:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(log.contains(&want), "no {want:?}:\n{log}");
    assert!(log.contains("PANIC: dirty: page 5"), "{log}");
    assert_eq!(
        vm.exit_event().reason(),
        Some(devices::ExitReason::VcpuError),
        "{log}"
    );
    vm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
