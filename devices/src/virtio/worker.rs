//! The worker thread that serves a device's queues: an event-manager loop over the device's fds
//! (queue ioeventfds, a TAP, ...) plus a control eventfd through which the device pauses, resumes
//! and stops it. While paused the worker processes nothing, so it neither touches guest memory nor
//! raises interrupts; fds that became ready meanwhile are served after resume (level-triggered).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The device-specific part of a worker: which fds to watch and what to do when they fire.
pub trait WorkerBody: Send + 'static {
    /// Register the fds to watch (called once on the worker thread).
    fn init(&mut self, ops: &mut EventOps);
    /// Handle a ready fd.
    fn process(&mut self, events: Events, ops: &mut EventOps);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    command: Command,
    parked: bool,
}

struct Control {
    state: Mutex<ControlState>,
    cv: Condvar,
    wake: EventFd,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn command(&self, c: Command) -> io::Result<()> {
        self.lock().command = c;
        self.cv.notify_all();
        self.wake.write(1)
    }
}

struct Harness<B: WorkerBody> {
    body: B,
    control: Arc<Control>,
    /// Whether `body.init` ran; a worker spawned paused runs it on the first resume (an init
    /// may already serve queues).
    body_ready: bool,
}

impl<B: WorkerBody> Harness<B> {
    fn init_body_if_running(&mut self, ops: &mut EventOps) {
        if !self.body_ready && self.control.lock().command == Command::Run {
            self.body_ready = true;
            self.body.init(ops);
        }
    }
}

impl<B: WorkerBody> MutEventSubscriber for Harness<B> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control.wake, EventSet::IN)) {
            log::error!("worker: cannot watch its control eventfd: {e}");
        }
        self.init_body_if_running(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.control.wake.as_raw_fd() {
            let _ = self.control.wake.read();
            self.init_body_if_running(ops);
        } else if self.control.lock().command == Command::Run {
            self.body.process(events, ops);
        }
    }
}

/// A running worker thread for one device.
pub struct Worker<B: WorkerBody> {
    control: Arc<Control>,
    thread: Option<JoinHandle<B>>,
}

/// How long [`Worker::pause`] waits for the thread to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl<B: WorkerBody> Worker<B> {
    /// Start a worker thread named `name` serving `body`.
    pub fn spawn(name: String, body: B) -> io::Result<Self> {
        Self::spawn_with(name, body, Command::Run)
    }

    /// Start a worker thread that is paused from the start: `body` (including its
    /// [`WorkerBody::init`]) runs nothing until [`Worker::resume`]. Used when a device is activated
    /// while paused, as on restore of a paused VM.
    pub fn spawn_paused(name: String, body: B) -> io::Result<Self> {
        Self::spawn_with(name, body, Command::Pause)
    }

    fn spawn_with(name: String, body: B, command: Command) -> io::Result<Self> {
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                command,
                parked: false,
            }),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        });
        if command != Command::Run {
            // Make the first event-loop iteration return at once, so the thread parks.
            control.wake.write(1)?;
        }
        let mut manager: EventManager<Arc<Mutex<Harness<B>>>> =
            EventManager::new().map_err(|e| io::Error::other(e.to_string()))?;
        let harness = Arc::new(Mutex::new(Harness {
            body,
            control: control.clone(),
            body_ready: false,
        }));
        manager.add_subscriber(harness.clone());
        let ctl = control.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            sandbox::apply_or_exit(sandbox::ThreadKind::DeviceWorker);
            loop {
                if let Err(e) = manager.run() {
                    log::error!("worker event loop failed: {e}");
                    break;
                }
                let mut st = ctl.lock();
                match st.command {
                    Command::Run => {}
                    Command::Stop => break,
                    Command::Pause => {
                        st.parked = true;
                        ctl.cv.notify_all();
                        while st.command == Command::Pause {
                            st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        st.parked = false;
                        ctl.cv.notify_all();
                        if st.command == Command::Stop {
                            break;
                        }
                    }
                }
            }
            drop(manager);
            match Arc::try_unwrap(harness) {
                Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()).body,
                Err(_) => unreachable!("the event manager, the only other owner, was dropped"),
            }
        })?;
        Ok(Self {
            control,
            thread: Some(thread),
        })
    }

    /// Stop processing; returns once the worker has parked (it then touches nothing).
    pub fn pause(&self) -> io::Result<()> {
        self.control.command(Command::Pause)?;
        let st = self.control.lock();
        let (st, timeout) = self
            .control
            .cv
            .wait_timeout_while(st, PAUSE_TIMEOUT, |s| !s.parked)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && !st.parked {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "worker did not pause",
            ));
        }
        Ok(())
    }

    /// Continue after [`Worker::pause`].
    pub fn resume(&self) -> io::Result<()> {
        self.control.command(Command::Run)
    }

    /// Stop the thread and return the body (with its queues) for reuse or inspection.
    pub fn stop(mut self) -> Option<B> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Option<B> {
        let t = self.thread.take()?;
        if let Err(e) = self.control.command(Command::Stop) {
            log::error!("cannot stop worker: {e}");
        }
        t.join().ok()
    }
}

impl<B: WorkerBody> Drop for Worker<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counter {
        kick: EventFd,
        seen: Arc<AtomicU64>,
    }

    impl WorkerBody for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.kick.read() {
                self.seen.fetch_add(n, Ordering::SeqCst);
            }
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn pause_holds_events_until_resume() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let body = Counter {
            kick: kick.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let w = Worker::spawn("test-worker".into(), body).unwrap();
        kick.write(2).unwrap();
        wait_until(|| seen.load(Ordering::SeqCst) == 2);
        w.pause().unwrap();
        kick.write(3).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            2,
            "a paused worker must not process"
        );
        w.resume().unwrap();
        wait_until(|| seen.load(Ordering::SeqCst) == 5);
        let body = w.stop().expect("body back");
        assert_eq!(body.seen.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn spawn_paused_waits_for_resume() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let body = Counter {
            kick: kick.try_clone().unwrap(),
            seen: seen.clone(),
        };
        kick.write(4).unwrap();
        let w = Worker::spawn_paused("test-worker".into(), body).unwrap();
        // Pausing a worker that was spawned paused returns once it parked.
        w.pause().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            "spawned paused but processed"
        );
        w.resume().unwrap();
        wait_until(|| seen.load(Ordering::SeqCst) == 4);
        kick.write(1).unwrap();
        wait_until(|| seen.load(Ordering::SeqCst) == 5);
        // Stopping a worker that never ran works too.
        let body = EventFd::new(EFD_NONBLOCK).unwrap();
        let w = Worker::spawn_paused(
            "test-worker".into(),
            Counter {
                kick: body,
                seen: Arc::new(AtomicU64::new(0)),
            },
        )
        .unwrap();
        assert!(w.stop().is_some());
    }
}
