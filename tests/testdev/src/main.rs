//! `skiff-testdev --socket PATH [--id NAME] [--migration CAPS] [--dma-logging on|off] [--msi]
//! [--memory-mib N] [--fill-memory SEED] [fault injection flags] [-v]`: serves one vfio-user client on PATH, exits 0 when it
//! disconnects cleanly, 3 when `--exit-on-arc` fired, 1 on other errors, 2 on a bad command
//! line; removes PATH on exit.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use log::{error, info};
use testdev::fault::parse_arc;
use testdev::fsm::{MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};

const USAGE: &str = "usage: skiff-testdev --socket PATH [--id NAME] [--migration CAPS]
                     [--dma-logging on|off] [--msi] [--memory-mib N]
                     [--fill-memory SEED] [--fail-arc FROM:TO[:N]]...
                     [--fail-read-after BYTES] [--reject-resume]
                     [--exit-on-arc FROM:TO]... [-v]

A vfio-user PCI test device (vendor 1b36, device 0f5f): DMA engine, MSI-X/INTx,
device memory in BAR2 (1 MiB by default), peer-to-peer writes, VFIO v2 migration. Serves one
client on PATH and exits when it disconnects.
  --socket PATH        Unix socket to listen on (a stale socket file is replaced)
  --id NAME            name used in log lines (default: testdev)
  --migration CAPS     migration capabilities: a comma-separated list of
                       stop-copy, p2p, pre-copy (stop-copy is required with the
                       others), or none (no migration: the MIGRATION feature is
                       not offered). Default: stop-copy,p2p,pre-copy
  --no-p2p             the same as leaving p2p out of --migration
  --dma-logging on|off offer DMA logging (DMA_LOGGING_START/STOP/REPORT); default on
  --msi                add an MSI capability (64-bit, per-vector masking, 2 vectors)
  --memory-mib N       device memory (BAR2) of N MiB: a power of two, 1 to 1024;
                       default 1
  --fill-memory SEED   fill the device memory with the pattern of SEED (u32, decimal
                       or 0x hex; byte i = the pattern byte i of WRITE_PATTERN) at
                       start instead of zeroes
  -v                   debug logging (RUST_LOG overrides)

Fault injection, for testing migration failure handling (all off by default; each
injected fault logs \"fault injected: ...\" at warn level). FROM and TO are the
kernel's state names: RUNNING, STOP, RUNNING_P2P, STOP_COPY, PRE_COPY, PRE_COPY_P2P,
RESUMING; the arc must be a direct arc of the machine --migration offers.
  --fail-arc FROM:TO[:N]   the Nth request (default 1st) for the arc FROM -> TO fails
                           with EIO, the state unchanged; other requests succeed.
                           Repeatable
  --fail-read-after BYTES  once BYTES bytes of migration data were read in STOP_COPY
                           (counted from entering it), the next MIG_DATA_READ fails
                           with EIO, consuming nothing: the session stays and later
                           reads continue the stream. Once per process
  --reject-resume          RESUMING -> STOP always fails with EINVAL as if the data
                           were corrupt; the device goes to ERROR (reset to leave it)
  --exit-on-arc FROM:TO    when the arc FROM -> TO is requested, exit with code 3
                           without replying (a device process dying mid-migration).
                           Repeatable

Exit codes: 0 the client disconnected cleanly, 1 protocol or I/O error, 2 bad command
line, 3 --exit-on-arc fired.";

/// Parses `--memory-mib`'s value into bytes: a power of two from 1 to 1024 MiB.
fn parse_memory_mib(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if n.is_power_of_two() && n <= 1024 => Ok(n << 20),
        _ => Err(format!(
            "--memory-mib: {v:?} is not a power of two from 1 to 1024"
        )),
    }
}

