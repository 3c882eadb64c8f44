//! Live migration: the source side ([`source`]) sends a running VM over one or more connections
//! ([`transport`]) with the wire protocol and pre-copy planner of the `migration` crate; the target
//! side ([`target`]) builds the VM from the configuration that arrives, loads RAM and state, and
//! runs it. Both run on a worker thread; the control loop is told when they end
//! ([`MigrationEvents`]) and the API reads their progress ([`SharedProgress`]).
//!
//! A failure at any step leaves the source VM running (resumed if it was paused), with dirty
//! logging and throttling stopped; nothing the guest wrote is lost because the source keeps
//! running its own copy until the target reports RESUMED.

pub mod source;
pub mod target;
pub mod tls;
pub mod transport;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api_server::migration::{MigrationPhase, MigrationProgress};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vm::{Vm, VmError};

/// Errors of a migration.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// A connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The stream broke the protocol, or a peer sent something invalid.
    #[error(transparent)]
    Stream(#[from] migration::stream::StreamError),
    /// The target refused the VM.
    #[error("the target refused the VM: {0}")]
    Refused(String),
    /// The target failed to load or run the VM.
    #[error("the target could not run the VM: {0}")]
    TargetFailed(String),
    /// The source aborted (sent by the source to the target).
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    /// The planner gave up (the guest dirties memory faster than it can be sent).
    #[error("the migration cannot converge: {0}")]
    GaveUp(String),
    /// The planner's limits are invalid.
    #[error(transparent)]
    Planner(#[from] migration::planner::PlannerError),
    /// Cancelled through the API.
    #[error("cancelled")]
    Cancelled,
    /// The VM could not be paused, resumed, built or loaded.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The peer sent something out of order.
    #[error("protocol: {0}")]
    Unexpected(String),
    /// The configuration that arrived cannot be used.
    #[error("configuration: {0}")]
    Config(String),
    /// The commit was sent but the target's RESUMED never came: the target may be running the
    /// VM, so this copy stays paused (resume it only once the target is known not to run it).
    #[error("outcome unknown: the commit was sent but the target did not confirm ({0}); the target may be running the VM, so this copy stays paused — resume it (vm.resume) only if the target does not run it")]
    OutcomeUnknown(String),
    /// TLS could not be set up, or the peer failed authentication.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl From<crate::registry::RegistryError> for MigrateError {
    fn from(e: crate::registry::RegistryError) -> Self {
        MigrateError::Vm(VmError::from(e))
    }
}

/// Where a migration stands with respect to its commit (fencing), for cancels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum CommitStage {
    /// Data still flows: a cancel shuts the connections down.
    #[default]
    Transfer,
    /// Source: everything was sent and the commit is pending; a cancel is only noted, and the
    /// worker withdraws (tells the target why) and resumes the VM.
    AwaitingCommit,
    /// The commit was sent (source) or received (target): the target may run the VM, so it is
    /// too late to cancel.
    Committed,
}

/// Progress shared between a migration worker and the API.
#[derive(Clone)]
pub struct SharedProgress {
    inner: Arc<Mutex<MigrationProgress>>,
    cancel: Arc<AtomicBool>,
    /// Taken by a cancel and by the commit, so a cancel never races past a commit.
    stage: Arc<Mutex<CommitStage>>,
    start: Arc<Mutex<Option<Instant>>>,
    /// Connections a cancel shuts down, so a worker blocked in a long write stops at once.
    conns: Arc<Mutex<Vec<transport::Conn>>>,
}

