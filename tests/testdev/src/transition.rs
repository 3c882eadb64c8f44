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
//!   [`DeviceState::freezes_memory`]). A REGION_WRITE into BAR2 is counted as it arrives. A
//!   change through the shared mapping (one count per 4 KiB chunk changed) is found by
//!   comparing chunks with what they must hold (`frozen.rs`: the bytes STOP_COPY saved, the
//!   digests taken when the device stopped from a running state, the chunks RESUMING
//!   loaded) — and each arc
//!   only looks at what it touches: a REGION_WRITE into BAR2 checks the chunks it writes; a
//!   chunk RESUMING loads is checked just before it is replaced. The whole memory is checked
//!   only where a change would otherwise be lost or could no longer be told from a legitimate
//!   one: leaving the frozen states (to RUNNING_P2P, RUNNING or ERROR), STOP -> STOP_COPY (the
//!   saved counters must include the writes made in STOP), a reset, a read of the violation
//!   counters, and the end of the session. Arcs inside the frozen states (STOP_COPY -> STOP,
//!   STOP -> RESUMING, RESUMING -> STOP) compare nothing: a change made in them is still
//!   counted, once, at the next of those points.
//! - STOP -> RESUMING starts a resuming session. Device memory is loaded as it arrives: each
//!   MEMORY record is applied to BAR2 once it arrived whole and checked out (CRC, after a
//!   matching header); the rest of the state is staged. RESUMING -> STOP checks the whole
//!   stream (END, counts, every chunk received) and only then applies the staged state, so
//!   it costs what is left of the stream, not the device memory. Our rules when the stream
//!   does not check out: data that is good so far but has not ended (no END record) fails
//!   the arc with EINVAL and the device stays in RESUMING (the client may write the rest and
//!   try again, or reset); corrupt, foreign or inconsistent data — which already failed its
//!   MIG_DATA_WRITE with EINVAL — fails the arc with EINVAL and moves the device to ERROR
//!   (only a reset leaves it). Registers, config space and the queue are untouched either
//!   way; device memory holds the chunks applied before the stream went bad (logged), which
//!   is never reported as a loaded state: ERROR, as with a real device, means "load again".
//! - Injected faults (`fault.rs`) are applied to a direct arc before it is executed.
//! - Queued commands stay queued across every state; the engine only runs in RUNNING and
//!   PRE_COPY (see `engine.rs`), and a level interrupt pending while stopped is re-evaluated
//!   when the device runs again.

use std::time::Instant;

use log::{info, warn};

use crate::device::{Device, DeviceState};
use crate::fault::ArcVerdict;
use crate::frozen::FrozenMemory;
use crate::fsm::is_direct_arc;
use crate::mem::Mapping;
use crate::migration::{
    full_stream_len, write_chunk, ChunkSink, DeviceSnapshot, LoadError, Loader, Saver,
};

/// Logs the device's own time for an arc (requested at `start`), in a line of its own: the
/// `migration state A -> B` lines are parsed by tests and the bench.
fn log_arc_time(from: DeviceState, to: DeviceState, start: Instant) {
    info!(
        "arc {} to {}: {} us in the device",
        from.name(),
        to.name(),
        start.elapsed().as_micros()
    );
}

/// Where RESUMING puts a chunk: device memory, after checking that nothing wrote the chunk
/// through the mapping since its reference was taken (the load would hide that write).
struct LoadInto<'a> {
    mem: &'a Mapping,
    frozen: Option<&'a mut FrozenMemory>,
    /// Chunks found changed before they were loaded.
    late: u32,
}

impl ChunkSink for LoadInto<'_> {
    fn apply(&mut self, index: usize, bytes: &[u8]) -> Result<(), String> {
        if let Some(f) = self.frozen.as_deref_mut() {
            if f.changed_chunk(self.mem, index) {
                self.late += 1;
            }
        }
        write_chunk(self.mem, index, bytes)?;
        if let Some(f) = self.frozen.as_deref_mut() {
            f.set(index, bytes);
        }
        Ok(())
    }
}

