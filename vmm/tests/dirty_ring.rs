//! The dirty ring under a guest that fills it: the `dirty` workload at full speed with logging on
//! and a sync every 200 ms. Where KVM honours the ring's soft limit, the vCPU exits with
//! `KVM_EXIT_DIRTY_RING_FULL`, harvests on its own thread and runs on: the guest keeps printing
//! progress and the syncs return its pages. On a PVM host KVM's emulator overflows the ring
//! (README, "Dirty pages"): there the overflow must be reported to the syncs (and a vCPU that finds
//! it ends with an error); the vCPU must never spin in full-ring exits nor hang the test.
//! (Own test binary: the mode override is process-wide.)

use std::time::{Duration, Instant};

use vmm::dirty_log::{pvm_host, set_mode_override, DirtyLogMode};
use vmm::vm::Vm;

/// Complete `dirty: gen` progress lines so far.
fn progress_lines(serial: &std::path::Path) -> usize {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.starts_with("dirty: gen "))
        .count()
}

#[test]
fn a_full_dirty_ring_never_wedges_the_vcpu() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let (config, dir, serial) = vmm::testing::guest_config(
        "dirty-ring",
        "scenario=dirty dirty.mib=16 dirty.rate=0 dirty.report_ms=200 dirty.verify_every=0",
        |_| serde_json::json!({}),
    );
    set_mode_override(Some(DirtyLogMode::Ring));
    let built = Vm::new(config);
    set_mode_override(None);
    let mut vm = built.expect("build VM");
    assert_eq!(vm.dirty_log_mode(), DirtyLogMode::Ring);
    vm.start().expect("start vCPUs");
    let deadline = Instant::now() + Duration::from_secs(300);
    while progress_lines(&serial) < 3 {
        assert!(
            Instant::now() < deadline && vm.exit_event().reason().is_none(),
            "no progress before logging:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = progress_lines(&serial);
    let (mut pages, mut sync_error) = (0u64, vm.start_dirty_log().err().map(|e| e.to_string()));
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        match vm.dirty_pages() {
            Ok(set) => pages += set.count(),
            Err(e) => sync_error = Some(e.to_string()),
        }
    }
    let exit = vm.exit_event().reason();
    let after = progress_lines(&serial);
    if pvm_host() {
        eprintln!(
            "PVM host: exit {exit:?}, sync error {sync_error:?}, {pages} pages, progress lines {before} -> {after}"
        );
        // The overflow is reported to the syncs (whoever found it), and a vCPU that did not end
        // is running the guest, not spinning in full-ring exits.
        assert!(sync_error.is_some(), "an overflowed ring went unreported");
        assert!(
            exit == Some(devices::ExitReason::VcpuError) || (exit.is_none() && after > before),
            "exit {exit:?}, progress {before} -> {after}"
        );
    } else {
        assert_eq!(exit, None, "the vCPU ended: {sync_error:?}");
        assert!(sync_error.is_none(), "{sync_error:?}");
        assert!(
            after > before + 5,
            "the guest stopped: {before} -> {after} lines"
        );
        assert!(pages > 0, "no page reported dirty");
    }
    let _ = vm.stop_dirty_log();
    vm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
