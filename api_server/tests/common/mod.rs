//! A fake VMM control thread for the server tests: it waits on the eventfd like the real control
//! loop, drains the request channel and runs a small VM state machine.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use api_server::config::VmConfig;
use api_server::models::file_url_path;
use api_server::{
    ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, ApiServer, Counters, DeviceInfo,
    MigrationPhase, MigrationProgress, MigrationUrl, PingResponse, ReceiveMigrationRequest,
    SendMigrationRequest, ServerOptions, VmInfo, VmState,
};
use vmm_sys_util::eventfd::EventFd;

/// A unique socket path in a fresh temporary directory.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "skiff-api-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("api.sock")
}

/// The fake VM's state (`None`: no VM).
#[derive(Debug, Default)]
pub struct FakeVm {
    pub state: Option<VmState>,
    pub config: Option<VmConfig>,
    /// Every action received, in order (endpoint names).
    pub log: Vec<&'static str>,
    /// The migration being simulated (or the last one).
    pub migration: Option<FakeMigration>,
    /// The last vm.send-migration request.
    pub sent: Option<SendMigrationRequest>,
    /// The last vm.receive-migration request.
    pub received: Option<ReceiveMigrationRequest>,
}

/// A scripted migration: each `vm.migration-progress` answers the next step (the last one
/// repeats). The destination picks the script: host `fail.invalid` fails after pre-copy, a
/// `unix:` path containing `slow` stays in pre-copy for 200 polls (time to cancel it), anything
/// else completes in six steps.
#[derive(Debug)]
pub struct FakeMigration {
    pub steps: Vec<MigrationProgress>,
    pub pos: usize,
    /// The state to go back to when it fails or is cancelled.
    pub before: VmState,
}

fn step(phase: MigrationPhase, iteration: u32, sent: u64, remaining: u64) -> MigrationProgress {
    MigrationProgress {
        phase,
        iteration,
        bytes_sent: sent,
        bytes_remaining: remaining,
        dirty_rate_pages_per_s: 1000 / (iteration as u64 + 1),
        bandwidth_bytes_per_s: 100 << 20,
        expected_downtime_ms: 900 / (iteration as u64 + 1),
        elapsed_ms: 200 * iteration as u64,
        ..Default::default()
    }
}

impl FakeMigration {
    pub fn script(url: &MigrationUrl, before: VmState) -> FakeMigration {
        use MigrationPhase as P;
        const G: u64 = 1 << 30;
        let mut steps = vec![step(P::Setup, 0, 0, 0), step(P::Precopy, 1, G / 2, G / 2)];
        match url {
            MigrationUrl::Tcp { host, .. } if host == "fail.invalid" => {
                let mut f = step(P::Failed, 1, G / 2, G / 2);
                f.error = Some("the target closed the connection".into());
                steps.push(f);
            }
            MigrationUrl::Unix { path } if path.to_string_lossy().contains("slow") => {
                for i in 0..200 {
                    steps.push(step(P::Precopy, 2 + i, G, G / 4));
                }
            }
            _ => {
                steps.push(step(P::Precopy, 2, G, 64 << 20));
                steps.push(step(P::Switchover, 3, G + (32 << 20), 8 << 20));
                let mut c = step(P::Completing, 3, G + (40 << 20), 0);
                c.downtime_ms = Some(42);
                steps.push(c.clone());
                c.phase = P::Completed;
                steps.push(c);
            }
        }
        FakeMigration {
            steps,
            pos: 0,
            before,
        }
    }

    fn current(&self) -> &MigrationProgress {
        &self.steps[self.pos.min(self.steps.len() - 1)]
    }
}

fn conflict(what: &str, state: Option<VmState>) -> ApiError {
    match state {
        None => ApiError::conflict(format!("{what}: no VM exists; create one first"), None),
        Some(s) => ApiError::conflict(format!("{what}: the VM is {s}"), Some(s)),
    }
}

