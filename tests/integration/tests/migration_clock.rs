//! The guest's wall clock is right on the target of a live migration: it moves on by the real
//! downtime, neither frozen (behind the host by the downtime) nor jumped back. The `clock` guest
//! reads kvmclock as Linux does and prints its wall-clock time; the target holds the state it
//! received for a few seconds before restoring it (test knob), so the time between the source's
//! save of the kvmclock and the target's restore — what the clock must be advanced by — is long
//! enough to see. (A hold on the source, paused, would not do: the source's kvmclock runs on
//! while its vCPUs are paused, and is saved only at the end.) Once as this host saves the clock
//! (with KVM's `KVM_CLOCK_REALTIME` pairing when `KVM_GET_CLOCK` gives one — a nested PVM host
//! does not: its KVM has no stable master clock), once as from a host without it (test knob
//! `SKIFF_TEST_NO_CLOCK_REALTIME`): skiff then advances the clock by its own realtime reading.
//! Each prints the target's account of how it advanced the clock.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::node::{send_migration as send, Node, DEADLINE};
use integration::{remote_ok, temp_dir};

/// The longest the guest's wall clock may be off the host's.
const TOLERANCE_MS: i64 = 2000;
/// How long the target holds the received state before restoring it.
const EXTRA_DOWNTIME_S: u64 = 3;

fn host_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `clock: <unix_ms> uptime_ms <ms>` values in the serial file, in order (whole lines only:
/// the guest may be in the middle of one).
fn clock_values(serial: &Path) -> Vec<i64> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("clock: "))
        .filter(|rest| rest.contains(" uptime_ms "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Watch the serial file until `n` more clock lines appeared; each with the host's time when it
/// was first seen (polled every 2 ms: the offset includes that and the UART's latency).
fn observe(serial: &Path, n: usize) -> Vec<(i64, i64)> {
    let start = clock_values(serial).len();
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while seen.len() < n {
        let values = clock_values(serial);
        let now = host_ms();
        for &v in values.iter().skip(start + seen.len()) {
            seen.push((v, now));
        }
        assert!(
            Instant::now() < deadline,
            "the guest printed {} of {n} clock lines:\n{}",
            seen.len(),
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    seen.truncate(n);
    seen
}

/// Offsets (guest − host, ms) of `lines`; fails when one is beyond the tolerance.
fn offsets(lines: &[(i64, i64)], when: &str, serial: &Path) -> Vec<i64> {
    let offsets: Vec<i64> = lines.iter().map(|(guest, host)| guest - host).collect();
    for &o in &offsets {
        assert!(
            o.abs() <= TOLERANCE_MS,
            "{when}: the guest's wall clock is {o} ms off the host's (offsets {offsets:?}):\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
    }
    offsets
}

/// Migrate the `clock` guest (the source started with `env`); returns how the target says it
/// advanced the kvmclock.
fn wall_clock_survives_migration(name: &str, env: &[(&str, &str)]) -> String {
    let dir = temp_dir(&format!("migration-clock-{name}"));
    let (mut src, serial) = Node::guest_env(
        &dir,
        "src",
        None,
        "size=128M",
        "scenario=clock clock.every_ms=200",
        env,
    );
    let before = offsets(&observe(&serial, 5), "before the migration", &serial);
    let hold = format!("restore:1@{EXTRA_DOWNTIME_S}");
    let mut dst = Node::start_env(
        &dir,
        "dst",
        None,
        &[],
        &[("SKIFF_TEST_MIGRATION_HOLD", hold.as_str())],
    );
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    let started = Instant::now();
    let (code, out) = send(&src, &url, &[]);
    assert_eq!(code, Some(0), "{out}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(EXTRA_DOWNTIME_S),
        "the migration took {took:?}: the target's hold before the restore did not happen"
    );
    src.process.wait(Duration::from_secs(30));
    let after = offsets(&observe(&serial, 10), "after the migration", &serial);
    // Never back: every printed time after the one before it.
    let all = clock_values(&serial);
    for w in all.windows(2) {
        assert!(
            w[1] >= w[0],
            "the guest's wall clock went back from {} to {}",
            w[0],
            w[1]
        );
    }
    // The jump across the migration is the downtime, not zero (a frozen clock).
    let jump = all
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "guest wall clock ({name}): offsets before {before:?} ms, after {after:?} ms; \
         largest step between two lines {jump} ms (lines every 200 ms; the state waited \
         {EXTRA_DOWNTIME_S} s on the target); migration: {}",
        out.lines().last().unwrap_or("")
    );
    assert!(
        jump >= (EXTRA_DOWNTIME_S * 1000) as i64 - 200,
        "the guest's clock did not move on over the downtime (largest step {jump} ms)"
    );
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let run = dst.process.wait(Duration::from_secs(30));
    let how = run
        .stderr
        .lines()
        .find(|l| l.contains("kvmclock restored"))
        .unwrap_or_else(|| {
            panic!(
                "the target did not say how it set the clock:\n{}",
                run.log()
            )
        })
        .to_string();
    eprintln!("target ({name}): {how}");
    how
}

#[test]
fn the_guest_wall_clock_moves_on_by_the_downtime() {
    wall_clock_survives_migration("as-saved", &[]);
}

#[test]
fn the_guest_wall_clock_moves_on_without_kvm_clock_realtime() {
    let how =
        wall_clock_survives_migration("no-realtime", &[("SKIFF_TEST_NO_CLOCK_REALTIME", "1")]);
    assert!(how.contains("skiff's realtime reading"), "{how}");
}
