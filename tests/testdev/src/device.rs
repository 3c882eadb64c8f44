//! The device model: registers (see `regs.rs`), the command queue, interrupts, the migration
//! state and the violation counters that check it.

use std::collections::VecDeque;
use std::fs::File;
use std::time::Instant;

use log::{debug, warn};

use crate::config::ConfigSpace;
use crate::dirty_log::DmaLog;
use crate::fault::FaultState;
use crate::frozen::FrozenMemory;
use crate::fsm::MIGRATION_ALL;
use crate::migration::{Loader, Saver};
use crate::regs::*;

/// The VFIO v2 migration states (values of `enum vfio_device_mig_state`); the arcs between them
/// are in `fsm.rs`, what each arc does in `transition.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// ERROR.
    Error = 0,
    /// STOP: no DMA, no MMIO, no interrupts.
    Stop = 1,
    /// RUNNING.
    Running = 2,
    /// STOP_COPY: stopped, state being saved.
    StopCopy = 3,
    /// RESUMING: state being loaded.
    Resuming = 4,
    /// RUNNING_P2P: running except that it initiates no DMA. The kernel asks only for no new
    /// *P2P* DMA, and allows stopping all DMA when a device cannot tell P2P apart: our choice
    /// is no new DMA of any kind (and no interrupts); incoming peer writes are still accepted.
    RunningP2p = 5,
    /// PRE_COPY: running while state is streamed.
    PreCopy = 6,
    /// PRE_COPY_P2P: PRE_COPY with RUNNING_P2P's restrictions.
    PreCopyP2p = 7,
}

impl DeviceState {
    /// Whether the device may initiate DMA (the engine runs): RUNNING and PRE_COPY only.
    pub fn allows_dma(self) -> bool {
        matches!(self, DeviceState::Running | DeviceState::PreCopy)
    }
    /// Whether the device may initiate peer-to-peer DMA. Same states as DMA; a P2P start in
    /// a *_P2P or stopped state is counted as a P2P violation rather than a DMA one.
    pub fn allows_p2p(self) -> bool {
        self.allows_dma()
    }
    /// Whether the device may signal interrupts: RUNNING and PRE_COPY only.
    pub fn allows_irqs(self) -> bool {
        self.allows_dma()
    }
    /// Whether guest MMIO (REGION_READ/WRITE of BAR0) is expected. Our choice: only the states
    /// in which vCPUs run (RUNNING, PRE_COPY); skiff pauses vCPUs before entering RUNNING_P2P.
    pub fn allows_guest_mmio(self) -> bool {
        matches!(self, DeviceState::Running | DeviceState::PreCopy)
    }

    /// Whether device memory must not change: STOP, STOP_COPY and RESUMING. A peer write
    /// (REGION_WRITE into BAR2, or a change of BAR2's bytes through the mapping) arriving in
    /// one of them is counted as `late_peer_write`.
    ///
    /// Why, from the comment above `enum vfio_device_mig_state` in the kernel's
    /// `include/uapi/linux/vfio.h`: in STOP the device "must not change its internal state"
    /// (device memory is internal state: what STOP_COPY saves); STOP_COPY "has the same
    /// behavior as STOP", and the user "should take steps to restrict access to vfio device
    /// regions while the device is in STOP_COPY or risk corruption of the device migration
    /// data stream"; RESUMING is loading a new internal state, which replaces whatever a
    /// write put there. A peer write in these states is lost (after STOP_COPY saved the
    /// memory), corrupts the saved state (between STOP and STOP_COPY the saved bytes would
    /// depend on when the write raced the save), or is overwritten by the load. The P2P
    /// states are what a VMM has for this: RUNNING_P2P / PRE_COPY_P2P only forbid
    /// *initiating* P2P DMA ("RUNNING, except the device cannot do peer to peer DMA"), so a
    /// device in them still accepts peer writes while every device is quiesced; only once
    /// all peers are in a P2P state (none can write any more) may one be stopped. ERROR is
    /// left out: nothing is saved or loaded from it, only a reset leaves it.
    pub fn freezes_memory(self) -> bool {
        matches!(
            self,
            DeviceState::Stop | DeviceState::StopCopy | DeviceState::Resuming
        )
    }
}

