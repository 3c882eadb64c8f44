//! `skiff-remote`: drive a running skiff through its API socket.
//!
//! `skiff-remote --api-socket PATH <command>`; `info`, `counters`, `ping` and
//! `migration-progress` print pretty JSON on stdout; errors print
//! `skiff-remote: error: <status> <message>` on stderr and exit 1 (2 for usage errors).
//!
//! `send-migration` starts a migration and follows it (polling `vm.migration-progress` every
//! 200 ms) until it ends: a live one-line progress bar when stdout is a terminal, otherwise one
//! plain line per phase change and at most one a second. It exits 0 once the migration has
//! completed, 1 when it failed or was cancelled (the error on stderr).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_server::{
    ApiClient, ClientError, DeviceOverride, MigrationPhase, MigrationProgress, MigrationTls,
    MigrationUrl, ReceiveMigrationRequest, SendMigrationRequest,
};
use clap::{Parser, Subcommand};

/// How often `send-migration` polls the progress.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Plain output prints at least this often while the phase stays the same.
const PLAIN_EVERY: Duration = Duration::from_secs(1);
/// How long `send-migration` tolerates a progress of phase `none` after the start.
const NONE_GRACE: Duration = Duration::from_secs(5);

/// Control a running skiff VM over its API socket (skiff --api-socket PATH).
#[derive(Debug, Parser)]
#[command(name = "skiff-remote", version)]
struct Cli {
    /// The API socket skiff was started with (skiff --api-socket PATH).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that skiff answers; print its version, pid and features.
    Ping,
    /// Stop the VM and end the skiff process.
    ShutdownVmm,
    /// Create the VM from a JSON configuration file ("-" reads stdin).
    Create {
        /// VmConfig JSON file, or - for stdin.
        config: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Reboot the VM.
    Reboot,
    /// Press the ACPI power button.
    PowerButton,
    /// Print the VM's configuration, state and devices as JSON.
    Info,
    /// Print per-device I/O counters as JSON.
    Counters,
    /// Snapshot the (paused) VM to a directory URL, e.g. file:///var/lib/skiff/snap1.
    Snapshot {
        /// Destination, file:///absolute/directory.
        url: String,
    },
    /// Restore a VM from a snapshot directory URL.
    Restore {
        /// Source, file:///absolute/directory.
        url: String,
        /// Resume the VM once restored (otherwise it stays paused).
        #[arg(long)]
        resume: bool,
    },
    /// Stop and forget the VM.
    Delete,
    /// Migrate the VM to a target waiting with receive-migration, showing the progress until
    /// it ends (exit 0 when completed, 1 when failed or cancelled).
    SendMigration {
        /// The target's receiver URL: tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:/PATH.
        #[arg(value_parser = MigrationUrl::parse)]
        url: MigrationUrl,
        /// Longest switchover downtime in ms (server default 300).
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Parallel connections for guest RAM, 1 to 16 (default 1).
        #[arg(long, value_name = "N")]
        connections: Option<u32>,
        /// Same-host migration handing guest RAM over (unix: URLs only).
        #[arg(long)]
        local: bool,
        /// Bandwidth cap in Mbit/s.
        #[arg(long, value_name = "MBPS")]
        bandwidth_mbps: Option<u64>,
        /// Most pre-copy passes before switching over anyway.
        #[arg(long, value_name = "N")]
        max_iterations: Option<u32>,
        /// Return once the migration has started instead of following it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Wait for a migrating VM (on a skiff started without one); returns once listening.
    ReceiveMigration {
        /// Where to listen: tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:/PATH.
        #[arg(value_parser = MigrationUrl::parse)]
        url: MigrationUrl,
        /// A host-local resource that differs here, e.g. disk0:path=/new/img, net0:tap=tap1,
        /// accel0:socket=/run/x.sock (repeatable; keys: path, tap, socket).
        #[arg(long = "override", value_name = "ID:KEY=VALUE", value_parser = parse_override)]
        overrides: Vec<Override>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Print the current (or last) migration's progress as JSON.
    MigrationProgress,
    /// Cancel the migration under way.
    MigrationCancel,
}

/// Mutually authenticated TLS for a migration: all three, or none for plain TCP.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
struct TlsArgs {
    /// This side's certificate chain (PEM); with --tls-key and --tls-ca turns TLS on.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) the peer's certificate must chain to.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The request's `tls` field (paths made absolute: the server resolves them, not us).
    fn to_request(&self) -> Result<Option<MigrationTls>, String> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
        Ok(Some(MigrationTls {
            cert: abs(cert)?,
            key: abs(key)?,
            ca: abs(ca)?,
        }))
    }
}

/// One `--override ID:KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Override {
    id: String,
    key: &'static str,
    value: String,
}

fn parse_override(s: &str) -> Result<Override, String> {
    let (id, kv) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected ID:KEY=VALUE (e.g. disk0:path=/new/img)"))?;
    let (key, value) = kv
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID:KEY=VALUE (e.g. disk0:path=/new/img)"))?;
    if id.is_empty() {
        return Err(format!("{s:?}: the device id is empty"));
    }
    let key = match key {
        "path" => "path",
        "tap" => "tap",
        "socket" => "socket",
        other => {
            return Err(format!(
                "{s:?}: unknown key {other:?} (path, tap or socket)"
            ))
        }
    };
    Ok(Override {
        id: id.to_string(),
        key,
        value: value.to_string(),
    })
}

/// Gather `--override`s by device; the same key twice for a device is an error.
fn overrides_map(list: &[Override]) -> Result<BTreeMap<String, DeviceOverride>, String> {
    let mut map: BTreeMap<String, DeviceOverride> = BTreeMap::new();
    for o in list {
        let d = map.entry(o.id.clone()).or_default();
        let taken = match o.key {
            "path" => d.path.replace(PathBuf::from(&o.value)).is_some(),
            "tap" => d.tap.replace(o.value.clone()).is_some(),
            _ => d.socket.replace(PathBuf::from(&o.value)).is_some(),
        };
        if taken {
            return Err(format!("--override {}:{} is given twice", o.id, o.key));
        }
    }
    Ok(map)
}

/// `1536` → `1.5 KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A `width`-character bar, `#` for the done part.
fn bar(fraction: f64, width: usize) -> String {
    let done = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(done), "-".repeat(width - done))
}

