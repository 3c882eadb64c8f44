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
    PingResponse, ServerOptions, VmInfo, VmState,
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