/// Violation counters (never cleared, not even by reset; carried in the migrated state and
/// added to the target's). Each is logged when counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Violations {
    /// Non-P2P DMA started in a state other than RUNNING/PRE_COPY.
    pub dma_state: u32,
    /// Guest MMIO (BAR0 access through the VMM) while not RUNNING/PRE_COPY.
    pub mmio_state: u32,
    /// A peer write into device memory (REGION_WRITE into BAR2, or a change of BAR2 through
    /// the mapping) while in STOP, STOP_COPY or RESUMING: see
    /// [`DeviceState::freezes_memory`].
    pub late_peer_write: u32,
    /// P2P DMA started in RUNNING_P2P/PRE_COPY_P2P or a stopped state.
    pub p2p_state: u32,
}

impl Violations {
    /// Sum of all counters.
    pub fn total(&self) -> u32 {
        self.dma_state
            .wrapping_add(self.mmio_state)
            .wrapping_add(self.late_peer_write)
            .wrapping_add(self.p2p_state)
    }
}

/// A queued command with the parameters latched at doorbell time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// `CMD_*`.
    pub code: u32,
    /// `ADDR`.
    pub addr: u64,
    /// `ADDR2`.
    pub addr2: u64,
    /// `LEN`.
    pub len: u32,
    /// `SEED`.
    pub seed: u32,
}

/// The running stream's parameters (latched at STREAM_START).
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    /// Ring address.
    pub ring: u64,
    /// Ring entries (power of two).
    pub entries: u32,
    /// Peer device memory address (0: none).
    pub peer: u64,
    /// Period in microseconds.
    pub period_us: u32,
    /// When the next sequence number is due.
    pub next_due: Instant,
}

/// Register file (the guest-visible values of BAR0).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Regs {
    /// ADDR.
    pub addr: u64,
    /// ADDR2.
    pub addr2: u64,
    /// LEN.
    pub len: u32,
    /// SEED.
    pub seed: u32,
    /// RESULT.
    pub result: u64,
    /// COMPLETED.
    pub completed: u32,
    /// FAILED.
    pub failed: u32,
    /// LAST_ERROR.
    pub last_error: u32,
    /// IRQ_STATUS.
    pub irq_status: u32,
    /// IRQ_CONTROL.
    pub irq_control: u32,
    /// DMA_WRITTEN.
    pub dma_written: u32,
    /// DMA_READ.
    pub dma_read: u32,
    /// PEER_WRITES.
    pub peer_writes: u32,
    /// STREAM_RING.
    pub stream_ring: u64,
    /// STREAM_RING_ENTRIES.
    pub stream_entries: u32,
    /// STREAM_PEER.
    pub stream_peer: u64,
    /// STREAM_PERIOD_US.
    pub stream_period_us: u32,
    /// STREAM_SEQ (full 64 bits; the register shows the low half).
    pub stream_seq: u64,
}

/// Interrupt plumbing: the client's eventfds and the INTx mask.
#[derive(Debug, Default)]
pub struct Irqs {
    /// MSI-X vector trigger eventfds.
    pub msix: [Option<File>; MSIX_VECTORS as usize],
    /// MSI vector trigger eventfds (only with the MSI capability).
    pub msi: [Option<File>; MSI_VECTORS as usize],
    /// INTx trigger eventfd.
    pub intx: Option<File>,
    /// INTx unmask (resample) eventfd, polled by the socket thread.
    pub intx_unmask: Option<File>,
    /// INTx is masked (automasked after a trigger, until unmasked).
    pub intx_masked: bool,
}

