//! A type-0 PCI configuration header with per-register write masks, capabilities and BARs.

use thiserror::Error;

use devices::legacy::{StateReader, StateWriter};
use migration::StateError;

/// Registers (dwords) in the legacy 256-byte configuration space.
pub const NUM_CONFIGURATION_REGISTERS: usize = 64;
/// Registers (dwords) in the 4 KiB PCI Express extended configuration space.
pub const NUM_EXTENDED_CONFIGURATION_REGISTERS: usize = 1024;
/// Number of BAR registers in a type-0 header.
pub const NUM_BAR_REGS: usize = 6;

/// Register index of the vendor / device id.
pub const VENDOR_DEVICE_REG: usize = 0;
/// Register index of the command / status registers.
pub const COMMAND_STATUS_REG: usize = 1;
/// Register index of the revision id and class code.
pub const CLASS_REG: usize = 2;
/// Register index of cache line size, latency timer, header type and BIST.
pub const HEADER_TYPE_REG: usize = 3;
/// Register index of BAR 0.
pub const BAR0_REG: usize = 4;
/// Register index of the subsystem vendor / subsystem id.
pub const SUBSYSTEM_REG: usize = 11;
/// Register index of the expansion ROM BAR.
pub const ROM_BAR_REG: usize = 12;
/// Register index of the capabilities pointer.
pub const CAPABILITY_POINTER_REG: usize = 13;
/// Register index of interrupt line / pin, min grant and max latency.
pub const INTERRUPT_REG: usize = 15;

/// Command register: I/O space decoding enabled.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: bus mastering (DMA) enabled.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: parity error response.
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
/// Command register: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command register: legacy INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command register bits a guest may change.
pub const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

/// Status register: INTx asserted (read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status register: the capability list is valid (read-only).
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status register bits that are write-1-to-clear (error reporting bits).
pub const STATUS_W1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// Header type register: multi-function device.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Header type 0 (general device).
pub const HEADER_TYPE_DEVICE: u8 = 0x00;

/// First byte offset available for capabilities.
pub const FIRST_CAPABILITY_OFFSET: usize = 0x40;
/// End (exclusive) of the standard capability area.
pub const CAPABILITY_AREA_END: usize = 0x100;

/// Capability id: power management.
pub const CAP_ID_POWER_MANAGEMENT: u8 = 0x01;
/// Capability id: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability id: vendor specific (used by virtio-pci).
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;
/// Capability id: PCI Express.
pub const CAP_ID_PCI_EXPRESS: u8 = 0x10;
/// Capability id: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// Version of the configuration-space state encoding.
pub const PCI_CONFIGURATION_STATE_VERSION: u16 = 1;

const BAR_IO_TYPE: u32 = 0x1;
const BAR_MEM64_TYPE: u32 = 0x4;
const BAR_PREFETCHABLE: u32 = 0x8;
const BAR_IO_ADDR_MASK: u32 = 0xFFFF_FFFC;
const BAR_MEM_ADDR_MASK: u32 = 0xFFFF_FFF0;

/// Errors from building a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// BAR index past the last BAR (or the last BAR for a 64-bit BAR).
    #[error("BAR index {0} is invalid for this BAR kind")]
    BarIndex(usize),
    /// The BAR register (or the upper half of a 64-bit BAR) is already used.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// Size not a power of two or outside the range the kind allows.
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    BarSize {
        /// Requested size.
        size: u64,
        /// Requested kind.
        kind: BarKind,
    },
    /// Address not aligned to the size or not reachable for the kind.
    #[error("invalid address {addr:#x} for a {kind:?} BAR of size {size:#x}")]
    BarAddress {
        /// Requested address.
        addr: u64,
        /// Requested size.
        size: u64,
        /// Requested kind.
        kind: BarKind,
    },
    /// A capability needs at least its id and next-pointer bytes.
    #[error("capability of {0} bytes is too short")]
    CapabilityTooShort(usize),
    /// No room left in the capability area.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32 {
        /// Prefetchable memory.
        prefetchable: bool,
    },
    /// 64-bit memory; uses two consecutive BAR registers.
    Mem64 {
        /// Prefetchable memory.
        prefetchable: bool,
    },
}

