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
use crate::vm::Vm;

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
#[derive(Default)]
pub struct Vmm {
    config: Option<VmConfig>,
    vm: Option<Vm>,
    state: Option<VmState>,
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
            if let Some(vm) = &self.vm {
                vm.resume()
                    .map_err(|e| internal("vm.restore (resume)", e))?;
                self.state = Some(VmState::Running);
                events::emit("vm", "resumed", serde_json::Value::Null);
            }
        }
        Ok(())
    }

    fn handle(&mut self, action: ApiAction) -> (ApiResponse, AfterAction) {
        use AfterAction::*;
        let ok = |after| (Ok(ApiReply::Empty), after);
        match action {
            ApiAction::Ping => {
                let ping = PingResponse {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    pid: std::process::id(),
                    features: vec![],
                };
                (json_reply(&ping), Continue)
            }
            ApiAction::VmmShutdown => {
                if self.vm.is_some() {
                    let _ = self.shutdown("vmm.shutdown");
                }
                ok(ExitProcess)
            }
            ApiAction::Create(config) => match self.create(*config) {
                Ok(()) => ok(Continue),
                Err(e) => (Err(e), Continue),
            },
            ApiAction::Boot => match self.boot() {
                Ok(()) => ok(VmStarted),
                Err(e) => (Err(e), Continue),
            },
            ApiAction::Pause => match (self.state, &self.vm) {
                (Some(VmState::Running), Some(vm)) => match vm.pause() {
                    Ok(()) => {
                        self.state = Some(VmState::Paused);
                        events::emit("vm", "paused", serde_json::Value::Null);
                        ok(Continue)
                    }
                    Err(e) => (Err(internal("vm.pause", e)), Continue),
                },
                (s, _) => (Err(conflict(s, "vm.pause")), Continue),
            },
            ApiAction::Resume => match (self.state, &self.vm) {
                (Some(VmState::Paused), Some(vm)) => match vm.resume() {
                    Ok(()) => {
                        self.state = Some(VmState::Running);
                        events::emit("vm", "resumed", serde_json::Value::Null);
                        ok(Continue)
                    }
                    Err(e) => (Err(internal("vm.resume", e)), Continue),
                },
                (s, _) => (Err(conflict(s, "vm.resume")), Continue),
            },
            ApiAction::Shutdown => match self.shutdown("vm.shutdown") {
                Ok(()) => ok(VmStopped),
                Err(e) => (Err(e), Continue),
            },
            ApiAction::Reboot => match self.state {
                Some(VmState::Running) | Some(VmState::Paused) => {
                    let _ = self.shutdown("vm.reboot");
                    match self.boot() {
                        Ok(()) => {
                            events::emit("vm", "rebooted", serde_json::Value::Null);
                            ok(VmStarted)
                        }
                        Err(e) => (Err(e), VmStopped),
                    }
                }
                s => (Err(conflict(s, "vm.reboot")), Continue),
            },
            ApiAction::PowerButton => match (self.state, &self.vm) {
                (Some(VmState::Running), Some(vm)) => {
                    let r = vm
                        .ged()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .notify(GedEvent::PowerButton);
                    match r {
                        Ok(()) => {
                            events::emit("vm", "power-button", serde_json::Value::Null);
                            ok(Continue)
                        }
                        Err(e) => (Err(internal("vm.power-button", e)), Continue),
                    }
                }
                (s, _) => (Err(conflict(s, "vm.power-button")), Continue),
            },
            ApiAction::Info => match (&self.config, self.state) {
                (Some(config), Some(state)) => {
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
                    let info = VmInfo {
                        config: config.clone(),
                        state,
                        devices,
                        memory_actual_size: config.memory.size,
                    };
                    (json_reply(&info), Continue)
                }
                (_, s) => (Err(conflict(s, "vm.info")), Continue),
            },
            ApiAction::Counters => match &self.vm {
                Some(vm) => {
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
                    (json_reply(&all), Continue)
                }
                None => (Err(conflict(self.state, "vm.counters")), Continue),
            },
            ApiAction::Snapshot(req) => match self.snapshot(&req.destination_url) {
                Ok(()) => ok(Continue),
                Err(e) => (Err(e), Continue),
            },
            ApiAction::Restore(req) => match self.restore(&req.source_url, req.resume) {
                Ok(()) => ok(VmStarted),
                Err(e) => (Err(e), Continue),
            },
            ApiAction::Delete => match self.state {
                Some(VmState::Running) | Some(VmState::Paused) => {
                    let _ = self.shutdown("vm.delete");
                    self.config = None;
                    self.state = None;
                    events::emit("vm", "deleted", serde_json::Value::Null);
                    ok(VmStopped)
                }
                Some(_) => {
                    self.config = None;
                    self.state = None;
                    events::emit("vm", "deleted", serde_json::Value::Null);
                    ok(Continue)
                }
                None => (Err(conflict(None, "vm.delete")), Continue),
            },
            ApiAction::SendMigration(_)
            | ApiAction::ReceiveMigration(_)
            | ApiAction::MigrationProgress
            | ApiAction::MigrationCancel => (
                Err(ApiError::not_implemented(
                    "live migration is not available in this build yet",
                )),
                Continue,
            ),
        }
    }

    /// Carry out one API action and answer it.
    pub fn handle_action(&mut self, action: ApiAction) -> (ApiResponse, AfterAction) {
        self.handle(action)
    }
}

fn json_reply<T: serde::Serialize>(v: &T) -> ApiResponse {
    serde_json::to_value(v)
        .map(ApiReply::Json)
        .map_err(|e| internal("encoding the reply", e))
}
