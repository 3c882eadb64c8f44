//! The control thread's event loop (event-manager): it waits for the guest or a vCPU to end the VM
//! and for SIGTERM/SIGINT, and decides how `skiff` exits. API requests join this loop later.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devices::{ExitReason, VmExitEvent};
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

struct ControlSubscriber {
    exit: Arc<VmExitEvent>,
    signals: OwnedFd,
    outcome: Option<VmOutcome>,
    intx_resample: Vec<std::os::fd::RawFd>,
    on_intx_resample: Box<dyn FnMut() + Send>,
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
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
            if let Some(reason) = self.exit.reason() {
                self.outcome.get_or_insert(VmOutcome::Guest(reason));
            }
        } else if events.fd() == self.signals.as_raw_fd() {
            if let Some(sig) = self.read_signal() {
                log::info!("received signal {sig}; stopping the VM");
                self.outcome.get_or_insert(VmOutcome::Signal(sig));
            }
        } else if self.intx_resample.contains(&events.fd()) {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes from an eventfd we watch into a valid buffer.
            unsafe { libc::read(events.fd(), buf.as_mut_ptr() as *mut libc::c_void, 8) };
            (self.on_intx_resample)();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [self.exit.eventfd().as_raw_fd(), self.signals.as_raw_fd()];
        for fd in fds.into_iter().chain(self.intx_resample.iter().copied()) {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e}");
            }
        }
    }
}

/// INTx resample eventfds and what to do when one fires (re-assert lines still pending).
pub struct IntxResample {
    /// The resample eventfds.
    pub fds: Vec<std::os::fd::RawFd>,
    /// Called when any of them is readable.
    pub handler: Box<dyn FnMut() + Send>,
}

/// Run the control loop until the VM ends; returns how it ended.
pub fn run_until_exit(
    exit: Arc<VmExitEvent>,
    signals: OwnedFd,
    intx: IntxResample,
) -> Result<VmOutcome, ControlError> {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| ControlError::EventLoop(e.to_string()))?;
    let sub = Arc::new(Mutex::new(ControlSubscriber {
        exit,
        signals,
        outcome: None,
        intx_resample: intx.fds,
        on_intx_resample: intx.handler,
    }));
    manager.add_subscriber(sub.clone());
    loop {
        match manager.run() {
            Ok(_) => {}
            Err(e) => return Err(ControlError::EventLoop(e.to_string())),
        }
        if let Some(o) = sub.lock().unwrap_or_else(|e| e.into_inner()).outcome {
            return Ok(o);
        }
    }
}