impl Default for SharedProgress {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(MigrationProgress::default())),
            cancel: Arc::new(AtomicBool::new(false)),
            stage: Arc::new(Mutex::new(CommitStage::Transfer)),
            start: Arc::new(Mutex::new(None)),
            conns: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl SharedProgress {
    /// The progress now.
    pub fn get(&self) -> MigrationProgress {
        let mut p = self.lock().clone();
        if let Some(start) = *self.start.lock().unwrap_or_else(|e| e.into_inner()) {
            if !matches!(
                p.phase,
                MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
            ) {
                p.elapsed_ms = start.elapsed().as_millis() as u64;
            }
        }
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MigrationProgress> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start a new migration's progress (phase setup).
    pub fn begin(&self) {
        self.cancel.store(false, Ordering::SeqCst);
        *self.stage_lock() = CommitStage::Transfer;
        self.unwatch();
        *self.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        *self.lock() = MigrationProgress {
            phase: MigrationPhase::Setup,
            ..Default::default()
        };
        crate::events::emit("migration", "setup", serde_json::Value::Null);
    }

    /// Update the figures with `f`.
    pub fn update(&self, f: impl FnOnce(&mut MigrationProgress)) {
        f(&mut self.lock());
    }

    /// Enter `phase`, with an event carrying the figures.
    pub fn phase(&self, phase: MigrationPhase) {
        let elapsed = self
            .start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(0, |s| s.elapsed().as_millis() as u64);
        let snapshot = {
            let mut p = self.lock();
            p.phase = phase;
            p.elapsed_ms = elapsed;
            p.clone()
        };
        crate::events::emit(
            "migration",
            phase.as_str(),
            serde_json::to_value(&snapshot).unwrap_or_default(),
        );
    }

    /// The migration ended with `error` (cancelled or failed).
    pub fn fail(&self, error: &MigrateError) {
        let phase = if matches!(error, MigrateError::Cancelled) {
            MigrationPhase::Cancelled
        } else {
            MigrationPhase::Failed
        };
        self.lock().error = Some(error.to_string());
        self.phase(phase);
    }

    fn stage_lock(&self) -> std::sync::MutexGuard<'_, CommitStage> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the worker to stop (its connections are shut down).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.shut_connections();
    }

    /// Cancel the migration for the API (vm.migration-cancel): allowed in every phase up to the
    /// commit — the source then resumes its VM and the target drops its copy, which never ran;
    /// refused (`Err` with the reason) when no migration runs or the commit was sent or received.
    pub fn request_cancel(&self) -> Result<(), String> {
        let phase = self.get().phase;
        if phase == MigrationPhase::None || phase.is_final() {
            return Err(format!(
                "no migration can be cancelled (phase {})",
                phase.as_str()
            ));
        }
        let stage = self.stage_lock();
        match *stage {
            CommitStage::Committed => Err(format!(
                "too late to cancel (phase {}): the commit was sent, the target may be running the VM",
                phase.as_str()
            )),
            CommitStage::AwaitingCommit => {
                self.cancel.store(true, Ordering::SeqCst);
                Ok(())
            }
            CommitStage::Transfer => {
                self.cancel();
                Ok(())
            }
        }
    }

    /// Source: everything was sent, the commit is pending; from now on a cancel leaves the
    /// connections to the worker, which withdraws.
    pub fn await_commit(&self) {
        let mut stage = self.stage_lock();
        if *stage == CommitStage::Transfer {
            *stage = CommitStage::AwaitingCommit;
        }
    }

    /// Pass the commit: fails with [`MigrateError::Cancelled`] when a cancel came first, and
    /// refuses every later cancel otherwise.
    pub fn commit(&self) -> Result<(), MigrateError> {
        let mut stage = self.stage_lock();
        self.check_cancel()?;
        *stage = CommitStage::Committed;
        Ok(())
    }

    /// Shut the migration's connections down (whatever blocks on them returns an error).
    pub fn shut_connections(&self) {
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            c.shutdown();
        }
    }

    /// Shut `conn` down when the migration is cancelled.
    pub fn watch(&self, conn: transport::Conn) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    /// Forget the connections (the migration ended).
    pub fn unwatch(&self) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Fail with [`MigrateError::Cancelled`] when a cancel was asked for.
    pub fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.cancelled() {
            Err(MigrateError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Hold the migration at `point` when the test knob asks for it, until `released` says so (a
/// cancel, the peer gone) or the knob's time limit passed.
pub fn hold_if_asked(point: crate::test_knobs::HoldPoint, released: impl Fn() -> bool) {
    let Some(limit) = crate::test_knobs::take_hold(point) else {
        return;
    };
    log::warn!("TEST KNOB: the migration holds at {}", point.name());
    crate::events::emit(
        "migration",
        "hold",
        serde_json::json!({ "point": point.name() }),
    );
    let deadline = Instant::now() + limit;
    while !released() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("TEST KNOB: the migration goes on from {}", point.name());
}

/// How a migration worker ended, for the control loop.
pub enum MigrationOutcome {
    /// Source: the target runs the VM; this process stops it and exits.
    Sent,
    /// Source: the migration failed; the VM runs on here.
    SendFailed(MigrateError),
    /// Target: the VM arrived and runs.
    Received(Box<Vm>),
    /// Target: nothing arrived that could run.
    ReceiveFailed(MigrateError),
    /// Source: the final progress was read (or nobody asked in time): the process may exit.
    Linger,
}

/// Outcomes of migration workers, with the eventfd the control loop watches.
pub struct MigrationEvents {
    fd: EventFd,
    queue: Mutex<Vec<MigrationOutcome>>,
}

impl MigrationEvents {
    /// A new channel.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            fd: EventFd::new(EFD_NONBLOCK)?,
            queue: Mutex::new(Vec::new()),
        }))
    }

    /// The eventfd the control loop watches.
    pub fn fd(&self) -> &EventFd {
        &self.fd
    }

    /// Report `outcome` from a worker.
    pub fn send(&self, outcome: MigrationOutcome) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(outcome);
        let _ = self.fd.write(1);
    }

    /// The outcomes reported since the last call.
    pub fn take(&self) -> Vec<MigrationOutcome> {
        let _ = self.fd.read();
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The components of a VM as the migration CONFIG describes them (id, kind, PCI address).
pub fn device_entries(registry: &crate::registry::Registry) -> Vec<migration::stream::DeviceEntry> {
    registry
        .components()
        .iter()
        .map(|c| migration::stream::DeviceEntry {
            id: c.id.clone(),
            kind: c.kind.clone(),
            pci_address: c.pci_address.map(|a| a.to_string()),
        })
        .collect()
}

/// The host facts a target must share with the source: CPU vendor and the feature leaves the
/// guest may have used.
pub fn host_record() -> Vec<(String, String)> {
    // SAFETY (of the intrinsic): CPUID exists on every x86_64 CPU.
    let leaf = |l: u32, s: u32| std::arch::x86_64::__cpuid_count(l, s);
    let v = leaf(0, 0);
    let mut vendor = Vec::with_capacity(12);
    for r in [v.ebx, v.edx, v.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    let l1 = leaf(1, 0);
    let l7 = leaf(7, 0);
    vec![
        (
            "cpu.vendor".into(),
            String::from_utf8_lossy(&vendor).into_owned(),
        ),
        ("cpu.leaf1.ecx".into(), format!("{:#010x}", l1.ecx)),
        ("cpu.leaf1.edx".into(), format!("{:#010x}", l1.edx)),
        ("cpu.leaf7.ebx".into(), format!("{:#010x}", l7.ebx)),
        ("cpu.leaf7.ecx".into(), format!("{:#010x}", l7.ecx)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_cancel_is_taken_up_to_the_commit_and_refused_after_it() {
        let p = SharedProgress::default();
        assert!(p.request_cancel().unwrap_err().contains("no migration"));
        // During the transfer: taken, and the connections are shut at once.
        p.begin();
        p.phase(MigrationPhase::Switchover);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        p.watch(transport::Conn::Unix(a));
        p.request_cancel().unwrap();
        assert!(p.cancelled());
        assert_eq!(b.read(&mut [0u8; 1]).unwrap(), 0, "the connection is shut");
        // A cancel that came first wins over the commit.
        assert!(matches!(p.commit(), Err(MigrateError::Cancelled)));
        // Awaiting the commit: taken, but the connections are left to the worker.
        p.begin();
        p.phase(MigrationPhase::Completing);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        p.watch(transport::Conn::Unix(a));
        p.await_commit();
        p.request_cancel().unwrap();
        assert!(p.cancelled());
        b.set_nonblocking(true).unwrap();
        assert!(
            (&b).read(&mut [0u8; 1]).is_err(),
            "the connection is still open"
        );
        // Once committed: refused, and nothing changes.
        p.begin();
        p.phase(MigrationPhase::Completing);
        p.await_commit();
        p.commit().unwrap();
        let e = p.request_cancel().unwrap_err();
        assert!(e.contains("too late"), "{e}");
        assert!(!p.cancelled());
        // A finished migration cannot be cancelled either.
        p.phase(MigrationPhase::Completed);
        assert!(p.request_cancel().unwrap_err().contains("no migration"));
    }
}
