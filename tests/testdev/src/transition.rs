//! What the migration arcs do to the device, and the migration data transfers: the device side
//! of MIG_DEVICE_STATE, MIG_DATA_READ/WRITE and MIG_DATA_SIZE (the wire side is `feature.rs`).
//!
//! - Entering PRE_COPY / PRE_COPY_P2P from outside the saving group starts a saving session;
//!   PRE_COPY -> RUNNING and PRE_COPY_P2P -> RUNNING_P2P end it.
//! - Entering STOP_COPY (from STOP, PRE_COPY_P2P, or PRE_COPY without P2P) produces the rest of
//!   the stream at once: device memory and state are those at the arc. From then on, until the
//!   device runs again, a write to device memory is late (it would be lost).
//! - STOP -> RESUMING starts a resuming session into a staging copy; RESUMING -> STOP checks
//!   the whole stream and only then loads it. Our rules when it does not check out: data that
//!   is good so far but has not ended (no END record) fails the arc with EINVAL and the device
//!   stays in RESUMING (the client may write the rest and try again, or reset); corrupt,
//!   foreign or inconsistent data — which already failed its MIG_DATA_WRITE with EINVAL —
//!   fails the arc with EINVAL and moves the device to ERROR (only a reset leaves it). The
//!   device's state is untouched either way.
//! - Queued commands stay queued across every state; the engine only runs in RUNNING and
//!   PRE_COPY (see `engine.rs`), and a level interrupt pending while stopped is re-evaluated
//!   when the device runs again.

use log::{info, warn};

use crate::device::{Device, DeviceState};
use crate::fsm::is_direct_arc;
use crate::mem::Mapping;
use crate::migration::{full_stream_len, DeviceSnapshot, LoadError, Loader, Saver};

impl Device {
    /// Executes the direct arc to `to` (EINVAL for anything else, changing nothing; the
    /// current state is accepted as a no-op). `bar2` is the device memory.
    pub fn set_state(&mut self, to: DeviceState, bar2: &Mapping) -> Result<(), i32> {
        let from = self.state;
        self.check_late_writes(bar2);
        if from == to && to.supported(self.mig_caps) {
            return Ok(());
        }
        if !is_direct_arc(self.mig_caps, from, to) {
            warn!(
                "refused migration arc {from:?} -> {to:?}: not a direct arc with capabilities {:#x}",
                self.mig_caps
            );
            return Err(libc::EINVAL);
        }
        let msi = self.config.has_msi();
        match to {
            DeviceState::PreCopy | DeviceState::PreCopyP2p if !from.is_saving() => {
                self.save = Some(Saver::new(msi));
            }
            DeviceState::StopCopy => {
                let snap = DeviceSnapshot::of(self);
                self.save
                    .get_or_insert_with(|| Saver::new(msi))
                    .finish(bar2, &snap);
                info!(
                    "STOP_COPY: state saved ({} commands queued, {} bytes to read)",
                    snap.queue.len(),
                    self.save.as_ref().map_or(0, Saver::pending)
                );
            }
            DeviceState::Stop if from == DeviceState::Resuming => return self.finish_load(bar2),
            DeviceState::Resuming => {
                self.save = None;
                self.load = Some(Loader::new(msi));
            }
            // The session ends, or the device runs again after its memory was saved.
            DeviceState::Running | DeviceState::RunningP2p => self.save = None,
            _ => {}
        }
        info!("migration state {from:?} -> {to:?}");
        self.state = to;
        if to.allows_irqs() {
            self.update_intx();
        }
        Ok(())
    }

    /// RESUMING -> STOP: loads the stream when it checks out (see the module comment).
    fn finish_load(&mut self, bar2: &Mapping) -> Result<(), i32> {
        let res = match &self.load {
            None => Err(LoadError::Corrupt("no resuming session".into())),
            Some(l) => l
                .finish()
                .map(|(mem, snap)| (bar2.write(0, mem), snap.clone())),
        };
        match res {
            Ok((true, snap)) => {
                snap.restore(self);
                self.load = None;
                self.state = DeviceState::Stop;
                info!(
                    "migration state Resuming -> Stop: state loaded ({} commands queued)",
                    snap.queue.len()
                );
                Ok(())
            }
            Ok((false, _)) => {
                warn!("RESUMING -> STOP: device memory could not be written; device in ERROR");
                self.enter_error();
                Err(libc::EIO)
            }
            Err(LoadError::Incomplete(e)) => {
                warn!("RESUMING -> STOP refused, staying in RESUMING: {e}");
                Err(libc::EINVAL)
            }
            Err(LoadError::Corrupt(e)) => {
                warn!("RESUMING -> STOP refused, device in ERROR (reset it): {e}");
                self.enter_error();
                Err(libc::EINVAL)
            }
        }
    }

    fn enter_error(&mut self) {
        self.state = DeviceState::Error;
        self.load = None;
        self.save = None;
    }

    /// Counts writes to device memory made through the mapping after it was saved (compared
    /// with what was saved; a peer's write and a guest's look the same, both are lost).
    pub fn check_late_writes(&mut self, bar2: &Mapping) {
        let n = self.save.as_mut().map_or(0, |s| s.late_writes(bar2));
        if n > 0 {
            self.late_peer_write(n, "write through the mapping (chunks changed)");
        }
    }

    /// After a REGION_WRITE of `len` bytes at `off` into device memory: counts the peer write
    /// (late when the memory was saved) and keeps the mapping check from counting it again.
    pub fn peer_region_write(&mut self, bar2: &Mapping, off: u64, len: usize) {
        self.peer_write();
        if let Some(s) = self.save.as_mut() {
            s.absorb(bar2, off, len);
        }
    }

    /// MIG_DATA_READ of at most `max` bytes in a saving state (EINVAL elsewhere). In PRE_COPY
    /// fewer bytes, or none, mean "nothing more for now"; in STOP_COPY the end of the stream.
    pub fn mig_data_read(&mut self, bar2: &Mapping, max: usize) -> Result<Vec<u8>, i32> {
        if !self.state.is_saving() {
            warn!("MIG_DATA_READ in state {:?}", self.state);
            return Err(libc::EINVAL);
        }
        self.check_late_writes(bar2);
        let s = self.save.as_mut().ok_or(libc::EINVAL)?;
        s.fill(bar2, max);
        Ok(s.read(max))
    }

    /// MIG_DATA_WRITE in RESUMING (EINVAL elsewhere, and for data that does not check out).
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), i32> {
        let state = self.state;
        let Some(l) = self
            .load
            .as_mut()
            .filter(|_| state == DeviceState::Resuming)
        else {
            warn!("MIG_DATA_WRITE in state {state:?}");
            return Err(libc::EINVAL);
        };
        l.write(data).map_err(|e| {
            warn!("MIG_DATA_WRITE refused: {e}");
            libc::EINVAL
        })
    }

    /// `stop_copy_length`: the bytes STOP_COPY would produce if entered now; in STOP_COPY the
    /// bytes not yet read.
    pub fn stop_copy_len(&self, bar2: &Mapping) -> u64 {
        let commands = usize::from(self.current.is_some()) + self.queue.len();
        match &self.save {
            Some(s) if self.state.is_saving() => s.stop_copy_len(bar2, commands),
            _ => full_stream_len(commands),
        }
    }
}
