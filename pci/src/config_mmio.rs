//! PCI Express enhanced configuration access (ECAM).
//!
//! The VMM registers [`PciConfigMmio`] on the MMIO bus at the ECAM base (0xE000_0000) with length
//! `(last_bus + 1)` MiB. An offset decodes as bus (27:20), device (19:15), function (14:12) and byte
//! offset (11:0). 1-, 2- and 4-byte accesses that stay inside one dword are forwarded; anything
//! else (8-byte or dword-crossing accesses, buses past `last_bus`) reads as all ones and ignores
//! writes.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;

use crate::bus::PciBus;

/// Bytes of ECAM space per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM window.
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
    last_bus: u8,
}

impl PciConfigMmio {
    /// An ECAM window for buses `0..=last_bus` reaching the devices of `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>, last_bus: u8) -> Self {
        Self { bus, last_bus }
    }

    /// The length the VMM should register: `(last_bus + 1)` MiB.
    pub fn size(&self) -> u64 {
        (u64::from(self.last_bus) + 1) * ECAM_BUS_SIZE
    }

    /// `(bus, device, function, register, byte within register)` for a valid access.
    fn decode(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, usize, u64)> {
        if offset >= self.size() || !matches!(len, 1 | 2 | 4) || (offset % 4) as usize + len > 4 {
            return None;
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            offset % 4,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some((b, d, f, r, within)) = self.decode(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let v = self
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_read(b, d, f, r);
        let within = within as usize;
        data.copy_from_slice(&v.to_le_bytes()[within..within + data.len()]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some((b, d, f, r, within)) = self.decode(offset, data.len()) {
            self.bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(b, d, f, r, within, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::TestDevice;

    fn ecam_offset(bus: u64, dev: u64, func: u64, byte: u64) -> u64 {
        bus << 20 | dev << 15 | func << 12 | byte
    }

    fn setup(last_bus: u8) -> PciConfigMmio {
        let mut bus = PciBus::new();
        bus.add_device(Some(31), TestDevice::shared(0x8086, 0x1234))
            .unwrap();
        PciConfigMmio::new(Arc::new(Mutex::new(bus)), last_bus)
    }

    fn read32(m: &mut PciConfigMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read(0xe000_0000, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn decode_and_access_sizes() {
        let mut m = setup(0);
        assert_eq!(m.size(), 1 << 20);
        assert_eq!(read32(&mut m, 0), 0x0008_1b36, "host bridge");
        assert_eq!(read32(&mut m, ecam_offset(0, 0, 0, 8)) >> 8, 0x06_00_00);
        assert_eq!(read32(&mut m, ecam_offset(0, 31, 0, 0)), 0x1234_8086);
        let mut w = [0u8; 2];
        m.read(0, ecam_offset(0, 31, 0, 2), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1234);
        let mut b = [0u8; 1];
        m.read(0, ecam_offset(0, 31, 0, 1), &mut b);
        assert_eq!(b[0], 0x80);
        // Byte write to the command register.
        m.write(0, ecam_offset(0, 31, 0, 4), &[0x02]);
        assert_eq!(read32(&mut m, ecam_offset(0, 31, 0, 4)) & 0xffff, 0x2);
        // Extended space of a legacy device reads 0; of the host bridge too.
        assert_eq!(read32(&mut m, ecam_offset(0, 31, 0, 0x100)), 0);
        assert_eq!(read32(&mut m, ecam_offset(0, 0, 0, 0x100)), 0);
    }

    #[test]
    fn invalid_accesses_read_all_ones() {
        let mut m = setup(0);
        // Absent device / function.
        assert_eq!(read32(&mut m, ecam_offset(0, 5, 0, 0)), 0xFFFF_FFFF);
        assert_eq!(read32(&mut m, ecam_offset(0, 31, 3, 0)), 0xFFFF_FFFF);
        // Past the last bus.
        assert_eq!(read32(&mut m, ecam_offset(1, 0, 0, 0)), 0xFFFF_FFFF);
        // 8-byte and dword-crossing accesses.
        let mut q = [0u8; 8];
        m.read(0, 0, &mut q);
        assert_eq!(q, [0xff; 8]);
        let mut w = [0u8; 2];
        m.read(0, 3, &mut w);
        assert_eq!(w, [0xff; 2]);
        m.write(0, ecam_offset(0, 31, 0, 4), &[0xff; 8]);
        m.write(0, ecam_offset(0, 31, 0, 3), &[0xff, 0xff]);
        assert_eq!(read32(&mut m, ecam_offset(0, 31, 0, 4)) & 0xffff, 0);

        // With more buses, bus 1 decodes but holds nothing.
        let mut m = setup(3);
        assert_eq!(m.size(), 4 << 20);
        assert_eq!(read32(&mut m, ecam_offset(1, 0, 0, 0)), 0xFFFF_FFFF);
    }
}