/// Everything behind the device lock.
#[derive(Debug)]
pub struct Device {
    /// Migration state.
    pub state: DeviceState,
    /// Registers.
    pub regs: Regs,
    /// Violation counters.
    pub viol: Violations,
    /// Commands waiting.
    pub queue: VecDeque<Command>,
    /// The command executing on the device thread. When the device leaves RUNNING/PRE_COPY
    /// before it ends, it goes back to the head of the queue and runs again from its start
    /// (every command is idempotent, except a COPY whose source and destination overlap).
    pub current: Option<Command>,
    /// The stream, when started.
    pub stream: Option<Stream>,
    /// Bumped by reset: results of work started before it are dropped.
    pub generation: u64,
    /// PCI config space.
    pub config: ConfigSpace,
    /// MSI-X table and PBA backing (the VMM emulates both; we just store what is written).
    pub msix_table: [u8; 16 * MSIX_VECTORS as usize],
    /// PBA bytes.
    pub msix_pba: [u8; 8],
    /// Interrupts.
    pub irqs: Irqs,
    /// The device thread must exit.
    pub shutdown: bool,
    /// `VFIO_MIGRATION_*` capabilities offered (0: no migration).
    pub mig_caps: u64,
    /// The saving session (PRE_COPY*/STOP_COPY).
    pub save: Option<Saver>,
    /// The resuming session (RESUMING).
    pub load: Option<Loader>,
    /// DMA logging, when started.
    pub dma_log: Option<DmaLog>,
    /// Device memory as it must stay in STOP/STOP_COPY/RESUMING (while in them: bytes or
    /// digests per chunk), to notice writes through the mapping (`frozen.rs`).
    pub frozen: Option<FrozenMemory>,
    /// The faults to inject (`fault.rs`).
    pub faults: FaultState,
}

impl Default for Device {
    fn default() -> Self {
        Device::new(false)
    }
}

impl Device {
    /// A device at power-on with the default memory size; `msi` gives it the MSI capability
    /// (`--msi`).
    pub fn new(msi: bool) -> Self {
        Self::with_memory(msi, DEVICE_MEMORY_SIZE)
    }

    /// A device at power-on whose BAR2 is `memory_size` bytes (`--memory-mib`; config space
    /// reports it, the memory itself is the server's mapping).
    pub fn with_memory(msi: bool, memory_size: u64) -> Self {
        Device {
            state: DeviceState::Running,
            regs: Regs::default(),
            viol: Violations::default(),
            queue: VecDeque::new(),
            current: None,
            stream: None,
            generation: 0,
            config: ConfigSpace::with(msi, memory_size),
            msix_table: [0; 16 * MSIX_VECTORS as usize],
            msix_pba: [0; 8],
            irqs: Irqs::default(),
            shutdown: false,
            mig_caps: MIGRATION_ALL,
            save: None,
            load: None,
            dma_log: None,
            frozen: None,
            faults: FaultState::default(),
        }
    }
}

fn signal(f: &File, what: &str) {
    debug!("raising {what}");
    crate::write_eventfd(f);
}

impl Device {
    /// Reads a 32-bit register (offset 4-aligned, below the MSI-X table).
    pub fn read_reg(&self, off: u64) -> u32 {
        let r = &self.regs;
        match off {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_STATUS => {
                let busy = if self.current.is_some() || !self.queue.is_empty() {
                    STATUS_BUSY
                } else {
                    0
                };
                busy | if self.stream.is_some() {
                    STATUS_STREAMING
                } else {
                    0
                }
            }
            REG_ADDR_LO => r.addr as u32,
            REG_ADDR_HI => (r.addr >> 32) as u32,
            REG_ADDR2_LO => r.addr2 as u32,
            REG_ADDR2_HI => (r.addr2 >> 32) as u32,
            REG_LEN => r.len,
            REG_SEED => r.seed,
            REG_RESULT_LO => r.result as u32,
            REG_RESULT_HI => (r.result >> 32) as u32,
            REG_COMPLETED => r.completed,
            REG_FAILED => r.failed,
            REG_LAST_ERROR => r.last_error,
            REG_IRQ_STATUS => r.irq_status,
            REG_IRQ_CONTROL => r.irq_control,
            REG_VIOLATIONS => self.viol.total(),
            REG_VIOL_DMA_STATE => self.viol.dma_state,
            REG_VIOL_MMIO_STATE => self.viol.mmio_state,
            REG_VIOL_LATE_PEER_WRITE => self.viol.late_peer_write,
            REG_VIOL_P2P_STATE => self.viol.p2p_state,
            REG_DMA_WRITTEN => r.dma_written,
            REG_DMA_READ => r.dma_read,
            REG_PEER_WRITES => r.peer_writes,
            REG_STREAM_RING_LO => r.stream_ring as u32,
            REG_STREAM_RING_HI => (r.stream_ring >> 32) as u32,
            REG_STREAM_RING_ENTRIES => r.stream_entries,
            REG_STREAM_PEER_LO => r.stream_peer as u32,
            REG_STREAM_PEER_HI => (r.stream_peer >> 32) as u32,
            REG_STREAM_PERIOD_US => r.stream_period_us,
            REG_STREAM_SEQ => r.stream_seq as u32,
            _ => 0,
        }
    }

