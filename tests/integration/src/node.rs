//! Live-migration test helpers: a skiff node serving its API (optionally on one of the
//! [`TwoHosts`]), `skiff-remote send-migration`, and the `counter` guest's continuity checks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{remote, skiff_bin, skiff_remote_bin, wait_for_path, SkiffProcess, TwoHosts};

/// How long a guest-side wait may take (emulated guests are slow).
pub const DEADLINE: Duration = Duration::from_secs(300);

/// One skiff serving its API (on host `ns`, or here when `None`).
pub struct Node {
    /// Its API socket.
    pub api: PathBuf,
    /// The process.
    pub process: SkiffProcess,
}

impl Node {
    /// Start skiff with `--api-socket` and `args` (no args: an empty target waiting for a VM).
    pub fn start(dir: &Path, name: &str, ns: Option<&str>, args: &[&str]) -> Self {
        Self::start_env(dir, name, ns, args, &[])
    }

    /// [`Node::start`] with environment variables set for the process (test knobs).
    pub fn start_env(
        dir: &Path,
        name: &str,
        ns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let api = dir.join(format!("{name}.sock"));
        let events = format!("path={}", dir.join(format!("{name}.events")).display());
        let mut cmd = match ns {
            Some(ns) => TwoHosts::command(ns, &skiff_bin()),
            None => std::process::Command::new(skiff_bin()),
        };
        cmd.arg("--api-socket")
            .arg(&api)
            .args(["--event-monitor", &events, "-v"])
            .args(args)
            .envs(env.iter().copied());
        let process = SkiffProcess::spawn_command(cmd);
        wait_for_path(&api, Duration::from_secs(30));
        Self { api, process }
    }

    /// Start a VM running the test guest with `cmdline` and `memory` (`size=...`), its serial
    /// output in `dir/serial.log`; returns the node and that path.
    pub fn guest(
        dir: &Path,
        name: &str,
        ns: Option<&str>,
        memory: &str,
        cmdline: &str,
    ) -> (Self, PathBuf) {
        Self::guest_env(dir, name, ns, memory, cmdline, &[])
    }

    /// [`Node::guest`] with environment variables set for the process (test knobs).
    pub fn guest_env(
        dir: &Path,
        name: &str,
        ns: Option<&str>,
        memory: &str,
        cmdline: &str,
        env: &[(&str, &str)],
    ) -> (Self, PathBuf) {
        let serial = dir.join("serial.log");
        let serial_arg = format!("file={}", serial.display());
        let args = [
            "--memory",
            memory,
            "--serial",
            &serial_arg,
            "--cmdline",
            cmdline,
        ];
        (Self::start_env(dir, name, ns, &args, env), serial)
    }

    /// `skiff-remote` against this node.
    pub fn remote(&self, args: &[&str]) -> (Option<i32>, String, String) {
        remote(&self.api, args)
    }

    /// The events this node's event monitor recorded so far (one JSON object a line).
    pub fn events(&self) -> String {
        std::fs::read_to_string(self.api.with_extension("events")).unwrap_or_default()
    }

    /// Wait until the event monitor recorded `source` / `event` `n` times in all; on timeout,
    /// panic with the events and the serial output `serial`.
    pub fn wait_for_event(&self, source: &str, event: &str, n: usize, serial: &Path) {
        let needle = format!("\"event\":\"{event}\"");
        let count = || {
            self.events()
                .lines()
                .filter(|l| l.contains(&needle) && l.contains(&format!("\"source\":\"{source}\"")))
                .count()
        };
        let deadline = Instant::now() + DEADLINE;
        while count() < n {
            assert!(
                Instant::now() < deadline,
                "no {source}/{event} event #{n}; events:\n{}\nserial:\n{}",
                self.events(),
                std::fs::read_to_string(serial).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `counter: N` values in the serial file, in order.
pub fn counters(serial: &Path) -> Vec<u64> {
    counter_values(&std::fs::read_to_string(serial).unwrap_or_default())
}

/// The `counter: N` values in serial output `text`, in order.
pub fn counter_values(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("counter: "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Wait until the serial file shows `counter: N` with N >= `at_least`.
pub fn wait_for_counter(serial: &Path, at_least: u64) {
    let deadline = Instant::now() + DEADLINE;
    while counters(serial).last().copied().unwrap_or(0) < at_least {
        assert!(
            Instant::now() < deadline,
            "the guest did not reach counter {at_least}:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every counter value follows the previous one: the guest neither restarted nor skipped.
pub fn assert_continuous(serial: &Path) {
    let values = counters(serial);
    for w in values.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the counter jumped from {} to {}:\n{}",
            w[0],
            w[1],
            std::fs::read_to_string(serial).unwrap_or_default()
        );
    }
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(
        !text.contains("FAIL"),
        "the guest found damaged memory:\n{text}"
    );
}

/// `skiff-remote send-migration` (waits for the end; its exit code and output).
pub fn send_migration(src: &Node, url: &str, extra: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(skiff_remote_bin())
        .arg("--api-socket")
        .arg(&src.api)
        .args(["send-migration", url])
        .args(extra)
        .output()
        .expect("skiff-remote");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
