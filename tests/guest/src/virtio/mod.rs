//! virtio 1.x drivers over the PCI modern transport: just enough of blk, net, console and rng
//! for the test scenarios, all polled (interrupt-driven waits are built on top by scenarios).

pub mod blk;
pub mod console;
pub mod iommu;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::acpi::madt::Madt;
use crate::acpi::{mcfg, Acpi};
use crate::arch::lapic;
use crate::bootinfo::BootInfo;
use crate::pci::{bar, scan_bus, ConfigSpace, Ecam, PciFunction, PortIo};
use crate::println;

pub use pci::Transport;

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;

/// `VIRTIO_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_EVENT_IDX` (never negotiated by this guest).
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform's IOMMU (addresses in
/// rings and descriptors are IOVAs).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest has a driver.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u8 = 8;
    /// Device hit an error and needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// Driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Device types (virtio 1.x §5).
pub mod types {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
    /// Console.
    pub const CONSOLE: u16 = 3;
    /// Entropy source.
    pub const RNG: u16 = 4;
    /// IOMMU.
    pub const IOMMU: u16 = 23;
}

/// The virtio device type of a PCI device ID (modern 0x1040 + type, or transitional).
pub fn device_type(device: u16) -> Option<u16> {
    match device {
        0x1000 => Some(types::NET),
        0x1001 => Some(types::BLOCK),
        0x1003 => Some(types::CONSOLE),
        0x1005 => Some(types::RNG),
        0x1040..=0x107f => Some(device - 0x1040),
        _ => None,
    }
}

/// What scenarios need to find and open virtio devices: config space access (ECAM from the
/// MCFG when there is one, else 0xCF8/0xCFC), the functions on bus 0, the MADT, and the memory
/// ranges already taken (for BARs the guest must assign itself).
pub struct Platform {
    /// Config space access.
    pub cfg: &'static dyn ConfigSpace,
    /// Every function on bus 0.
    pub functions: Vec<PciFunction>,
    /// The MADT, if ACPI has one (its LAPIC address is already applied).
    pub madt: Option<Madt>,
    used: Vec<(u64, u64)>,
    clear_bars: bool,
}

impl Platform {
    /// Discover ACPI (optional), PCI bus 0 and the MADT.
    pub fn discover(boot: &BootInfo) -> Platform {
        let acpi = Acpi::discover(boot.rsdp_addr).ok();
        let mut used = Vec::new();
        let ecam = acpi
            .as_ref()
            .and_then(|a| a.find(b"MCFG"))
            .and_then(|t| {
                mcfg::parse(t)
                    .into_iter()
                    .find(|w| w.segment == 0 && w.start_bus == 0)
            })
            .and_then(|w| {
                used.push((
                    w.base,
                    w.base + ((u64::from(w.end_bus - w.start_bus) + 1) << 20),
                ));
                Ecam::new(w.base, w.start_bus, w.end_bus)
            });
        let cfg: &'static dyn ConfigSpace = match ecam {
            Some(e) => Box::leak(Box::new(e)),
            None => &PortIo,
        };
        let madt = acpi.as_ref().and_then(|a| a.find(b"APIC")).map(Madt::parse);
        if let Some(m) = &madt {
            if m.lapic_addr != 0 {
                lapic::set_base(m.lapic_addr);
            }
        }
        let functions = scan_bus(cfg, 0);
        used.extend(bar::used_ranges(cfg, &functions));
        Platform {
            cfg,
            functions,
            madt,
            used,
            clear_bars: boot.param("virtio.clear_bars") == Some("1"),
        }
    }

    /// The virtio functions of device type `kind` on bus 0, in BDF order.
    pub fn virtio_devices(&self, kind: u16) -> Vec<PciFunction> {
        self.functions
            .iter()
            .filter(|f| f.vendor == VENDOR && device_type(f.device) == Some(kind))
            .copied()
            .collect()
    }

    /// Make sure memory BAR `index` of `bdf` has an address below 4 GiB (see
    /// [`bar::ensure_assigned`]), avoiding every range already in use on bus 0.
    pub fn assign_bar(
        &mut self,
        bdf: crate::pci::Bdf,
        index: u8,
    ) -> Result<(bar::Bar, bool), &'static str> {
        bar::ensure_assigned(self.cfg, bdf, index, &mut self.used)
    }

    /// Open `func` as a virtio-pci modern device and print one line about it:
    /// `virtio: BB:DD.F NAME bars [N@0xADDR(+0xSIZE)[ assigned] ...] msix N|none`.
    ///
    /// With `virtio.clear_bars=1` on the command line the function's BARs are zeroed first, so
    /// the guest's own BAR assignment is exercised (a testing aid for firmware that assigns all).
    pub fn open(&mut self, func: PciFunction) -> Result<Transport, String> {
        if self.clear_bars && func.header_type == 0 {
            crate::pci::update_command(self.cfg, func.bdf, 0, crate::pci::command::MEMORY);
            for i in 0..6u16 {
                self.cfg.write32(func.bdf, 0x10 + 4 * i, 0);
            }
        }
        let t = Transport::open(self.cfg, func, &mut self.used)?;
        let bars: Vec<String> = t
            .bars
            .iter()
            .map(|&(i, a, s, assigned)| {
                format!(
                    "{i}@{a:#x}(+{s:#x}){}",
                    if assigned { " assigned" } else { "" }
                )
            })
            .collect();
        let msix = match &t.msix {
            Some(m) => format!("{}", m.entries),
            None => "none".into(),
        };
        println!(
            "virtio: {} {} bars {} msix {}",
            func.bdf,
            func.virtio_name().unwrap_or("virtio"),
            bars.join(" "),
            msix
        );
        Ok(t)
    }
}
