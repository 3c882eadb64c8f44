//! `boot`: detailed platform checks with machine-readable output (see the README for the format).

use alloc::string::ToString;
use alloc::vec::Vec;

use super::platform::{self, Findings};
use crate::acpi::Table;
use crate::bootinfo::BootInfo;
use crate::println;

fn print_table(t: &Table) {
    println!(
        "acpi: {} len {} checksum {}",
        t.signature,
        t.length,
        if t.checksum_ok { "ok" } else { "BAD" }
    );
}

/// Run the checks, print every finding and the summary; panic on any inconsistency.
pub fn run(boot: &BootInfo) {
    // (1) memory map
    for r in &boot.memory_map {
        println!(
            "e820: [0x{:016x}-0x{:016x}] {}",
            r.addr,
            r.addr.wrapping_add(r.size).wrapping_sub(1),
            r.kind
        );
    }

    // (2) ACPI tables
    let acpi = platform::acpi(boot);
    let rsdp = &acpi.rsdp;
    if rsdp.revision >= 2 {
        println!(
            "acpi: RSDP rev {} oem \"{}\" xsdt 0x{:x}",
            rsdp.revision,
            rsdp.oem(),
            rsdp.xsdt
        );
    } else {
        println!(
            "acpi: RSDP rev {} oem \"{}\" rsdt 0x{:x}",
            rsdp.revision,
            rsdp.oem(),
            rsdp.rsdt
        );
    }
    if !rsdp.checksum_ok {
        println!("acpi: RSDP checksum BAD");
    }
    print_table(&acpi.root);
    acpi.tables.iter().for_each(print_table);

    let mut notes = Vec::new();

    // (3) MADT
    let madt = platform::madt(&acpi);
    match &madt {
        Ok(m) => match m.ioapics.first() {
            Some(io) => println!(
                "madt: {} cpus, lapic 0x{:x}, ioapic id {} at 0x{:x}",
                m.cpu_count(),
                m.lapic_addr,
                io.id,
                io.addr
            ),
            None => println!(
                "madt: {} cpus, lapic 0x{:x}, no ioapic",
                m.cpu_count(),
                m.lapic_addr
            ),
        },
        Err(e) => {
            println!("madt: {}", e);
            notes.push(e.to_string());
        }
    }

    // (4) SMP
    let smp = platform::start_cpus(madt.as_ref().ok(), false);
    println!("smp: {} of {} cpus online", smp.online, smp.cpus);

    // (5) PCI bus 0, both ways
    let pci_ecam = platform::pci_ecam(&acpi).unwrap_or_else(|e| {
        println!("pci-ecam: {}", e);
        notes.push(e.to_string());
        Vec::new()
    });
    for f in &pci_ecam {
        match f.virtio_name() {
            Some(name) => println!("pci-ecam: {} {}", f, name),
            None => println!("pci-ecam: {}", f),
        }
    }
    let pci_cf8 = platform::pci_cf8();
    for f in &pci_cf8 {
        match f.virtio_name() {
            Some(name) => println!("pci-cf8: {} {}", f, name),
            None => println!("pci-cf8: {}", f),
        }
    }

    // (6) summary
    let findings = Findings {
        cpus: smp.cpus,
        online: smp.online,
        acpi_tables: acpi.table_count(),
        checksum_errors: acpi.checksum_errors(),
        pci_ecam,
        pci_cf8,
        notes,
    };
    println!(
        "summary: cpus={} online={} acpi_tables={} checksum_errors={} pci_ecam={} pci_cf8={} pci_match={}",
        findings.cpus,
        findings.online,
        findings.acpi_tables,
        findings.checksum_errors,
        findings.pci_ecam.len(),
        findings.pci_cf8.len(),
        if findings.pci_match() { "yes" } else { "no" }
    );
    match findings.verdict() {
        Ok(()) => println!("result: PASS"),
        Err(why) => {
            println!("result: FAIL {}", why);
            panic!("boot scenario failed: {why}");
        }
    }
}
