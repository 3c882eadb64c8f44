//! Configuration mechanism #1: the 0xCF8 address / 0xCFC data ports.
//!
//! The VMM registers [`PciConfigIo`] on the I/O bus at 0xCF8 with length 8. Offsets 0..4 are the
//! 32-bit address register (bit 31 enable, bits 23:16 bus, 15:11 device, 10:8 function, 7:2
//! register; bits 1:0 read as 0); byte and word accesses update just their bytes. Offsets 4..8 are
//! the data window onto the selected register: 1-, 2- and 4-byte accesses anywhere inside the dword.
//! With the enable bit clear, data reads return all ones and writes are dropped.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;

use crate::bus::PciBus;

/// Number of I/O ports the VMM registers (0xCF8..=0xCFF).
pub const PCI_CONFIG_IO_PORT_COUNT: u64 = 8;

const ADDRESS_ENABLE: u32 = 1 << 31;
/// Writable bits of the address register (reserved bits 30:24 and 1:0 read as 0).
const ADDRESS_MASK: u32 = ADDRESS_ENABLE | 0x00FF_FFFC;
const DATA_OFFSET: u64 = 4;

/// The 0xCF8/0xCFC configuration access ports.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    /// Ports that reach the devices of `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus, address: 0 }
    }

    /// The current address register.
    pub fn address(&self) -> u32 {
        self.address
    }

    /// `(bus, device, function, register)` selected by the address register, if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }

    fn valid_access(offset: u64, len: usize) -> bool {
        matches!(len, 1 | 2 | 4) && (offset % 4) as usize + len <= 4
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= PCI_CONFIG_IO_PORT_COUNT || !Self::valid_access(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let within = (offset % 4) as usize;
        let value = if offset < DATA_OFFSET {
            self.address
        } else {
            match self.target() {
                Some((b, d, f, r)) => self
                    .bus
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_read(b, d, f, r),
                None => 0xFFFF_FFFF,
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[within..within + data.len()]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= PCI_CONFIG_IO_PORT_COUNT || !Self::valid_access(offset, data.len()) {
            return;
        }
        let within = (offset % 4) as usize;
        if offset < DATA_OFFSET {
            let mut bytes = self.address.to_le_bytes();
            bytes[within..within + data.len()].copy_from_slice(data);
            self.address = u32::from_le_bytes(bytes) & ADDRESS_MASK;
        } else if let Some((b, d, f, r)) = self.target() {
            self.bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(b, d, f, r, within as u64, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::TestDevice;

    fn setup() -> PciConfigIo {
        let mut bus = PciBus::new();
        bus.add_device(Some(2), TestDevice::shared(0x1af4, 0x1041))
            .unwrap();
        PciConfigIo::new(Arc::new(Mutex::new(bus)))
    }

    fn addr(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
        ADDRESS_ENABLE
            | u32::from(bus) << 16
            | u32::from(dev) << 11
            | u32::from(func) << 8
            | u32::from(reg) << 2
    }

    fn read32(io: &mut PciConfigIo, off: u64) -> u32 {
        let mut b = [0u8; 4];
        io.read(0xcf8, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn address_latch() {
        let mut io = setup();
        io.write(0xcf8, 0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(read32(&mut io, 0), ADDRESS_MASK);
        io.write(0xcf8, 0, &0u32.to_le_bytes());
        // Byte and word writes update their own bytes.
        io.write(0xcf8, 3, &[0x80]);
        io.write(0xcf8, 1, &[0x10]); // device 2
        io.write(0xcf8, 0, &[0x03]); // low bits are reserved
        assert_eq!(io.address(), addr(0, 2, 0, 0));
        let mut w = [0u8; 2];
        io.read(0xcf8, 2, &mut w);
        assert_eq!(w, [0x00, 0x80]);
        // Misaligned or odd sizes are ignored.
        io.write(0xcf8, 3, &[1, 2]);
        io.write(0xcf8, 0, &[1, 2, 3]);
        assert_eq!(io.address(), addr(0, 2, 0, 0));
    }

    #[test]
    fn data_window_accesses() {
        let mut io = setup();
        io.write(0xcf8, 0, &addr(0, 0, 0, 0).to_le_bytes());
        assert_eq!(read32(&mut io, 4), 0x0008_1b36, "host bridge");
        io.write(0xcf8, 0, &addr(0, 2, 0, 0).to_le_bytes());
        assert_eq!(read32(&mut io, 4), 0x1041_1af4);
        let mut w = [0u8; 2];
        io.read(0xcf8, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        let mut b = [0u8; 1];
        io.read(0xcf8, 5, &mut b);
        assert_eq!(b[0], 0x1a);
        // Byte write to the command register through 0xCFC.
        io.write(0xcf8, 0, &addr(0, 2, 0, 1).to_le_bytes());
        io.write(0xcf8, 4, &[0x06]);
        io.write(0xcf8, 5, &[0x04]);
        assert_eq!(read32(&mut io, 4) & 0xffff, 0x0406);
        // A word write at 0xCFE reaches the status half.
        io.write(0xcf8, 6, &0xffffu16.to_le_bytes());
        assert_eq!(read32(&mut io, 4) & 0xffff, 0x0406);
    }

    #[test]
    fn disabled_and_absent_read_all_ones() {
        let mut io = setup();
        io.write(
            0xcf8,
            0,
            &(addr(0, 2, 0, 0) & !ADDRESS_ENABLE).to_le_bytes(),
        );
        assert_eq!(read32(&mut io, 4), 0xFFFF_FFFF);
        io.write(0xcf8, 0, &addr(0, 3, 0, 0).to_le_bytes());
        assert_eq!(read32(&mut io, 4), 0xFFFF_FFFF);
        io.write(0xcf8, 0, &addr(0, 2, 1, 0).to_le_bytes());
        assert_eq!(read32(&mut io, 4), 0xFFFF_FFFF);
        io.write(0xcf8, 0, &addr(1, 2, 0, 0).to_le_bytes());
        assert_eq!(read32(&mut io, 4), 0xFFFF_FFFF);
        let mut b = [0u8; 8];
        io.read(0xcf8, 0, &mut b);
        assert_eq!(b, [0xff; 8]);
    }
}
