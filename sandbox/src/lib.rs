//! Process confinement for skiff: one seccomp filter per thread kind.
//!
//! The binary calls [`configure`] once, before the VM exists; every thread then calls [`apply`]
//! with its [`ThreadKind`] before it touches guest, peer or network input. A library used
//! without [`configure`] (unit tests, benches) runs unfiltered: [`apply`] does nothing there.
//!
//! Filters stack: a thread inherits the filter of the thread that spawned it and adds its own,
//! and the kernel applies both. The control thread spawns vCPUs, device workers, passthrough and
//! migration threads, so its rules are a superset of theirs (see `rules.rs`).
//!
//! A forbidden syscall in [`SeccompMode::Enforce`] raises SIGSYS; the handler writes the thread
//! and the syscall number to stderr and ends the process with status 128 + SIGSYS (159).

pub mod landlock;
mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit status after a seccomp violation (128 + SIGSYS, as for a death by that signal).
pub const EXIT_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

/// The kinds of thread skiff runs; each has its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the control loop that owns the VM, builds and tears it down.
    Control,
    /// A vCPU thread: KVM_RUN and PIO/MMIO dispatch.
    Vcpu,
    /// The REST API server thread.
    Api,
    /// A virtio device's I/O worker (event loop over its queues).
    DeviceWorker,
    /// A passthrough device's helper thread (the vfio-user client's reader and DMA worker).
    Passthrough,
    /// A live-migration thread (sending or receiving; the receiver builds the VM).
    Migration,
}

impl ThreadKind {
    /// Every kind, in a fixed order (an index into the compiled filters).
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::DeviceWorker,
        ThreadKind::Passthrough,
        ThreadKind::Migration,
    ];

    /// The kind's name, as written in logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::DeviceWorker => "device-worker",
            ThreadKind::Passthrough => "passthrough",
            ThreadKind::Migration => "migration",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the filters do with a syscall outside their rules (`--seccomp true|false|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Filters on; a forbidden syscall is reported and ends the process (the default).
    #[default]
    Enforce,
    /// Filters on, but a forbidden syscall is only logged by the kernel (audit) and allowed.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(SandboxError::BadMode(s.to_string())),
        }
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--seccomp` got something other than true, false or log.
    #[error("--seccomp {0:?}: expected true, false or log")]
    BadMode(String),
    /// A filter could not be compiled (a bug in the rules).
    #[error("seccomp filter for {kind} threads: {source}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A filter could not be installed on the calling thread.
    #[error("installing the seccomp filter for {kind} threads: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// [`configure`] was called twice.
    #[error("the sandbox is already configured")]
    AlreadyConfigured,
    /// `--landlock-rules` got an access other than r or rw.
    #[error("landlock access {0:?}: expected r or rw")]
    LandlockAccess(String),
    /// A Landlock rule names a path that cannot be used.
    #[error("landlock rule for {}: {why}", path.display())]
    LandlockPath {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// The Landlock ruleset could not be built or applied.
    #[error("landlock: {0}")]
    Landlock(String),
    /// The kernel does not enforce Landlock.
    #[error(
        "--landlock: this kernel does not enforce Landlock (not built in, or not in the lsm= list)"
    )]
    LandlockUnsupported,
    /// This architecture has no rules.
    #[error("seccomp: unsupported architecture {0}")]
    Arch(&'static str),
}

