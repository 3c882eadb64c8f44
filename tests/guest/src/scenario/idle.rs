//! `idle`: announce itself, then halt forever with interrupts off. The VM only ends from outside
//! (a signal to skiff, later an API call), which is what lifecycle tests need.

use crate::bootinfo::BootInfo;

/// Print the marker line and halt.
pub fn run(_boot: &BootInfo) {
    crate::println!("idle: halting until the VMM stops the VM");
    crate::arch::halt_forever();
}
