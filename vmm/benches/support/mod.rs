//! What the benchmarks that run real `skiff` processes share: the host's figures, a temporary
//! directory, polling, a free port, and a `skiff --api-socket` process. Each bench uses a part
//! of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::client::ApiClient;

/// `SKIFF_BENCH_QUICK` is set: fewer sizes and repeats.
pub fn quick() -> bool {
    std::env::var_os("SKIFF_BENCH_QUICK").is_some()
}

/// The host's 1-minute load average (the figures move with it).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A temporary directory removed at the end (kept with `SKIFF_BENCH_KEEP`).
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SKIFF_BENCH_KEEP").is_some() {
            println!("kept {} (SKIFF_BENCH_KEEP)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `f` every 10 ms until it holds; panics after `deadline` (a broken set-up, not a
/// figure).
pub fn wait_for(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough here).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `skiff --api-socket` process (in network namespace `ns` when given), killed when dropped.
pub struct Skiff {
    /// Its name (files are `NAME.sock`, `NAME.events`, `NAME.log`).
    pub name: String,
    /// Its API socket.
    pub api: PathBuf,
    /// Its event monitor file.
    pub events: PathBuf,
    log: PathBuf,
    /// The process.
    pub child: Child,
}

impl Skiff {
    /// Start it with `args`, in network namespace `ns` when given; returns once the API
    /// socket is there.
    pub fn spawn(dir: &Path, name: &str, ns: Option<&str>, args: &[&str]) -> Skiff {
        let api = dir.join(format!("{name}.sock"));
        let events = dir.join(format!("{name}.events"));
        let log = dir.join(format!("{name}.log"));
        let skiff = env!("CARGO_BIN_EXE_skiff");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, skiff]);
                c
            }
            None => Command::new(skiff),
        };
        let child = cmd
            .arg("--api-socket")
            .arg(&api)
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn skiff");
        let s = Skiff {
            name: name.into(),
            api,
            events,
            log,
            child,
        };
        wait_for(
            &format!("{name}: API socket"),
            Duration::from_secs(30),
            || s.api.exists(),
        );
        s
    }

    /// A client of its API.
    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.api).expect("API client")
    }

    /// Wait for the process to exit (a migrated source exits by itself).
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The last 20 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(c) = ApiClient::new(&self.api) {
                let _ = c.shutdown_vmm();
            }
            if !self.wait_exit(Duration::from_secs(3)) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}