impl BarKind {
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_TYPE,
            BarKind::Mem32 { prefetchable } => {
                if prefetchable {
                    BAR_PREFETCHABLE
                } else {
                    0
                }
            }
            BarKind::Mem64 { prefetchable } => {
                BAR_MEM64_TYPE | if prefetchable { BAR_PREFETCHABLE } else { 0 }
            }
        }
    }

    fn addr_mask(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_ADDR_MASK,
            _ => BAR_MEM_ADDR_MASK,
        }
    }
}

/// A BAR registered with [`PciConfiguration::add_bar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// Size in bytes (a power of two).
    pub size: u64,
    /// What it decodes.
    pub kind: BarKind,
}

/// A guest write that moved a BAR: the VMM should move the device's range on its bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index (the lower register of a 64-bit BAR).
    pub index: usize,
    /// Address the BAR decoded before the write.
    pub old_addr: u64,
    /// Address it decodes now.
    pub new_addr: u64,
    /// BAR size.
    pub size: u64,
    /// BAR kind.
    pub kind: BarKind,
}

/// Identity of a type-0 function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Base class code.
    pub class_code: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// Set the multi-function bit of the header type.
    pub multifunction: bool,
}

/// Size of a configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSpaceSize {
    /// 256 bytes (conventional PCI).
    Legacy,
    /// 4 KiB (PCI Express, reachable through ECAM).
    Extended,
}

impl ConfigSpaceSize {
    /// Number of 32-bit registers.
    pub fn registers(self) -> usize {
        match self {
            ConfigSpaceSize::Legacy => NUM_CONFIGURATION_REGISTERS,
            ConfigSpaceSize::Extended => NUM_EXTENDED_CONFIGURATION_REGISTERS,
        }
    }
}

/// A type-0 configuration space.
///
/// Registers outside the space (e.g. the extended area of a 256-byte space) read as 0 and ignore
/// writes. Every register has a writable-bit mask; the status register has write-1-to-clear bits.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    writable: Vec<u32>,
    w1c: Vec<u32>,
    bars: [Option<BarInfo>; NUM_BAR_REGS],
    /// Upper halves of 64-bit BARs.
    bar_upper: [bool; NUM_BAR_REGS],
    /// The address each BAR decoded after the last reported move.
    bar_addr: [u64; NUM_BAR_REGS],
    last_capability: Option<(usize, usize)>,
}

impl PciConfiguration {
    /// A configuration space for `header`, of `size`, with no BARs and no capabilities.
    pub fn new(header: &PciHeader, size: ConfigSpaceSize) -> Self {
        let n = size.registers();
        let mut registers = vec![0u32; n];
        let mut writable = vec![0u32; n];
        let mut w1c = vec![0u32; n];

        registers[VENDOR_DEVICE_REG] =
            u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        writable[COMMAND_STATUS_REG] = u32::from(COMMAND_WRITABLE);
        w1c[COMMAND_STATUS_REG] = u32::from(STATUS_W1C) << 16;
        registers[CLASS_REG] = u32::from(header.class_code) << 24
            | u32::from(header.subclass) << 16
            | u32::from(header.prog_if) << 8
            | u32::from(header.revision_id);
        let header_type = HEADER_TYPE_DEVICE
            | if header.multifunction {
                HEADER_TYPE_MULTIFUNCTION
            } else {
                0
            };
        registers[HEADER_TYPE_REG] = u32::from(header_type) << 16;
        // Cache line size.
        writable[HEADER_TYPE_REG] = 0x0000_00FF;
        registers[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        // Interrupt line.
        writable[INTERRUPT_REG] = 0x0000_00FF;

        Self {
            registers,
            writable,
            w1c,
            bars: [None; NUM_BAR_REGS],
            bar_upper: [false; NUM_BAR_REGS],
            bar_addr: [0; NUM_BAR_REGS],
            last_capability: None,
        }
    }

    /// Number of 32-bit registers in this space.
    pub fn num_registers(&self) -> usize {
        self.registers.len()
    }

    /// Read register `reg_idx` (0 outside the space).
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(0)
    }

