//! I/O APIC (82093AA-style MMIO: IOREGSEL at +0, IOWIN at +0x10) redirection entries.

/// Trigger mode of a redirection entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered.
    Edge,
    /// Level-triggered.
    Level,
}

/// Pin polarity of a redirection entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polarity {
    /// Active high.
    High,
    /// Active low (PCI INTx per ACPI `_PRT` convention).
    Low,
}

/// One I/O APIC at an MMIO address (from the MADT), serving GSIs from `gsi_base`.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    base: u64,
    /// First GSI of pin 0.
    pub gsi_base: u32,
}

const REG_VER: u32 = 0x01;
const MASKED: u32 = 1 << 16;

impl IoApic {
    /// The I/O APIC at `base` (must be in the identity-mapped, uncached top GiB).
    pub fn new(base: u64, gsi_base: u32) -> IoApic {
        IoApic { base, gsi_base }
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: IOREGSEL/IOWIN of the I/O APIC the MADT describes, identity mapped uncached.
        unsafe {
            core::ptr::write_volatile(self.base as *mut u32, reg);
            core::ptr::read_volatile((self.base + 0x10) as *const u32)
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::write_volatile(self.base as *mut u32, reg);
            core::ptr::write_volatile((self.base + 0x10) as *mut u32, value);
        }
    }

    /// Number of redirection entries (pins).
    pub fn pins(&self) -> u32 {
        ((self.read(REG_VER) >> 16) & 0xFF) + 1
    }

    /// Whether `gsi` is one of this I/O APIC's pins.
    pub fn serves(&self, gsi: u32) -> bool {
        gsi >= self.gsi_base && gsi - self.gsi_base < self.pins()
    }

    /// Program the entry for `gsi`: fixed delivery, physical destination `dest_apic`.
    pub fn route(
        &self,
        gsi: u32,
        vector: u8,
        trigger: Trigger,
        polarity: Polarity,
        dest_apic: u32,
    ) {
        let pin = gsi - self.gsi_base;
        let mut low = u32::from(vector);
        if polarity == Polarity::Low {
            low |= 1 << 13;
        }
        if trigger == Trigger::Level {
            low |= 1 << 15;
        }
        self.write(0x10 + 2 * pin, MASKED);
        self.write(0x11 + 2 * pin, dest_apic << 24);
        self.write(0x10 + 2 * pin, low);
    }

    /// Mask the entry for `gsi`.
    pub fn mask(&self, gsi: u32) {
        let pin = gsi - self.gsi_base;
        let low = self.read(0x10 + 2 * pin);
        self.write(0x10 + 2 * pin, low | MASKED);
    }

    /// Unmask the entry for `gsi` (a level-triggered line that is still asserted then
    /// interrupts again).
    pub fn unmask(&self, gsi: u32) {
        let pin = gsi - self.gsi_base;
        let low = self.read(0x10 + 2 * pin);
        self.write(0x10 + 2 * pin, low & !MASKED);
    }

    /// The MMIO base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Raw low dword of the entry for `gsi` (vector, flags, remote IRR in bit 14).
    pub fn entry_low(&self, gsi: u32) -> u32 {
        self.read(0x10 + 2 * (gsi - self.gsi_base))
    }
}
