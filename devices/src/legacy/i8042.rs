//! A minimal i8042 keyboard controller: enough for Linux's probe, plus the CPU reset line.
//!
//! The VMM registers it at I/O port 0x60 with length 5: offset 0 is the data port (0x60), offset 4
//! the status (read) / command (write) port (0x64). Offsets 1..=3 (0x61..=0x63) read as 0 and ignore
//! writes. There is no keyboard or mouse behind the controller and no interrupt line.
//!
//! Guest-visible behaviour:
//! - commands 0xFE (and every other even "pulse output lines" command 0xF0..=0xFE) and an output
//!   port write (0xD1) with bit 0 clear request [`ExitReason::Reset`];
//! - 0x20 / 0x60 read / write the controller command byte, 0xAA self test answers 0x55, 0xAB
//!   keyboard interface test answers 0x00, 0xD0 reads the output port, 0xD2 echoes a byte;
//! - the auxiliary (mouse) port is reported broken so Linux gives up on it without timeouts: the
//!   0xD3 loopback echoes its byte without the AUX-data status bit, and the 0xA9 aux interface test
//!   answers 0x01 ("clock line stuck low");
//! - the status register shows the output buffer full only while a command's answer is pending;
//!   data reads with nothing pending return 0.

use std::sync::Arc;

use migration::{Pausable, Snapshottable, StateError, StateSection};

use super::log_limit::LogLimiter;
use super::state::{StateReader, StateWriter};
use crate::bus::BusDevice;
use crate::exit::{ExitReason, VmExitEvent};

/// Number of I/O ports the VMM registers for the controller (0x60..=0x64).
pub const I8042_PORT_COUNT: u64 = 5;
/// Version of the i8042 state section.
pub const I8042_STATE_VERSION: u16 = 1;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM_FLAG: u8 = 0x04;
const SR_LAST_WAS_COMMAND: u8 = 0x08;
const SR_NOT_INHIBITED: u8 = 0x10;

// Controller command byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM_FLAG: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;

// Commands.
const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xD2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_PULSE_FIRST: u8 = 0xF0;

const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
const AUX_TEST_CLOCK_STUCK_LOW: u8 = 0x01;
/// Output port: bit 0 is the (active-low) CPU reset line, bit 1 the A20 gate.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
const OUTPUT_PORT_RESET_N: u8 = 0x01;

/// The i8042 controller; see the module documentation.
pub struct I8042 {
    id: String,
    exit: Arc<VmExitEvent>,
    control: u8,
    output_port: u8,
    output: Option<u8>,
    /// A command waiting for its parameter byte on the data port.
    pending: Option<u8>,
    last_was_command: bool,
    ignored: LogLimiter,
}

impl I8042 {
    /// A controller that asks `exit` for a reset when the guest pulses the reset line; id `i8042`.
    pub fn new(exit: Arc<VmExitEvent>) -> Self {
        Self {
            id: "i8042".to_string(),
            exit,
            control: CB_KBD_INT | CB_SYSTEM_FLAG,
            output_port: OUTPUT_PORT_DEFAULT,
            output: None,
            pending: None,
            last_was_command: false,
            ignored: LogLimiter::new(),
        }
    }

    /// Use `id` as the state-section id instead of `i8042`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    fn status(&self) -> u8 {
        let mut s = SR_NOT_INHIBITED;
        if self.output.is_some() {
            s |= SR_OUTPUT_FULL;
        }
        if self.control & CB_SYSTEM_FLAG != 0 {
            s |= SR_SYSTEM_FLAG;
        }
        if self.last_was_command {
            s |= SR_LAST_WAS_COMMAND;
        }
        s
    }

    fn reset(&self, why: &str) {
        log::info!("{}: guest requested a reset ({why})", self.id);
        self.exit.request(ExitReason::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CB => self.output = Some(self.control),
            CMD_WRITE_CB
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.control |= CB_AUX_DISABLE,
            CMD_AUX_ENABLE => self.control &= !CB_AUX_DISABLE,
            CMD_AUX_TEST => self.output = Some(AUX_TEST_CLOCK_STUCK_LOW),
            CMD_SELF_TEST => {
                self.control |= CB_SYSTEM_FLAG;
                self.output = Some(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.output = Some(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.output = Some(self.output_port),
            CMD_PULSE_FIRST..=0xFF => {
                // Bits 3:0 select the output lines to pulse low; bit 0 is the CPU reset line.
                if cmd & OUTPUT_PORT_RESET_N == 0 {
                    self.reset(&format!("command {cmd:#04x}"));
                }
            }
            _ => {
                if self.ignored.allow() {
                    log::debug!("{}: ignoring command {cmd:#04x}", self.id);
                }
            }
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CB) => self.control = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_N == 0 {
                    self.reset("output port reset line");
                }
            }
            // The loopback answers without the AUX-data status bit: see the module documentation.
            Some(CMD_WRITE_KBD_OUTPUT) | Some(CMD_WRITE_AUX_OUTPUT) => self.output = Some(value),
            // No mouse behind the controller: bytes sent to it are dropped.
            Some(_) => {}
            None => {
                // A byte for the keyboard; there is none.
                if self.ignored.allow() {
                    log::debug!("{}: no keyboard, dropping byte {value:#04x}", self.id);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.output.take().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(data[0]);
            }
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(data[0]);
            }
            _ => {}
        }
    }
}

