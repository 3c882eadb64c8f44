//! The ACPI Generic Event Device (GED) event register.
//!
//! The VMM registers it at I/O port 0x604 with length 4 and wires its interrupt line to GSI 5. The
//! DSDT's GED `_EVT` method reads the 32-bit event register (DWordAcc), which returns the pending
//! event bits and clears them (read-to-clear), then notifies the matching ACPI devices (bit 0: the
//! power button, `Notify(PWRB, 0x80)`). Narrower reads return and clear only the bytes they cover.
//! Writes are ignored. The line is an edge (irqfd), so describe the GED interrupt as
//! edge-triggered, active-high.

use std::sync::Arc;

use migration::{Pausable, Snapshottable, StateError, StateSection};
use thiserror::Error;

use super::interrupt::InterruptLine;
use super::log_limit::LogLimiter;
use super::state::{StateReader, StateWriter};
use crate::bus::BusDevice;

/// Number of I/O ports in the register block.
pub const ACPI_GED_PORT_COUNT: u64 = 4;
/// Version of the GED state section.
pub const ACPI_GED_STATE_VERSION: u16 = 1;

/// Events the GED reports, each a bit of the event register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GedEvent {
    /// The ACPI power button was pressed (bit 0).
    PowerButton,
}

impl GedEvent {
    /// The event's bit in the event register.
    pub fn bit(self) -> u32 {
        match self {
            GedEvent::PowerButton => 1 << 0,
        }
    }
}

/// Errors from [`AcpiGed::notify`].
#[derive(Debug, Error)]
pub enum GedError {
    /// The interrupt line could not be raised (the event stays pending).
    #[error("cannot raise the GED interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// The GED event register; see the module documentation.
pub struct AcpiGed {
    id: String,
    line: Arc<dyn InterruptLine>,
    pending: u32,
    paused: bool,
    /// An event arrived while paused; its interrupt is raised on resume.
    deferred: bool,
    ignored: LogLimiter,
}

impl AcpiGed {
    /// A GED raising `line` (GSI 5) when an event is notified; id `acpi_ged`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            id: "acpi_ged".to_string(),
            line,
            pending: 0,
            paused: false,
            deferred: false,
            ignored: LogLimiter::new(),
        }
    }

    /// Use `id` as the state-section id instead of `acpi_ged`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Record `event` and raise the interrupt. While paused the interrupt waits for resume.
    pub fn notify(&mut self, event: GedEvent) -> Result<(), GedError> {
        self.pending |= event.bit();
        if self.paused {
            self.deferred = true;
            return Ok(());
        }
        self.line.trigger().map_err(GedError::Interrupt)
    }

    /// Event bits the guest has not read yet.
    pub fn pending(&self) -> u32 {
        self.pending
    }
}

impl BusDevice for AcpiGed {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = self.pending.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let idx = offset.saturating_add(i as u64);
            *b = if idx < ACPI_GED_PORT_COUNT {
                self.pending &= !(0xffu32 << (8 * idx));
                bytes[idx as usize]
            } else {
                0
            };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if self.ignored.allow() {
            log::debug!(
                "{}: ignoring {}-byte write at offset {offset}",
                self.id,
                data.len()
            );
        }
    }
}

impl Pausable for AcpiGed {
    fn pause(&mut self) -> Result<(), StateError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), StateError> {
        self.paused = false;
        if self.deferred {
            self.line.trigger().map_err(|e| StateError::Resume {
                id: self.id.clone(),
                reason: format!("cannot raise the deferred GED interrupt: {e}"),
            })?;
            self.deferred = false;
        }
        Ok(())
    }
}

impl Snapshottable for AcpiGed {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let mut w = StateWriter::new();
        w.u32(self.pending).u8(u8::from(self.deferred));
        Ok(w.into_section(&self.id, ACPI_GED_STATE_VERSION))
    }

    /// Restores the pending bits; an interrupt that was deferred by a pause on the source is raised
    /// at the next resume.
    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, &self.id, ACPI_GED_STATE_VERSION)?;
        let pending = r.u32()?;
        let deferred = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(r.malformed(format!("invalid deferred flag {v}"))),
        };
        r.finish()?;
        self.pending = pending;
        self.deferred = deferred;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;

    fn ged() -> (AcpiGed, EventFdTrigger) {
        let irq = EventFdTrigger::new().unwrap();
        (AcpiGed::new(Arc::new(irq.try_clone().unwrap())), irq)
    }

    fn read32(g: &mut AcpiGed) -> u32 {
        let mut b = [0u8; 4];
        g.read(0x604, 0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn power_button_raises_interrupt_and_reads_clear() {
        let (mut g, irq) = ged();
        assert_eq!(read32(&mut g), 0);
        g.notify(GedEvent::PowerButton).unwrap();
        g.notify(GedEvent::PowerButton).unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        assert_eq!(read32(&mut g), 1);
        assert_eq!(read32(&mut g), 0, "read-to-clear");
        g.write(0x604, 0, &[0xff; 4]);
        assert_eq!(read32(&mut g), 0, "writes are ignored");
    }

    #[test]
    fn byte_reads_clear_only_their_bytes() {
        let (mut g, _irq) = ged();
        g.pending = 0x0100_0001;
        let mut b = [0u8];
        g.read(0x604, 3, &mut b);
        assert_eq!(b, [1]);
        assert_eq!(g.pending(), 1);
        g.read(0x604, 0, &mut b);
        assert_eq!(b, [1]);
        assert_eq!(g.pending(), 0);
    }

    #[test]
    fn notify_while_paused_defers_interrupt() {
        let (mut g, irq) = ged();
        g.pause().unwrap();
        g.notify(GedEvent::PowerButton).unwrap();
        assert!(irq.eventfd().read().is_err());
        g.resume().unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(g.pending(), 1);
    }

    #[test]
    fn snapshot_round_trip_and_bad_state() {
        let (mut g, _irq) = ged();
        g.pause().unwrap();
        g.notify(GedEvent::PowerButton).unwrap();
        let snap = g.snapshot().unwrap();

        let (mut h, irq2) = ged();
        h.pause().unwrap();
        h.restore(&snap).unwrap();
        assert_eq!(h.pending(), 1);
        h.resume().unwrap();
        assert_eq!(irq2.eventfd().read().unwrap(), 1);

        let mut bad = snap.clone();
        bad.data.truncate(3);
        assert!(h.restore(&bad).is_err());
        let mut bad = snap.clone();
        bad.data[4] = 7;
        assert!(h.restore(&bad).is_err());
        let mut bad = snap;
        bad.version = 2;
        assert!(h.restore(&bad).is_err());
    }
}
