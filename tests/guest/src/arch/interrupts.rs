//! External interrupts: per-vector counters, LAPIC EOI, 8259 masking, `sti`/`cli`.
//!
//! Every vector 32..=255 has a stub in the IDT ([`super::idt`]) that calls [`irq_dispatch`]. The
//! dispatcher counts the interrupt, optionally reads a device register first (to deassert a
//! level-triggered INTx line, see [`set_level_ack`]) and sends the LAPIC EOI (except for the
//! spurious vector 0xFF). It never prints (the serial lock may be held by the interrupted code).
//! Interrupts are enabled only by scenarios that need them ([`enable`]).

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use super::lapic;
use super::port::outb;

/// First vector scenarios use for device interrupts.
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
/// The LAPIC spurious vector (set by [`lapic::enable`]); never EOI'd.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

static COUNTS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
static LEVEL_ACK: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static LAST_ACK: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];
static ACK_BITS: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

/// Called by the IDT stubs for vectors 32..=255 with interrupts disabled.
pub extern "C" fn irq_dispatch(vector: u64) {
    let v = (vector & 0xFF) as usize;
    // Plain load + store instead of a locked read-modify-write: only the BSP takes interrupts
    // and the handler is not reentrant (interrupt gate), so there is no concurrent writer.
    COUNTS[v].store(COUNTS[v].load(Ordering::Relaxed) + 1, Ordering::SeqCst);
    let ack = LEVEL_ACK[v].load(Ordering::SeqCst);
    if ack != 0 {
        // SAFETY: `ack` was registered by `set_level_ack` as the address of a read-to-clear
        // device register (a virtio ISR byte) in the identity-mapped MMIO range.
        let value = unsafe { core::ptr::read_volatile(ack as *const u8) };
        LAST_ACK[v].store(value, Ordering::SeqCst);
        ACK_BITS[v].store(
            ACK_BITS[v].load(Ordering::Relaxed) | value,
            Ordering::SeqCst,
        );
    }
    if v != usize::from(SPURIOUS_VECTOR) {
        lapic::eoi();
    }
}

/// How many times `vector` has arrived.
pub fn count(vector: u8) -> u32 {
    COUNTS[usize::from(vector)].load(Ordering::SeqCst)
}

/// Register (non-zero) or clear (0) a byte register that the handler for `vector` reads before
/// the EOI — for level-triggered INTx, reading the virtio ISR register deasserts the line.
pub fn set_level_ack(vector: u8, addr: u64) {
    LEVEL_ACK[usize::from(vector)].store(addr, Ordering::SeqCst);
}

/// The value the handler last read from the `set_level_ack` register of `vector`.
pub fn last_ack(vector: u8) -> u8 {
    LAST_ACK[usize::from(vector)].load(Ordering::SeqCst)
}

/// The OR of every value the handler read from the `set_level_ack` register of `vector`.
pub fn ack_bits(vector: u8) -> u8 {
    ACK_BITS[usize::from(vector)].load(Ordering::SeqCst)
}

/// Mask every line of both 8259 PICs (firmware may have left the PIT unmasked on IRQ 0, which
/// would arrive on a vector the IDT uses for exceptions).
pub fn mask_pic() {
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

/// Mask the PICs, software-enable this CPU's LAPIC and enable interrupts (`sti`).
pub fn enable() {
    mask_pic();
    lapic::enable();
    // SAFETY: the IDT has a handler for every vector; device interrupts only arrive on vectors
    // the scenario programmed.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Disable interrupts on this CPU (`cli`).
pub fn disable() {
    // SAFETY: only clears IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Wait (at least `ms` milliseconds, polled) until `vector`'s count exceeds `before`. Returns the
/// new count, or None on timeout.
pub fn wait_for(vector: u8, before: u32, ms: u64) -> Option<u32> {
    let deadline = super::time::Deadline::after_ms(ms);
    loop {
        let now = count(vector);
        if now > before {
            return Some(now);
        }
        if deadline.expired() {
            return None;
        }
        core::hint::spin_loop();
    }
}
