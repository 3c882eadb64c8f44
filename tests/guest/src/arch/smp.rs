//! Application processor bring-up: a real-mode trampoline at [`TRAMPOLINE_PADDR`], INIT-SIPI-SIPI
//! through the local APIC, and [`ap_main`] on each started AP.
//!
//! The trampoline goes 16-bit → protected mode (our GDT) → PAE + EFER.LME + paging with the BSP's
//! boot page tables → 64-bit `ap_long_entry`, which takes the next free stack slot with an atomic
//! increment (so late or duplicate arrivals can never share a stack) and calls [`ap_main`].

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::lapic;
use super::time::{delay_ms, delay_us, Deadline};

/// Physical address the trampoline is copied to; SIPI vector = address >> 12.
pub const TRAMPOLINE_PADDR: u64 = 0x8000;
/// Maximum number of APs that can get a stack.
pub const MAX_APS: usize = 63;
/// Stack size of each AP.
pub const AP_STACK_SIZE: usize = 16 * 1024;

global_asm!(
    r#"
.section .noinit.ap_stacks, "aw", @nobits
.balign 4096
ap_stacks:
    .skip {max_aps} * {stack_size}

.section .bss.ap_slot, "aw", @nobits
.balign 4
ap_next_slot:
    .long 0

/* ---------------------------------------------------------------- trampoline (copied) */
.section .text.ap_trampoline, "ax"
.code16
.global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    movw $(ap_tramp_gdt_ptr - ap_trampoline_start), %bx
    lgdtl (%bx)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${sel_code32}, $({tramp} + ap_tramp32 - ap_trampoline_start)

.code32
ap_tramp32:
    movw ${sel_data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax           /* PG */
    movl %eax, %cr0
    ljmp ${sel_code64}, $ap_long_entry

.balign 8
ap_tramp_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
.global ap_trampoline_end
ap_trampoline_end:

/* ---------------------------------------------------------------- 64-bit AP entry (in place) */
.section .text.ap_entry, "ax"
.code64
ap_long_entry:
    movw ${sel_data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, ap_next_slot(%rip)
    cmpl ${max_aps}, %eax
    jae 9f
    incl %eax
    imulq ${stack_size}, %rax, %rax
    leaq ap_stacks(%rip), %rsp
    addq %rax, %rsp
    xorl %ebp, %ebp
    call {ap_main}
9:  cli
    hlt
    jmp 9b
"#,
    max_aps = const MAX_APS,
    stack_size = const AP_STACK_SIZE,
    tramp = const TRAMPOLINE_PADDR,
    sel_code32 = const super::boot::SEL_CODE32,
    sel_code64 = const super::boot::SEL_CODE64,
    sel_data = const super::boot::SEL_DATA,
    ap_main = sym ap_main,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// CPUs running our code (the BSP counts as one).
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// When set, APs do not print their "online" line.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Outcome of [`start_aps`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmpStatus {
    /// CPUs listed in the MADT (enabled or online-capable), BSP included.
    pub cpus: usize,
    /// CPUs that reached Rust code, BSP included.
    pub online: usize,
    /// The BSP's LAPIC ID.
    pub bsp_id: u32,
}

/// Rust entry of every AP: report, count, halt.
extern "C" fn ap_main() -> ! {
    super::idt::load();
    let id = lapic::id();
    if !QUIET.load(Ordering::SeqCst) {
        crate::println!("smp: cpu online, apic id {}", id);
    }
    ONLINE.fetch_add(1, Ordering::SeqCst);
    super::halt_forever()
}

/// Number of CPUs that reached Rust code so far (BSP included).
pub fn online() -> usize {
    ONLINE.load(Ordering::SeqCst)
}

/// Start every AP in `apic_ids` (the MADT's list; the BSP's own ID is skipped) and wait up to
/// `timeout_ms` (at least) for all of them to come online. `quiet` suppresses the APs' own lines.
pub fn start_aps(apic_ids: &[u32], timeout_ms: u64, quiet: bool) -> SmpStatus {
    QUIET.store(quiet, Ordering::SeqCst);
    lapic::enable();
    let bsp_id = lapic::id();
    install_trampoline();

    let mut expected = 1;
    let vector = (TRAMPOLINE_PADDR >> 12) as u8;
    for &id in apic_ids.iter().filter(|&&id| id != bsp_id) {
        if id > 0xFE {
            crate::println!(
                "smp: apic id {} cannot be reached in xAPIC mode, skipped",
                id
            );
            continue;
        }
        if !lapic::send_init(id) {
            crate::println!("smp: INIT to apic id {} not delivered", id);
        }
        delay_ms(10);
        for _ in 0..2 {
            if !lapic::send_startup(id, vector) {
                crate::println!("smp: SIPI to apic id {} not delivered", id);
            }
            delay_us(200);
        }
        expected += 1;
    }

    let deadline = Deadline::after_ms(timeout_ms);
    while online() < expected && !deadline.expired() {
        core::hint::spin_loop();
    }
    SmpStatus {
        cpus: apic_ids.len().max(1),
        online: online(),
        bsp_id,
    }
}

fn install_trampoline() {
    let start = core::ptr::addr_of!(ap_trampoline_start) as usize;
    let end = core::ptr::addr_of!(ap_trampoline_end) as usize;
    let len = end - start;
    assert!(len <= 4096, "AP trampoline too large ({len} bytes)");
    // SAFETY: low memory at TRAMPOLINE_PADDR is identity mapped RAM that nothing else uses after
    // the boot information has been copied out; source and destination do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE_PADDR as *mut u8, len);
    }
}
