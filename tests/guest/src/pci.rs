//! PCI configuration space access (ECAM and the legacy 0xCF8/0xCFC ports) and bus enumeration.

pub mod bar;
pub mod msi;
pub mod msix;

use alloc::vec::Vec;
use core::fmt;

use crate::arch::port::{inl, outl};

/// Bus/device/function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

/// A configuration space access mechanism.
pub trait ConfigSpace {
    /// Read the aligned dword at `reg`.
    fn read32(&self, bdf: Bdf, reg: u16) -> u32;
    /// Write the aligned dword at `reg`.
    fn write32(&self, bdf: Bdf, reg: u16, value: u32);

    /// Read a 16-bit field.
    fn read16(&self, bdf: Bdf, reg: u16) -> u16 {
        (self.read32(bdf, reg & !3) >> ((reg & 2) * 8)) as u16
    }
    /// Read an 8-bit field.
    fn read8(&self, bdf: Bdf, reg: u16) -> u8 {
        (self.read32(bdf, reg & !3) >> ((reg & 3) * 8)) as u8
    }
}

/// Legacy configuration mechanism #1: address at 0xCF8, data at 0xCFC (256-byte space).
pub struct PortIo;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

impl PortIo {
    fn address(bdf: Bdf, reg: u16) -> u32 {
        0x8000_0000
            | u32::from(bdf.bus) << 16
            | u32::from(bdf.dev) << 11
            | u32::from(bdf.func) << 8
            | u32::from(reg & 0xFC)
    }
}

impl ConfigSpace for PortIo {
    fn read32(&self, bdf: Bdf, reg: u16) -> u32 {
        outl(CONFIG_ADDRESS, Self::address(bdf, reg));
        inl(CONFIG_DATA)
    }

    fn write32(&self, bdf: Bdf, reg: u16, value: u32) {
        outl(CONFIG_ADDRESS, Self::address(bdf, reg));
        outl(CONFIG_DATA, value);
    }
}

/// Memory-mapped (ECAM) configuration space of one window.
pub struct Ecam {
    base: u64,
    start_bus: u8,
    end_bus: u8,
}

impl Ecam {
    /// An ECAM window whose bus `start_bus` is at `base`. None if it is not (fully) in the
    /// identity-mapped low 4 GiB.
    pub fn new(base: u64, start_bus: u8, end_bus: u8) -> Option<Ecam> {
        let size = (u64::from(end_bus.checked_sub(start_bus)?) + 1) << 20;
        (base != 0 && base.checked_add(size)? <= 1 << 32).then_some(Ecam {
            base,
            start_bus,
            end_bus,
        })
    }

    fn addr(&self, bdf: Bdf, reg: u16) -> Option<u64> {
        (self.start_bus..=self.end_bus).contains(&bdf.bus).then(|| {
            self.base
                + (u64::from(bdf.bus - self.start_bus) << 20)
                + (u64::from(bdf.dev) << 15)
                + (u64::from(bdf.func) << 12)
                + u64::from(reg & 0xFFC)
        })
    }
}

impl ConfigSpace for Ecam {
    fn read32(&self, bdf: Bdf, reg: u16) -> u32 {
        match self.addr(bdf, reg) {
            // SAFETY: the window lies in the identity-mapped, uncached top of the low 4 GiB
            // (checked in `new`); config reads have no side effects on memory we own.
            Some(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
            None => u32::MAX,
        }
    }

    fn write32(&self, bdf: Bdf, reg: u16, value: u32) {
        if let Some(a) = self.addr(bdf, reg) {
            // SAFETY: as in `read32`; the caller owns the device it configures.
            unsafe { core::ptr::write_volatile(a as *mut u32, value) }
        }
    }
}

/// A present PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass, programming interface (24 bits).
    pub class: u32,
    /// Header type (bit 7 masked off).
    pub header_type: u8,
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:06x}",
            self.bdf, self.vendor, self.device, self.class
        )
    }
}

impl PciFunction {
    /// The virtio device name ("virtio-blk", ...) when this is a virtio function.
    pub fn virtio_name(&self) -> Option<&'static str> {
        if self.vendor == 0x1af4 {
            virtio_name(self.device)
        } else {
            None
        }
    }

    /// A short human-readable description ("host bridge", "virtio-blk", ...).
    pub fn description(&self) -> &'static str {
        if self.vendor == 0x1af4 {
            if let Some(name) = virtio_name(self.device) {
                return name;
            }
        }
        class_name(self.class)
    }
}