    /// Writes a 32-bit register. Returns true when the device thread must be woken.
    pub fn write_reg(&mut self, off: u64, v: u32) -> bool {
        let r = &mut self.regs;
        let lo = |x: &mut u64| *x = (*x & !0xffff_ffff) | v as u64;
        let hi = |x: &mut u64| *x = (*x & 0xffff_ffff) | ((v as u64) << 32);
        match off {
            REG_DOORBELL => return self.doorbell(v),
            REG_ADDR_LO => lo(&mut r.addr),
            REG_ADDR_HI => hi(&mut r.addr),
            REG_ADDR2_LO => lo(&mut r.addr2),
            REG_ADDR2_HI => hi(&mut r.addr2),
            REG_LEN => r.len = v,
            REG_SEED => r.seed = v,
            REG_IRQ_STATUS => {
                r.irq_status &= !v;
                self.update_intx();
            }
            REG_IRQ_CONTROL => {
                r.irq_control = v;
                self.update_intx();
            }
            REG_STREAM_RING_LO => lo(&mut r.stream_ring),
            REG_STREAM_RING_HI => hi(&mut r.stream_ring),
            REG_STREAM_RING_ENTRIES => r.stream_entries = v,
            REG_STREAM_PEER_LO => lo(&mut r.stream_peer),
            REG_STREAM_PEER_HI => hi(&mut r.stream_peer),
            REG_STREAM_PERIOD_US => r.stream_period_us = v,
            _ => debug!("write {v:#x} to read-only or unknown register {off:#x} ignored"),
        }
        false
    }

    fn doorbell(&mut self, code: u32) -> bool {
        if self.queue.len() >= QUEUE_DEPTH {
            self.finish(Err(ERR_QUEUE_FULL));
            return false;
        }
        let r = &self.regs;
        self.queue.push_back(Command {
            code,
            addr: r.addr,
            addr2: r.addr2,
            len: r.len,
            seed: r.seed,
        });
        true
    }

    /// Ends a command: counts it, records the error, raises IRQ_DONE.
    pub fn finish(&mut self, res: Result<(), u32>) {
        match res {
            Ok(()) => self.regs.completed = self.regs.completed.wrapping_add(1),
            Err(e) => {
                self.regs.failed = self.regs.failed.wrapping_add(1);
                self.regs.last_error = e;
            }
        }
        self.raise(IRQ_DONE);
    }

    /// Whether interrupts go out as MSI-X. Our choice (the VMM may or may not forward the
    /// control word): MSI-X is in use when its enable bit is set in config space or when the
    /// client gave MSI-X vectors eventfds (as kernel VFIO enables MSI-X through SET_IRQS).
    pub fn msix_mode(&self) -> bool {
        self.config.msix_enabled() || self.irqs.msix.iter().any(Option::is_some)
    }

    /// Whether interrupts go out as MSI (when not as MSI-X, which wins): same choice as for
    /// MSI-X — its enable bit is set in config space, or the client gave MSI vectors eventfds
    /// (SET_IRQS index 1, as kernel VFIO enables MSI).
    pub fn msi_mode(&self) -> bool {
        !self.msix_mode()
            && (self.config.msi_enabled() || self.irqs.msi.iter().any(Option::is_some))
    }