/// One frame of the terminal progress line: `\r`, the line, and erase-to-end-of-line.
fn tty_frame(p: &MigrationProgress) -> String {
    let f = p.fraction();
    format!(
        "\r{:<10} iter {:>3} {} {:>3}% {}/{} {}/s dirty {} pages/s downtime ~{} ms\x1b[K",
        p.phase.as_str(),
        p.iteration,
        bar(f, 24),
        (f * 100.0).floor() as u64,
        human_bytes(p.bytes_sent),
        human_bytes(p.bytes_sent.saturating_add(p.bytes_remaining)),
        human_bytes(p.bandwidth_bytes_per_s),
        p.dirty_rate_pages_per_s,
        p.expected_downtime_ms,
    )
}

/// One plain progress line (no newline).
fn plain_line(p: &MigrationProgress) -> String {
    let mut l = format!(
        "migration: {} iteration {}: {}% ({} sent, {} remaining), {}/s, dirty {} pages/s, expected downtime {} ms",
        p.phase,
        p.iteration,
        (p.fraction() * 100.0).floor() as u64,
        human_bytes(p.bytes_sent),
        human_bytes(p.bytes_remaining),
        human_bytes(p.bandwidth_bytes_per_s),
        p.dirty_rate_pages_per_s,
        p.expected_downtime_ms,
    );
    if p.throttle_percent > 0 {
        l.push_str(&format!(", throttle {}%", p.throttle_percent));
    }
    l.push_str(&format!(", elapsed {:.1} s", p.elapsed_ms as f64 / 1000.0));
    if let Some(d) = p.downtime_ms {
        l.push_str(&format!(", downtime {d} ms"));
    }
    l
}

/// Decides when plain output prints: on every phase change, otherwise at most every
/// [`PLAIN_EVERY`].
#[derive(Debug, Default)]
struct PlainReporter {
    last: Option<(MigrationPhase, Instant)>,
}

impl PlainReporter {
    /// The line to print for `p` seen at `now`, if any.
    fn update(&mut self, p: &MigrationProgress, now: Instant) -> Option<String> {
        let due = match self.last {
            None => true,
            Some((phase, at)) => phase != p.phase || now.duration_since(at) >= PLAIN_EVERY,
        };
        if !due {
            return None;
        }
        self.last = Some((p.phase, now));
        Some(plain_line(p))
    }
}

/// How a followed migration ended, as the CLI reports it: the exit status and the message.
fn outcome(p: &MigrationProgress) -> Result<String, String> {
    let why = p
        .error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    match p.phase {
        MigrationPhase::Completed => Ok(format!(
            "migration completed in {:.1} s{}",
            p.elapsed_ms as f64 / 1000.0,
            p.downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default()
        )),
        MigrationPhase::Cancelled => Err(format!("migration cancelled{why}")),
        other => Err(format!("migration {other}{why}")),
    }
}