impl Device {
    /// Executes the direct arc to `to` (EINVAL for anything else, changing nothing; the
    /// current state is accepted as a no-op). `bar2` is the device memory.
    pub fn set_state(&mut self, to: DeviceState, bar2: &Mapping) -> Result<(), i32> {
        let from = self.state;
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
            ArcVerdict::Proceed => self.execute_arc(from, to, bar2, Instant::now()),
            // Exit: never replied to, the session ends (see `server.rs`).
            ArcVerdict::Fail | ArcVerdict::Exit => Err(libc::EIO),
        }
    }

    /// Executes the direct arc `from -> to` (requested at `start`: its log line says how long
    /// the device took).
    fn execute_arc(
        &mut self,
        from: DeviceState,
        to: DeviceState,
        bar2: &Mapping,
        start: Instant,
    ) -> Result<(), i32> {
        let msi = self.config.has_msi();
        match to {
            DeviceState::PreCopy | DeviceState::PreCopyP2p if !from.is_saving() => {
                self.save = Some(Saver::new(msi, bar2.len()));
            }
            DeviceState::StopCopy => {
                if from.freezes_memory() {
                    // From STOP: the saved counters include what was written in STOP.
                    self.check_late_writes(bar2);
                }
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
            DeviceState::Stop if from == DeviceState::Resuming => {
                return self.finish_load(bar2, start)
            }
            DeviceState::Resuming => {
                self.save = None;
                self.load = Some(Loader::new(msi, bar2.len()));
            }
            // The saving session ends (or there was none).
            DeviceState::Running | DeviceState::RunningP2p | DeviceState::Stop => self.save = None,
            _ => {}
        }
        if from.freezes_memory() && !to.freezes_memory() {
            // Leaving: from now on a change is legitimate, so every one made so far counts now.
            self.check_late_writes(bar2);
        }
        self.state = to;
        if !to.freezes_memory() {
            self.frozen = None;
        } else if self.frozen.is_none() {
            // Stopping from a running state: the one arc that must read all of the memory to
            // have a reference (its digests: no saving session has the bytes).
            self.frozen = Some(FrozenMemory::of(bar2));
        }
        log_arc_time(from, to, start);
        info!("migration state {from:?} -> {to:?}");
        if to.allows_irqs() {
            self.update_intx();
        }
        Ok(())
    }

    /// RESUMING -> STOP: applies the staged state when the stream checked out (device
    /// memory was applied as it arrived; see the module comment).
    fn finish_load(&mut self, bar2: &Mapping, start: Instant) -> Result<(), i32> {
        if self.faults.reject_resume() {
            self.enter_error(bar2);
            return Err(libc::EINVAL);
        }
        let res = match &self.load {
            None => Err(LoadError::Corrupt("no resuming session".into())),
            Some(l) => l.finish().cloned(),
        };
        match res {
            Ok(snap) => {
                snap.restore(self);
                self.state = DeviceState::Stop;
                self.load = None;
                // `frozen` followed every chunk loaded: it is what must not change from now on.
                log_arc_time(DeviceState::Resuming, DeviceState::Stop, start);
                info!(
                    "migration state Resuming -> Stop: state loaded ({} commands queued)",
                    snap.queue.len()
                );
                Ok(())
            }
            Err(LoadError::Incomplete(e)) => {
                warn!("RESUMING -> STOP refused, staying in RESUMING: {e}");
                Err(libc::EINVAL)
            }
            Err(LoadError::Corrupt(e)) => {
                warn!("RESUMING -> STOP refused, device in ERROR (reset it): {e}");
                self.enter_error(bar2);
                Err(libc::EINVAL)
            }
        }
    }

    fn enter_error(&mut self, bar2: &Mapping) {
        self.check_late_writes(bar2);
        if let Some(l) = &self.load {
            warn!(
                "device memory holds the {} memory record(s) applied before the load failed; load a state again",
                l.applied()
            );
        }
        self.state = DeviceState::Error;
        self.load = None;
        self.save = None;
        self.frozen = None;
    }

    /// Counts writes to device memory made through the mapping while it must not change
    /// (STOP, STOP_COPY, RESUMING) and not counted yet, comparing every chunk with its
    /// reference (`frozen.rs`): a peer's write and a guest's look the same, both are late.
    /// Reads all of device memory (while frozen; nothing otherwise): called where the count
    /// must be complete (see the module comment), not at every arc.
    pub fn check_late_writes(&mut self, bar2: &Mapping) {
        let n = self.frozen.as_mut().map_or(0, |f| f.changed_chunks(bar2));
        if n > 0 {
            self.late_peer_write(n, "write through the mapping (4 KiB chunks changed)");
        }
    }

    /// REGION_WRITE of `data` at `off` into device memory (false: out of range, nothing
    /// written): a peer write, counted (late in STOP, STOP_COPY, RESUMING). Changes made
    /// through the mapping to the chunks it writes are counted first (the others later, see
    /// the module comment); this one is not counted again by the mapping check.
    pub fn peer_region_write(&mut self, bar2: &Mapping, off: u64, data: &[u8]) -> bool {
        let n = self
            .frozen
            .as_mut()
            .map_or(0, |f| f.changed_in(bar2, off, data.len()));
        if n > 0 {
            self.late_peer_write(n, "write through the mapping (4 KiB chunks changed)");
        }
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

    /// MIG_DATA_WRITE in RESUMING (EINVAL elsewhere, and for data that does not check out):
    /// the memory records it completes are applied to `bar2` at once.
    pub fn mig_data_write(&mut self, data: &[u8], bar2: &Mapping) -> Result<(), i32> {
        let Device {
            state,
            load,
            frozen,
            ..
        } = self;
        let Some(l) = load.as_mut().filter(|_| *state == DeviceState::Resuming) else {
            warn!("MIG_DATA_WRITE in state {state:?}");
            return Err(libc::EINVAL);
        };
        let mut sink = LoadInto {
            mem: bar2,
            frozen: frozen.as_mut(),
            late: 0,
        };
        let res = l.write(data, &mut sink);
        let late = sink.late;
        if late > 0 {
            self.late_peer_write(
                late,
                "write through the mapping before its chunk was loaded",
            );
        }
        res.map_err(|e| {
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

#[cfg(test)]
#[path = "transition_tests.rs"]
mod tests;