    /// Sets `bits` in IRQ_STATUS and delivers the interrupt the control register allows.
    pub fn raise(&mut self, bits: u32) {
        self.regs.irq_status |= bits;
        if !self.state.allows_irqs() {
            // Only a guest MMIO while stopped (itself a violation) gets here: the status bit
            // is kept, the level re-evaluated when the device runs again, an edge is dropped.
            debug!(
                "interrupt {bits:#x} not signalled in state {:?}",
                self.state
            );
        } else if self.msix_mode() {
            // Edge: one message per event. The function mask drops it (the VMM owns the PBA).
            if self.regs.irq_control & bits != 0 && !self.config.msix_masked() {
                if let Some(f) = &self.irqs.msix[0] {
                    signal(f, "MSI-X vector 0");
                }
            }
        } else if self.msi_mode() && self.regs.irq_control & bits != 0 {
            self.msi_message(0);
        }
        self.update_intx();
    }

    /// Sends MSI `vector`'s message (edge, one per event); while its mask bit (in our config
    /// space) is set, the message is held in the pending bit instead.
    fn msi_message(&mut self, vector: u16) {
        if self.config.msi_masked(vector) {
            debug!("MSI vector {vector} masked: pending");
            self.config.set_msi_pending(vector, true);
        } else if !self.state.allows_irqs() {
            debug!(
                "MSI vector {vector} not signalled in state {:?}",
                self.state
            );
        } else if let Some(f) = &self.irqs.msi[usize::from(vector)] {
            signal(f, &format!("MSI vector {vector}"));
        }
    }

    /// After a client config write: a pending MSI vector that is no longer masked sends its
    /// message, and INTx is re-evaluated (MSI/MSI-X enable, INTx disable may have changed).
    pub fn config_written(&mut self) {
        for v in 0..MSI_VECTORS {
            if self.config.msi_pending(v) && !self.config.msi_masked(v) {
                self.config.set_msi_pending(v, false);
                if self.msi_mode() {
                    self.msi_message(v);
                }
            }
        }
        self.update_intx();
    }

    /// The INTx level: pending, enabled, not disabled in the command register, MSI-X and MSI
    /// off.
    pub fn intx_level(&self) -> bool {
        !self.msix_mode()
            && !self.msi_mode()
            && self.regs.irq_status & self.regs.irq_control != 0
            && !self.config.intx_disabled()
    }

    /// Re-evaluates INTx: a level asserted and unmasked is triggered, then automasked until the
    /// client unmasks it (VFIO's INTx model); unmasking while still asserted re-triggers.
    pub fn update_intx(&mut self) {
        let level = self.intx_level();
        self.config.set_intx_status(level);
        if level && !self.irqs.intx_masked && self.state.allows_irqs() {
            if let Some(f) = &self.irqs.intx {
                signal(f, "INTx");
                self.irqs.intx_masked = true;
            }
        }
    }

    /// Counts a guest MMIO access against the state.
    pub fn check_mmio(&mut self) {
        if !self.state.allows_guest_mmio() {
            self.viol.mmio_state = self.viol.mmio_state.wrapping_add(1);
            warn!("violation: guest MMIO in state {:?}", self.state);
        }
    }

    /// Counts a peer write into device memory, and a violation when the state does not
    /// allow it to change ([`DeviceState::freezes_memory`]).
    pub fn peer_write(&mut self) {
        self.regs.peer_writes = self.regs.peer_writes.wrapping_add(1);
        if self.state.freezes_memory() {
            self.late_peer_write(1, "peer write (REGION_WRITE)");
        }
    }

    /// Counts `n` late writes to device memory.
    pub fn late_peer_write(&mut self, n: u32, how: &str) {
        self.viol.late_peer_write = self.viol.late_peer_write.wrapping_add(n);
        warn!(
            "violation: late peer write: {how} into device memory, noticed in state {} ({n}; it must not change in STOP, STOP_COPY or RESUMING: lost, or corrupting the saved state)",
            self.state.name()
        );
    }

    /// Counts a DMA start against the state (`p2p`: the target is a peer's memory).
    pub fn check_dma(&mut self, p2p: bool) {
        if p2p && !self.state.allows_p2p() {
            self.viol.p2p_state = self.viol.p2p_state.wrapping_add(1);
            warn!("violation: P2P DMA in state {:?}", self.state);
        } else if !p2p && !self.state.allows_dma() {
            self.viol.dma_state = self.viol.dma_state.wrapping_add(1);
            warn!("violation: DMA in state {:?}", self.state);
        }
    }

