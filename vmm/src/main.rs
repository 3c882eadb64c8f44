//! `skiff`: run one microVM. With no arguments it boots the built-in demo guest.

use std::path::PathBuf;
use std::process::ExitCode;

use api_server::ApiServer;
use clap::Parser;
use devices::ExitReason;
use vmm::config::{self, VmConfig};
use vmm::control::{self, VmOutcome};
use vmm::events;
use vmm::timing;
use vmm::vmm::Vmm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status when the guest powered off.
const EXIT_POWER_OFF: u8 = 0;
/// Exit status for errors: bad host set-up, VMM failure, or a guest crash (triple fault, KVM error).
const EXIT_ERROR: u8 = 1;
/// Exit status for an invalid command line or configuration (nothing was started).
const EXIT_USAGE: u8 = 2;
/// Exit status when the guest asked for a reboot (skiff does not restart the VM itself).
const EXIT_REBOOT: u8 = 3;

const AFTER_HELP: &str = "\
With no options skiff boots its built-in demo guest, which checks the virtual hardware and powers off.

Exit status:
  0        the guest powered off
  1        error: the VM could not be built, or the guest crashed (triple fault, KVM internal error)
  2        invalid command line or configuration (nothing was started)
  3        the guest asked for a reboot (skiff ends the VM; restart it if you want a reboot)
  128+N    stopped cleanly on signal N (130 for SIGINT, 143 for SIGTERM)
  159      a thread made a syscall its seccomp filter forbids (stderr names it; see --seccomp)

With --api-socket the VMM keeps serving after the guest powers off (the VM is then Shutdown) and
exits 0 on vmm.shutdown.";

/// Command-line options, in Cloud Hypervisor's style.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about = "skiff: a KVM microVM monitor", after_help = AFTER_HELP)]
struct Cli {
    /// Kernel to boot: an ELF vmlinux (PVH or 64-bit entry) or a bzImage. Default: the built-in demo guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio archive) to load with the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// vCPUs: boot=N.
    #[arg(long, value_name = "boot=N")]
    cpus: Option<String>,
    /// Guest RAM: size=SIZE with an optional K/M/G/T unit (default 512M).
    #[arg(long, value_name = "size=SIZE")]
    memory: Option<String>,
    /// Serial port (COM1) output: stdout, file=PATH or off.
    #[arg(long, value_name = "stdout|file=PATH|off")]
    serial: Option<String>,
    /// virtio-blk disk: path=IMAGE[,readonly=on][,id=NAME][,serial=S][,iommu=on] (repeatable).
    #[arg(long, value_name = "path=IMAGE,...")]
    disk: Vec<String>,
    /// virtio-net device: tap=NAME|fd=N[,mac=MAC][,id=NAME][,iommu=on] (repeatable).
    #[arg(long, value_name = "tap=NAME|fd=N,...")]
    net: Vec<String>,
    /// virtio-console: off, stdout, file=PATH or pty, then optionally ,iommu=on (default off).
    #[arg(long, value_name = "off|stdout|file=PATH|pty[,iommu=on]")]
    console: Option<String>,
    /// Add a virtio-rng device fed from the host's getrandom; options: [id=NAME][,iommu=on].
    #[arg(long, value_name = "id=NAME,iommu=on", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
    /// A device emulated by a vfio-user server, passed through:
    /// socket=PATH[,id=NAME][,iommu=on][,p2p=off] (repeatable).
    #[arg(long, value_name = "socket=PATH,...")]
    user_device: Vec<String>,
    /// A host PCI device passed through with kernel VFIO: path=/sys/bus/pci/devices/DDDD:BB:SS.F
    /// [,id=NAME][,iommu=on][,p2p=off][,managed=on][,group=take][,backend=group|iommufd] (repeatable).
    #[arg(long, value_name = "path=SYSFS_PATH,...")]
    device: Vec<String>,
    /// JSON file of CPUID masks applied on top of the CPUID KVM supports (a common CPU baseline).
    #[arg(long, value_name = "PATH")]
    cpu_template: Option<PathBuf>,
    /// Serve the REST API on this Unix socket. Without VM options skiff then starts with no VM
    /// and waits for vm.create; with them it boots that VM and serves the API alongside.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Restore a VM from a snapshot instead of booting: source_url=file:///DIR[,resume=on]. The VM
    /// comes up paused (resume it with the API) unless resume=on.
    #[arg(long, value_name = "source_url=URL[,resume=on]")]
    restore: Option<String>,
    /// Write one JSON line per lifecycle event to FILE: path=FILE.
    #[arg(long, value_name = "path=FILE")]
    event_monitor: Option<String>,
    /// Seccomp filters, one per thread kind: true (default: a forbidden syscall is reported and
    /// ends the process), log (the kernel logs it and it is allowed), or false (no filters).
    #[arg(long, value_name = "true|false|log", default_value = "true")]
    seccomp: String,
    /// Confine skiff to the files its configuration names (Landlock): kernel, disks, output
    /// files, the snapshot to restore, the API socket's directory, /dev/kvm.
    #[arg(long)]
    landlock: bool,
    /// One more path for --landlock: path=PATH,access=r|rw (repeatable) — snapshot and
    /// migration directories, and the files of VMs created later through the API.
    #[arg(long, value_name = "path=PATH,access=r|rw")]
    landlock_rules: Vec<String>,
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

impl Cli {
    /// Whether any option describing a VM was given.
    fn has_vm_options(&self) -> bool {
        self.kernel.is_some()
            || self.initramfs.is_some()
            || self.cmdline.is_some()
            || self.cpus.is_some()
            || self.memory.is_some()
            || self.serial.is_some()
            || !self.disk.is_empty()
            || !self.net.is_empty()
            || self.console.is_some()
            || self.rng.is_some()
            || !self.user_device.is_empty()
            || !self.device.is_empty()
            || self.cpu_template.is_some()
    }

