//! vCPU throttling ("auto-converge"): a guest that dirties memory faster than a live migration
//! can send it gets less CPU time. A throttle thread parks every vCPU for `percent` of each
//! 100 ms period and lets them run for the rest.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vcpu::VcpuControl;

/// Length of one throttle period.
const PERIOD: Duration = Duration::from_millis(100);
/// Highest throttle: the guest keeps 1 % of its CPU time.
pub const MAX_THROTTLE_PERCENT: u8 = 99;

/// A running throttle; stopping it (or dropping it) lets the vCPUs run freely again.
pub struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Throttle the vCPUs (threads `vcpus`, controlled by `control`); starts at 0 %.
    pub fn start(control: Arc<VcpuControl>, vcpus: Vec<libc::pthread_t>) -> std::io::Result<Self> {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("skiff-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let pct = u32::from(p.load(Ordering::SeqCst).min(MAX_THROTTLE_PERCENT));
                    if pct == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    control.request_pause(&vcpus);
                    std::thread::sleep(PERIOD * pct / 100);
                    control.resume();
                    std::thread::sleep(PERIOD * (100 - pct) / 100);
                }
            })?;
        Ok(Self {
            percent,
            stop,
            thread: Some(thread),
        })
    }

    /// Set the share of time the vCPUs are parked (0 ..= [`MAX_THROTTLE_PERCENT`]).
    pub fn set(&self, percent: u8) {
        self.percent
            .store(percent.min(MAX_THROTTLE_PERCENT), Ordering::SeqCst);
    }

    /// The current setting.
    pub fn get(&self) -> u8 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Stop throttling and wait for the thread: when this returns the throttle no longer parks
    /// or resumes vCPUs (the caller may pause them for real).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}
