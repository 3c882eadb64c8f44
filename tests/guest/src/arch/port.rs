//! Port I/O.

use core::arch::asm;

/// Read a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects visible to Rust; the ports we use are device registers.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Write a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: see `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Read a 16-bit word from an I/O port.
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: see `inb`.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Write a 16-bit word to an I/O port.
pub fn outw(port: u16, v: u16) {
    // SAFETY: see `inb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Read a 32-bit dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: see `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Write a 32-bit dword to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: see `inb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}
