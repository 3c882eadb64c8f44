//! `skiff-testdev --socket PATH [--id NAME] [--migration CAPS] [--dma-logging on|off] [--msi]
//! [-v]`: serves one vfio-user client on PATH, exits 0 when it disconnects cleanly, non-zero on
//! errors; removes PATH on exit.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use log::{error, info};
use testdev::fsm::{MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};

const USAGE: &str = "usage: skiff-testdev --socket PATH [--id NAME] [--migration CAPS]
                     [--dma-logging on|off] [--msi] [-v]

A vfio-user PCI test device (vendor 1b36, device 0f5f): DMA engine, MSI-X/INTx,
1 MiB device memory in BAR2, peer-to-peer writes, VFIO v2 migration. Serves one
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
  -v                   debug logging (RUST_LOG overrides)";

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
            "-v" | "--verbose" => verbose = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if no_p2p {
        opts.migration &= !MIGRATION_P2P;
    }
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

fn run(args: &Args) -> Result<(), String> {
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
    testdev::serve(sock, &args.opts).map_err(|e| e.to_string())
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
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
}
