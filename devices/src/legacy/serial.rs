//! A 16550A UART (COM port) on vm-superio.
//!
//! The VMM places COM1 at I/O port 0x3F8 (length 8) with its interrupt on GSI 4. Registers are
//! reached with one-byte accesses at offsets 0..8; other access sizes read as 0xff and are ignored
//! on write.

use std::io::{self, Write};
use std::sync::Arc;

use migration::{Pausable, Snapshottable, StateError, StateSection};
use thiserror::Error;
use vm_superio::serial::{Error as UartError, NoEvents, SerialState};

use super::interrupt::{InterruptLine, LineTrigger};
use super::log_limit::LogLimiter;
use super::state::{StateReader, StateWriter};
use crate::bus::BusDevice;

/// Number of registers (I/O ports) a 16550 decodes.
pub const SERIAL_REGISTER_COUNT: u64 = 8;
/// Capacity of the receive FIFO.
pub const SERIAL_FIFO_SIZE: usize = 64;
/// Version of the serial state section.
pub const SERIAL_STATE_VERSION: u16 = 1;

/// Errors from the host side of the serial port.
#[derive(Debug, Error)]
pub enum SerialError {
    /// Input was offered while the device is paused.
    #[error("serial port {0} is paused")]
    Paused(String),
}

type Uart = vm_superio::Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A serial port whose output goes to a host writer and whose input comes from
/// [`Serial::enqueue_input`].
///
/// Writes to the output happen on the vCPU thread that performs the access: give it a writer that
/// does not block for long (a file, a buffered pipe, or a channel-backed writer).
pub struct Serial {
    id: String,
    uart: Uart,
    interrupt: Arc<dyn InterruptLine>,
    paused: bool,
    bad_access: LogLimiter,
    write_errors: LogLimiter,
}

impl Serial {
    /// A serial port raising `interrupt` and writing guest output to `out`; id `serial0`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            id: "serial0".to_string(),
            uart: Uart::new(LineTrigger::new(interrupt.clone()), out),
            interrupt,
            paused: false,
            bad_access: LogLimiter::new(),
            write_errors: LogLimiter::new(),
        }
    }

    /// Use `id` as the state-section id instead of `serial0`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Queue host input for the guest and raise the receive interrupt if the guest enabled it.
    ///
    /// Returns how many bytes fit in the receive FIFO (possibly 0 when it is full); the caller keeps
    /// the rest and retries once the guest has drained the FIFO (see [`Serial::fifo_capacity`]).
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        if self.paused {
            return Err(SerialError::Paused(self.id.clone()));
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            // LineTrigger never fails and enqueueing does not write output.
            Err(UartError::Trigger(never)) => match never {},
            Err(UartError::IOError(_)) => Ok(0),
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The raw UART state (registers and receive FIFO).
    pub fn uart_state(&self) -> SerialState {
        self.uart.state()
    }

    fn encode(state: &SerialState) -> StateWriter {
        let mut w = StateWriter::new();
        w.u8(state.baud_divisor_low)
            .u8(state.baud_divisor_high)
            .u8(state.interrupt_enable)
            .u8(state.interrupt_identification)
            .u8(state.line_control)
            .u8(state.line_status)
            .u8(state.modem_control)
            .u8(state.modem_status)
            .u8(state.scratch)
            .bytes(&state.in_buffer);
        w
    }

    fn decode(&self, section: &StateSection) -> Result<SerialState, StateError> {
        let mut r = StateReader::open(section, &self.id, SERIAL_STATE_VERSION)?;
        let state = SerialState {
            baud_divisor_low: r.u8()?,
            baud_divisor_high: r.u8()?,
            interrupt_enable: r.u8()?,
            interrupt_identification: r.u8()?,
            line_control: r.u8()?,
            line_status: r.u8()?,
            modem_control: r.u8()?,
            modem_status: r.u8()?,
            scratch: r.u8()?,
            in_buffer: r.bytes(SERIAL_FIFO_SIZE)?.to_vec(),
        };
        r.finish()?;
        Ok(state)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= SERIAL_REGISTER_COUNT {
            if self.bad_access.allow() {
                log::debug!(
                    "{}: ignoring {}-byte read at offset {offset}",
                    self.id,
                    data.len()
                );
            }
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= SERIAL_REGISTER_COUNT {
            if self.bad_access.allow() {
                log::debug!(
                    "{}: ignoring {}-byte write at offset {offset}",
                    self.id,
                    data.len()
                );
            }
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            if self.write_errors.allow() {
                log::warn!(
                    "{}: guest output lost (error #{}): {e}",
                    self.id,
                    self.write_errors.count()
                );
            }
        }
    }
}

impl Pausable for Serial {
    fn pause(&mut self) -> Result<(), StateError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), StateError> {
        self.paused = false;
        Ok(())
    }
}

