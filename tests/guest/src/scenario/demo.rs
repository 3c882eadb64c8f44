//! `demo`: what a user sees running `skiff` with no arguments — a short, friendly report of the
//! same checks as `boot`.

use alloc::string::ToString;
use alloc::vec::Vec;

use super::platform::{self, Findings};
use crate::bootinfo::BootInfo;
use crate::println;

/// Print the report and return (power-off follows); panic on an inconsistency.
pub fn run(boot: &BootInfo) {
    println!("skiff demo guest: hello from inside the VM");
    println!(
        "Memory: {} MiB of RAM in {} range(s)",
        boot.ram_bytes() >> 20,
        boot.ram_regions().count()
    );

    let acpi = platform::acpi(boot);
    let errors = acpi.checksum_errors();
    if errors == 0 {
        println!("ACPI: {} tables, all checksums valid", acpi.table_count());
    } else {
        println!(
            "ACPI: {} tables, {} with a bad checksum",
            acpi.table_count(),
            errors
        );
    }

    let mut notes = Vec::new();
    let madt = platform::madt(&acpi);
    if let Err(e) = &madt {
        notes.push(e.to_string());
    }
    let smp = platform::start_cpus(madt.as_ref().ok(), true);
    println!("CPUs: {} of {} online", smp.online, smp.cpus);

    let pci_ecam = platform::pci_ecam(&acpi).unwrap_or_else(|e| {
        notes.push(e.to_string());
        Vec::new()
    });
    let pci_cf8 = platform::pci_cf8();
    match pci_cf8.as_slice() {
        [only] => println!(
            "PCI: 1 device(s) on bus 0: {} {} {:04x}:{:04x}",
            only.bdf,
            only.description(),
            only.vendor,
            only.device
        ),
        all => {
            println!("PCI: {} device(s) on bus 0:", all.len());
            for f in all {
                println!(
                    "  {} {} {:04x}:{:04x}",
                    f.bdf,
                    f.description(),
                    f.vendor,
                    f.device
                );
            }
        }
    }

    let findings = Findings {
        cpus: smp.cpus,
        online: smp.online,
        acpi_tables: acpi.table_count(),
        checksum_errors: errors,
        pci_ecam,
        pci_cf8,
        notes,
    };
    if let Err(why) = findings.verdict() {
        panic!("demo: something is wrong: {why}");
    }
    println!("Powering off through ACPI. Bye!");
}
