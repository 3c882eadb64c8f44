//! The PCI Express host bridge at 00:00.0.

use devices::legacy::{StateReader, StateWriter};
use migration::{Pausable, Snapshottable, StateError, StateSection};

use crate::configuration::{ConfigSpaceSize, PciConfiguration, PciHeader};
use crate::device::PciDevice;

/// Red Hat / QEMU vendor id.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// QEMU PCIe host bridge device id.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Base class: bridge device.
pub const PCI_CLASS_BRIDGE: u8 = 0x06;
/// Sub-class: host bridge.
pub const PCI_SUBCLASS_HOST_BRIDGE: u8 = 0x00;
/// Version of the host bridge state section.
pub const HOST_BRIDGE_STATE_VERSION: u16 = 1;

/// The host bridge: a configuration space with the bridge's identity and nothing else.
#[derive(Debug, Clone)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// A host bridge with vendor 0x1b36, device 0x0008, class 06/00/00 and a 4 KiB config space.
    pub fn new() -> Self {
        let header = PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision_id: 0,
            class_code: PCI_CLASS_BRIDGE,
            subclass: PCI_SUBCLASS_HOST_BRIDGE,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            multifunction: false,
        };
        Self {
            config: PciConfiguration::new(&header, ConfigSpaceSize::Extended),
        }
    }

    /// The bridge's configuration space.
    pub fn configuration(&self) -> &PciConfiguration {
        &self.config
    }
}

impl PciDevice for PciHostBridge {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        // The bridge has no BARs, so no write can move one.
        let _ = self.config.write_reg(reg_idx, offset, data);
    }

    fn id(&self) -> String {
        "pci-host-bridge".to_string()
    }
}

impl Pausable for PciHostBridge {}

impl migration::Migratable for PciHostBridge {}

impl Snapshottable for PciHostBridge {
    fn id(&self) -> String {
        PciDevice::id(self)
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let mut w = StateWriter::new();
        self.config.save(&mut w);
        Ok(w.into_section(&PciDevice::id(self), HOST_BRIDGE_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let id = PciDevice::id(self);
        let mut r = StateReader::open(section, &id, HOST_BRIDGE_STATE_VERSION)?;
        let mut config = self.config.clone();
        config.restore(&mut r)?;
        r.finish()?;
        self.config = config;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_snapshot() {
        let mut hb = PciHostBridge::new();
        assert_eq!(hb.config_read(0), 0x0008_1b36);
        assert_eq!(hb.config_read(2) >> 8, 0x06_00_00);
        assert_eq!((hb.config_read(3) >> 16) & 0xff, 0);
        hb.config_write(1, 0, &[0x06]);
        let snap = hb.snapshot().unwrap();
        let mut other = PciHostBridge::new();
        other.restore(&snap).unwrap();
        assert_eq!(other.config_read(1) & 0xffff, 0x6);
        let mut bad = snap.clone();
        bad.data.truncate(10);
        assert!(other.restore(&bad).is_err());
        let mut bad = snap;
        bad.version = 7;
        assert!(other.restore(&bad).is_err());
        assert_eq!(
            other.config_read(1) & 0xffff,
            0x6,
            "failed restore changed nothing"
        );
    }
}
