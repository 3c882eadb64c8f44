//! `panic`: fail on purpose.

use crate::bootinfo::BootInfo;

/// Panic with "requested by scenario".
pub fn run(_boot: &BootInfo) {
    panic!("requested by scenario");
}
