//! Start-up benchmark: runs the built-in demo guest repeatedly and prints
//! - the time from spawning `skiff` to the boot vCPU's first KVM_RUN (target ≤ 10 ms), and
//! - the VMM's resident memory beyond guest RAM while the guest runs (target ≤ 6 MiB).
//!
//! Figures only: nothing here asserts on time (the host is shared and noisy).
//! Run with `cargo bench -p vmm --bench startup` (SKIFF_BENCH_RUNS sets the number of runs).

use std::process::{Command, Stdio};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn field_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let i = text.find(marker)? + marker.len();
    text[i..].split_whitespace().next()
}

fn stats(name: &str, unit: &str, mut v: Vec<f64>, target: f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = v[v.len() / 2];
    println!(
        "{name:<34} median {median:>9.3} {unit}  min {:>9.3}  max {:>9.3}  (target <= {target} {unit}: {})",
        v[0],
        v[v.len() - 1],
        if median <= target { "met" } else { "NOT met" }
    );
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let runs: usize = std::env::var("SKIFF_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bin = env!("CARGO_BIN_EXE_skiff");
    let mut to_first_run = Vec::new();
    let mut main_to_first_run = Vec::new();
    let mut overhead = Vec::new();
    for _ in 0..runs {
        let t0 = monotonic_ns();
        let out = Command::new(bin)
            .args(["-v", "--serial", "off"])
            .stdin(Stdio::null())
            .output()
            .expect("run skiff");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "skiff failed:\n{log}");
        let mono: u64 = field_after(&log, "(monotonic ")
            .and_then(|s| s.parse().ok())
            .expect("timing line");
        to_first_run.push((mono - t0) as f64 / 1e6);
        let ms: f64 = field_after(&log, "first KVM_RUN ")
            .and_then(|s| s.parse().ok())
            .expect("timing line");
        main_to_first_run.push(ms);
        let kib: f64 = field_after(&log, "VMM overhead ")
            .and_then(|s| s.parse().ok())
            .expect("memory line");
        overhead.push(kib / 1024.0);
    }
    println!("skiff start-up, {runs} runs of the built-in demo guest (512 MiB, 1 vCPU)");
    stats("spawn -> first KVM_RUN", "ms", to_first_run, 10.0);
    stats("main() -> first KVM_RUN", "ms", main_to_first_run, 10.0);
    stats("VMM RSS beyond guest RAM", "MiB", overhead, 6.0);
}