struct Config {
    mode: SeccompMode,
    filters: Vec<BpfProgram>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The thread kind that makes a forbidden syscall right after its filter is installed
/// (`u8::MAX`: none). Set only through [`provoke_violation_in`], which the binary calls only for
/// its test knob.
static PROVOKE: AtomicU8 = AtomicU8::new(u8::MAX);
/// Whether the provoked violation is [`PROVOKED_IOCTL`] rather than [`PROVOKED_SYSCALL`].
static PROVOKE_IOCTL: AtomicBool = AtomicBool::new(false);

/// The syscall [`provoke_violation_in`] makes: harmless, and in no thread kind's rules.
pub const PROVOKED_SYSCALL: i64 = libc::SYS_getppid;
/// The ioctl request [`provoke_violation_in`] makes, on no descriptor (-1): FIONREAD, which the
/// vCPU, device-worker and API filters refuse (they allow ioctls by request).
pub const PROVOKED_IOCTL: libc::Ioctl = libc::FIONREAD;

thread_local! {
    /// The calling thread's name and kind, recorded by [`apply`] for the SIGSYS handler (which
    /// may not allocate or lock). Const-initialised: no lazy set-up inside the handler.
    static IDENTITY: Cell<([u8; 16], u8)> = const { Cell::new(([0; 16], u8::MAX)) };
}

/// Compile every thread kind's filter for `mode` and install the SIGSYS handler. Called once by
/// the binary, before any thread handles guest input.
pub fn configure(mode: SeccompMode) -> Result<(), SandboxError> {
    let filters = match mode {
        SeccompMode::Off => Vec::new(),
        SeccompMode::Enforce | SeccompMode::Log => compile_all(mode)?,
    };
    if mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    if mode != SeccompMode::Off {
        single_malloc_arena();
    }
    CONFIG
        .set(Config { mode, filters })
        .map_err(|_| SandboxError::AlreadyConfigured)
}

/// The configured mode (`None` before [`configure`]).
pub fn mode() -> Option<SeccompMode> {
    CONFIG.get().map(|c| c.mode)
}

/// Install `kind`'s filter on the calling thread; nothing when the sandbox is not configured
/// or is off.
pub fn apply(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(config) = CONFIG.get() else {
        return Ok(());
    };
    if config.mode == SeccompMode::Off {
        return Ok(());
    }
    record_identity(kind);
    seccompiler::apply_filter(&config.filters[kind.index()]).map_err(|source| {
        SandboxError::Install {
            kind: kind.name(),
            source,
        }
    })?;
    log::debug!("seccomp: {} filter installed", kind.name());
    if PROVOKE.load(Ordering::Relaxed) == kind as u8 {
        if PROVOKE_IOCTL.load(Ordering::Relaxed) {
            log::warn!(
                "test knob: the {} thread now makes the forbidden ioctl {PROVOKED_IOCTL:#x}",
                kind.name()
            );
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on descriptor -1 only fails with EBADF (when the filter lets it
            // through at all); `n` outlives the call.
            unsafe { libc::ioctl(-1, PROVOKED_IOCTL, &mut n) };
        } else {
            log::warn!(
                "test knob: the {} thread now makes the forbidden syscall {PROVOKED_SYSCALL}",
                kind.name()
            );
            // SAFETY: getppid has no side effects (and is not executed when the filter traps it).
            unsafe { libc::syscall(PROVOKED_SYSCALL) };
        }
    }
    Ok(())
}

/// Test-only: make every thread of `kind` call [`PROVOKED_SYSCALL`] (with `ioctl`: the ioctl
/// [`PROVOKED_IOCTL`]), which its filter refuses, right after installing its filter — to show
/// that a violation is caught and reported. The binary calls this only for a test knob that
/// release builds refuse.
pub fn provoke_violation_in(kind: ThreadKind, ioctl: bool) {
    PROVOKE_IOCTL.store(ioctl, Ordering::Relaxed);
    PROVOKE.store(kind as u8, Ordering::Relaxed);
}

/// The kind named `name` (as [`ThreadKind::name`] writes it).
pub fn kind_by_name(name: &str) -> Option<ThreadKind> {
    ThreadKind::ALL.into_iter().find(|k| k.name() == name)
}

/// [`apply`], for a thread that has no way to report an error: a thread that cannot be
/// confined must not run, so the process ends (status 1) after logging why.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        log::error!("{e}; exiting: skiff does not run unconfined threads");
        // SAFETY: `_exit` ends the process at once; nothing is left in an inconsistent state
        // that outlives it.
        unsafe { libc::_exit(1) };
    }
}

fn compile_all(mode: SeccompMode) -> Result<Vec<BpfProgram>, SandboxError> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SandboxError::Arch(std::env::consts::ARCH))?;
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    ThreadKind::ALL
        .iter()
        .map(|&kind| {
            let compile_err = |source| SandboxError::Compile {
                kind: kind.name(),
                source,
            };
            let rules: BTreeMap<_, _> = rules::rules(kind).map_err(compile_err)?;
            let filter = SeccompFilter::new(rules, mismatch.clone(), SeccompAction::Allow, arch)
                .map_err(compile_err)?;
            filter.try_into().map_err(compile_err)
        })
        .collect()
}

