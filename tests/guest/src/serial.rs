//! Polled 16550 UART at I/O port 0x3F8 and the `print!`/`println!` macros.

use core::fmt;

use crate::arch::port::{inb, outb};
use crate::sync::SpinLock;

/// I/O base of COM1.
pub const COM1: u16 = 0x3F8;

const THR: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// A 16550 driven by polling.
pub struct Uart {
    base: u16,
}

impl Uart {
    /// The UART at `base`; call [`Uart::init`] before use.
    pub const fn new(base: u16) -> Self {
        Uart { base }
    }

    /// 115200 8N1, FIFOs on, interrupts off.
    pub fn init(&self) {
        outb(self.base + IER, 0x00);
        outb(self.base + LCR, 0x80); // DLAB
        outb(self.base, 0x01); // divisor 1 = 115200
        outb(self.base + 1, 0x00);
        outb(self.base + LCR, 0x03); // 8N1
        outb(self.base + FCR, 0xC7);
        outb(self.base + MCR, 0x03); // DTR | RTS, OUT2 off (no interrupts)
    }

    /// Send one byte, waiting (bounded, in case there is no UART) for THR to be empty.
    pub fn write_byte(&self, b: u8) {
        for _ in 0..1_000_000 {
            if inb(self.base + LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        outb(self.base + THR, b);
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.write_byte(b);
        }
        Ok(())
    }
}

static CONSOLE: SpinLock<Uart> = SpinLock::new(Uart::new(COM1));

/// Initialise the console UART.
pub fn init() {
    CONSOLE.lock().init();
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    use fmt::Write;
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Print from the panic handler: takes the console lock even if its holder never returns.
pub fn print_panic(args: fmt::Arguments) {
    use fmt::Write;
    let _ = CONSOLE.lock_or_steal(1_000_000).write_fmt(args);
}

/// Print to the serial console (any CPU; lines do not interleave within one call).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::serial::_print(format_args!($($arg)*)));
}

/// Print a line to the serial console.
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))));
}
