//! A failed migration leaves the source running with nothing lost, whatever phase it failed in:
//! the target killed, or the migration cancelled, during the config handshake (before any RAM),
//! during the stop-and-copy (the source's vCPUs paused) and between the target's READY and the
//! source's commit. The test knob `SKIFF_TEST_MIGRATION_HOLD` stops a migration at each of these
//! points so the test can strike there. After each failure the source runs (and counts on, every
//! value once), `migration-progress` says why, and a cancel before the commit makes the target
//! drop its copy with the source's reason; finally a migration to a fresh target succeeds.
//! A cancel once the commit was sent is refused: the target may be running the VM.

use std::path::Path;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration::node::{
    assert_continuous, counters, send_migration as send, wait_for_counter, Node, DEADLINE,
};
use integration::{remote_ok, skiff_remote_bin, skip_or_fail, temp_dir, TwoHosts};

/// `skiff-remote send-migration` on a thread (it returns when the migration ends).
fn send_in_background(src: &Node, url: &str) -> JoinHandle<Output> {
    let (api, url) = (src.api.clone(), url.to_string());
    std::thread::spawn(move || {
        std::process::Command::new(skiff_remote_bin())
            .arg("--api-socket")
            .arg(&api)
            .args(["send-migration", &url])
            .output()
            .expect("skiff-remote")
    })
}

