//! Scenarios: what the guest does after boot, chosen with `scenario=NAME` on the command line.
//!
//! To add one: write `src/scenario/<name>.rs` with `pub fn run(boot: &BootInfo)`, declare the
//! module below and add a line to [`SCENARIOS`]. A scenario that returns is followed by an ACPI
//! power-off (a successful VM exit); a scenario that fails panics (a triple fault, i.e. a failing
//! VM exit).

mod boot;
mod demo;
mod idle;
mod panic;
mod platform;
mod poweroff;
mod reboot;

use crate::bootinfo::BootInfo;

/// A named test program.
pub struct Scenario {
    /// Name used in `scenario=NAME`.
    pub name: &'static str,
    /// One-line description (listed in the README and on an unknown name).
    pub about: &'static str,
    /// Body; return to power off, panic to fail.
    pub run: fn(&BootInfo),
}

/// Scenario used when the command line names none.
pub const DEFAULT: &str = "demo";

/// All scenarios.
pub static SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "demo",
        about: "short friendly report of memory, ACPI, CPUs and PCI, then power off",
        run: demo::run,
    },
    Scenario {
        name: "boot",
        about: "detailed platform checks (e820, ACPI checksums, MADT, SMP, PCI ECAM vs CF8)",
        run: boot::run,
    },
    Scenario {
        name: "panic",
        about: "panic on purpose (a guest panic must become a failing VM exit)",
        run: panic::run,
    },
    Scenario {
        name: "idle",
        about: "print a line, then halt forever (for pause, signal and lifecycle tests)",
        run: idle::run,
    },
    Scenario {
        name: "reboot",
        about: "reset the machine through the FADT's reset register",
        run: reboot::run,
    },
    Scenario {
        name: "poweroff",
        about: "power off through ACPI at once (the shortest successful run)",
        run: poweroff::run,
    },
];

/// Look a scenario up by name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
