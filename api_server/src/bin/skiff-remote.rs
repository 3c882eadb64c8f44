//! `skiff-remote`: drive a running skiff through its API socket.
//!
//! `skiff-remote --api-socket PATH <command>`; `info`, `counters` and `ping` print pretty JSON on
//! stdout; errors print `skiff-remote: error: <status> <message>` on stderr and exit 1 (2 for
//! usage errors).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use api_server::{ApiClient, ClientError};
use clap::{Parser, Subcommand};

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
