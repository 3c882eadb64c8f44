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
static CLEAR_ADDR: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static CLEAR_VALUE: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
static CLEAR_SEEN: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
static MASK_PIN: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// TSC at the entry of the last interrupt handled (latency benchmarks): [`entry_tsc`].
static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);

/// Called by the IDT stubs for vectors 32..=255 with interrupts disabled.
pub extern "C" fn irq_dispatch(vector: u64) {
    ENTRY_TSC.store(super::time::rdtsc(), Ordering::SeqCst);
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
    let clear = CLEAR_ADDR[v].load(Ordering::SeqCst);
    if clear != 0 {
        // SAFETY: `clear` was registered by `set_status_clear` as the address of a 32-bit
        // write-1-to-clear interrupt status register in an identity-mapped, uncached BAR.
        let seen = unsafe { core::ptr::read_volatile(clear as *const u32) };
        CLEAR_SEEN[v].store(
            CLEAR_SEEN[v].load(Ordering::Relaxed) | seen,
            Ordering::SeqCst,
        );
        // SAFETY: as above.
        unsafe {
            core::ptr::write_volatile(clear as *mut u32, CLEAR_VALUE[v].load(Ordering::SeqCst))
        };
    }
    let pin = MASK_PIN[v].load(Ordering::SeqCst);
    if pin != 0 {
        super::ioapic::IoApic::new(pin & !0xFFF, 0).mask((pin & 0xFF) as u32);
    }
    if v != usize::from(SPURIOUS_VECTOR) {
        lapic::eoi();
    }
}

/// The TSC read when the dispatcher was entered for the last interrupt (any vector).
pub fn entry_tsc() -> u64 {
    ENTRY_TSC.load(Ordering::SeqCst)
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

/// Register (non-zero `addr`) or clear (0) a 32-bit write-1-to-clear status register that the
/// handler for `vector` reads (see [`status_seen`]) and then writes `value` to before the EOI —
/// a device whose level-triggered INTx stays asserted until its status bit is cleared.
pub fn set_status_clear(vector: u8, addr: u64, value: u32) {
    CLEAR_VALUE[usize::from(vector)].store(value, Ordering::SeqCst);
    CLEAR_ADDR[usize::from(vector)].store(addr, Ordering::SeqCst);
}

/// The OR of every value the handler read from the `set_status_clear` register of `vector`
/// since the last [`reset_status_seen`].
pub fn status_seen(vector: u8) -> u32 {
    CLEAR_SEEN[usize::from(vector)].load(Ordering::SeqCst)
}

/// Forget what [`status_seen`] reports for `vector`.
pub fn reset_status_seen(vector: u8) {
    CLEAR_SEEN[usize::from(vector)].store(0, Ordering::SeqCst);
}

/// Make the handler for `vector` mask I/O APIC pin `pin` of the I/O APIC at `ioapic_base`
/// (4 KiB aligned) before the EOI (`ioapic_base` 0: stop doing that). With a level-triggered
/// line this keeps an asserted line from interrupting again, so a test can look at it.
pub fn set_mask_on_arrival(vector: u8, ioapic_base: u64, pin: u32) {
    let v = if ioapic_base == 0 {
        0
    } else {
        (ioapic_base & !0xFFF) | u64::from(pin & 0xFF)
    };
    MASK_PIN[usize::from(vector)].store(v, Ordering::SeqCst);
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