impl Snapshottable for Serial {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        Ok(Self::encode(&self.uart.state()).into_section(&self.id, SERIAL_STATE_VERSION))
    }

    /// Restores registers and the receive FIFO; re-raises the interrupt if one was pending and
    /// enabled (vm-superio semantics), which KVM delivers once the irqfd is registered.
    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let state = self.decode(section)?;
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        let trigger = LineTrigger::new(self.interrupt.clone());
        self.uart = match Uart::from_state(&state, trigger, NoEvents, out) {
            Ok(uart) => uart,
            // decode() bounds the FIFO and LineTrigger never fails.
            Err(e) => {
                return Err(StateError::Malformed {
                    id: self.id.clone(),
                    reason: e.to_string(),
                })
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;
    use std::sync::Mutex;

    /// A writer the test can inspect after handing it to the device.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn serial() -> (Serial, EventFdTrigger, SharedBuf) {
        let irq = EventFdTrigger::new().unwrap();
        let out = SharedBuf::default();
        let s = Serial::new(Arc::new(irq.try_clone().unwrap()), Box::new(out.clone()));
        (s, irq, out)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(0x3f8, off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_writer() {
        let (mut s, _irq, out) = serial();
        for &b in b"hi\n" {
            s.write(0x3f8, 0, &[b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Transmitter always empty.
        assert_eq!(rd(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn input_raises_interrupt_and_is_readable() {
        let (mut s, irq, _out) = serial();
        s.write(0x3f8, IER, &[0x01]); // receive-data interrupt
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(rd(&mut s, LSR) & 1, 1);
        assert_eq!(rd(&mut s, 0), b'o');
        assert_eq!(rd(&mut s, 0), b'k');
        assert_eq!(rd(&mut s, LSR) & 1, 0);
    }

    #[test]
    fn fifo_full_accepts_zero_and_pause_refuses() {
        let (mut s, _irq, _out) = serial();
        assert_eq!(s.enqueue_input(&[b'x'; 100]).unwrap(), SERIAL_FIFO_SIZE);
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_input(b"y").unwrap(), 0);
        s.pause().unwrap();
        assert!(matches!(s.enqueue_input(b"z"), Err(SerialError::Paused(_))));
        s.resume().unwrap();
    }

    #[test]
    fn odd_sizes_and_offsets_are_ignored() {
        let (mut s, _irq, out) = serial();
        let mut w = [0u8; 2];
        s.read(0x3f8, 0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut b = [0u8];
        s.read(0x3f8, 9, &mut b);
        assert_eq!(b, [0xff]);
        s.write(0x3f8, 0, b"ab");
        s.write(0x3f8, 8, b"a");
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn snapshot_restore_round_trip() {
        let (mut s, _irq, _out) = serial();
        s.write(0x3f8, 7, &[0x5a]); // scratch
        s.write(0x3f8, 3, &[0x83]); // LCR with DLAB
        s.write(0x3f8, 0, &[0x01]); // divisor low
        s.write(0x3f8, 3, &[0x03]);
        s.enqueue_input(b"abc").unwrap();
        s.pause().unwrap();
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.id, "serial0");

        let (mut t, _irq2, out2) = serial();
        t.restore(&snap).unwrap();
        assert_eq!(t.uart_state(), s.uart_state());
        assert_eq!(rd(&mut t, 7), 0x5a);
        assert_eq!(rd(&mut t, 0), b'a');
        // The restored device still writes to its own output.
        t.write(0x3f8, 0, b"z");
        assert_eq!(out2.0.lock().unwrap().as_slice(), b"z");
    }

    #[test]
    fn bad_state_is_rejected() {
        let (mut s, _irq, _out) = serial();
        let snap = s.snapshot().unwrap();
        let mut truncated = snap.clone();
        truncated.data.truncate(5);
        assert!(s.restore(&truncated).is_err());
        let mut wrong_version = snap.clone();
        wrong_version.version = 9;
        assert!(matches!(
            s.restore(&wrong_version),
            Err(StateError::Version { found: 9, .. })
        ));
        let mut trailing = snap.clone();
        trailing.data.push(0);
        assert!(s.restore(&trailing).is_err());
        // A receive FIFO larger than the hardware's.
        let mut big = StateWriter::new();
        big.raw(&[0; 9]).bytes(&[0; SERIAL_FIFO_SIZE + 1]);
        assert!(s.restore(&big.into_section("serial0", 1)).is_err());
        // The device is still usable after failed restores.
        s.write(0x3f8, 0, b"q");
    }
}