/// Wait until `node`'s migration progress reaches the final `phase`; returns the progress JSON.
fn wait_for_phase(node: &Node, phase: &str, serial: &Path) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, p, _) = node.remote(&["migration-progress"]);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap_or_default();
        if v["phase"] == phase {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never reached {phase}: {p}\nserial:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The source runs its VM again and the guest counts on, each value once.
fn assert_source_runs(src: &Node, serial: &Path, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, info, _) = src.remote(&["info"]);
        assert_eq!(code, Some(0), "{what}: the source does not answer");
        if info.contains("\"Running\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the source is not running: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = counters(serial).last().copied().unwrap_or(0);
    wait_for_counter(serial, last + 2);
    assert_continuous(serial);
}

/// While the source holds at the switch-over its vCPUs are paused: the counter stands still.
fn assert_guest_stands_still(src: &Node, serial: &Path) {
    let before = counters(serial).last().copied();
    std::thread::sleep(Duration::from_millis(1500));
    let after = counters(serial).last().copied();
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let tail: Vec<_> = text.lines().rev().take(5).collect();
    let (_, progress, _) = src.remote(&["migration-progress"]);
    assert_eq!(
        before,
        after,
        "the guest ran during the stop-and-copy: {tail:?}\n{progress}\n{}",
        src.events()
    );
}

/// A target that failed: its progress says why (containing `needle`) and it runs no VM.
fn assert_target_dropped(target: &Node, needle: &str, serial: &Path) {
    let p = wait_for_phase(target, "failed", serial);
    let error = p["error"].as_str().unwrap_or_default();
    assert!(error.contains(needle), "target: {p}");
    let (_, info, _) = target.remote(&["info"]);
    assert!(
        !info.contains("\"Running\""),
        "the target runs the VM: {info}"
    );
    eprintln!("target's reason: {error}");
}

/// Send a migration to `url` (its target `t` listens), wait with `held` until it holds, kill
/// the target; the source's failure is reported with a reason (its progress is returned).
fn kill_target_at_hold(
    src: &Node,
    t: &Node,
    url: &str,
    serial: &Path,
    held: impl FnOnce(),
) -> serde_json::Value {
    let sender = send_in_background(src, url);
    held();
    t.process.signal("KILL");
    let out = sender.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let p = wait_for_phase(src, "failed", serial);
    assert!(p["error"].as_str().is_some_and(|e| !e.is_empty()), "{p}");
    p
}

/// Send a migration to `url`, wait with `held` until it holds, cancel it; the source reports
/// it cancelled (its progress is returned).
fn cancel_at_hold(src: &Node, url: &str, serial: &Path, held: impl FnOnce()) -> serde_json::Value {
    let (code, out, err) = src.remote(&["send-migration", url, "--no-wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    held();
    let (code, out, err) = src.remote(&["migration-cancel"]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_for_phase(src, "cancelled", serial)
}

#[test]
fn a_kill_or_cancel_in_every_phase_leaves_the_source_running() {
    let start = Instant::now();
    let dir = temp_dir("migration-phases");
    // The source holds twice at the switch-over (kill, cancel), then twice before the commit
    // (kill, cancel); the last migration goes through.
    let (src, serial) = Node::guest_env(
        &dir,
        "src",
        None,
        "size=128M",
        "scenario=counter counter.every=1",
        &[("SKIFF_TEST_MIGRATION_HOLD", "switchover:2,commit:2")],
    );
    wait_for_counter(&serial, 3);
    let url = |n: &str| format!("unix:{}", dir.join(format!("{n}.mig")).display());
    let target = |name: &str, env: &[(&str, &str)]| {
        let t = Node::start_env(&dir, name, None, &[], env);
        let (code, out, err) = t.remote(&["receive-migration", &url(name)]);
        assert_eq!(code, Some(0), "{name}: {out}{err}");
        t
    };
    let hold_at_config = [("SKIFF_TEST_MIGRATION_HOLD", "config")];
    let mut holds = 0;

    // 1. The config handshake: the target holds after CONFIG, before its answer.
    let t = target("config-kill", &hold_at_config);
    let p = kill_target_at_hold(&src, &t, &url("config-kill"), &serial, || {
        t.wait_for_event("migration", "hold", 1, &serial)
    });
    eprintln!("config, target killed: {}", p["error"]);
    assert_source_runs(&src, &serial, "config handshake, target killed");

    let t = target("config-cancel", &hold_at_config);
    let p = cancel_at_hold(&src, &url("config-cancel"), &serial, || {
        t.wait_for_event("migration", "hold", 1, &serial)
    });
    assert!(
        p["error"].as_str().is_some_and(|e| e.contains("cancel")),
        "{p}"
    );
    assert_source_runs(&src, &serial, "config handshake, cancelled");
    drop(t);

    // 2. The stop-and-copy: the source holds with its vCPUs paused, before the last pages.
    let t = target("switchover-kill", &[]);
    holds += 1;
    let p = kill_target_at_hold(&src, &t, &url("switchover-kill"), &serial, || {
        src.wait_for_event("migration", "hold", holds, &serial);
        assert_guest_stands_still(&src, &serial);
    });
    eprintln!("stop-and-copy, target killed: {}", p["error"]);
    assert_source_runs(&src, &serial, "stop-and-copy, target killed");

    let t = target("switchover-cancel", &[]);
    holds += 1;
    cancel_at_hold(&src, &url("switchover-cancel"), &serial, || {
        src.wait_for_event("migration", "hold", holds, &serial)
    });
    assert_source_runs(&src, &serial, "stop-and-copy, cancelled");
    let p = wait_for_phase(&t, "failed", &serial);
    eprintln!("stop-and-copy, cancelled; the target: {}", p["error"]);

    // 3. Between READY and the commit: the target loaded the VM and waits, stopped.
    let t = target("commit-kill", &[]);
    holds += 1;
    let p = kill_target_at_hold(&src, &t, &url("commit-kill"), &serial, || {
        src.wait_for_event("migration", "hold", holds, &serial)
    });
    let error = p["error"].as_str().unwrap_or_default();
    assert!(!error.contains("outcome unknown"), "{p}");
    eprintln!("before the commit, target killed: {error}");
    assert_source_runs(&src, &serial, "before the commit, target killed");

    let t = target("commit-cancel", &[]);
    holds += 1;
    cancel_at_hold(&src, &url("commit-cancel"), &serial, || {
        src.wait_for_event("migration", "hold", holds, &serial)
    });
    assert_source_runs(&src, &serial, "before the commit, cancelled");
    // The target never ran the VM and says why it dropped it.
    assert_target_dropped(&t, "withdrew before its commit: cancelled", &serial);

    // 4. A fresh target: the migration goes through and the guest counts on there.
    let good = target("good", &[]);
    let (code, out) = send(&src, &url("good"), &[]);
    assert_eq!(code, Some(0), "{out}");
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    let (_, info, _) = good.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    remote_ok(&good.api, &["shutdown-vmm"]);
    eprintln!("every phase: {:.1} s", start.elapsed().as_secs_f64());
}

/// Once the commit was sent the target may run the VM: a cancel is refused with the reason
/// (here while the target, which runs the VM, holds its RESUMED back for a few seconds), and the
/// migration completes.
#[test]
fn a_cancel_after_the_commit_is_refused() {
    let dir = temp_dir("migration-late-cancel");
    let (src, serial) = Node::guest(
        &dir,
        "src",
        None,
        "size=128M",
        "scenario=counter counter.every=1",
    );
    let hold = [("SKIFF_TEST_MIGRATION_HOLD", "resumed@3")];
    let dst = Node::start_env(&dir, "dst", None, &[], &hold);
    wait_for_counter(&serial, 3);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    let sender = send_in_background(&src, &url);
    dst.wait_for_event("migration", "hold", 1, &serial);
    let (code, out, err) = src.remote(&["migration-cancel"]);
    let (_, progress, _) = src.remote(&["migration-progress"]);
    assert_ne!(
        code,
        Some(0),
        "a cancel after the commit was accepted: {out}"
    );
    assert!(
        err.contains("too late") || out.contains("too late"),
        "{out}{err}\nthe source's progress: {progress}\n{}",
        src.events()
    );
    eprintln!("a cancel after the commit: {}", err.trim());
    let out = sender.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The guest runs once, on the target.
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    let (_, info, _) = dst.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    remote_ok(&dst.api, &["shutdown-vmm"]);
}

/// The link between the hosts cut while the source's vCPUs are paused for the stop-and-copy:
/// the source gives up on the dead connection (its unacknowledged data times out; no answer can
/// come) and resumes its VM, which loses nothing.
#[test]
fn a_cut_link_during_the_stop_and_copy_resumes_the_source() {
    let hosts = match TwoHosts::create("cutsw") {
        Ok(h) => h,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let dir = temp_dir("migration-cut-switchover");
    let (src, serial) = Node::guest_env(
        &dir,
        "src",
        Some(&hosts.a),
        "size=128M",
        "scenario=counter counter.every=1",
        &[("SKIFF_TEST_MIGRATION_HOLD", "switchover:1@2")],
    );
    let dst = Node::start(&dir, "dst", Some(&hosts.b), &[]);
    wait_for_counter(&serial, 3);
    let url = format!("tcp:{}:6003", TwoHosts::B_ADDR);
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = src.remote(&["send-migration", &url, "--no-wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    src.wait_for_event("migration", "hold", 1, &serial);
    hosts.cut();
    let cut_at = Instant::now();
    let p = wait_for_phase(&src, "failed", &serial);
    eprintln!(
        "link cut during the stop-and-copy: the source gave up after {:.1} s: {}",
        cut_at.elapsed().as_secs_f64(),
        p["error"]
    );
    // Within the connections' 30 s timeout (and its keepalive), not the two minutes the target
    // may take to load the VM: the guest stays paused no longer than that.
    assert!(
        cut_at.elapsed() < Duration::from_secs(60),
        "the source noticed the cut only after {:?}",
        cut_at.elapsed()
    );
    assert_source_runs(&src, &serial, "a cut link during the stop-and-copy");
    remote_ok(&src.api, &["shutdown-vmm"]);
}
