//! Platform checks shared by the `boot` and `demo` scenarios; each step returns data and leaves
//! the printing to the scenario.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::acpi::madt::Madt;
use crate::acpi::{mcfg, Acpi};
use crate::arch::lapic;
use crate::arch::smp::{self, SmpStatus};
use crate::bootinfo::BootInfo;
use crate::pci::{self, Ecam, PciFunction, PortIo};

/// How long (at least) the BSP waits for the APs. Guest code is emulated on the development host,
/// so this is generous; the wait ends as soon as every AP has checked in.
pub const AP_TIMEOUT_MS: u64 = 5000;

/// Find and walk the ACPI tables; panics if there is no RSDP at all.
pub fn acpi(boot: &BootInfo) -> Acpi {
    match Acpi::discover(boot.rsdp_addr) {
        Ok(a) => a,
        Err(e) => {
            crate::println!("result: FAIL {}", e);
            panic!("ACPI: {e}");
        }
    }
}

/// Parse the MADT.
pub fn madt(acpi: &Acpi) -> Result<Madt, &'static str> {
    acpi.find(b"APIC").map(Madt::parse).ok_or("no MADT")
}

/// Start every AP the MADT lists (none without a MADT).
pub fn start_cpus(madt: Option<&Madt>, quiet: bool) -> SmpStatus {
    match madt {
        Some(m) => {
            if m.lapic_addr != 0 {
                lapic::set_base(m.lapic_addr);
            }
            smp::start_aps(&m.apic_ids, AP_TIMEOUT_MS, quiet)
        }
        None => SmpStatus {
            cpus: 0,
            online: smp::online(),
            bsp_id: lapic::id(),
        },
    }
}

/// Enumerate bus 0 through the MCFG's ECAM window.
pub fn pci_ecam(acpi: &Acpi) -> Result<Vec<PciFunction>, &'static str> {
    let table = acpi.find(b"MCFG").ok_or("no MCFG table")?;
    let window = mcfg::parse(table)
        .into_iter()
        .find(|w| w.segment == 0 && w.start_bus == 0)
        .ok_or("MCFG has no window for segment 0 bus 0")?;
    let ecam = Ecam::new(window.base, window.start_bus, window.end_bus)
        .ok_or("ECAM window is not below 4 GiB")?;
    Ok(pci::scan_bus(&ecam, 0))
}

/// Enumerate bus 0 through ports 0xCF8/0xCFC.
pub fn pci_cf8() -> Vec<PciFunction> {
    pci::scan_bus(&PortIo, 0)
}

/// The numbers the scenarios report and judge.
#[derive(Debug)]
pub struct Findings {
    /// CPUs in the MADT.
    pub cpus: usize,
    /// CPUs that came online (BSP included).
    pub online: usize,
    /// ACPI tables checked (root table, listed tables, DSDT).
    pub acpi_tables: usize,
    /// Checksum failures (RSDP included).
    pub checksum_errors: usize,
    /// Bus 0 via ECAM (empty if ECAM is unusable).
    pub pci_ecam: Vec<PciFunction>,
    /// Bus 0 via 0xCF8/0xCFC.
    pub pci_cf8: Vec<PciFunction>,
    /// Problems found along the way that are not visible in the numbers.
    pub notes: Vec<String>,
}

impl Findings {
    /// Whether both enumerations saw exactly the same functions.
    pub fn pci_match(&self) -> bool {
        self.pci_ecam == self.pci_cf8
    }

    /// `Ok` if everything is consistent, else the reasons.
    pub fn verdict(&self) -> Result<(), String> {
        let mut why: Vec<String> = self.notes.clone();
        if self.cpus == 0 {
            why.push("no CPUs in MADT".into());
        } else if self.online != self.cpus {
            why.push(format!("{} of {} cpus online", self.online, self.cpus));
        }
        if self.checksum_errors != 0 {
            why.push(format!("{} ACPI checksum error(s)", self.checksum_errors));
        }
        if self.pci_ecam.is_empty() || self.pci_cf8.is_empty() {
            why.push("no PCI functions found".into());
        }
        if !self.pci_match() {
            why.push("ECAM and CF8 enumerations differ".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}