impl FakeVm {
    /// Perform one action.
    pub fn apply(&mut self, action: ApiAction) -> ApiResponse {
        use VmState::*;
        self.log.push(action.endpoint());
        let what = action.endpoint();
        let s = self.state;
        let next = match (action, s) {
            (ApiAction::Ping, _) => {
                return ApiReply::json(&PingResponse {
                    version: "0.1.0-fake".into(),
                    pid: std::process::id(),
                    features: vec!["fake".into()],
                })
            }
            (ApiAction::VmmShutdown, _) => return Ok(ApiReply::Empty),
            (ApiAction::Create(c), None) => {
                self.config = Some(*c);
                Created
            }
            (ApiAction::Boot, Some(Created | Shutdown)) => Running,
            (ApiAction::Pause, Some(Running)) => Paused,
            (ApiAction::Resume, Some(Paused)) => Running,
            (ApiAction::Shutdown, Some(Running | Paused)) => Shutdown,
            (ApiAction::Reboot, Some(Running | Paused)) => Running,
            (ApiAction::PowerButton, Some(Running)) => Running,
            (ApiAction::Info, Some(st)) => {
                let config = self.config.clone().unwrap_or_default();
                let devices = config
                    .device_ids()
                    .into_iter()
                    .enumerate()
                    .map(|(i, id)| DeviceInfo {
                        kind: if id.starts_with("disk") {
                            "virtio-blk".into()
                        } else {
                            "virtio-net".into()
                        },
                        id,
                        pci_address: format!("0000:00:{:02x}.0", i + 1),
                        details: Default::default(),
                    })
                    .collect();
                return ApiReply::json(&VmInfo {
                    memory_actual_size: config.memory.size,
                    config,
                    state: st,
                    devices,
                });
            }
            (ApiAction::Counters, Some(_)) => {
                let mut c = Counters::new();
                c.entry("disk0".into())
                    .or_default()
                    .insert("read_ops".into(), 3);
                return ApiReply::json(&c);
            }
            (ApiAction::Snapshot(r), Some(Paused)) => {
                if file_url_path(&r.destination_url)
                    .unwrap()
                    .starts_with("/fail")
                {
                    return Err(ApiError::internal("snapshot: cannot write /fail"));
                }
                Paused
            }
            (ApiAction::Restore(r), None) => {
                self.config = Some(VmConfig::default());
                if r.resume {
                    Running
                } else {
                    Paused
                }
            }
            (ApiAction::SendMigration(r), Some(before @ (Running | Paused))) => {
                self.migration = Some(FakeMigration::script(&r.destination_url, before));
                self.sent = Some(r);
                Migrating
            }
            (ApiAction::ReceiveMigration(r), None) => {
                self.received = Some(r);
                return Ok(ApiReply::Empty);
            }
            (ApiAction::MigrationProgress, _) => {
                let Some(m) = self.migration.as_mut() else {
                    return ApiReply::json(&MigrationProgress::default());
                };
                let p = m.current().clone();
                m.pos += 1;
                if p.phase.is_final() && self.state == Some(Migrating) {
                    self.state = Some(match p.phase {
                        MigrationPhase::Completed => Migrated,
                        _ => m.before,
                    });
                }
                return ApiReply::json(&p);
            }
            (ApiAction::MigrationCancel, Some(Migrating)) => {
                let m = self.migration.as_mut().expect("migrating");
                let mut c = m.current().clone();
                c.phase = MigrationPhase::Cancelled;
                m.steps.truncate(m.pos.min(m.steps.len()));
                m.steps.push(c);
                m.pos = m.steps.len() - 1;
                m.before
            }
            (ApiAction::Delete, _) => {
                self.state = None;
                self.config = None;
                return Ok(ApiReply::Empty);
            }
            (_, s) => return Err(conflict(what, s)),
        };
        self.state = Some(next);
        Ok(ApiReply::Empty)
    }
}

/// A running server with a fake VMM behind it.
pub struct Harness {
    pub server: Option<ApiServer>,
    pub path: PathBuf,
    pub vm: Arc<Mutex<FakeVm>>,
    pub vmm: Option<JoinHandle<()>>,
}

impl Harness {
    /// Start a server on a fresh socket with the fake VMM.
    pub fn start(tag: &str) -> Harness {
        Self::start_with(tag, ServerOptions::default())
    }

    /// [`Harness::start`] with server options.
    pub fn start_with(tag: &str, opts: ServerOptions) -> Harness {
        let path = socket_path(tag);
        let (tx, rx) = channel();
        let wake = EventFd::new(0).unwrap();
        let vmm_wake = wake.try_clone().unwrap();
        let server = ApiServer::start_with(&path, tx, wake, opts).unwrap();
        let vm = Arc::new(Mutex::new(FakeVm::default()));
        let vm2 = vm.clone();
        let vmm = std::thread::spawn(move || fake_control_loop(rx, vmm_wake, vm2));
        Harness {
            server: Some(server),
            path,
            vm,
            vmm: Some(vmm),
        }
    }

    /// A client for this server.
    pub fn client(&self) -> api_server::ApiClient {
        api_server::ApiClient::new(&self.path).unwrap()
    }

    /// The fake VM's state.
    pub fn state(&self) -> Option<VmState> {
        self.vm.lock().unwrap().state
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The fake control thread stays blocked on its eventfd; it is detached and ends with
        // the test process.
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The control loop as the real VMM runs it: block on the eventfd, then drain the channel.
pub fn fake_control_loop(rx: Receiver<ApiRequest>, wake: EventFd, vm: Arc<Mutex<FakeVm>>) {
    loop {
        if wake.read().is_err() {
            return;
        }
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    let shutdown = req.action == ApiAction::VmmShutdown;
                    let r = vm.lock().unwrap().apply(req.action);
                    let _ = req.respond.send(r);
                    if shutdown {
                        return;
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
    }
}