/// Make glibc's malloc keep one arena. A thread's own arena, when it shrinks, makes glibc read
/// /proc/sys/vm/overcommit_memory (once per process, `check_may_shrink_heap`): a file open no
/// worker, vCPU or API filter allows, so whichever thread frees enough memory first would die
/// (the API load test found it in the API thread). The main arena shrinks with brk and reads
/// nothing. Called before any other thread exists.
fn single_malloc_arena() {
    /// glibc's `M_ARENA_MAX` (`malloc.h`); the libc crate does not define it.
    const M_ARENA_MAX: libc::c_int = -8;
    // SAFETY: mallopt only changes glibc's allocator settings.
    if unsafe { libc::mallopt(M_ARENA_MAX, 1) } != 1 {
        log::warn!(
            "seccomp: glibc refused M_ARENA_MAX=1; a shrinking thread arena may trip the filters"
        );
    }
}

fn record_identity(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    IDENTITY.with(|id| id.set((name, kind as u8)));
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler has the SA_SIGINFO
    // signature and only calls async-signal-safe functions (write, _exit).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS on 64-bit: three ints, four
/// bytes of padding, `_call_addr`, then `_syscall` (`include/uapi/asm-generic/siginfo.h`).
/// Hand-written: the libc crate has no accessor for the `_sigsys` member.
const SI_SYSCALL_OFFSET: usize = 24;

/// A small stack buffer for the handler's message (no allocation in a signal handler).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_hex(&mut self, mut v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); `si_syscall` is an
    // int at SI_SYSCALL_OFFSET within it.
    let syscall = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
    };
    // The thread-local is const-initialised with no destructor: reading it here is a plain load.
    let (name, kind) = IDENTITY
        .try_with(|id| id.get())
        .unwrap_or(([0; 16], u8::MAX));
    let mut m = Message {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"skiff: seccomp: thread '");
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    m.push(&name[..name_len]);
    m.push(b"' (");
    match ThreadKind::ALL.get(usize::from(kind)) {
        Some(k) => {
            m.push(k.name().as_bytes());
            m.push(b" filter");
        }
        None => m.push(b"filter inherited from its parent"),
    }
    m.push(b", tid ");
    // SAFETY: gettid has no side effects.
    m.push_number(unsafe { libc::syscall(libc::SYS_gettid) } as u64);
    m.push(b") made the forbidden syscall ");
    m.push_number(syscall.max(0) as u64);
    if i64::from(syscall) == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext; a
        // seccomp trap leaves the syscall's arguments in its registers (the request in RSI).
        let request = unsafe {
            (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        m.push(b" (ioctl request 0x");
        m.push_hex(request as u64 & 0xffff_ffff);
        m.push(b")");
    }
    m.push(b"; exiting\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer lives on this stack frame.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(EXIT_SECCOMP_VIOLATION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_both_modes() {
        assert_eq!(compile_all(SeccompMode::Enforce).unwrap().len(), 6);
        assert_eq!(compile_all(SeccompMode::Log).unwrap().len(), 6);
    }

    #[test]
    fn mode_parses_the_cli_words() {
        assert_eq!("true".parse::<SeccompMode>().unwrap(), SeccompMode::Enforce);
        assert_eq!("false".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        let e = "yes".parse::<SeccompMode>().unwrap_err().to_string();
        assert!(e.contains("expected true, false or log"), "{e}");
    }

    #[test]
    fn message_numbers_are_decimal_and_hex() {
        let mut m = Message {
            buf: [0; 256],
            len: 0,
        };
        m.push_number(0);
        m.push(b" ");
        m.push_number(18446744073709551615);
        m.push(b" ");
        m.push_hex(0x541b);
        m.push(b" ");
        m.push_hex(0);
        assert_eq!(&m.buf[..m.len], b"0 18446744073709551615 541b 0");
    }
}
