//! PCI configuration space (region 7) of the test device: type 0 header, BAR0 32-bit 4 KiB,
//! BAR2 64-bit prefetchable, the device memory's size (1 MiB by default, `--memory-mib`),
//! interrupt pin A, an MSI-X capability and, optionally (`--msi`),
//! an MSI capability after it (64-bit address, per-vector masking).

use crate::regs;

/// Config space size.
pub const CONFIG_SIZE: usize = 256;
/// Offset of the MSI-X capability.
pub const MSIX_CAP: usize = 0x40;
/// Offset of the MSI capability (present with `--msi`): 24 bytes (64-bit, per-vector masking).
pub const MSI_CAP: usize = 0x50;
/// MSI capability ID.
pub const MSI_CAP_ID: u8 = 0x05;
/// MSI control: enable.
pub const MSI_CTRL_ENABLE: u16 = 1 << 0;
/// MSI control: 64-bit address capable.
pub const MSI_CTRL_64BIT: u16 = 1 << 7;
/// MSI control: per-vector masking capable.
pub const MSI_CTRL_PVM: u16 = 1 << 8;
/// Offsets inside the MSI capability (64-bit layout).
const MSI_CONTROL: usize = MSI_CAP + 2;
const MSI_ADDR_LO: usize = MSI_CAP + 4;
const MSI_ADDR_HI: usize = MSI_CAP + 8;
const MSI_DATA: usize = MSI_CAP + 0x0c;
const MSI_MASK: usize = MSI_CAP + 0x10;
const MSI_PENDING: usize = MSI_CAP + 0x14;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
/// Command register: INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
const STATUS_INTX: u16 = 1 << 3;
const STATUS_CAP_LIST: u16 = 1 << 4;
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
const MSIX_CTRL_MASK: u16 = 1 << 14;