fn virtio_name(device: u16) -> Option<&'static str> {
    let id = match device {
        0x1000..=0x103f => match device {
            0x1000 => 1,
            0x1001 => 2,
            0x1003 => 3,
            0x1005 => 4,
            _ => return None,
        },
        0x1040..=0x107f => device - 0x1040,
        _ => return None,
    };
    Some(match id {
        1 => "virtio-net",
        2 => "virtio-blk",
        3 => "virtio-console",
        4 => "virtio-rng",
        5 => "virtio-balloon",
        9 => "virtio-9p",
        16 => "virtio-gpu",
        19 => "virtio-vsock",
        23 => "virtio-iommu",
        24 => "virtio-mem",
        26 => "virtio-fs",
        _ => "virtio device",
    })
}

/// Name of a (class, subclass) pair.
pub fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0106 => "SATA controller",
        0x0108 => "NVMe controller",
        0x0200 => "ethernet controller",
        0x0300 => "VGA controller",
        0x0600 => "host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0700 => "serial controller",
        0x0c03 => "USB controller",
        0x0c05 => "SMBus controller",
        0x0880 => "system peripheral",
        0x1300..=0x13ff => "non-essential instrumentation",
        0xff00..=0xffff => "unassigned class",
        _ => "PCI device",
    }
}

/// Probe one function; None if absent (vendor 0xFFFF or 0).
pub fn probe(cfg: &dyn ConfigSpace, bdf: Bdf) -> Option<PciFunction> {
    let id = cfg.read32(bdf, 0);
    let vendor = id as u16;
    if vendor == 0xFFFF || vendor == 0 {
        return None;
    }
    Some(PciFunction {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class: cfg.read32(bdf, 8) >> 8,
        header_type: cfg.read8(bdf, 0x0E) & 0x7F,
    })
}

/// Every function on `bus`, in BDF order. Functions 1..7 are probed only when function 0's
/// header type has the multi-function bit (7) set.
pub fn scan_bus(cfg: &dyn ConfigSpace, bus: u8) -> Vec<PciFunction> {
    let mut found = Vec::new();
    for dev in 0..32 {
        let f0 = Bdf { bus, dev, func: 0 };
        let Some(first) = probe(cfg, f0) else {
            continue;
        };
        found.push(first);
        if cfg.read8(f0, 0x0E) & 0x80 != 0 {
            found.extend((1..8).filter_map(|func| probe(cfg, Bdf { bus, dev, func })));
        }
    }
    found
}

/// Command register bits.
pub mod command {
    /// I/O space decoding.
    pub const IO: u16 = 1 << 0;
    /// Memory space decoding.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus mastering (DMA, MSI).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Read the command register.
pub fn read_command(cfg: &dyn ConfigSpace, bdf: Bdf) -> u16 {
    cfg.read16(bdf, 0x04)
}

/// Write the command register (the status half of the dword is written as 0: its bits are
/// read-only or write-1-to-clear).
pub fn write_command(cfg: &dyn ConfigSpace, bdf: Bdf, value: u16) {
    cfg.write32(bdf, 0x04, u32::from(value));
}

/// Set and clear command register bits.
pub fn update_command(cfg: &dyn ConfigSpace, bdf: Bdf, set: u16, clear: u16) {
    let cmd = read_command(cfg, bdf);
    write_command(cfg, bdf, (cmd & !clear) | set);
}

/// Write a 16-bit field (read-modify-write of its dword).
pub fn write16(cfg: &dyn ConfigSpace, bdf: Bdf, reg: u16, value: u16) {
    let shift = (reg & 2) * 8;
    let old = cfg.read32(bdf, reg & !3);
    let new = (old & !(0xFFFF << shift)) | (u32::from(value) << shift);
    cfg.write32(bdf, reg & !3, new);
}

/// Offsets of the capabilities in the standard list, in list order (bounded against loops).
/// Each item is `(offset, capability id)`.
pub fn capabilities(cfg: &dyn ConfigSpace, bdf: Bdf) -> Vec<(u16, u8)> {
    let mut caps = Vec::new();
    if cfg.read16(bdf, 0x06) & (1 << 4) == 0 {
        return caps;
    }
    let mut ptr = u16::from(cfg.read8(bdf, 0x34) & 0xFC);
    while ptr >= 0x40 && caps.len() < 48 {
        caps.push((ptr, cfg.read8(bdf, ptr)));
        ptr = u16::from(cfg.read8(bdf, ptr + 1) & 0xFC);
    }
    caps
}