    /// Read `data.len()` (1, 2 or 4) bytes at byte `offset` of the space; all ones when the access
    /// crosses a register boundary.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        let within = offset % 4;
        if !matches!(data.len(), 1 | 2 | 4) || within + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let v = self.read_reg(offset / 4).to_le_bytes();
        data.copy_from_slice(&v[within..within + data.len()]);
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` within register `reg_idx`.
    ///
    /// Only writable bits change; status bits written as 1 are cleared. Returns the BAR move the
    /// write caused, if any. Writes that size a BAR (all address bits set) are not reported, and
    /// neither is restoring the BAR's address afterwards.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let offset = usize::try_from(offset).ok().filter(|&o| o < 4)?;
        if reg_idx >= self.registers.len()
            || !matches!(data.len(), 1 | 2 | 4)
            || offset + data.len() > 4
        {
            return None;
        }
        let mut value_bytes = [0u8; 4];
        let mut touched_bytes = [0u8; 4];
        value_bytes[offset..offset + data.len()].copy_from_slice(data);
        touched_bytes[offset..offset + data.len()].fill(0xff);
        let value = u32::from_le_bytes(value_bytes);
        let touched = u32::from_le_bytes(touched_bytes);

        let writable = self.writable[reg_idx] & touched;
        let old = self.registers[reg_idx];
        let mut new = (old & !writable) | (value & writable);
        new &= !(value & self.w1c[reg_idx] & touched);
        self.registers[reg_idx] = new;

        self.bar_moved(reg_idx)
    }

    /// Replace the writable-bit mask of `reg_idx` (e.g. for an MSI-X message-control register).
    pub fn set_writable_bits(&mut self, reg_idx: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg_idx) {
            *w = mask;
        }
    }

    /// The writable-bit mask of `reg_idx` (0 outside the space).
    pub fn writable_bits(&self, reg_idx: usize) -> u32 {
        self.writable.get(reg_idx).copied().unwrap_or(0)
    }

    /// Set a register's value as the device (not the guest) sees fit, ignoring write masks.
    pub fn set_reg(&mut self, reg_idx: usize, value: u32) {
        if let Some(r) = self.registers.get_mut(reg_idx) {
            *r = value;
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_reg(COMMAND_STATUS_REG) as u16
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        (self.read_reg(COMMAND_STATUS_REG) >> 16) as u16
    }

    /// Set status bits (device-side, e.g. an error); the guest clears them by writing 1.
    pub fn set_status_bits(&mut self, bits: u16) {
        self.registers[COMMAND_STATUS_REG] |= u32::from(bits) << 16;
    }

    /// Set the interrupt pin (1 = INTA# .. 4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let r = &mut self.registers[INTERRUPT_REG];
        *r = (*r & !0xFF00) | u32::from(pin) << 8;
    }

    /// Set the interrupt line register (what firmware stores: the GSI INTx is routed to).
    pub fn set_interrupt_line(&mut self, line: u8) {
        let r = &mut self.registers[INTERRUPT_REG];
        *r = (*r & !0xFF) | u32::from(line);
    }

    /// Append a capability whose first byte is its id. Its second byte (the next pointer) is
    /// filled in, the previous capability (or the capabilities pointer) is linked to it, and status
    /// bit 4 is set. The capability's body is read-only; use [`Self::set_writable_bits`] for
    /// registers the guest may change. Returns its byte offset (4-byte aligned, from 0x40).
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize, PciConfigError> {
        if data.len() < 2 {
            return Err(PciConfigError::CapabilityTooShort(data.len()));
        }
        let offset = match self.last_capability {
            Some((off, len)) => (off + len).next_multiple_of(4),
            None => FIRST_CAPABILITY_OFFSET,
        };
        if offset + data.len() > CAPABILITY_AREA_END {
            return Err(PciConfigError::CapabilitySpace(data.len()));
        }
        for (i, &b) in data.iter().enumerate() {
            let v = if i == 1 { 0 } else { b };
            self.write_byte_internal(offset + i, v);
        }
        match self.last_capability {
            Some((prev, _)) => self.write_byte_internal(prev + 1, offset as u8),
            None => self.write_byte_internal(CAPABILITY_POINTER_REG * 4, offset as u8),
        }
        self.set_status_bits(STATUS_CAPABILITIES_LIST);
        self.last_capability = Some((offset, data.len()));
        Ok(offset)
    }

    fn write_byte_internal(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.registers[offset / 4];
        *r = (*r & !(0xFF << shift)) | u32::from(value) << shift;
    }

    /// Register BAR `index` of `size` bytes decoding `kind` at `addr`.
    ///
    /// `size` is a power of two (I/O: 4..=64 KiB, 32-bit memory: 16 B..=2 GiB, 64-bit memory: from
    /// 16 B); `addr` is aligned to `size` and reachable for the kind. A 64-bit BAR also takes
    /// register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
        addr: u64,
    ) -> Result<(), PciConfigError> {
        let is64 = matches!(kind, BarKind::Mem64 { .. });
        if index >= NUM_BAR_REGS || (is64 && index + 1 >= NUM_BAR_REGS) {
            return Err(PciConfigError::BarIndex(index));
        }
        if self.bar_used(index) || (is64 && self.bar_used(index + 1)) {
            return Err(PciConfigError::BarInUse(index));
        }
        // Smallest and largest size, and the last address the BAR can decode.
        let (min, max, last_addr) = match kind {
            BarKind::Io => (4, 1 << 16, 0xFFFF),
            BarKind::Mem32 { .. } => (16, 1 << 31, 0xFFFF_FFFF),
            BarKind::Mem64 { .. } => (16, 1 << 63, u64::MAX),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciConfigError::BarSize { size, kind });
        }
        let fits = addr
            .checked_add(size - 1)
            .is_some_and(|last| last <= last_addr);
        if addr & (size - 1) != 0 || !fits {
            return Err(PciConfigError::BarAddress { addr, size, kind });
        }

        let mask = !(size - 1);
        let reg = BAR0_REG + index;
        self.registers[reg] = (addr as u32 & kind.addr_mask()) | kind.type_bits();
        self.writable[reg] = mask as u32 & kind.addr_mask();
        if is64 {
            self.registers[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
            self.bar_upper[index + 1] = true;
        }
        self.bars[index] = Some(BarInfo { size, kind });
        self.bar_addr[index] = addr;
        Ok(())
    }

    /// Move BAR `index` to `addr` on the device's (VMM's) behalf, e.g. after allocating its
    /// address; not reported as a guest move. `addr` must be aligned to the BAR size and
    /// reachable for its kind.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciConfigError> {
        let info = self.bar(index).ok_or(PciConfigError::BarIndex(index))?;
        let last_addr = match info.kind {
            BarKind::Io => 0xFFFF,
            BarKind::Mem32 { .. } => 0xFFFF_FFFF,
            BarKind::Mem64 { .. } => u64::MAX,
        };
        let fits = addr
            .checked_add(info.size - 1)
            .is_some_and(|last| last <= last_addr);
        if addr & (info.size - 1) != 0 || !fits {
            return Err(PciConfigError::BarAddress {
                addr,
                size: info.size,
                kind: info.kind,
            });
        }
        let reg = BAR0_REG + index;
        self.registers[reg] = (addr as u32 & info.kind.addr_mask()) | info.kind.type_bits();
        if matches!(info.kind, BarKind::Mem64 { .. }) {
            self.registers[reg + 1] = (addr >> 32) as u32;
        }
        self.bar_addr[index] = addr;
        Ok(())
    }

    fn bar_used(&self, index: usize) -> bool {
        self.bars[index].is_some() || self.bar_upper[index]
    }

    /// The BAR registered at `index` (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently decodes, as programmed by the guest.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let info = self.bar(index)?;
        let reg = BAR0_REG + index;
        let low = u64::from(self.registers[reg] & info.kind.addr_mask());
        Some(match info.kind {
            BarKind::Mem64 { .. } => u64::from(self.registers[reg + 1]) << 32 | low,
            _ => low,
        })
    }

    /// Compare the programmed address of the BAR register `reg_idx` belongs to with the last one
    /// reported, and report (and remember) a change.
    fn bar_moved(&mut self, reg_idx: usize) -> Option<BarMove> {
        if !(BAR0_REG..BAR0_REG + NUM_BAR_REGS).contains(&reg_idx) {
            return None;
        }
        let mut index = reg_idx - BAR0_REG;
        if self.bar_upper[index] {
            index -= 1;
        }
        let info = self.bar(index)?;
        let reg = BAR0_REG + index;
        let sizing = |r: usize| {
            let w = self.writable[r];
            w != 0 && self.registers[r] & w == w
        };
        let is64 = matches!(info.kind, BarKind::Mem64 { .. });
        if sizing(reg) || (is64 && sizing(reg + 1)) {
            return None;
        }
        let new_addr = self.bar_address(index)?;
        let old_addr = self.bar_addr[index];
        if new_addr == old_addr {
            return None;
        }
        self.bar_addr[index] = new_addr;
        Some(BarMove {
            index,
            old_addr,
            new_addr,
            size: info.size,
            kind: info.kind,
        })
    }

    /// Append the guest-visible state (registers and the last reported BAR addresses) to `w`.
    pub fn save(&self, w: &mut StateWriter) {
        w.u16(PCI_CONFIGURATION_STATE_VERSION)
            .u32(self.registers.len() as u32);
        for r in &self.registers {
            w.u32(*r);
        }
        for a in &self.bar_addr {
            w.u64(*a);
        }
    }

    /// Read state written by [`Self::save`] into this space, which must have been built with the
    /// same size (BARs, capabilities and masks come from construction, not from the state).
    pub fn restore(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let version = r.u16()?;
        if version != PCI_CONFIGURATION_STATE_VERSION {
            return Err(r.malformed(format!(
                "configuration space state version {version} is not supported"
            )));
        }
        let n = r.u32()? as usize;
        if n != self.registers.len() {
            return Err(r.malformed(format!(
                "configuration space has {n} registers, expected {}",
                self.registers.len()
            )));
        }
        let mut regs = Vec::with_capacity(n);
        for _ in 0..n {
            regs.push(r.u32()?);
        }
        let mut addrs = [0u64; NUM_BAR_REGS];
        for a in &mut addrs {
            *a = r.u64()?;
        }
        self.registers = regs;
        self.bar_addr = addrs;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(
            &PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1041,
                revision_id: 1,
                class_code: 0x02,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x1100,
                multifunction: false,
            },
            ConfigSpaceSize::Extended,
        )
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) -> Option<BarMove> {
        c.write_reg(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn identity_registers_are_read_only() {
        let mut c = cfg();
        assert_eq!(c.read_reg(0), 0x1041_1af4);
        assert_eq!(c.read_reg(CLASS_REG), 0x0200_0001);
        assert_eq!(c.read_reg(SUBSYSTEM_REG), 0x1100_1af4);
        for reg in [
            0,
            CLASS_REG,
            SUBSYSTEM_REG,
            CAPABILITY_POINTER_REG,
            ROM_BAR_REG,
        ] {
            let before = c.read_reg(reg);
            write32(&mut c, reg, 0xFFFF_FFFF);
            assert_eq!(c.read_reg(reg), before, "register {reg}");
        }
        // Header type stays 0, cache line size is writable.
        write32(&mut c, HEADER_TYPE_REG, 0xFFFF_FFFF);
        assert_eq!(c.read_reg(HEADER_TYPE_REG), 0x0000_00FF);
        // Out-of-range registers read 0 and do not panic.
        assert_eq!(c.read_reg(5000), 0);
        write32(&mut c, 5000, 1);
    }

    #[test]
    fn command_writable_and_status_w1c() {
        let mut c = cfg();
        write32(&mut c, COMMAND_STATUS_REG, 0xFFFF_FFFF);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert_eq!(c.status(), 0);
        c.set_status_bits(1 << 13 | 1 << 14 | STATUS_CAPABILITIES_LIST);
        // Writing 0 keeps them; a word write of 1 << 13 to the status clears only that bit.
        c.write_reg(COMMAND_STATUS_REG, 2, &0u16.to_le_bytes());
        assert_eq!(c.status(), 1 << 13 | 1 << 14 | STATUS_CAPABILITIES_LIST);
        c.write_reg(COMMAND_STATUS_REG, 2, &(1u16 << 13).to_le_bytes());
        assert_eq!(c.status(), 1 << 14 | STATUS_CAPABILITIES_LIST);
        // A command-only word write does not clear status bits.
        c.write_reg(COMMAND_STATUS_REG, 0, &0xFFFFu16.to_le_bytes());
        assert_eq!(c.status(), 1 << 14 | STATUS_CAPABILITIES_LIST);
        // Read-only status bits stay set whatever is written.
        write32(&mut c, COMMAND_STATUS_REG, 0xFFFF_0000);
        assert_eq!(c.status(), STATUS_CAPABILITIES_LIST);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn byte_and_word_writes() {
        let mut c = cfg();
        c.write_reg(INTERRUPT_REG, 0, &[0x0b]);
        c.set_interrupt_pin(1);
        assert_eq!(c.read_reg(INTERRUPT_REG), 0x010b);
        c.write_reg(INTERRUPT_REG, 1, &[0x04]); // pin is read-only
        assert_eq!(c.read_reg(INTERRUPT_REG), 0x010b);
        c.write_reg(COMMAND_STATUS_REG, 0, &[0x06]);
        assert_eq!(c.command(), 0x6);
        c.write_reg(COMMAND_STATUS_REG, 1, &[0x04]);
        assert_eq!(c.command(), 0x406);
        // Bad sizes and accesses crossing the register are ignored.
        c.write_reg(INTERRUPT_REG, 3, &[1, 2]);
        c.write_reg(INTERRUPT_REG, 0, &[1, 2, 3]);
        c.write_reg(INTERRUPT_REG, u64::MAX, &[1]);
        assert_eq!(c.read_reg(INTERRUPT_REG), 0x010b);
        let mut b = [0u8; 2];
        c.read_bytes(INTERRUPT_REG * 4, &mut b);
        assert_eq!(b, [0x0b, 0x01]);
        c.read_bytes(INTERRUPT_REG * 4 + 3, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn bar_sizing_32bit_and_io() {
        let mut c = cfg();
        c.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0xc000_0000,
        )
        .unwrap();
        c.add_bar(1, 0x20, BarKind::Io, 0x1000).unwrap();
        c.add_bar(
            2,
            0x10_0000,
            BarKind::Mem32 { prefetchable: true },
            0xc010_0000,
        )
        .unwrap();
        assert_eq!(c.read_reg(BAR0_REG), 0xc000_0000);
        assert_eq!(c.read_reg(BAR0_REG + 1), 0x1001);
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xc010_0008);

        assert_eq!(write32(&mut c, BAR0_REG, 0xFFFF_FFFF), None);
        assert_eq!(c.read_reg(BAR0_REG), 0xFFFF_F000);
        assert_eq!(write32(&mut c, BAR0_REG + 1, 0xFFFF_FFFF), None);
        assert_eq!(c.read_reg(BAR0_REG + 1), 0xFFFF_FFE1);
        write32(&mut c, BAR0_REG + 2, 0xFFFF_FFFF);
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xFFF0_0008);
        // Restoring the address is not a move; a new address is.
        assert_eq!(write32(&mut c, BAR0_REG, 0xc000_0000), None);
        let m = write32(&mut c, BAR0_REG, 0xd000_0123).unwrap();
        assert_eq!(
            m,
            BarMove {
                index: 0,
                old_addr: 0xc000_0000,
                new_addr: 0xd000_0000,
                size: 0x1000,
                kind: BarKind::Mem32 {
                    prefetchable: false
                }
            }
        );
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        // Unused BARs read 0 and stay 0.
        write32(&mut c, BAR0_REG + 5, 0xFFFF_FFFF);
        assert_eq!(c.read_reg(BAR0_REG + 5), 0);
    }

    #[test]
    fn bar_sizing_64bit() {
        let mut c = cfg();
        let kind = BarKind::Mem64 { prefetchable: true };
        c.add_bar(2, 0x4000_0000, kind, 0x1_4000_0000).unwrap();
        assert_eq!(c.read_reg(BAR0_REG + 2), 0x4000_000C);
        assert_eq!(c.read_reg(BAR0_REG + 3), 0x1);
        // The upper half is taken.
        assert_eq!(
            c.add_bar(3, 16, BarKind::Io, 0),
            Err(PciConfigError::BarInUse(3))
        );
        // Linux sizes low then high, restoring each.
        write32(&mut c, BAR0_REG + 2, 0xFFFF_FFFF);
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xC000_000C);
        assert_eq!(write32(&mut c, BAR0_REG + 2, 0x4000_0000), None);
        assert_eq!(write32(&mut c, BAR0_REG + 3, 0xFFFF_FFFF), None);
        assert_eq!(c.read_reg(BAR0_REG + 3), 0xFFFF_FFFF);
        assert_eq!(write32(&mut c, BAR0_REG + 3, 0x1), None);
        // Moving the upper half reports the whole address.
        let m = write32(&mut c, BAR0_REG + 3, 0x2).unwrap();
        assert_eq!(
            (m.index, m.old_addr, m.new_addr),
            (2, 0x1_4000_0000, 0x2_4000_0000)
        );

        // A BAR above 4 GiB in size: the upper register has writable bits.
        let mut c = cfg();
        c.add_bar(0, 1 << 34, kind, 1 << 36).unwrap();
        write32(&mut c, BAR0_REG, 0xFFFF_FFFF);
        write32(&mut c, BAR0_REG + 1, 0xFFFF_FFFF);
        assert_eq!(c.read_reg(BAR0_REG), 0x0000_000C);
        assert_eq!(c.read_reg(BAR0_REG + 1), 0xFFFF_FFFC);
    }

    #[test]
    fn set_bar_address_is_not_a_guest_move() {
        let mut c = cfg();
        let kind = BarKind::Mem64 {
            prefetchable: false,
        };
        c.add_bar(0, 0x4000, kind, 0).unwrap();
        c.set_bar_address(0, 0x10_0000_4000).unwrap();
        assert_eq!(c.bar_address(0), Some(0x10_0000_4000));
        assert_eq!(c.read_reg(BAR0_REG), 0x4004);
        assert_eq!(write32(&mut c, BAR0_REG, 0x4000), None);
        assert!(c.set_bar_address(0, 0x2000).is_err());
        assert!(c.set_bar_address(1, 0).is_err());
        assert!(c.set_bar_address(0, u64::MAX - 0x3fff + 1).is_err());
    }

    #[test]
    fn bar_validation() {
        let mut c = cfg();
        let m32 = BarKind::Mem32 {
            prefetchable: false,
        };
        let m64 = BarKind::Mem64 {
            prefetchable: false,
        };
        assert!(matches!(
            c.add_bar(6, 16, m32, 0),
            Err(PciConfigError::BarIndex(6))
        ));
        assert!(matches!(
            c.add_bar(5, 16, m64, 0),
            Err(PciConfigError::BarIndex(5))
        ));
        assert!(matches!(
            c.add_bar(0, 24, m32, 0),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 8, m32, 0),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 2, BarKind::Io, 0),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 0x1000, m32, 0x800),
            Err(PciConfigError::BarAddress { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 0x1000, m32, 1 << 32),
            Err(PciConfigError::BarAddress { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 0x10, BarKind::Io, 0x1_0000),
            Err(PciConfigError::BarAddress { .. })
        ));
        c.add_bar(4, 1 << 63, m64, 1 << 63).unwrap();
        c.add_bar(1, 0x100, m32, 0).unwrap();
        assert_eq!(
            c.add_bar(1, 0x100, m32, 0),
            Err(PciConfigError::BarInUse(1))
        );
        assert_eq!(c.add_bar(0, 16, m64, 0), Err(PciConfigError::BarInUse(0)));
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        assert_eq!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_reg(CAPABILITY_POINTER_REG), 0);
        let a = c
            .add_capability(&[CAP_ID_VENDOR_SPECIFIC, 0xEE, 5, 1, 2])
            .unwrap();
        let b = c
            .add_capability(&[CAP_ID_MSIX, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let d = c.add_capability(&[CAP_ID_PCI_EXPRESS, 0]).unwrap();
        assert_eq!((a, b, d), (0x40, 0x48, 0x54));
        assert_eq!(
            c.status() & STATUS_CAPABILITIES_LIST,
            STATUS_CAPABILITIES_LIST
        );
        assert_eq!(c.read_reg(CAPABILITY_POINTER_REG) & 0xff, 0x40);

        // Walk the list the way a guest does.
        let mut ptr = c.read_reg(CAPABILITY_POINTER_REG) as usize & 0xfc;
        let mut ids = Vec::new();
        while ptr != 0 {
            let r = c.read_reg(ptr / 4) >> ((ptr % 4) * 8);
            ids.push(r as u8);
            ptr = (r >> 8) as usize & 0xfc;
        }
        assert_eq!(
            ids,
            [CAP_ID_VENDOR_SPECIFIC, CAP_ID_MSIX, CAP_ID_PCI_EXPRESS]
        );
        // Body bytes are kept, the placeholder next pointer is not.
        assert_eq!(c.read_reg(0x40 / 4), 0x0105_4809);
        assert_eq!(c.read_reg(0x44 / 4) & 0xff, 2);
        // Capabilities are read-only unless made writable.
        write32(&mut c, 0x40 / 4, 0);
        assert_eq!(c.read_reg(0x40 / 4), 0x0105_4809);

        assert_eq!(
            c.add_capability(&[1]),
            Err(PciConfigError::CapabilityTooShort(1))
        );
        assert_eq!(
            c.add_capability(&[0; 200]),
            Err(PciConfigError::CapabilitySpace(200))
        );
    }

    #[test]
    fn save_restore_round_trip() {
        let mut c = cfg();
        c.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0xc000_0000,
        )
        .unwrap();
        write32(&mut c, COMMAND_STATUS_REG, 0x6);
        write32(&mut c, BAR0_REG, 0xd000_0000);
        let mut w = StateWriter::new();
        c.save(&mut w);
        let bytes = w.into_bytes();

        let mut d = cfg();
        d.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0xc000_0000,
        )
        .unwrap();
        let mut r = StateReader::from_bytes("dev", &bytes);
        d.restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(d.command(), 0x6);
        assert_eq!(d.bar_address(0), Some(0xd000_0000));
        assert_eq!(write32(&mut d, BAR0_REG, 0xd000_0000), None);

        let mut r = StateReader::from_bytes("dev", &bytes[..bytes.len() - 1]);
        assert!(d.restore(&mut r).is_err());
        let mut legacy = PciConfiguration::new(&PciHeader::default(), ConfigSpaceSize::Legacy);
        let mut r = StateReader::from_bytes("dev", &bytes);
        assert!(legacy.restore(&mut r).is_err());
    }
}
