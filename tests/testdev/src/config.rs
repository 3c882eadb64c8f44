//! PCI configuration space (region 7) of the test device: type 0 header, BAR0 32-bit 4 KiB,
//! BAR2 64-bit prefetchable 1 MiB, interrupt pin A, one MSI-X capability.

use crate::regs;

/// Config space size.
pub const CONFIG_SIZE: usize = 256;
/// Offset of the MSI-X capability.
pub const MSIX_CAP: usize = 0x40;

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
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// The power-on config space.
    pub fn new() -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
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
        c.mask32(0x18, !(regs::DEVICE_MEMORY_SIZE as u32 - 1));
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

    /// MSI-X enable bit of the capability's control word.
    pub fn msix_enabled(&self) -> bool {
        self.get16(MSIX_CAP + 2) & MSIX_CTRL_ENABLE != 0
    }

    /// MSI-X function mask bit.
    pub fn msix_masked(&self) -> bool {
        self.get16(MSIX_CAP + 2) & MSIX_CTRL_MASK != 0
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
    }
}