/// Parses a u32 in decimal or `0x` hex (`--fill-memory`).
fn parse_u32(v: &str) -> Option<u32> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Parses `--migration`'s value into `VFIO_MIGRATION_*` flags.
fn parse_migration(v: &str) -> Result<u64, String> {
    if v == "none" {
        return Ok(0);
    }
    let mut caps = 0;
    for cap in v.split(',') {
        caps |= match cap.trim() {
            "stop-copy" => MIGRATION_STOP_COPY,
            "p2p" => MIGRATION_P2P,
            "pre-copy" => MIGRATION_PRE_COPY,
            other => return Err(format!("unknown migration capability {other:?}")),
        };
    }
    if caps & MIGRATION_STOP_COPY == 0 {
        return Err("--migration: stop-copy is required (p2p and pre-copy extend it)".into());
    }
    Ok(caps)
}

struct Args {
    socket: PathBuf,
    opts: testdev::Options,
    verbose: bool,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut socket = None;
    let mut opts = testdev::Options::default();
    let mut verbose = false;
    let mut no_p2p = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(it.next().ok_or("--socket needs a path")?)),
            "--id" => opts.id = it.next().ok_or("--id needs a name")?,
            "--migration" => {
                opts.migration = parse_migration(&it.next().ok_or("--migration needs a value")?)?
            }
            "--no-p2p" => no_p2p = true,
            "--dma-logging" => {
                opts.dma_logging = match it.next().as_deref() {
                    Some("on") => true,
                    Some("off") => false,
                    _ => return Err("--dma-logging needs on or off".into()),
                }
            }
            "--msi" => opts.msi = true,
            "--memory-mib" => {
                opts.memory_size = parse_memory_mib(&it.next().ok_or("--memory-mib needs N")?)?
            }
            "--fill-memory" => {
                let v = it.next().ok_or("--fill-memory needs a seed")?;
                let seed = parse_u32(&v).ok_or(format!("--fill-memory: bad seed {v:?}"))?;
                opts.fill_seed = Some(seed);
            }
            "--fail-arc" => {
                let v = it.next().ok_or("--fail-arc needs FROM:TO[:N]")?;
                opts.faults.fail_arcs.push(parse_arc(&v, true)?);
            }
            "--fail-read-after" => {
                let v = it.next().ok_or("--fail-read-after needs a byte count")?;
                let n = v
                    .parse()
                    .map_err(|_| format!("--fail-read-after: bad byte count {v:?}"))?;
                opts.faults.fail_read_after = Some(n);
            }
            "--reject-resume" => opts.faults.reject_resume = true,
            "--exit-on-arc" => {
                let v = it.next().ok_or("--exit-on-arc needs FROM:TO")?;
                let a = parse_arc(&v, false)?;
                opts.faults.exit_on_arcs.push((a.from, a.to));
            }
            "-v" | "--verbose" => verbose = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if no_p2p {
        opts.migration &= !MIGRATION_P2P;
    }
    opts.faults.check(opts.migration)?;
    Ok(Args {
        socket: socket.ok_or("--socket is required")?,
        opts,
        verbose,
    })
}

/// Removes the socket file when dropped.
struct SocketFile<'a>(&'a Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Exit code when `--exit-on-arc` fired.
const EXIT_INJECTED: u8 = 3;