    fn into_config(self) -> Result<VmConfig, config::ConfigError> {
        let mut c = VmConfig::default();
        if let Some(s) = &self.cpus {
            c.cpus = config::parse_cpus(s)?;
        }
        if let Some(s) = &self.memory {
            c.memory = config::parse_memory(s)?;
        }
        if let Some(s) = &self.serial {
            c.serial = config::parse_serial(s)?;
        }
        for d in &self.disk {
            c.disks.push(config::parse_disk(d)?);
        }
        for n in &self.net {
            c.nets.push(config::parse_net(n)?);
        }
        if let Some(s) = &self.console {
            (c.console, c.console_iommu) = config::parse_console_option(s)?;
        }
        if let Some(s) = &self.rng {
            c.rng = Some(config::parse_rng(s)?);
        }
        for u in &self.user_device {
            c.user_devices.push(config::parse_user_device(u)?);
        }
        for d in &self.device {
            c.host_devices.push(config::parse_host_device(d)?);
        }
        c.payload.kernel = self.kernel;
        c.payload.initramfs = self.initramfs;
        c.payload.cmdline = self.cmdline;
        c.cpu_template = self.cpu_template;
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("SKIFF_LOG")
        .format_timestamp_micros()
        .init();
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("skiff: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    timing::mark_start();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) | Err(code) => code,
    }
}

/// Everything after logging is up: check the options, confine the process, run the VM and map
/// its outcome to an exit status. `Err` carries the status of a failure already reported.
fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    if let Err(e) = vmm::test_knobs::init_from_env() {
        return Err(fail(EXIT_USAGE, e));
    }
    let seccomp = cli
        .seccomp
        .parse::<sandbox::SeccompMode>()
        .map_err(|e| fail(EXIT_USAGE, e))?;
    let landlock_extra = parse_landlock_rules(&cli)?;
    if let Some(em) = &cli.event_monitor {
        open_event_monitor(em)?;
    }
    let api_socket = cli.api_socket.clone();
    let landlock = cli.landlock;
    let restore = parse_restore(&cli)?;
    let boot_now = restore.is_none() && (api_socket.is_none() || cli.has_vm_options());
    let config = cli.into_config().map_err(|e| fail(EXIT_USAGE, e))?;
    // Confinement comes before any other thread starts (both apply to the calling thread and
    // the threads it starts) and before the VM reads any guest input. Landlock first: the
    // control thread's seccomp filter does not allow its syscalls.
    if landlock {
        apply_landlock(
            restore.as_ref(),
            boot_now.then_some(&config),
            api_socket.as_deref(),
            &landlock_extra,
        )?;
    }
    apply_seccomp(seccomp)?;
    let signals = control::block_termination_signals().map_err(|e| fail(EXIT_ERROR, e))?;
    let (api_server, api) = match &api_socket {
        None => (None, None),
        Some(path) => {
            let (server, channel) = start_api_server(path)?;
            (Some(server), Some(channel))
        }
    };
    let vmm = start_vm(restore, boot_now.then_some(config))?;
    let outcome = control::run(vmm, signals, api, api_socket.is_none());
    timing::log_memory_overhead("at VM exit");
    let code = match outcome {
        Err(e) => fail(EXIT_ERROR, e),
        Ok((outcome, mut vmm)) => {
            if vmm.vm().is_some() {
                let _ = vmm.shutdown("skiff exiting");
            }
            exit_code(outcome)
        }
    };
    drop(api_server);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    Ok(code)
}

/// The extra `--landlock-rules` paths, checked to come with `--landlock`.
fn parse_landlock_rules(cli: &Cli) -> Result<Vec<sandbox::landlock::PathRule>, ExitCode> {
    if !cli.landlock && !cli.landlock_rules.is_empty() {
        return Err(fail(EXIT_USAGE, "--landlock-rules needs --landlock"));
    }
    cli.landlock_rules
        .iter()
        .map(|r| vmm::confine::parse_landlock_rule(r).map_err(|e| fail(EXIT_USAGE, e)))
        .collect()
}

/// Open the `--event-monitor path=FILE` output.
fn open_event_monitor(em: &str) -> Result<(), ExitCode> {
    let o =
        config::parse_options("event-monitor", em, &["path"]).map_err(|e| fail(EXIT_USAGE, e))?;
    let Some(path) = o.get("path").filter(|p| !p.is_empty()).map(PathBuf::from) else {
        return Err(fail(EXIT_USAGE, "--event-monitor: missing path=FILE"));
    };
    events::open(&path).map_err(|e| {
        fail(
            EXIT_USAGE,
            format!("--event-monitor {}: {e}", path.display()),
        )
    })
}

/// `--restore source_url=URL[,resume=on]` as `(url, resume)`, checked against the other options.
fn parse_restore(cli: &Cli) -> Result<Option<(String, bool)>, ExitCode> {
    let Some(r) = &cli.restore else {
        return Ok(None);
    };
    if cli.has_vm_options() {
        return Err(fail(EXIT_USAGE, "--restore takes the VM configuration from the snapshot; do not combine it with VM options"));
    }
    let o = config::parse_options("restore", r, &["source_url", "resume"])
        .map_err(|e| fail(EXIT_USAGE, e))?;
    let Some(url) = o.get("source_url").cloned() else {
        return Err(fail(
            EXIT_USAGE,
            "--restore: missing source_url=file:///DIR",
        ));
    };
    let resume = match o.get("resume").map(String::as_str) {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => {
            return Err(fail(
                EXIT_USAGE,
                format!("--restore: resume={v:?}: expected on or off"),
            ))
        }
    };
    if !resume && cli.api_socket.is_none() {
        return Err(fail(
            EXIT_USAGE,
            "--restore without resume=on and without --api-socket would leave a paused VM \
             that nothing can resume: pass resume=on, or --api-socket PATH to resume it later",
        ));
    }
    Ok(Some((url, resume)))
}

/// Confine the process with Landlock to the files the configuration (`boot`, when the VM boots
/// now), the snapshot to restore, the API socket and the extra rules name.
fn apply_landlock(
    restore: Option<&(String, bool)>,
    boot: Option<&VmConfig>,
    api_socket: Option<&std::path::Path>,
    extra: &[sandbox::landlock::PathRule],
) -> Result<(), ExitCode> {
    let restore_dir = match restore {
        Some((url, _)) => {
            Some(api_server::models::file_url_path(url).map_err(|e| fail(EXIT_USAGE, e))?)
        }
        None => None,
    };
    let rules = vmm::confine::landlock_rules(boot, restore_dir.as_deref(), api_socket, extra)
        .map_err(|e| fail(EXIT_ERROR, format!("--landlock: {e}")))?;
    sandbox::landlock::restrict(&rules).map_err(|e| fail(EXIT_USAGE, e))
}

/// Configure the seccomp filters and install the control thread's.
fn apply_seccomp(seccomp: sandbox::SeccompMode) -> Result<(), ExitCode> {
    if seccomp == sandbox::SeccompMode::Off {
        log::warn!("--seccomp false: skiff runs without seccomp filters");
    }
    // Every thread installs its kind's filter as it starts; this one is the control thread.
    sandbox::configure(seccomp)
        .and_then(|()| sandbox::apply(sandbox::ThreadKind::Control))
        .map_err(|e| fail(EXIT_ERROR, e))
}

/// Start the REST API server on `path`, with the channel the control loop reads it from.
fn start_api_server(path: &std::path::Path) -> Result<(ApiServer, control::ApiChannel), ExitCode> {
    let (tx, rx) = std::sync::mpsc::channel();
    let eventfd_err = |e| fail(EXIT_ERROR, format!("cannot create an eventfd: {e}"));
    let wake = EventFd::new(EFD_NONBLOCK).map_err(eventfd_err)?;
    let server_wake = wake.try_clone().map_err(eventfd_err)?;
    let server = ApiServer::start(path, tx, server_wake)
        .map_err(|e| fail(EXIT_ERROR, format!("--api-socket {}: {e}", path.display())))?;
    Ok((server, control::ApiChannel { requests: rx, wake }))
}

/// The VMM with the VM restored from `restore` or, with `boot`, created and booted.
fn start_vm(restore: Option<(String, bool)>, boot: Option<VmConfig>) -> Result<Vmm, ExitCode> {
    let mut vmm = Vmm::new();
    if let Some((url, resume)) = &restore {
        vmm.restore(url, *resume)
            .map_err(|e| fail(EXIT_ERROR, e.message))?;
        if !*resume {
            log::warn!("the restored VM is paused: resume it through the API (vm.resume)");
        }
    }
    if let Some(config) = boot {
        vmm.create(config)
            .map_err(|e| fail(EXIT_USAGE, e.message))?;
        vmm.boot().map_err(|e| fail(EXIT_ERROR, e.message))?;
    }
    Ok(vmm)
}

/// The exit status for how the VM ended.
fn exit_code(outcome: VmOutcome) -> ExitCode {
    match outcome {
        VmOutcome::Guest(ExitReason::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::from(EXIT_POWER_OFF)
        }
        VmOutcome::Guest(ExitReason::Reset) => {
            log::warn!("guest requested a reboot; ending the VM");
            ExitCode::from(EXIT_REBOOT)
        }
        VmOutcome::Guest(ExitReason::VcpuError) => {
            fail(EXIT_ERROR, "the guest crashed (see the vCPU error above)")
        }
        VmOutcome::VmmShutdown => ExitCode::from(EXIT_POWER_OFF),
        VmOutcome::Signal(sig) => ExitCode::from(128u8.saturating_add(sig as u8)),
    }
}