/// Config space bytes plus the mask of bits a client may write.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    /// BAR2's size (what BAR sizing reports).
    memory_size: u64,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// The power-on config space without an MSI capability.
    pub fn new() -> ConfigSpace {
        Self::with_msi(false)
    }

    /// The power-on config space with the default device memory size; `msi` adds the MSI
    /// capability (chained after MSI-X).
    pub fn with_msi(msi: bool) -> ConfigSpace {
        Self::with(msi, regs::DEVICE_MEMORY_SIZE)
    }

    /// The power-on config space; `msi` adds the MSI capability (chained after MSI-X), BAR2 is
    /// `memory_size` bytes (a power of two, [`regs::DEVICE_MEMORY_SIZE`] up to
    /// [`regs::MAX_DEVICE_MEMORY_SIZE`]; the command line checks it).
    pub fn with(msi: bool, memory_size: u64) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            memory_size,
        };
        c.put16(0x00, regs::VENDOR_ID);
        c.put16(0x02, regs::DEVICE_ID);
        c.put16(STATUS, STATUS_CAP_LIST);
        c.bytes[0x08] = 1; // revision
        c.bytes[0x0b] = regs::CLASS_CODE;
        c.bytes[0x0e] = 0; // header type 0, single function
                           // BAR0: 32-bit memory, not prefetchable; low bits hard-wired to the type (0).
        c.put32(0x10, 0);
        c.mask32(0x10, !(regs::REGS_BAR_SIZE as u32 - 1));
        // BAR2/3: 64-bit (type 0b10 in bits 2:1) prefetchable (bit 3) memory.
        c.put32(0x18, 0x4 | 0x8);
        c.mask32(0x18, !(memory_size.saturating_sub(1) as u32));
        c.mask32(0x1c, 0xffff_ffff);
        c.put16(0x2c, regs::VENDOR_ID); // subsystem vendor
        c.put16(0x2e, regs::DEVICE_ID); // subsystem id
        c.bytes[0x34] = MSIX_CAP as u8;
        c.bytes[0x3d] = 1; // interrupt pin A
        c.wmask[0x3c] = 0xff; // interrupt line
                              // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.wmask[COMMAND] = 0x47;
        c.wmask[COMMAND + 1] = 0x05;
        // MSI-X: id 0x11, last capability, table size N-1; enable and function mask writable.
        c.bytes[MSIX_CAP] = 0x11;
        c.bytes[MSIX_CAP + 1] = 0;
        c.put16(MSIX_CAP + 2, regs::MSIX_VECTORS - 1);
        c.wmask[MSIX_CAP + 3] = 0xc0;
        c.put32(
            MSIX_CAP + 4,
            regs::MSIX_TABLE_OFFSET as u32 | regs::REGS_BAR as u32,
        );
        c.put32(
            MSIX_CAP + 8,
            regs::MSIX_PBA_OFFSET as u32 | regs::REGS_BAR as u32,
        );
        if msi {
            c.bytes[MSIX_CAP + 1] = MSI_CAP as u8;
            // MSI: id 0x05, last capability. Control: Multiple Message Capable (bits 3:1) =
            // log2(vectors), 64-bit, per-vector masking; enable (bit 0) and Multiple Message
            // Enable (bits 6:4) writable. No extended message data.
            c.bytes[MSI_CAP] = MSI_CAP_ID;
            c.bytes[MSI_CAP + 1] = 0;
            let mmc = regs::MSI_VECTORS.trailing_zeros() as u16;
            c.put16(MSI_CONTROL, (mmc << 1) | MSI_CTRL_64BIT | MSI_CTRL_PVM);
            c.wmask[MSI_CONTROL] = 0x71;
            c.mask32(MSI_ADDR_LO, 0xffff_fffc);
            c.mask32(MSI_ADDR_HI, 0xffff_ffff);
            c.wmask[MSI_DATA] = 0xff;
            c.wmask[MSI_DATA + 1] = 0xff;
            c.mask32(MSI_MASK, (1u32 << regs::MSI_VECTORS) - 1);
            // Pending bits: read-only, set by the device.
        }
        c
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask32(&mut self, off: usize, v: u32) {
        self.wmask[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }

    /// BAR2's size, as BAR sizing reports it.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Reads `buf.len()` bytes at `off`; false when out of range.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        let Some(r) = range(off, buf.len()) else {
            return false;
        };
        buf.copy_from_slice(&self.bytes[r]);
        true
    }

    /// Writes `data` at `off` through the write mask (read-only bits keep their value, which is
    /// also what makes BAR sizing work); false when out of range.
    pub fn write(&mut self, off: u64, data: &[u8]) -> bool {
        let Some(r) = range(off, data.len()) else {
            return false;
        };
        for (i, &v) in r.zip(data) {
            self.bytes[i] = (self.bytes[i] & !self.wmask[i]) | (v & self.wmask[i]);
        }
        true
    }

    /// The raw bytes (migration).
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Replaces the raw bytes with migrated ones (the write mask stays: it follows from the
    /// capabilities, which source and target must share).
    pub fn load_bytes(&mut self, b: &[u8; CONFIG_SIZE]) {
        self.bytes = *b;
    }

    /// MSI-X enable bit of the capability's control word.
    pub fn msix_enabled(&self) -> bool {
        self.get16(MSIX_CAP + 2) & MSIX_CTRL_ENABLE != 0
    }

    /// MSI-X function mask bit.
    pub fn msix_masked(&self) -> bool {
        self.get16(MSIX_CAP + 2) & MSIX_CTRL_MASK != 0
    }

    /// Whether the MSI capability is present.
    pub fn has_msi(&self) -> bool {
        self.bytes[MSI_CAP] == MSI_CAP_ID
    }

    /// MSI enable bit (false without the capability).
    pub fn msi_enabled(&self) -> bool {
        self.has_msi() && self.get16(MSI_CONTROL) & MSI_CTRL_ENABLE != 0
    }

    /// MSI per-vector mask bit of `vector`.
    pub fn msi_masked(&self, vector: u16) -> bool {
        self.has_msi() && self.get32(MSI_MASK) & (1 << vector) != 0
    }

    /// MSI pending bit of `vector`.
    pub fn msi_pending(&self, vector: u16) -> bool {
        self.has_msi() && self.get32(MSI_PENDING) & (1 << vector) != 0
    }

    /// Sets or clears the MSI pending bit of `vector` (the device's side; read-only to clients).
    pub fn set_msi_pending(&mut self, vector: u16, on: bool) {
        if !self.has_msi() {
            return;
        }
        let p = self.get32(MSI_PENDING) & !(1 << vector);
        self.put32(MSI_PENDING, p | if on { 1 << vector } else { 0 });
    }

    /// INTx disable bit of the command register.
    pub fn intx_disabled(&self) -> bool {
        self.get16(COMMAND) & CMD_INTX_DISABLE != 0
    }

    /// Reflects the INTx line in the status register's interrupt status bit.
    pub fn set_intx_status(&mut self, asserted: bool) {
        let s = self.get16(STATUS) & !STATUS_INTX;
        self.put16(STATUS, s | if asserted { STATUS_INTX } else { 0 });
    }
}

