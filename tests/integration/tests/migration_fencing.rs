//! Fencing: the target runs a migrated VM only after the source's commit, and a source that
//! sent its commit but never heard RESUMED stays paused — it cannot tell whether the target runs
//! the VM, and two running copies of one VM (split brain) would corrupt its disks. With the
//! target's RESUMED dropped on purpose (a test knob), the source ends paused with "outcome
//! unknown", the guest goes on counting on the target alone, and the operator can then remove
//! the source's copy.

use std::time::Duration;

use integration::node::{
    assert_continuous, counters, send_migration as send, wait_for_counter, Node,
};
use integration::temp_dir;

#[test]
fn a_lost_resumed_leaves_the_source_paused_and_the_guest_runs_once() {
    let dir = temp_dir("migration-fencing");
    let (src, serial) = Node::guest(
        &dir,
        "src",
        None,
        "size=128M",
        "scenario=counter counter.every=1",
    );
    let mut dst = Node::start_env(&dir, "dst", None, &[], &[("SKIFF_TEST_DROP_RESUMED", "1")]);
    wait_for_counter(&serial, 3);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out) = send(&src, &url, &[]);
    assert_ne!(code, Some(0), "the migration claims success: {out}");
    assert!(out.contains("outcome unknown"), "{out}");
    // The source keeps its copy paused: it does not run the guest a second time.
    let (_, info, _) = src.remote(&["info"]);
    assert!(
        info.contains("\"Paused\""),
        "the source is not paused: {info}"
    );
    // The target runs it: the counter goes on, each value once.
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 4);
    assert_continuous(&serial);
    let (_, info, _) = dst.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    // The operator, knowing the target runs the VM, removes the source's copy.
    let (code, out, err) = src.remote(&["delete"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = dst.remote(&["shutdown-vmm"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let run = dst.process.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}