    /// Device reset: registers, queue, stream, config space and interrupt state return to
    /// power-on values, the migration state to RUNNING (from any state, ERROR included, as
    /// the kernel's VFIO_DEVICE_RESET) ending any migration session. Kept: violations, DMA
    /// logging (a VMM facility, not device state), eventfds, device memory.
    pub fn reset(&mut self) {
        if self.state != DeviceState::Running {
            log::info!("reset: migration state {:?} -> Running", self.state);
        }
        self.state = DeviceState::Running;
        self.save = None;
        self.load = None;
        self.frozen = None;
        self.regs = Regs::default();
        self.current = None;
        self.queue.clear();
        self.stream = None;
        self.generation = self.generation.wrapping_add(1);
        self.config = ConfigSpace::with(self.config.has_msi(), self.config.memory_size());
        self.msix_table = [0; 16 * MSIX_VECTORS as usize];
        self.msix_pba = [0; 8];
        self.irqs.intx_masked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_predicates() {
        use DeviceState::*;
        assert!(Running.allows_dma() && PreCopy.allows_dma());
        for s in [Stop, StopCopy, Resuming, RunningP2p, PreCopyP2p, Error] {
            assert!(
                !s.allows_dma() && !s.allows_p2p() && !s.allows_guest_mmio(),
                "{s:?}"
            );
        }
        assert!(Running.allows_irqs() && PreCopy.allows_irqs() && !RunningP2p.allows_irqs());
        for s in DeviceState::ALL {
            assert_eq!(
                s.freezes_memory(),
                matches!(s, Stop | StopCopy | Resuming),
                "{s:?}"
            );
        }
    }

    #[test]
    fn violations_follow_state() {
        let mut d = Device::default();
        d.check_mmio();
        d.check_dma(false);
        d.check_dma(true);
        d.peer_write();
        assert_eq!(d.viol, Violations::default());
        d.state = DeviceState::RunningP2p;
        d.check_mmio();
        d.check_dma(true);
        d.peer_write();
        d.state = DeviceState::PreCopyP2p;
        d.peer_write();
        assert_eq!(
            d.viol.late_peer_write, 0,
            "peer writes are fine in the P2P states"
        );
        for s in [
            DeviceState::Stop,
            DeviceState::StopCopy,
            DeviceState::Resuming,
        ] {
            d.state = s;
            d.peer_write();
        }
        d.state = DeviceState::Error;
        d.peer_write();
        d.check_dma(false);
        assert_eq!(
            d.viol,
            Violations {
                dma_state: 1,
                mmio_state: 1,
                late_peer_write: 3,
                p2p_state: 1
            }
        );
        assert_eq!(d.read_reg(REG_VIOLATIONS), 6);
        assert_eq!(d.read_reg(REG_PEER_WRITES), 7);
        d.reset();
        assert_eq!(d.viol.total(), 6, "reset keeps violations");
    }

    #[test]
    fn queue_depth_and_registers() {
        let mut d = Device::default();
        d.write_reg(REG_ADDR_LO, 0x1000);
        d.write_reg(REG_ADDR_HI, 0x2);
        assert_eq!(d.regs.addr, 0x2_0000_1000);
        for _ in 0..QUEUE_DEPTH {
            assert!(d.write_reg(REG_DOORBELL, CMD_WRITE_PATTERN));
        }
        assert!(!d.write_reg(REG_DOORBELL, CMD_WRITE_PATTERN));
        assert_eq!(d.read_reg(REG_FAILED), 1);
        assert_eq!(d.read_reg(REG_LAST_ERROR), ERR_QUEUE_FULL);
        assert_eq!(d.read_reg(REG_STATUS) & STATUS_BUSY, STATUS_BUSY);
        assert_eq!(d.read_reg(REG_IRQ_STATUS), IRQ_DONE);
        d.write_reg(REG_IRQ_STATUS, IRQ_DONE);
        assert_eq!(d.read_reg(REG_IRQ_STATUS), 0);
    }
}
