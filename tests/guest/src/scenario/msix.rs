//! `msix`: MSI-X delivery, masking, pending bit and re-targeting, using the first virtio-rng's
//! request queue routed to MSI-X table entry 0.

use alloc::format;

use super::report::{check, fail, or_fail, param_u64, param_vector};
use crate::arch::{interrupts, lapic, time};
use crate::bootinfo::BootInfo;
use crate::println;
use crate::virtio::blk::REQUEST_TIMEOUT_MS;
use crate::virtio::pci::NO_VECTOR;
use crate::virtio::rng::Rng;
use crate::virtio::{types, Platform};

const ENTRY: u16 = 0;

/// Run the scenario; panic on failure.
pub fn run(boot: &BootInfo) {
    let v1 = param_vector(boot, "msix.vector", interrupts::FIRST_DEVICE_VECTOR);
    let v2 = param_vector(boot, "msix.vector2", interrupts::FIRST_DEVICE_VECTOR + 1);
    if v1 == v2 {
        fail("msix.vector and msix.vector2 must differ");
    }
    let irq_ms = param_u64(boot, "msix.timeout_ms", 5_000);
    let quiet_ms = param_u64(boot, "msix.masked_wait_ms", 1_000);

    let mut p = Platform::discover(boot);
    let Some(&dev) = p.virtio_devices(types::RNG).first() else {
        fail("no virtio-rng device (1af4:1044) on bus 0");
    };
    let t = or_fail(p.open(dev));
    let Some(msix) = t.msix else {
        fail(format!("{}: no MSI-X capability", dev.bdf));
    };
    let cfg = t.cfg;
    println!(
        "msix: {} entries, table bar {} +{:#x} at {:#x}, pba bar {} +{:#x} at {:#x}",
        msix.entries,
        msix.table_bar,
        msix.table_offset,
        msix.table,
        msix.pba_bar,
        msix.pba_offset,
        msix.pba
    );

    // Everything masked, entry 0 -> v1 on this CPU, then enable MSI-X.
    let bsp = lapic::id();
    for e in 0..msix.entries {
        msix.set_masked(e, true);
    }
    msix.program(ENTRY, v1, bsp);
    msix.set_enabled(cfg, true);
    check(
        "msix-enabled",
        msix.enabled(cfg),
        "enable bit does not stick",
    );

    let mut rng = or_fail(Rng::init(t, Some(ENTRY)));
    check("queue-msix-vector", true, "");
    let cv = rng.t.set_config_vector(NO_VECTOR);
    check(
        "config-msix-vector-none",
        cv == NO_VECTOR,
        format!("reads back {cv:#x}"),
    );
    msix.set_masked(ENTRY, false);
    interrupts::enable();

    // 1. Delivery on v1.
    let before = interrupts::count(v1);
    let (head, _) = or_fail(rng.submit(16));
    if interrupts::wait_for(v1, before, irq_ms).is_none() {
        fail(format!(
            "no interrupt on vector {v1:#04x} within {irq_ms} ms"
        ));
    }
    println!("msix: queue interrupt on vector {:#04x}", v1);
    check(
        "request-completed",
        rng.q.wait_for(head, REQUEST_TIMEOUT_MS).is_some(),
        "no used entry after the interrupt",
    );

    // 2. Masked: the request completes, no interrupt, the pending bit is set.
    msix.set_masked(ENTRY, true);
    let before = interrupts::count(v1);
    let (head, _) = or_fail(rng.submit(16));
    check(
        "completes-while-masked",
        rng.q.wait_for(head, REQUEST_TIMEOUT_MS).is_some(),
        "no used entry while masked",
    );
    time::delay_ms(quiet_ms);
    let now = interrupts::count(v1);
    check(
        "no-interrupt-while-masked",
        now == before,
        format!("{} interrupt(s) on {v1:#04x} while masked", now - before),
    );
    if !msix.pending(ENTRY) {
        println!(
            "check: pba-pending FAIL pending bit of entry {} clear while masked",
            ENTRY
        );
        fail("MSI-X pending bit not set while masked");
    }
    println!("msix: pending while masked ok");

    // 3. Unmask: the pending message is delivered.
    msix.set_masked(ENTRY, false);
    if interrupts::wait_for(v1, before, irq_ms).is_none() {
        fail(format!("no interrupt on {v1:#04x} after unmasking"));
    }
    println!("msix: delivered after unmask ok");
    check(
        "pba-cleared-after-delivery",
        !msix.pending(ENTRY),
        "pending bit still set",
    );

    // 4. Re-target the entry to v2 (masked while the data changes, as the spec asks).
    msix.set_masked(ENTRY, true);
    msix.set_vector(ENTRY, v2);
    msix.set_masked(ENTRY, false);
    check(
        "entry-data-reads-back",
        msix.data(ENTRY) == u32::from(v2),
        format!("data {:#x}", msix.data(ENTRY)),
    );
    let (old, before2) = (interrupts::count(v1), interrupts::count(v2));
    let (head, _) = or_fail(rng.submit(16));
    if interrupts::wait_for(v2, before2, irq_ms).is_none() {
        fail(format!("no interrupt on the new vector {v2:#04x}"));
    }
    println!("msix: delivered on new vector {:#04x} ok", v2);
    check(
        "old-vector-quiet",
        interrupts::count(v1) == old,
        "interrupt still arrived on the old vector",
    );
    check(
        "request-completed",
        rng.q.wait_for(head, REQUEST_TIMEOUT_MS).is_some(),
        "no used entry",
    );

    interrupts::disable();
    msix.set_masked(ENTRY, true);
    println!("result: PASS");
}
