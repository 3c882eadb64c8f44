//! What the migration arcs do to the device, and the migration data transfers: the device side
//! of MIG_DEVICE_STATE, MIG_DATA_READ/WRITE and MIG_DATA_SIZE (the wire side is `feature.rs`).
//!
//! - Entering PRE_COPY / PRE_COPY_P2P from outside the saving group starts a saving session;
//!   PRE_COPY -> RUNNING and PRE_COPY_P2P -> RUNNING_P2P end it.
//! - Entering STOP_COPY (from STOP, PRE_COPY_P2P, or PRE_COPY without P2P) produces the rest of
//!   the stream at once: device memory and state are those at the arc. STOP_COPY -> STOP ends
//!   the saving session (the kernel: "The STOP_COPY arc will terminate a data transfer
//!   session"); entering STOP_COPY again starts a new one.
//! - Late peer writes: in STOP, STOP_COPY and RESUMING device memory must not change (why:
//!   [`DeviceState::freezes_memory`]). A REGION_WRITE into BAR2 is counted as it arrives; a
//!   change through the shared mapping is found by comparing BAR2 with the copy taken when the
//!   device entered those states (one count per 4 KiB chunk changed): the whole of BAR2 at the
//!   next state change request or REGION_WRITE into BAR2; at a MIG_DATA_READ of N bytes, the
//!   next N / 4 KiB + 1 chunks, round robin (so that draining STOP_COPY data in many reads
//!   compares the memory about once, not once per read; every change is still counted, at the
//!   latest at STOP_COPY -> STOP).
//! - STOP -> RESUMING starts a resuming session into a staging copy; RESUMING -> STOP checks
//!   the whole stream and only then loads it. Our rules when it does not check out: data that
//!   is good so far but has not ended (no END record) fails the arc with EINVAL and the device
//!   stays in RESUMING (the client may write the rest and try again, or reset); corrupt,
//!   foreign or inconsistent data — which already failed its MIG_DATA_WRITE with EINVAL —
//!   fails the arc with EINVAL and moves the device to ERROR (only a reset leaves it). The
//!   device's state is untouched either way.
//! - Injected faults (`fault.rs`) are applied to a direct arc before it is executed.
//! - Queued commands stay queued across every state; the engine only runs in RUNNING and
//!   PRE_COPY (see `engine.rs`), and a level interrupt pending while stopped is re-evaluated
//!   when the device runs again.

use log::{info, warn};

