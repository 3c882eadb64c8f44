//! `skiff-testdev --socket PATH [--id NAME] [--no-p2p] [--msi] [-v]`: serves one vfio-user client on
//! PATH, exits 0 when it disconnects cleanly, non-zero on errors; removes PATH on exit.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use log::{error, info};

const USAGE: &str = "usage: skiff-testdev --socket PATH [--id NAME] [--no-p2p] [--msi] [-v]

A vfio-user PCI test device (vendor 1b36, device 0f5f): DMA engine, MSI-X/INTx,
1 MiB device memory in BAR2, peer-to-peer writes. Serves one client on PATH and
exits when it disconnects.
  --socket PATH  Unix socket to listen on (a stale socket file is replaced)
  --id NAME      name used in log lines (default: testdev)
  --no-p2p       the device does not support the P2P migration states
  --msi          add an MSI capability (64-bit, per-vector masking, 2 vectors)
  -v             debug logging (RUST_LOG overrides)";

struct Args {
    socket: PathBuf,
    opts: testdev::Options,
    verbose: bool,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut socket = None;
    let mut opts = testdev::Options::default();
    let mut verbose = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(it.next().ok_or("--socket needs a path")?)),
            "--id" => opts.id = it.next().ok_or("--id needs a name")?,
            "--no-p2p" => opts.p2p = false,
            "--msi" => opts.msi = true,
            "-v" | "--verbose" => verbose = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
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
