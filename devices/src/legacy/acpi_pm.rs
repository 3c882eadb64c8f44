//! The hardware-reduced ACPI power-management block: sleep control, sleep status and reset.
//!
//! The VMM registers it at I/O port 0x600 with length 4 and describes it in the FADT as the
//! `SLEEP_CONTROL_REG` (0x600), `SLEEP_STATUS_REG` (0x601) and `RESET_REG` (0x602, with the reset
//! value passed to [`AcpiPm::new`]). Offset 3 is reserved. Accesses of any size are handled byte by
//! byte.

use std::sync::Arc;

use migration::{Pausable, Snapshottable, StateError, StateSection};

use super::log_limit::LogLimiter;
use super::state::{StateReader, StateWriter};
use crate::bus::BusDevice;
use crate::exit::{ExitReason, VmExitEvent};

/// Number of I/O ports in the block.
pub const ACPI_PM_PORT_COUNT: u64 = 4;
/// Version of the power-management state section.
pub const ACPI_PM_STATE_VERSION: u16 = 1;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

/// SLP_EN: writing 1 enters the sleep state selected by SLP_TYP.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// WAK_STS: set when the system woke from a sleep state; write 1 to clear.
const WAK_STS: u8 = 1 << 7;

/// The power-management block; see the module documentation.
pub struct AcpiPm {
    id: String,
    exit: Arc<VmExitEvent>,
    s5_sleep_type: u8,
    reset_value: u8,
    sleep_status: u8,
    ignored: LogLimiter,
}

impl AcpiPm {
    /// A block that powers off on SLP_TYP `s5_sleep_type` with SLP_EN and resets when
    /// `reset_value` is written to the reset register; id `acpi_pm`.
    pub fn new(exit: Arc<VmExitEvent>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            id: "acpi_pm".to_string(),
            exit,
            s5_sleep_type: s5_sleep_type & SLP_TYP_MASK,
            reset_value,
            sleep_status: 0,
            ignored: LogLimiter::new(),
        }
    }

    /// Use `id` as the state-section id instead of `acpi_pm`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL => {
                if value & SLP_EN == 0 {
                    return;
                }
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == self.s5_sleep_type {
                    log::info!("{}: guest entered S5, powering off", self.id);
                    self.exit.request(ExitReason::PowerOff);
                } else if self.ignored.allow() {
                    log::warn!(
                        "{}: ignoring request for unsupported sleep type {slp_typ}",
                        self.id
                    );
                }
            }
            SLEEP_STATUS => self.sleep_status &= !(value & WAK_STS),
            RESET => {
                if value == self.reset_value {
                    log::info!("{}: guest wrote the ACPI reset register", self.id);
                    self.exit.request(ExitReason::Reset);
                } else if self.ignored.allow() {
                    log::debug!("{}: ignoring reset register value {value:#x}", self.id);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(SLEEP_STATUS) => self.sleep_status,
                _ => 0,
            };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(off) = offset.checked_add(i as u64) {
                self.write_byte(off, b);
            }
        }
    }
}

impl Pausable for AcpiPm {}

impl Snapshottable for AcpiPm {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let mut w = StateWriter::new();
        w.u8(self.sleep_status);
        Ok(w.into_section(&self.id, ACPI_PM_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, &self.id, ACPI_PM_STATE_VERSION)?;
        let status = r.u8()?;
        r.finish()?;
        self.sleep_status = status;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPm, Arc<VmExitEvent>) {
        let exit = Arc::new(VmExitEvent::new().unwrap());
        (AcpiPm::new(exit.clone(), 5, 1), exit)
    }

    #[test]
    fn s5_powers_off_exactly_once() {
        let (mut pm, exit) = dev();
        let s5 = SLP_EN | (5 << SLP_TYP_SHIFT);
        pm.write(0x600, SLEEP_CONTROL, &[s5]);
        pm.write(0x600, SLEEP_CONTROL, &[s5]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
        assert!(exit.eventfd().read().is_err());
    }

    #[test]
    fn wrong_sleep_type_or_missing_slp_en_is_ignored() {
        let (mut pm, exit) = dev();
        pm.write(0x600, SLEEP_CONTROL, &[SLP_EN | (3 << SLP_TYP_SHIFT)]);
        pm.write(0x600, SLEEP_CONTROL, &[5 << SLP_TYP_SHIFT]);
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err());
    }

    #[test]
    fn reset_register() {
        let (mut pm, exit) = dev();
        pm.write(0x600, RESET, &[2]);
        assert_eq!(exit.reason(), None);
        // A 4-byte write covering the whole block reaches the reset register too.
        pm.write(0x600, 0, &[0, 0, 1, 0]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn sleep_status_reads_zero_and_is_w1c() {
        let (mut pm, _exit) = dev();
        let mut b = [0xff; 4];
        pm.read(0x600, 0, &mut b);
        assert_eq!(b, [0; 4]);
        pm.sleep_status = WAK_STS | 1;
        pm.write(0x600, SLEEP_STATUS, &[0x01]);
        assert_eq!(pm.sleep_status, WAK_STS | 1);
        pm.write(0x600, SLEEP_STATUS, &[WAK_STS]);
        let mut b = [0xff];
        pm.read(0x600, SLEEP_STATUS, &mut b);
        assert_eq!(b, [1]);
    }

    #[test]
    fn snapshot_round_trip_and_bad_state() {
        let (mut pm, _exit) = dev();
        pm.sleep_status = WAK_STS;
        let snap = pm.snapshot().unwrap();
        let (mut other, _exit2) = dev();
        other.restore(&snap).unwrap();
        assert_eq!(other.sleep_status, WAK_STS);
        let mut bad = snap.clone();
        bad.data.clear();
        assert!(other.restore(&bad).is_err());
        let mut bad = snap;
        bad.version = 0;
        assert!(other.restore(&bad).is_err());
    }
}