fn range(off: u64, n: usize) -> Option<std::ops::Range<usize>> {
    let off = usize::try_from(off).ok()?;
    let end = off.checked_add(n)?;
    (end <= CONFIG_SIZE).then_some(off..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(c.read(off, &mut b));
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_and_masks() {
        let mut c = ConfigSpace::new();
        for off in [0x10u64, 0x18, 0x1c, 0x14] {
            assert!(c.write(off, &[0xff; 4]));
        }
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        assert_eq!(rd32(&c, 0x14), 0, "BAR1 is not implemented");
        assert_eq!(rd32(&c, 0x18), 0xfff0_000c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_ffff);
        assert!(c.write(0, &[0; 4]), "vendor/device are read-only");
        assert_eq!(rd32(&c, 0), 0x0f5f_1b36);
        assert!(!c.write(255, &[0, 0]));
        assert!(!c.msix_enabled());
        assert!(c.write(MSIX_CAP as u64 + 2, &[0xff, 0xff]));
        assert!(c.msix_enabled() && c.msix_masked());
        assert_eq!(
            rd32(&c, MSIX_CAP as u64) >> 16,
            0xc001,
            "table size stays read-only"
        );
        assert_eq!(c.bytes[MSIX_CAP + 1], 0, "no MSI without --msi");
        assert!(!c.has_msi() && !c.msi_enabled());
    }

    #[test]
    fn bar2_sizing_follows_the_memory_size() {
        for (mib, low) in [(1u64, 0xfff0_000c), (64, 0xfc00_000c), (1024, 0xc000_000c)] {
            let mut c = ConfigSpace::with(false, mib << 20);
            assert_eq!(c.memory_size(), mib << 20);
            assert!(c.write(0x18, &[0xff; 4]) && c.write(0x1c, &[0xff; 4]));
            assert_eq!(
                (rd32(&c, 0x18), rd32(&c, 0x1c)),
                (low, 0xffff_ffff),
                "{mib} MiB"
            );
        }
    }

    #[test]
    fn msi_capability_and_masks() {
        let mut c = ConfigSpace::with_msi(true);
        assert_eq!(c.bytes[MSIX_CAP + 1] as usize, MSI_CAP);
        assert_eq!((c.bytes[MSI_CAP], c.bytes[MSI_CAP + 1]), (MSI_CAP_ID, 0));
        assert_eq!(rd32(&c, MSI_CAP as u64) >> 16, 0x0182, "MMC 1, 64-bit, PVM");
        assert!(c.write(MSI_CAP as u64, &[0xff; 24]));
        assert_eq!(
            rd32(&c, MSI_CAP as u64),
            0x01f3_0005,
            "enable + MME writable"
        );
        assert!(c.msi_enabled());
        assert_eq!(rd32(&c, MSI_CAP as u64 + 4), 0xffff_fffc);
        assert_eq!(rd32(&c, MSI_CAP as u64 + 8), 0xffff_ffff);
        assert_eq!(rd32(&c, MSI_CAP as u64 + 0xc), 0x0000_ffff, "16-bit data");
        assert_eq!(rd32(&c, MSI_CAP as u64 + 0x10), 0b11, "two mask bits");
        assert_eq!(rd32(&c, MSI_CAP as u64 + 0x14), 0, "pending is read-only");
        assert!(c.msi_masked(0) && c.msi_masked(1));
        c.set_msi_pending(0, true);
        assert!(c.msi_pending(0) && !c.msi_pending(1));
        assert_eq!(rd32(&c, MSI_CAP as u64 + 0x14), 1);
        c.set_msi_pending(0, false);
        assert!(!c.msi_pending(0));
    }
}
