//! Boot entry points, boot page tables and the GDT.
//!
//! Two ways in, one way on:
//!
//! * `pvh_start32` — the PVH entry named by the `XEN_ELFNOTE_PHYS32_ENTRY` note: 32-bit protected
//!   mode, paging off, `EBX` = physical address of `struct hvm_start_info`.
//! * `linux64_start` — the ELF entry point (`e_entry`) for the Linux 64-bit boot protocol: long mode
//!   with the VMM's identity map, `RSI` = physical address of the Linux zero page (`boot_params`).
//!
//! Both zero `.bss`, build identity page tables for the low 4 GiB (2 MiB pages; the top GiB, where
//! the PCI hole, IOAPIC and LAPIC live, is mapped uncached), load our GDT, switch to the boot stack
//! and call [`crate::rust_entry`] with `(info_paddr, protocol)`, where protocol is
//! [`PROTOCOL_PVH`] or [`PROTOCOL_LINUX64`].

use core::arch::global_asm;

/// `rust_entry` protocol argument: booted through the PVH entry.
pub const PROTOCOL_PVH: u64 = 0;
/// `rust_entry` protocol argument: booted through the Linux 64-bit boot protocol.
pub const PROTOCOL_LINUX64: u64 = 1;

/// Size of the BSP boot stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

/// GDT selector of the 64-bit code segment.
pub const SEL_CODE64: u16 = 0x08;
/// GDT selector of the flat data segment.
pub const SEL_DATA: u16 = 0x10;
/// GDT selector of the flat 32-bit code segment (used by the AP trampoline).
pub const SEL_CODE32: u16 = 0x18;

global_asm!(
    r#"
/* ---------------------------------------------------------------- PVH note */
.section .note.Xen, "a"
.balign 4
.long 4                 /* namesz: "Xen\0" */
.long 8                 /* descsz */
.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.quad pvh_start32       /* fits in 32 bits; 8 bytes like Linux so readers of 4 or 8 bytes agree */
.balign 4

/* ---------------------------------------------------------------- GDT */
.section .data.boot_gdt, "aw"
.balign 16
.global boot_gdt
boot_gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
    .quad 0x00cf9a000000ffff        /* 0x18: flat 32-bit code */
.global boot_gdt_end
boot_gdt_end:
.balign 8
.global boot_gdt_ptr
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt                  /* 32-bit lgdt reads the low 4 bytes */

/* ---------------------------------------------------------------- page tables (zeroed .bss) */
.section .bss.boot_tables, "aw", @nobits
.balign 4096
.global boot_pml4
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096          /* 4 x 512 x 2 MiB = 4 GiB */

/* ---------------------------------------------------------------- boot stack (not zeroed) */
.section .noinit.boot_stack, "aw", @nobits
.balign 4096
boot_stack_bottom:
    .skip {boot_stack_size}
boot_stack_top:

/* ---------------------------------------------------------------- PVH entry (32-bit) */
.section .text.boot, "ax"
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* keep hvm_start_info */

    /* zero .bss */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT, PDPT[0..4] -> PD[0..4] */
    movl $boot_pdpt + 3, %eax
    movl %eax, boot_pml4
    movl $boot_pd + 3, %eax
    movl %eax, boot_pdpt
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 8
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 16
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 24

    /* 2048 x 2 MiB identity entries; the top GiB uncached (PCD|PWT) */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present | writable | page size */
    cmpl $1536, %ecx
    jb 2f
    orl $0x18, %eax
2:  movl %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp ${sel_code64}, $pvh_long

.code64
pvh_long:
    movl %esi, %edi                 /* arg0: hvm_start_info paddr (zero-extended) */
    movl ${proto_pvh}, %esi         /* arg1: protocol */
    jmp boot_common64

/* ---------------------------------------------------------------- Linux 64-bit entry */
.global linux64_start
linux64_start:
    cli
    cld
    movq %rsi, %r12                 /* keep boot_params */

    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq

    leaq boot_pdpt + 3(%rip), %rax
    movq %rax, boot_pml4(%rip)
    leaq boot_pd + 3(%rip), %rax
    movq %rax, boot_pdpt(%rip)
    addq $0x1000, %rax
    movq %rax, boot_pdpt + 8(%rip)
    addq $0x1000, %rax
    movq %rax, boot_pdpt + 16(%rip)
    addq $0x1000, %rax
    movq %rax, boot_pdpt + 24(%rip)

    leaq boot_pd(%rip), %rdi
    xorl %ecx, %ecx
1:  movq %rcx, %rax
    shlq $21, %rax
    orq $0x83, %rax
    cmpq $1536, %rcx
    jb 2f
    orq $0x18, %rax
2:  movq %rax, (%rdi,%rcx,8)
    incq %rcx
    cmpq $2048, %rcx
    jb 1b

    leaq boot_pml4(%rip), %rax
    movq %rax, %cr3                 /* our map replaces the VMM's (which may cover only 1 GiB) */
    lgdt boot_gdt_ptr(%rip)
    leaq boot_stack_top(%rip), %rsp
    pushq ${sel_code64}
    leaq 3f(%rip), %rax
    pushq %rax
    lretq                           /* reload CS from our GDT */
3:  movq %r12, %rdi
    movl ${proto_linux64}, %esi
    /* fall through */

/* ---------------------------------------------------------------- common 64-bit tail */
boot_common64:
    movw ${sel_data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call {rust_entry}
4:  cli
    hlt
    jmp 4b
"#,
    boot_stack_size = const BOOT_STACK_SIZE,
    sel_code64 = const SEL_CODE64,
    sel_data = const SEL_DATA,
    proto_pvh = const PROTOCOL_PVH,
    proto_linux64 = const PROTOCOL_LINUX64,
    rust_entry = sym crate::rust_entry,
    options(att_syntax)
);
