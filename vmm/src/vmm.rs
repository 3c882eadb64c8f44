//! The VM lifecycle as the API and the CLI drive it: no VM → created (config known) → running ⇄
//! paused → shutdown, plus delete, reboot and the power button. Every API action is checked against
//! the current state first; an action that does not fit gets 409 with the state and changes nothing.

use std::collections::BTreeMap;

use api_server::models::{file_url_path, DeviceInfo, PingResponse, VmInfo, VmState};
use api_server::{ApiAction, ApiError, ApiReply, ApiResponse};
use devices::legacy::GedEvent;
use serde_json::json;

use crate::config::VmConfig;
use crate::events;
use crate::migrate::{MigrationEvents, MigrationOutcome, SharedProgress};
use crate::vm::Vm;
use api_server::migration::{MigrationPhase, ReceiveMigrationRequest, SendMigrationRequest};
use std::sync::Arc;

/// What the control loop must do after an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAction {
    /// Keep going.
    Continue,
    /// A VM was started: watch its exit event.
    VmStarted,
    /// The VM was torn down: stop watching its fds.
    VmStopped,
    /// End the skiff process (vmm.shutdown).
    ExitProcess,
}

/// The VMM: at most one VM and its configuration.
pub struct Vmm {
    config: Option<VmConfig>,
    vm: Option<Vm>,
    state: Option<VmState>,
    /// The last (or running) migration's progress.
    migration: SharedProgress,
    /// Where migration workers report how they ended.
    migration_events: Arc<MigrationEvents>,
    /// The state to go back to when an outgoing migration fails.
    state_before_migration: Option<VmState>,
    /// After a completed outgoing migration: told when a client read the final progress.
    linger: Option<Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>>,
}

/// How long a migrated source keeps answering the API (so `skiff-remote send-migration` and
/// orchestrators can read the final progress) before it exits.
const MIGRATED_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

impl Default for Vmm {
    fn default() -> Self {
        Self {
            config: None,
            vm: None,
            state: None,
            migration: SharedProgress::default(),
            migration_events: MigrationEvents::new().expect("an eventfd for migration events"),
            state_before_migration: None,
            linger: None,
        }
    }
}

