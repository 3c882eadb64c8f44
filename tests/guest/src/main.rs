//! skiff test guest: a `no_std` program booted by skiff (or QEMU) like a Linux kernel.
//!
//! It enters through PVH (32-bit, `hvm_start_info`) or the Linux 64-bit boot protocol (zero page),
//! reduces both to a [`bootinfo::BootInfo`], runs the scenario named by `scenario=NAME` on the
//! command line (default `demo`), reports on the 16550 at 0x3F8 and powers off through ACPI.
//! Any failure panics, and a panic ends in a deliberate triple fault so the VMM sees a failing
//! exit. See `README.md` for the contract with the VMM.

#![no_std]
#![no_main]

extern crate alloc;

pub mod acpi;
pub mod arch;
pub mod bootinfo;
pub mod dma;
pub mod heap;
pub mod pci;
pub mod power;
pub mod scenario;
pub mod serial;
pub mod sync;
pub mod virtio;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use arch::boot::PROTOCOL_PVH;

/// Rust entry on the BSP, called by the boot assembly with the boot structure's physical address
/// and the protocol ([`arch::boot::PROTOCOL_PVH`] or [`arch::boot::PROTOCOL_LINUX64`]).
pub extern "C" fn rust_entry(info_paddr: u64, protocol: u64) -> ! {
    arch::idt::init();
    serial::init();
    // Copy everything out of low memory before anything (the AP trampoline) reuses it.
    let boot = if protocol == PROTOCOL_PVH {
        bootinfo::from_pvh(info_paddr)
    } else {
        bootinfo::from_linux(info_paddr)
    };

    let name = boot.param("scenario").unwrap_or(scenario::DEFAULT);
    if name != scenario::DEFAULT {
        println!(
            "guest: scenario={} protocol={} cmdline=\"{}\"",
            name, boot.protocol, boot.cmdline
        );
    }
    let Some(s) = scenario::find(name) else {
        let known: alloc::vec::Vec<&str> = scenario::SCENARIOS.iter().map(|s| s.name).collect();
        panic!(
            "unknown scenario \"{}\" (known: {})",
            name,
            known.join(", ")
        );
    };
    (s.run)(&boot);
    power::power_off(boot.rsdp_addr)
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if !PANICKING.swap(true, Ordering::SeqCst) {
        match info.location() {
            Some(loc) => serial::print_panic(format_args!(
                "PANIC: {} (at {}:{})\n",
                info.message(),
                loc.file(),
                loc.line()
            )),
            None => serial::print_panic(format_args!("PANIC: {}\n", info.message())),
        }
    }
    arch::triple_fault()
}