use crate::device::{Device, DeviceState};
use crate::fault::ArcVerdict;
use crate::frozen::FrozenMemory;
use crate::fsm::is_direct_arc;
use crate::mem::Mapping;
use crate::migration::{full_stream_len, DeviceSnapshot, LoadError, Loader, Saver, CHUNK};

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
        match self.faults.on_arc(from, to) {
            ArcVerdict::Proceed => self.execute_arc(from, to, bar2),
            // Exit: never replied to, the session ends (see `server.rs`).
            ArcVerdict::Fail | ArcVerdict::Exit => Err(libc::EIO),
        }
    }

    /// Executes the direct arc `from -> to`.
    fn execute_arc(
        &mut self,
        from: DeviceState,
        to: DeviceState,
        bar2: &Mapping,
    ) -> Result<(), i32> {
        let msi = self.config.has_msi();
        match to {
            DeviceState::PreCopy | DeviceState::PreCopyP2p if !from.is_saving() => {
                self.save = Some(Saver::new(msi, bar2.len()));
            }
            DeviceState::StopCopy => {
                let snap = DeviceSnapshot::of(self);
                let save = self.save.get_or_insert_with(|| Saver::new(msi, bar2.len()));
                save.finish(bar2, &snap);
                // The saved bytes are what must not change from now on (no second copy; a
                // write racing the arc differs from them and counts as late).
                if let Some(saved) = save.take_saved_memory() {
                    self.frozen = Some(FrozenMemory::from_copy(saved));
                }
                info!(
                    "STOP_COPY: state saved ({} commands queued, {} bytes to read)",
                    snap.queue.len(),
                    self.save.as_ref().map_or(0, Saver::pending)
                );
                self.faults.stop_copy_entered();
            }
            DeviceState::Stop if from == DeviceState::Resuming => return self.finish_load(bar2),
            DeviceState::Resuming => {
                self.save = None;
                self.load = Some(Loader::new(msi, bar2.len()));
            }
            // The saving session ends (or there was none).
            DeviceState::Running | DeviceState::RunningP2p | DeviceState::Stop => self.save = None,
            _ => {}
        }
        info!("migration state {from:?} -> {to:?}");
        self.state = to;
        if !to.freezes_memory() {
            self.frozen = None;
        } else if self.frozen.is_none() {
            self.frozen = Some(FrozenMemory::of(bar2));
        }
        if to.allows_irqs() {
            self.update_intx();
        }
        Ok(())
    }

    /// RESUMING -> STOP: loads the stream when it checks out (see the module comment).
    fn finish_load(&mut self, bar2: &Mapping) -> Result<(), i32> {
        if self.faults.reject_resume() {
            self.enter_error();
            return Err(libc::EINVAL);
        }
        let res = match &self.load {
            None => Err(LoadError::Corrupt("no resuming session".into())),
            Some(l) => l
                .finish()
                .map(|(mem, snap)| (bar2.write(0, mem), snap.clone())),
        };
        match res {
            Ok((true, snap)) => {
                snap.restore(self);
                self.state = DeviceState::Stop;
                // The loaded bytes are what must not change from now on (no second copy).
                self.frozen = match self.load.take() {
                    Some(l) => Some(FrozenMemory::from_copy(l.into_memory())),
                    None => Some(FrozenMemory::of(bar2)),
                };
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
        self.frozen = None;
    }

    /// Counts writes to device memory made through the mapping while it must not change
    /// (STOP, STOP_COPY, RESUMING), compared with the copy taken on entering those states: a
    /// peer's write and a guest's look the same, both are late.
    pub fn check_late_writes(&mut self, bar2: &Mapping) {
        let n = self.frozen.as_mut().map_or(0, |f| f.changed_chunks(bar2));
        if n > 0 {
            self.late_peer_write(n, "write through the mapping (4 KiB chunks changed)");
        }
    }

    /// REGION_WRITE of `data` at `off` into device memory (false: out of range, nothing
    /// written): a peer write, counted (late in STOP, STOP_COPY, RESUMING). Changes made
    /// through the mapping before it are counted first; this one is not counted again by
    /// the mapping check.
    pub fn peer_region_write(&mut self, bar2: &Mapping, off: u64, data: &[u8]) -> bool {
        self.check_late_writes(bar2);
        if !bar2.write(off, data) {
            return false;
        }
        self.peer_write();
        if let Some(f) = self.frozen.as_mut() {
            f.absorb(bar2, off, data.len());
        }
        true
    }

    /// MIG_DATA_READ of at most `max` bytes in a saving state (EINVAL elsewhere). In PRE_COPY
    /// fewer bytes, or none, mean "nothing more for now"; in STOP_COPY the end of the stream.
    pub fn mig_data_read(&mut self, bar2: &Mapping, max: usize) -> Result<Vec<u8>, i32> {
        if !self.state.is_saving() {
            warn!("MIG_DATA_READ in state {:?}", self.state);
            return Err(libc::EINVAL);
        }
        // A share of the memory per read (see the module comment).
        let n = self
            .frozen
            .as_mut()
            .map_or(0, |f| f.changed_chunks_some(bar2, max / CHUNK + 1));
        if n > 0 {
            self.late_peer_write(n, "write through the mapping (4 KiB chunks changed)");
        }
        let stop_copy = self.state == DeviceState::StopCopy;
        if stop_copy && self.faults.read_fails() {
            return Err(libc::EIO);
        }
        let s = self.save.as_mut().ok_or(libc::EINVAL)?;
        s.fill(bar2, max);
        let data = s.read(max);
        if stop_copy {
            self.faults.read_done(data.len());
        }
        Ok(data)
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
            _ => full_stream_len(bar2.len(), commands),
        }
    }
}