fn conflict(state: Option<VmState>, what: &str) -> ApiError {
    let message = match state {
        None => format!("{what}: no VM has been created (use vm.create first)"),
        Some(s) => format!("{what}: not possible while the VM is {s:?}"),
    };
    ApiError {
        status: 409,
        message,
        state,
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError {
        status: 500,
        message: format!("{what}: {e}"),
        state: None,
    }
}

impl Vmm {
    /// A VMM with no VM.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state (None: no VM created).
    pub fn state(&self) -> Option<VmState> {
        self.state
    }

    /// The running VM, if any.
    pub fn vm(&self) -> Option<&Vm> {
        self.vm.as_ref()
    }

    /// Record a configuration (vm.create).
    pub fn create(&mut self, config: VmConfig) -> Result<(), ApiError> {
        if self.state.is_some() {
            return Err(conflict(self.state, "vm.create"));
        }
        config.validate().map_err(|e| ApiError {
            status: 400,
            message: e.to_string(),
            state: None,
        })?;
        self.config = Some(config);
        self.state = Some(VmState::Created);
        events::emit("vm", "created", serde_json::Value::Null);
        Ok(())
    }

    /// Build and start the VM from the recorded configuration (vm.boot).
    pub fn boot(&mut self) -> Result<(), ApiError> {
        match self.state {
            Some(VmState::Created) | Some(VmState::Shutdown) => {}
            s => return Err(conflict(s, "vm.boot")),
        }
        let config = self
            .config
            .clone()
            .ok_or_else(|| conflict(None, "vm.boot"))?;
        let mut vm = Vm::new(config).map_err(|e| internal("vm.boot", e))?;
        vm.start().map_err(|e| internal("vm.boot", e))?;
        // The VM's configuration records where each device was placed.
        self.config = Some(vm.config().clone());
        self.vm = Some(vm);
        self.state = Some(VmState::Running);
        events::emit("vm", "booted", serde_json::Value::Null);
        Ok(())
    }

    /// Stop the VM (vm.shutdown, or the guest ended it); the configuration is kept.
    pub fn shutdown(&mut self, reason: &str) -> Result<(), ApiError> {
        match self.state {
            Some(VmState::Running) | Some(VmState::Paused) => {}
            s => return Err(conflict(s, "vm.shutdown")),
        }
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
        }
        self.state = Some(VmState::Shutdown);
        events::emit("vm", "shutdown", json!({ "reason": reason }));
        Ok(())
    }

    /// Write a snapshot of the paused VM to a `file://` URL (vm.snapshot).
    pub fn snapshot(&mut self, url: &str) -> Result<(), ApiError> {
        let vm = match (self.state, &self.vm) {
            (Some(VmState::Paused), Some(vm)) => vm,
            (s, _) => return Err(conflict(s, "vm.snapshot (the VM must be paused)")),
        };
        let dir = file_url_path(url).map_err(|e| ApiError {
            status: 400,
            message: e.to_string(),
            state: None,
        })?;
        vm.snapshot(&dir).map_err(|e| internal("vm.snapshot", e))?;
        events::emit("vm", "snapshotted", json!({ "destination_url": url }));
        Ok(())
    }

    /// Build the VM from a snapshot at a `file://` URL (vm.restore, `--restore`); it comes up
    /// paused unless `resume`.
    pub fn restore(&mut self, url: &str, resume: bool) -> Result<(), ApiError> {
        match self.state {
            None | Some(VmState::Created) | Some(VmState::Shutdown) => {}
            s => return Err(conflict(s, "vm.restore (a VM is running)")),
        }
        let dir = file_url_path(url).map_err(|e| ApiError {
            status: 400,
            message: e.to_string(),
            state: None,
        })?;
        let mut vm = Vm::restore(&dir).map_err(|e| internal("vm.restore", e))?;
        vm.start().map_err(|e| internal("vm.restore", e))?;
        self.config = Some(vm.config().clone());
        self.vm = Some(vm);
        self.state = Some(VmState::Paused);
        events::emit("vm", "restored", json!({ "source_url": url }));
        if resume {
            self.resume_paused("vm.restore (resume)")?;
        }
        Ok(())
    }

    fn handle(&mut self, action: ApiAction) -> (ApiResponse, AfterAction) {
        use AfterAction::*;
        match action {
            // The API server answers pings itself; this serves other senders of the action.
            ApiAction::Ping => (json_reply(&PingResponse::current()), Continue),
            ApiAction::VmmShutdown => {
                if self.vm.is_some() {
                    let _ = self.shutdown("vmm.shutdown");
                }
                done(Ok(()), ExitProcess)
            }
            ApiAction::Create(config) => done(self.create(*config), Continue),
            ApiAction::Boot => done(self.boot(), VmStarted),
            ApiAction::Pause => done(self.pause(), Continue),
            ApiAction::Resume => done(self.resume(), Continue),
            ApiAction::Shutdown => done(self.shutdown("vm.shutdown"), VmStopped),
            ApiAction::Reboot => self.reboot(),
            ApiAction::PowerButton => done(self.power_button(), Continue),
            ApiAction::Info => (self.info(), Continue),
            ApiAction::Counters => (self.counters(), Continue),
            ApiAction::Snapshot(req) => done(self.snapshot(&req.destination_url), Continue),
            ApiAction::Restore(req) => done(self.restore(&req.source_url, req.resume), VmStarted),
            ApiAction::Delete => self.delete(),
            ApiAction::SendMigration(req) => done(self.send_migration(req), Continue),
            ApiAction::ReceiveMigration(req) => done(self.receive_migration(req), Continue),
            ApiAction::MigrationProgress => (self.migration_progress(), Continue),
            ApiAction::MigrationCancel => done(self.migration_cancel(), Continue),
        }
    }

    /// Pause every vCPU of the running VM (vm.pause).
    fn pause(&mut self) -> Result<(), ApiError> {
        match (self.state, &self.vm) {
            (Some(VmState::Running), Some(vm)) => {
                vm.pause().map_err(|e| internal("vm.pause", e))?;
                self.state = Some(VmState::Paused);
                events::emit("vm", "paused", serde_json::Value::Null);
                Ok(())
            }
            (s, _) => Err(conflict(s, "vm.pause")),
        }
    }

    /// Resume the paused VM (vm.resume).
    fn resume(&mut self) -> Result<(), ApiError> {
        match (self.state, &self.vm) {
            (Some(VmState::Paused), Some(_)) => self.resume_paused("vm.resume"),
            (s, _) => Err(conflict(s, "vm.resume")),
        }
    }

    /// Resume the VM, which is paused, for `what` (the request, for errors).
    fn resume_paused(&mut self, what: &str) -> Result<(), ApiError> {
        if let Some(vm) = &self.vm {
            vm.resume().map_err(|e| internal(what, e))?;
            self.state = Some(VmState::Running);
            events::emit("vm", "resumed", serde_json::Value::Null);
        }
        Ok(())
    }

    /// Stop the VM and boot it again from its configuration (vm.reboot).
    fn reboot(&mut self) -> (ApiResponse, AfterAction) {
        match self.state {
            Some(VmState::Running) | Some(VmState::Paused) => {
                let _ = self.shutdown("vm.reboot");
                match self.boot() {
                    Ok(()) => {
                        events::emit("vm", "rebooted", serde_json::Value::Null);
                        (Ok(ApiReply::Empty), AfterAction::VmStarted)
                    }
                    Err(e) => (Err(e), AfterAction::VmStopped),
                }
            }
            s => (Err(conflict(s, "vm.reboot")), AfterAction::Continue),
        }
    }

    /// Press the ACPI power button of the running VM (vm.power-button).
    fn power_button(&self) -> Result<(), ApiError> {
        match (self.state, &self.vm) {
            (Some(VmState::Running), Some(vm)) => {
                vm.ged()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .notify(GedEvent::PowerButton)
                    .map_err(|e| internal("vm.power-button", e))?;
                events::emit("vm", "power-button", serde_json::Value::Null);
                Ok(())
            }
            (s, _) => Err(conflict(s, "vm.power-button")),
        }
    }

    /// The VM's configuration, state and devices (vm.info).
    fn info(&self) -> ApiResponse {
        let (Some(config), Some(state)) = (&self.config, self.state) else {
            return Err(conflict(self.state, "vm.info"));
        };
        let devices = self
            .vm
            .as_ref()
            .map(|vm| {
                vm.pci_devices()
                    .devices()
                    .into_iter()
                    .map(|(id, kind, slot, dev)| DeviceInfo {
                        id,
                        kind: kind.to_string(),
                        pci_address: format!("0000:00:{slot:02x}.0"),
                        details: dev
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .details()
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        json_reply(&VmInfo {
            config: config.clone(),
            state,
            devices,
            memory_actual_size: config.memory.size,
        })
    }

    /// Every device's I/O counters by device id (vm.counters).
    fn counters(&self) -> ApiResponse {
        let Some(vm) = &self.vm else {
            return Err(conflict(self.state, "vm.counters"));
        };
        let mut all: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (id, _, _, dev) in vm.pci_devices().devices() {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let c = d
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            all.insert(id, c);
        }
        json_reply(&all)
    }

    /// Stop the VM if it runs and forget it (vm.delete).
    fn delete(&mut self) -> (ApiResponse, AfterAction) {
        let after = match self.state {
            Some(VmState::Running) | Some(VmState::Paused) => {
                let _ = self.shutdown("vm.delete");
                AfterAction::VmStopped
            }
            Some(_) => AfterAction::Continue,
            None => return (Err(conflict(None, "vm.delete")), AfterAction::Continue),
        };
        self.config = None;
        self.state = None;
        events::emit("vm", "deleted", serde_json::Value::Null);
        (Ok(ApiReply::Empty), after)
    }

    /// The current (or last) migration's progress (vm.migration-progress); reading it lets a
    /// migrated source that lingers for its final progress go.
    fn migration_progress(&self) -> ApiResponse {
        let reply = json_reply(&self.migration.get());
        if let Some(gate) = &self.linger {
            *gate.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            gate.1.notify_all();
        }
        reply
    }

    /// Ask the migration under way to stop (vm.migration-cancel).
    fn migration_cancel(&self) -> Result<(), ApiError> {
        self.migration.request_cancel().map_err(|why| ApiError {
            status: 409,
            message: format!("vm.migration-cancel: {why}"),
            state: self.state,
        })
    }

    /// Start sending the running VM to `req.destination_url` (vm.send-migration).
    fn send_migration(&mut self, req: SendMigrationRequest) -> Result<(), ApiError> {
        let vm = match (self.state, &self.vm) {
            (Some(VmState::Running) | Some(VmState::Paused), Some(vm)) => vm,
            (s, _) => return Err(conflict(s, "vm.send-migration")),
        };
        req.validate().map_err(|message| ApiError {
            status: 400,
            message,
            state: None,
        })?;
        // Passthrough devices: can they all migrate, and safely together (P2P)?
        let passthrough = vm.registry().passthrough_migration();
        if !passthrough.is_empty() {
            if let Err(e) = migration::device_fsm::plan_device_migration(&passthrough) {
                return Err(ApiError {
                    status: 409,
                    message: format!("vm.send-migration: {e}"),
                    state: self.state,
                });
            }
        }
        if self.state == Some(VmState::Paused) {
            return Err(ApiError {
                status: 409,
                message: "vm.send-migration: resume the VM first (a paused VM is migrated as a snapshot: vm.snapshot)".into(),
                state: self.state,
            });
        }
        let (core, config) = (vm.core(), vm.config().clone());
        let progress = self.migration.clone();
        progress.begin();
        let events = self.migration_events.clone();
        std::thread::Builder::new()
            .name("skiff-migrate-out".into())
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Migration);
                let outcome = match crate::migrate::source::send(core, config, req, progress) {
                    Ok(()) => MigrationOutcome::Sent,
                    Err(e) => MigrationOutcome::SendFailed(e),
                };
                events.send(outcome);
            })
            .map_err(|e| internal("vm.send-migration", e))?;
        self.state_before_migration = self.state;
        self.state = Some(VmState::Migrating);
        Ok(())
    }

    /// Start receiving a VM on `req.receiver_url` (vm.receive-migration).
    fn receive_migration(&mut self, req: ReceiveMigrationRequest) -> Result<(), ApiError> {
        match self.state {
            None | Some(VmState::Created) | Some(VmState::Shutdown) => {}
            s => return Err(conflict(s, "vm.receive-migration (a VM exists)")),
        }
        if self.migration.get().phase.is_final()
            || self.migration.get().phase == MigrationPhase::None
        {
        } else {
            return Err(ApiError {
                status: 409,
                message: "vm.receive-migration: a migration is already under way".into(),
                state: self.state,
            });
        }
        let progress = self.migration.clone();
        progress.begin();
        let events = self.migration_events.clone();
        std::thread::Builder::new()
            .name("skiff-migrate-in".into())
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Migration);
                let outcome = match crate::migrate::target::receive(req, progress) {
                    Ok(vm) => MigrationOutcome::Received(Box::new(vm)),
                    Err(e) => MigrationOutcome::ReceiveFailed(e),
                };
                events.send(outcome);
            })
            .map_err(|e| internal("vm.receive-migration", e))?;
        Ok(())
    }

    /// The eventfd migration workers signal when they end.
    pub fn migration_event_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.migration_events.fd().as_raw_fd()
    }

    /// Take the outcome of finished migration workers.
    pub fn on_migration_events(&mut self) -> AfterAction {
        let mut after = AfterAction::Continue;
        for outcome in self.migration_events.take() {
            match outcome {
                MigrationOutcome::Sent => {
                    if let Some(mut vm) = self.vm.take() {
                        vm.shutdown();
                    }
                    self.state = Some(VmState::Migrated);
                    events::emit("vm", "migrated", serde_json::Value::Null);
                    // Keep answering until a client read the final progress (or a few seconds
                    // passed), then exit.
                    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
                    self.linger = Some(gate.clone());
                    let events = self.migration_events.clone();
                    let _ = std::thread::Builder::new()
                        .name("skiff-migrated".into())
                        .spawn(move || {
                            let seen = gate.0.lock().unwrap_or_else(|e| e.into_inner());
                            let (seen, _) = gate
                                .1
                                .wait_timeout_while(seen, MIGRATED_LINGER, |seen| !*seen)
                                .unwrap_or_else(|e| e.into_inner());
                            drop(seen);
                            // Let the reply that was just read reach its client.
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            events.send(MigrationOutcome::Linger);
                        });
                }
                MigrationOutcome::Linger => after = AfterAction::ExitProcess,
                MigrationOutcome::SendFailed(e) => {
                    log::warn!("outgoing migration failed: {e}");
                    let before = self.state_before_migration.take();
                    self.state = if matches!(e, crate::migrate::MigrateError::OutcomeUnknown(_)) {
                        // The target may run the VM: this copy stays paused (vm.resume, or
                        // vm.delete once the target is known to run it).
                        events::emit("vm", "paused", serde_json::Value::Null);
                        Some(VmState::Paused)
                    } else {
                        before.or(Some(VmState::Running))
                    };
                }
                MigrationOutcome::Received(vm) => {
                    self.config = Some(vm.config().clone());
                    self.vm = Some(*vm);
                    self.state = Some(VmState::Running);
                    events::emit("vm", "received", serde_json::Value::Null);
                    after = AfterAction::VmStarted;
                }
                MigrationOutcome::ReceiveFailed(e) => {
                    log::warn!("incoming migration failed: {e}");
                }
            }
        }
        after
    }

    /// Carry out one API action and answer it.
    pub fn handle_action(&mut self, action: ApiAction) -> (ApiResponse, AfterAction) {
        self.handle(action)
    }
}

/// The answer to a request whose work returned `result`: `after` when it succeeded, nothing
/// more to do when it failed.
fn done(result: Result<(), ApiError>, after: AfterAction) -> (ApiResponse, AfterAction) {
    match result {
        Ok(()) => (Ok(ApiReply::Empty), after),
        Err(e) => (Err(e), AfterAction::Continue),
    }
}

fn json_reply<T: serde::Serialize>(v: &T) -> ApiResponse {
    serde_json::to_value(v)
        .map(ApiReply::Json)
        .map_err(|e| internal("encoding the reply", e))
}
