//! Legacy (non-PCI) devices and the helpers they share.
//!
//! | device | base | length | interrupt |
//! |---|---|---|---|
//! | [`Serial`] (COM1) | I/O 0x3F8 | 8 | GSI 4 |
//! | [`I8042`] | I/O 0x60 | 5 | — |
//! | [`Cmos`] | I/O 0x70 | 2 | — |
//! | [`AcpiPm`] | I/O 0x600 | 4 | — |
//! | [`AcpiGed`] | I/O 0x604 | 4 | GSI 5 |

pub mod acpi_pm;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod interrupt;
pub mod log_limit;
mod migratable;
pub mod serial;
pub mod state;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use ged::{AcpiGed, GedError, GedEvent};
pub use i8042::I8042;
pub use interrupt::{EventFdTrigger, InterruptLine};
pub use log_limit::LogLimiter;
pub use serial::{Serial, SerialError};
pub use state::{StateReader, StateWriter};
