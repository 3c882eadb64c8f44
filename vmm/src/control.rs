//! The control thread's event loop (event-manager): it waits for the guest or a vCPU to end the VM
//! and for SIGTERM/SIGINT, and decides how `skiff` exits. API requests join this loop later.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::ExitReason;

use crate::vmm::{AfterAction, Vmm};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest ended the VM (power-off, reset request, or a fatal vCPU condition).
    Guest(ExitReason),
    /// skiff received a termination signal.
    Signal(i32),
    /// The API asked the VMM to exit (vmm.shutdown).
    VmmShutdown,
}

/// Errors of the control loop.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Setting up signal handling failed.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
}

/// Block SIGTERM and SIGINT in this thread (and threads it spawns later) and return a signalfd
/// that reports them. Call before starting vCPU threads.
pub fn block_termination_signals() -> Result<OwnedFd, ControlError> {
    // SAFETY: `set` is a valid sigset_t initialised by sigemptyset before use; the calls only
    // touch this thread's signal mask and create a new descriptor that we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(ControlError::Signals(std::io::Error::last_os_error()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(ControlError::Signals(std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The API's request channel and the eventfd its server writes after each request.
pub struct ApiChannel {
    /// Requests from the API thread.
    pub requests: std::sync::mpsc::Receiver<api_server::ApiRequest>,
    /// Written by the API thread after queueing a request.
    pub wake: vmm_sys_util::eventfd::EventFd,
}

struct ControlSubscriber {
    vmm: Vmm,
    signals: OwnedFd,
    api: Option<ApiChannel>,
    /// End the process when the guest ends the VM (CLI mode); with the API the VMM keeps serving.
    exit_on_vm_end: bool,
    /// fds of the current VM being watched: its exit event and INTx resample fds.
    vm_fds: Vec<RawFd>,
    exit_fd: Option<RawFd>,
    on_intx_resample: Option<Box<dyn FnMut() + Send>>,
    outcome: Option<VmOutcome>,
}

impl ControlSubscriber {
    fn read_signal(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data; we read at most its size into it from our fd.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.signals.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            (n == std::mem::size_of::<libc::signalfd_siginfo>() as isize)
                .then_some(info.ssi_signo as i32)
        }
    }

    /// Stop watching the current VM's fds (before it may be torn down).
    fn unwatch_vm(&mut self, ops: &mut EventOps) {
        for fd in self.vm_fds.drain(..) {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.exit_fd = None;
        self.on_intx_resample = None;
    }

    /// Watch the current VM's fds, if there is a VM.
    fn watch_vm(&mut self, ops: &mut EventOps) {
        let Some(vm) = self.vmm.vm() else { return };
        let exit = vm.exit_event();
        let exit_fd = exit.eventfd().as_raw_fd();
        let mut fds = vec![exit_fd];
        fds.extend(vm.pci_devices().intx_resample_fds());
        self.on_intx_resample = Some(vm.pci_devices().intx_resample_handler());
        for fd in &fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e}");
            }
        }
        self.exit_fd = Some(exit_fd);
        self.vm_fds = fds;
    }

    fn on_guest_exit(&mut self, ops: &mut EventOps) {
        let Some(vm) = self.vmm.vm() else { return };
        let exit = vm.exit_event();
        let _ = exit.eventfd().read();
        let Some(reason) = exit.reason() else { return };
        if self.exit_on_vm_end {
            self.outcome.get_or_insert(VmOutcome::Guest(reason));
            return;
        }
        self.unwatch_vm(ops);
        match reason {
            ExitReason::PowerOff => {
                let _ = self.vmm.shutdown("guest power-off");
            }
            ExitReason::Reset => {
                let _ = self.vmm.shutdown("guest reset");
                if let Err(e) = self.vmm.boot() {
                    log::error!("reboot after a guest reset failed: {}", e.message);
                }
            }
            ExitReason::VcpuError => {
                log::error!("the guest crashed; the VM is shut down");
                crate::events::emit(
                    "vm",
                    "device-error",
                    serde_json::json!({"reason": "guest crashed"}),
                );
                let _ = self.vmm.shutdown("guest crashed");
            }
        }
        self.watch_vm(ops);
    }

    fn on_api(&mut self, ops: &mut EventOps) {
        let Some(api) = &self.api else { return };
        let _ = api.wake.read();
        let requests: Vec<api_server::ApiRequest> = api.requests.try_iter().collect();
        for req in requests {
            self.unwatch_vm(ops);
            let (reply, after) = self.vmm.handle_action(req.action);
            self.watch_vm(ops);
            let _ = req.respond.send(reply);
            if after == AfterAction::ExitProcess {
                self.outcome.get_or_insert(VmOutcome::VmmShutdown);
            }
        }
    }
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if Some(fd) == self.exit_fd {
            self.on_guest_exit(ops);
        } else if fd == self.signals.as_raw_fd() {
            if let Some(sig) = self.read_signal() {
                log::info!("received signal {sig}; stopping the VM");
                self.outcome.get_or_insert(VmOutcome::Signal(sig));
            }
        } else if self.api.as_ref().is_some_and(|a| a.wake.as_raw_fd() == fd) {
            self.on_api(ops);
        } else if fd == self.vmm.migration_event_fd() {
            self.unwatch_vm(ops);
            let after = self.vmm.on_migration_events();
            self.watch_vm(ops);
            if after == AfterAction::ExitProcess {
                log::info!("the VM runs on the migration target now; exiting");
                self.outcome.get_or_insert(VmOutcome::VmmShutdown);
            }
        } else if self.vm_fds.contains(&fd) {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes from an eventfd we watch into a valid buffer.
            unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, 8) };
            if let Some(h) = self.on_intx_resample.as_mut() {
                h();
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.signals.as_raw_fd(), self.vmm.migration_event_fd()];
        if let Some(api) = &self.api {
            fds.push(api.wake.as_raw_fd());
        }
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e}");
            }
        }
        self.watch_vm(ops);
    }
}

/// Run the control loop until skiff should exit: the guest ended the VM (CLI mode), vmm.shutdown,
/// or a termination signal. Returns how it ended and the VMM (so its VM can be shut down cleanly).
pub fn run(
    vmm: Vmm,
    signals: OwnedFd,
    api: Option<ApiChannel>,
    exit_on_vm_end: bool,
) -> Result<(VmOutcome, Vmm), ControlError> {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| ControlError::EventLoop(e.to_string()))?;
    let sub = Arc::new(Mutex::new(ControlSubscriber {
        vmm,
        signals,
        api,
        exit_on_vm_end,
        vm_fds: Vec::new(),
        exit_fd: None,
        on_intx_resample: None,
        outcome: None,
    }));
    manager.add_subscriber(sub.clone());
    loop {
        if let Err(e) = manager.run() {
            return Err(ControlError::EventLoop(e.to_string()));
        }
        let outcome = sub.lock().unwrap_or_else(|e| e.into_inner()).outcome;
        if let Some(o) = outcome {
            drop(manager);
            let vmm = match Arc::try_unwrap(sub) {
                Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()).vmm,
                Err(_) => {
                    return Err(ControlError::EventLoop(
                        "control subscriber still shared".into(),
                    ))
                }
            };
            return Ok((o, vmm));
        }
    }
}