fn run(args: &Args) -> Result<ExitCode, String> {
    let path = &args.socket;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing stale {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    let _guard = SocketFile(path);
    info!("{}: listening on {}", args.opts.id, path.display());
    let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    match testdev::serve(sock, &args.opts) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(testdev::Error::InjectedExit) => Ok(ExitCode::from(EXIT_INJECTED)),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if e.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("skiff-testdev: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let level = if args.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            error!("{}: {e}", args.opts.id);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn migration_and_logging_flags() {
        let a = args(&["--socket", "/x"]).unwrap();
        assert_eq!(a.opts.migration, 0b111);
        assert!(a.opts.dma_logging);
        let a = args(&["--socket", "/x", "--migration", "stop-copy,pre-copy"]).unwrap();
        assert_eq!(a.opts.migration, 0b101);
        let a = args(&[
            "--socket",
            "/x",
            "--migration",
            "none",
            "--dma-logging",
            "off",
        ])
        .unwrap();
        assert_eq!((a.opts.migration, a.opts.dma_logging), (0, false));
        let a = args(&["--socket", "/x", "--no-p2p"]).unwrap();
        assert_eq!(a.opts.migration, 0b101);
        for bad in [
            &["--socket", "/x", "--migration", "p2p"][..],
            &["--socket", "/x", "--migration", "stop-copy,fast"],
            &["--socket", "/x", "--migration"],
            &["--socket", "/x", "--dma-logging", "maybe"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memory_flags() {
        let a = args(&["--socket", "/x"]).unwrap();
        assert_eq!((a.opts.memory_size, a.opts.fill_seed), (1 << 20, None));
        let a = args(&[
            "--socket",
            "/x",
            "--memory-mib",
            "256",
            "--fill-memory",
            "0x5eed",
        ])
        .unwrap();
        assert_eq!(
            (a.opts.memory_size, a.opts.fill_seed),
            (256 << 20, Some(0x5eed))
        );
        let a = args(&[
            "--socket",
            "/x",
            "--memory-mib",
            "1024",
            "--fill-memory",
            "7",
        ])
        .unwrap();
        assert_eq!((a.opts.memory_size, a.opts.fill_seed), (1 << 30, Some(7)));
        for bad in [
            &["--socket", "/x", "--memory-mib"][..],
            &["--socket", "/x", "--memory-mib", "0"],
            &["--socket", "/x", "--memory-mib", "3"],
            &["--socket", "/x", "--memory-mib", "2048"],
            &["--socket", "/x", "--memory-mib", "-1"],
            &["--socket", "/x", "--fill-memory"],
            &["--socket", "/x", "--fill-memory", "0x1_0000_0000"],
            &["--socket", "/x", "--fill-memory", "seed"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fault_flags() {
        use testdev::device::DeviceState::*;
        let a = args(&["--socket", "/x"]).unwrap();
        assert!(a.opts.faults.is_empty(), "off by default");
        let a = args(&[
            "--socket",
            "/x",
            "--fail-arc",
            "RUNNING:RUNNING_P2P",
            "--fail-arc",
            "STOP:STOP_COPY:2",
            "--fail-read-after",
            "4096",
            "--reject-resume",
            "--exit-on-arc",
            "PRE_COPY_P2P:STOP_COPY",
        ])
        .unwrap();
        let f = &a.opts.faults;
        let arcs: Vec<_> = f.fail_arcs.iter().map(|a| (a.from, a.to, a.nth)).collect();
        assert_eq!(arcs, [(Running, RunningP2p, 1), (Stop, StopCopy, 2)]);
        assert_eq!(f.fail_read_after, Some(4096));
        assert!(f.reject_resume);
        assert_eq!(f.exit_on_arcs, [(PreCopyP2p, StopCopy)]);
        // RUNNING -> STOP is direct only without P2P, whatever the order of the flags.
        assert!(args(&["--socket", "/x", "--fail-arc", "RUNNING:STOP"]).is_err());
        assert!(args(&["--socket", "/x", "--fail-arc", "RUNNING:STOP", "--no-p2p"]).is_ok());
        for bad in [
            &["--socket", "/x", "--fail-arc"][..],
            &["--socket", "/x", "--fail-arc", "RUNNING:RUNNING_P2P:0"],
            &["--socket", "/x", "--fail-arc", "RUNNING:NOWHERE"],
            &["--socket", "/x", "--exit-on-arc", "STOP:RESUMING:1"],
            &["--socket", "/x", "--exit-on-arc", "STOP_COPY:PRE_COPY"],
            &["--socket", "/x", "--fail-read-after", "-1"],
            &["--socket", "/x", "--reject-resume", "--migration", "none"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}
