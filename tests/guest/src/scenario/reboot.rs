//! `reboot`: reset the machine through the FADT's reset register (the VMM reports a reboot request).

use crate::bootinfo::BootInfo;

/// Write the FADT reset value to the reset register.
pub fn run(boot: &BootInfo) {
    crate::println!("reboot: resetting through the ACPI reset register");
    crate::power::reset(boot.rsdp_addr);
}
