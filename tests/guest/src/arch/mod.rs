//! x86_64 specifics: boot entry, port I/O, exceptions, local APIC, SMP bring-up, time.

pub mod boot;
pub mod idt;
pub mod interrupts;
pub mod ioapic;
pub mod lapic;
pub mod paging;
pub mod port;
pub mod smp;
pub mod time;

use core::arch::asm;

/// Disable interrupts and halt this CPU forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; no memory is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Force a triple fault: load an empty IDT and raise #UD, so that the CPU shuts down and the VMM
/// sees a failing exit (KVM_EXIT_SHUTDOWN). `int3` is deliberately not used (not emulated on the
/// nested development host).
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: this intentionally destroys the CPU's exception handling and then faults; nothing
    // runs after it on this CPU.
    unsafe {
        asm!("cli", "lidt [{0}]", "ud2", in(reg) &idtr, options(noreturn, nostack));
    }
}
