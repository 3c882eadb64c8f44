//! A minimal IDT: every CPU exception panics with a description (vector, error code, RIP, CR2),
//! which then triple-faults like any other panic. Vectors 32..=255 go to
//! [`super::interrupts`] (counted, then EOI); interrupts stay disabled unless a scenario enables
//! them.

use core::arch::{asm, global_asm};

use crate::sync::RacyCell;

/// Stack layout built by the exception stubs plus the CPU.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// Exception vector (pushed by the stub).
    pub vector: u64,
    /// Error code (pushed by the CPU, or 0 by the stub).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Stack pointer at the time of the exception.
    pub rsp: u64,
    /// Stack segment.
    pub ss: u64,
}

global_asm!(
    r#"
.section .text.isr, "ax"
.balign 16
.global isr_stubs
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if vec < 32
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .else
    pushq $vec
    jmp irq_common
    .endif
    .set vec, vec + 1
.endr

isr_common:
    cld
    movq %rsp, %rdi
    subq $8, %rsp
    call {handler}
1:  cli
    hlt
    jmp 1b

/* External interrupt: save the caller-saved registers (soft-float target: no SSE state), call
 * the Rust dispatcher with the vector, restore, return. The CPU aligned RSP to 16 before pushing
 * its 40-byte frame; vector + 9 registers + 8 bytes of padding keep the call 16-byte aligned. */
irq_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    cld
    movq 72(%rsp), %rdi
    subq $8, %rsp
    call {irq}
    addq $8, %rsp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq
"#,
    handler = sym exception_handler,
    irq = sym super::interrupts::irq_dispatch,
    options(att_syntax)
);

extern "C" {
    static isr_stubs: u8;
}

const STUB_STRIDE: u64 = 16;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate([u64; 2]);

static IDT: RacyCell<[Gate; 256]> = RacyCell::new([Gate([0, 0]); 256]);

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 error",
    "alignment check",
    "machine check",
    "SIMD error",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let name = EXCEPTION_NAMES[(frame.vector & 31) as usize];
    panic!(
        "CPU exception {} ({}) error {:#x} rip {:#x} rsp {:#x} cr2 {:#x}",
        frame.vector, name, frame.error_code, frame.rip, frame.rsp, cr2
    );
}

/// Fill the IDT (once, on the BSP) and load it on this CPU.
pub fn init() {
    let stubs = core::ptr::addr_of!(isr_stubs) as u64;
    // SAFETY: called on the BSP before any other CPU runs, so nobody else touches the IDT.
    let idt = unsafe { &mut *IDT.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let handler = stubs + vector as u64 * STUB_STRIDE;
        let low = (handler & 0xFFFF)
            | (u64::from(super::boot::SEL_CODE64) << 16)
            | (0x8E << 40) // present, DPL 0, 64-bit interrupt gate
            | ((handler >> 16) & 0xFFFF) << 48;
        *gate = Gate([low, handler >> 32]);
    }
    load();
}

/// Load the (already filled) IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the IDT is static and its gates point at the stubs above.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}
