//! The legacy devices are [`Migratable`] with the defaults: they write guest memory never, and
//! their state is small enough to send after stop.

use migration::Migratable;

use super::{AcpiGed, AcpiPm, Cmos, Serial, I8042};

impl Migratable for AcpiGed {}
impl Migratable for AcpiPm {}
impl Migratable for Cmos {}
impl Migratable for I8042 {}
impl Migratable for Serial {}