impl Pausable for I8042 {}

impl Snapshottable for I8042 {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let mut w = StateWriter::new();
        let flags = u8::from(self.output.is_some())
            | u8::from(self.pending.is_some()) << 1
            | u8::from(self.last_was_command) << 2;
        w.u8(flags)
            .u8(self.control)
            .u8(self.output_port)
            .u8(self.output.unwrap_or(0))
            .u8(self.pending.unwrap_or(0));
        Ok(w.into_section(&self.id, I8042_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, &self.id, I8042_STATE_VERSION)?;
        let flags = r.u8()?;
        let control = r.u8()?;
        let output_port = r.u8()?;
        let output = r.u8()?;
        let pending = r.u8()?;
        if flags & !0x7 != 0 {
            return Err(r.malformed(format!("unknown flags {flags:#x}")));
        }
        r.finish()?;
        self.control = control;
        self.output_port = output_port;
        self.output = (flags & 1 != 0).then_some(output);
        self.pending = (flags & 2 != 0).then_some(pending);
        self.last_was_command = flags & 4 != 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<VmExitEvent>) {
        let exit = Arc::new(VmExitEvent::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    fn cmd(d: &mut I8042, c: u8) {
        d.write(0x60, COMMAND_OFFSET, &[c]);
    }
    fn status(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(0x60, COMMAND_OFFSET, &mut b);
        b[0]
    }
    fn data(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(0x60, DATA_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut d, exit) = dev();
        assert_eq!(status(&mut d) & SR_OUTPUT_FULL, 0);
        assert_eq!(data(&mut d), 0);
        cmd(&mut d, 0xFF); // pulses no line
        assert_eq!(exit.reason(), None);
        cmd(&mut d, 0xFE);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset() {
        let (mut d, exit) = dev();
        cmd(&mut d, CMD_READ_OUTPUT_PORT);
        assert_eq!(data(&mut d), OUTPUT_PORT_DEFAULT);
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        d.write(0x60, DATA_OFFSET, &[0x03]);
        assert_eq!(exit.reason(), None);
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        d.write(0x60, DATA_OFFSET, &[0x02]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn linux_probe_sequence_answers() {
        let (mut d, exit) = dev();
        // Read the command byte: output buffer full until the data port is read.
        cmd(&mut d, CMD_READ_CB);
        assert_eq!(
            status(&mut d) & (SR_OUTPUT_FULL | SR_LAST_WAS_COMMAND),
            0x09
        );
        let cb = data(&mut d);
        assert_eq!(cb, CB_KBD_INT | CB_SYSTEM_FLAG);
        assert_eq!(status(&mut d) & SR_OUTPUT_FULL, 0);
        // Write it back modified and read it again.
        cmd(&mut d, CMD_WRITE_CB);
        d.write(0x60, DATA_OFFSET, &[0x44]);
        cmd(&mut d, CMD_READ_CB);
        assert_eq!(data(&mut d), 0x44);
        cmd(&mut d, CMD_SELF_TEST);
        assert_eq!(data(&mut d), SELF_TEST_OK);
        cmd(&mut d, CMD_KBD_TEST);
        assert_eq!(status(&mut d) & SR_OUTPUT_FULL, SR_OUTPUT_FULL);
        assert_eq!(data(&mut d), KBD_TEST_OK);
        // AUX loopback answers, but not as AUX data; the AUX test reports a broken port.
        cmd(&mut d, CMD_WRITE_AUX_OUTPUT);
        d.write(0x60, DATA_OFFSET, &[0x5a]);
        assert_eq!(status(&mut d) & 0x21, SR_OUTPUT_FULL);
        assert_eq!(data(&mut d), 0x5a);
        cmd(&mut d, CMD_AUX_TEST);
        assert_eq!(data(&mut d), AUX_TEST_CLOCK_STUCK_LOW);
        cmd(&mut d, CMD_AUX_DISABLE);
        cmd(&mut d, CMD_READ_CB);
        assert_eq!(data(&mut d) & CB_AUX_DISABLE, CB_AUX_DISABLE);
        // Keyboard bytes go nowhere; unrelated ports read 0.
        d.write(0x60, DATA_OFFSET, &[0xF2]);
        assert_eq!(status(&mut d) & SR_OUTPUT_FULL, 0);
        let mut b = [0xaa];
        d.read(0x60, 1, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn snapshot_round_trip_and_rejects_bad_state() {
        let (mut d, _exit) = dev();
        cmd(&mut d, CMD_WRITE_CB);
        d.write(0x60, DATA_OFFSET, &[0x61]);
        cmd(&mut d, CMD_SELF_TEST);
        let snap = d.snapshot().unwrap();
        let (mut e, _exit2) = dev();
        e.restore(&snap).unwrap();
        assert_eq!(data(&mut e), SELF_TEST_OK);
        cmd(&mut e, CMD_READ_CB);
        assert_eq!(data(&mut e), 0x61 | CB_SYSTEM_FLAG);

        let mut bad = snap.clone();
        bad.data.pop();
        assert!(e.restore(&bad).is_err());
        let mut bad = snap.clone();
        bad.version = 2;
        assert!(e.restore(&bad).is_err());
        let mut bad = snap;
        bad.data[0] = 0x80;
        assert!(e.restore(&bad).is_err());
    }
}
