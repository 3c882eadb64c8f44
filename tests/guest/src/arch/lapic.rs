//! Local APIC in xAPIC (MMIO) mode.

use core::sync::atomic::{AtomicU64, Ordering};

/// Architectural default LAPIC base.
pub const DEFAULT_BASE: u64 = 0xFEE0_0000;

const REG_ID: u64 = 0x20;
const REG_EOI: u64 = 0xB0;
const REG_SVR: u64 = 0xF0;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;

const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_MODE_INIT: u32 = 0b101 << 8;
const ICR_MODE_STARTUP: u32 = 0b110 << 8;

static BASE: AtomicU64 = AtomicU64::new(DEFAULT_BASE);

/// Set the LAPIC MMIO base (from the MADT) used by every CPU.
pub fn set_base(base: u64) {
    BASE.store(base, Ordering::SeqCst);
}

/// The LAPIC MMIO base in use.
pub fn base() -> u64 {
    BASE.load(Ordering::SeqCst)
}

fn read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity mapped (uncached) by the boot page tables; reads of these
    // registers have no side effects.
    unsafe { core::ptr::read_volatile((base() + reg) as *const u32) }
}

fn write(reg: u64, v: u32) {
    // SAFETY: as in `read`; the callers write architecturally defined values.
    unsafe { core::ptr::write_volatile((base() + reg) as *mut u32, v) }
}

/// This CPU's LAPIC ID, read from the LAPIC ID register (never from CPUID).
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Software-enable the LAPIC (spurious vector 0xFF). Interrupts stay masked by `cli`.
pub fn enable() {
    write(REG_SVR, read(REG_SVR) | 0x1FF);
}

/// Signal end-of-interrupt for the interrupt being serviced on this CPU.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Wait (bounded) until the ICR reports the last IPI as delivered. Returns false on timeout.
fn wait_icr_idle() -> bool {
    let deadline = super::time::Deadline::after_ms(100);
    while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
        if deadline.expired() {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn send_ipi(dest: u32, low: u32) -> bool {
    write(REG_ESR, 0);
    write(REG_ICR_HIGH, dest << 24);
    write(REG_ICR_LOW, low);
    wait_icr_idle()
}

/// Send an INIT IPI to the LAPIC `dest` (xAPIC physical destination). False if it never left.
pub fn send_init(dest: u32) -> bool {
    send_ipi(dest, ICR_MODE_INIT | ICR_LEVEL_ASSERT)
}

/// Send a STARTUP IPI with the given vector (start at `vector << 12`).
pub fn send_startup(dest: u32, vector: u8) -> bool {
    send_ipi(
        dest,
        ICR_MODE_STARTUP | ICR_LEVEL_ASSERT | u32::from(vector),
    )
}