fn stdout_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDOUT_FILENO) == 1 }
}

/// Poll the progress until a final phase, rendering it on `out`.
fn follow(c: &ApiClient, out: &mut impl Write, tty: bool) -> Result<MigrationProgress, String> {
    let mut plain = PlainReporter::default();
    let mut none_since: Option<Instant> = None;
    let io = |e: std::io::Error| format!("cannot write the progress: {e}");
    loop {
        let p = c.migration_progress().map_err(|e| e.to_string())?;
        let now = Instant::now();
        if tty {
            write!(out, "{}", tty_frame(&p)).map_err(io)?;
            if p.phase.is_final() {
                writeln!(out).map_err(io)?;
            }
            out.flush().map_err(io)?;
        } else if let Some(line) = plain.update(&p, now) {
            writeln!(out, "{line}").map_err(io)?;
            out.flush().map_err(io)?;
        }
        if p.phase.is_final() {
            return Ok(p);
        }
        if p.phase == MigrationPhase::None {
            let since = *none_since.get_or_insert(now);
            if now.duration_since(since) >= NONE_GRACE {
                if tty {
                    let _ = writeln!(out);
                }
                return Err("the VMM reports no migration under way".into());
            }
        } else {
            none_since = None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn print_json(v: &serde_json::Value) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

fn read_config(path: &PathBuf) -> Result<Vec<u8>, String> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read the configuration from stdin: {e}"))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let c = ApiClient::new(&cli.api_socket).map_err(|e| e.to_string())?;
    let api = |r: Result<(), ClientError>| r.map_err(|e| e.to_string());
    match cli.command {
        Command::Ping => print_json(&c.ping_json().map_err(|e| e.to_string())?),
        Command::ShutdownVmm => api(c.shutdown_vmm()),
        Command::Create { config } => api(c.create_raw(read_config(&config)?)),
        Command::Boot => api(c.boot()),
        Command::Pause => api(c.pause()),
        Command::Resume => api(c.resume()),
        Command::Shutdown => api(c.shutdown()),
        Command::Reboot => api(c.reboot()),
        Command::PowerButton => api(c.power_button()),
        Command::Info => print_json(&c.info_json().map_err(|e| e.to_string())?),
        Command::Counters => {
            let counters = c.counters().map_err(|e| e.to_string())?;
            print_json(&serde_json::to_value(counters).map_err(|e| e.to_string())?)
        }
        Command::Snapshot { url } => api(c.snapshot(&url)),
        Command::Restore { url, resume } => api(c.restore(&url, resume)),
        Command::Delete => api(c.delete()),
        Command::SendMigration {
            url,
            downtime_ms,
            connections,
            local,
            bandwidth_mbps,
            max_iterations,
            no_wait,
            tls,
        } => {
            let mut req = SendMigrationRequest::new(url);
            if let Some(d) = downtime_ms {
                req.downtime_limit_ms = d;
            }
            if let Some(n) = connections {
                req.connections = n;
            }
            req.local = local;
            req.bandwidth_limit_mbps = bandwidth_mbps;
            req.max_iterations = max_iterations;
            req.tls = tls.to_request()?;
            api(c.send_migration(&req))?;
            if no_wait {
                return Ok(());
            }
            let last = follow(&c, &mut std::io::stdout().lock(), stdout_is_tty())?;
            println!("{}", outcome(&last)?);
            Ok(())
        }
        Command::ReceiveMigration {
            url,
            overrides,
            tls,
        } => {
            let mut req = ReceiveMigrationRequest::new(url);
            req.overrides = overrides_map(&overrides)?;
            req.tls = tls.to_request()?;
            api(c.receive_migration(&req))
        }
        Command::MigrationProgress => {
            let p = c.migration_progress().map_err(|e| e.to_string())?;
            print_json(&serde_json::to_value(p).map_err(|e| e.to_string())?)
        }
        Command::MigrationCancel => api(c.migration_cancel()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-remote: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(phase: MigrationPhase) -> MigrationProgress {
        MigrationProgress {
            phase,
            iteration: 3,
            bytes_sent: 3 << 30,
            bytes_remaining: 1 << 30,
            dirty_rate_pages_per_s: 1200,
            bandwidth_bytes_per_s: 118 << 20,
            expected_downtime_ms: 120,
            throttle_percent: 0,
            error: None,
            elapsed_ms: 3250,
            downtime_ms: None,
        }
    }

    #[test]
    fn sizes_and_bars() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(118 << 20), "118.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(bar(0.0, 4), "[----]");
        assert_eq!(bar(0.5, 4), "[##--]");
        assert_eq!(bar(1.0, 4), "[####]");
        assert_eq!(bar(7.0, 4), "[####]");
    }

    #[test]
    fn tty_line() {
        let f = tty_frame(&progress(MigrationPhase::Precopy));
        assert_eq!(
            f,
            "\rprecopy    iter   3 [##################------]  75% 3.0 GiB/4.0 GiB 118.0 MiB/s dirty 1200 pages/s downtime ~120 ms\x1b[K"
        );
        assert!(!f.contains('\n'));
        let done = tty_frame(&MigrationProgress {
            bytes_remaining: 0,
            ..progress(MigrationPhase::Completed)
        });
        assert!(
            done.contains("completed  iter   3 [########################] 100%"),
            "{done}"
        );
        let start = tty_frame(&MigrationProgress::default());
        assert!(
            start.contains("none       iter   0 [------------------------]   0% 0 B/0 B"),
            "{start}"
        );
    }

    #[test]
    fn plain_lines() {
        let mut p = progress(MigrationPhase::Precopy);
        assert_eq!(
            plain_line(&p),
            "migration: precopy iteration 3: 75% (3.0 GiB sent, 1.0 GiB remaining), 118.0 MiB/s, dirty 1200 pages/s, expected downtime 120 ms, elapsed 3.2 s"
        );
        p.throttle_percent = 20;
        p.downtime_ms = Some(85);
        assert!(plain_line(&p).ends_with("throttle 20%, elapsed 3.2 s, downtime 85 ms"));

        // One line per phase change, otherwise at most one a second.
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = PlainReporter::default();
        let setup = progress(MigrationPhase::Setup);
        let pre = progress(MigrationPhase::Precopy);
        assert!(r
            .update(&setup, ms(0))
            .unwrap()
            .starts_with("migration: setup"));
        assert_eq!(r.update(&setup, ms(200)), None);
        assert!(r
            .update(&pre, ms(400))
            .unwrap()
            .starts_with("migration: precopy"));
        assert_eq!(r.update(&pre, ms(600)), None);
        assert_eq!(r.update(&pre, ms(1200)), None);
        assert!(
            r.update(&pre, ms(1400)).is_some(),
            "a second after the last line"
        );
        assert_eq!(r.update(&pre, ms(1600)), None);
        let done = progress(MigrationPhase::Completed);
        assert!(r
            .update(&done, ms(1800))
            .unwrap()
            .starts_with("migration: completed"));
    }

    #[test]
    fn outcomes() {
        let mut p = progress(MigrationPhase::Completed);
        p.downtime_ms = Some(85);
        assert_eq!(
            outcome(&p).unwrap(),
            "migration completed in 3.2 s, downtime 85 ms"
        );
        let mut p = progress(MigrationPhase::Failed);
        p.error = Some("target closed the connection".into());
        assert_eq!(
            outcome(&p).unwrap_err(),
            "migration failed: target closed the connection"
        );
        assert_eq!(
            outcome(&progress(MigrationPhase::Cancelled)).unwrap_err(),
            "migration cancelled"
        );
    }

    #[test]
    fn override_arguments() {
        let o = parse_override("hostdev0:path=/sys/bus/pci/devices/0000:01:00.0").unwrap();
        assert_eq!(
            o,
            Override {
                id: "hostdev0".into(),
                key: "path",
                value: "/sys/bus/pci/devices/0000:01:00.0".into()
            }
        );
        for bad in ["disk0", "disk0:path", ":path=/x", "disk0:file=/x"] {
            assert!(parse_override(bad).is_err(), "{bad}");
        }
        let list: Vec<Override> = ["disk0:path=/new/img", "net0:tap=tap1", "net0:path=/x"]
            .iter()
            .map(|s| parse_override(s).unwrap())
            .collect();
        let m = overrides_map(&list).unwrap();
        assert_eq!(m["disk0"].path, Some(PathBuf::from("/new/img")));
        assert_eq!(m["net0"].tap.as_deref(), Some("tap1"));
        assert_eq!(
            m["net0"].path,
            Some(PathBuf::from("/x")),
            "the server refuses two keys"
        );
        let twice = [
            parse_override("d:tap=a").unwrap(),
            parse_override("d:tap=b").unwrap(),
        ];
        assert_eq!(
            overrides_map(&twice).unwrap_err(),
            "--override d:tap is given twice"
        );
    }
}
