//! Builds the virtio devices a [`VmConfig`] asks for, in a stable order (disks, nets, console, rng)
//! with the ids `VmConfig::device_ids` reports, and plans their PCI slots ([`PciPlan`]): when any
//! device asks for `iommu=on`, a virtio-iommu takes the first slot after the host bridge and the
//! devices follow in configuration order. Each device is then put on the PCI bus by
//! `pci_devices::PciDevices::add_virtio`.

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::console::{Console, ConsoleConfig as DevConsoleConfig, ConsoleOutput};
use devices::virtio::net::{MacAddr, Net, NetConfig as DevNetConfig, TapSource};
use devices::virtio::rng::{Rng, RngConfig as DevRngConfig};
use devices::virtio::VirtioDevice;
use thiserror::Error;

use crate::config::{ConsoleConfig, TapConfig, VmConfig};

/// Errors creating a device from the configuration (before the guest starts).
#[derive(Debug, Error)]
#[error("{what} {id}: {reason}")]
pub struct DeviceCreateError {
    /// The option that configured it.
    pub what: &'static str,
    /// Device id.
    pub id: String,
    /// Why it cannot be created.
    pub reason: String,
}

pub use crate::config::IOMMU_DEVICE_ID;
/// First PCI slot after the host bridge (slot 0).
const FIRST_DEVICE_SLOT: u8 = 1;

/// Where the virtio devices of a configuration go on PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPlan {
    /// Slot of the virtio-iommu, when any device sits behind it.
    pub iommu_slot: Option<u8>,
    /// Slot of each device, in [`create_virtio_devices`] order, and whether it sits behind the
    /// IOMMU.
    pub devices: Vec<(u8, bool)>,
}

impl PciPlan {
    /// The plan for `config`. Fails when the devices do not fit on one bus.
    pub fn new(config: &VmConfig) -> Result<Self, DeviceCreateError> {
        let behind: Vec<bool> = config.devices().into_iter().map(|(_, b)| b).collect();
        let has_iommu = behind.contains(&true);
        let first = FIRST_DEVICE_SLOT + u8::from(has_iommu);
        let count = behind.len() + usize::from(has_iommu);
        if usize::from(FIRST_DEVICE_SLOT) + count > 32 {
            return Err(DeviceCreateError {
                what: "PCI",
                id: "bus 0".into(),
                reason: format!("{count} devices do not fit in the 31 free slots"),
            });
        }
        Ok(Self {
            iommu_slot: has_iommu.then_some(FIRST_DEVICE_SLOT),
            devices: behind
                .into_iter()
                .enumerate()
                .map(|(i, b)| (first + i as u8, b))
                .collect(),
        })
    }

    /// Slots of the devices behind the IOMMU.
    pub fn endpoint_slots(&self) -> Vec<u8> {
        self.devices
            .iter()
            .filter(|(_, b)| *b)
            .map(|(slot, _)| *slot)
            .collect()
    }
}

/// The endpoint id (PCI requester id, BDF) of function 0 of `slot` on bus 0.
pub fn endpoint_id(slot: u8) -> u32 {
    u32::from(slot) << 3
}

/// Create every configured virtio device. A `restoring` VM appends to its console output file
/// instead of truncating it.
pub fn create_virtio_devices(
    config: &VmConfig,
    restoring: bool,
) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceCreateError> {
    let mut ids = config.device_ids().into_iter();
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &config.disks {
        let id = ids.next().unwrap_or_default();
        let blk = Block::new(BlockConfig {
            id: id.clone(),
            path: d.path.clone(),
            readonly: d.readonly,
            serial: d.serial.clone(),
            iommu: d.iommu,
        })
        .map_err(|e| DeviceCreateError {
            what: "--disk",
            id,
            reason: e.to_string(),
        })?;
        out.push(Box::new(blk));
    }
    for n in &config.nets {
        let id = ids.next().unwrap_or_default();
        let tap = match &n.tap {
            TapConfig::Name(name) => TapSource::Name(name.clone()),
            TapConfig::Fd(fd) => TapSource::Fd(*fd),
        };
        let net = Net::new(DevNetConfig {
            id: id.clone(),
            tap,
            mac: n.mac.map(MacAddr),
            iommu: n.iommu,
        })
        .map_err(|e| DeviceCreateError {
            what: "--net",
            id,
            reason: e.to_string(),
        })?;
        out.push(Box::new(net));
    }
    let output = match &config.console {
        ConsoleConfig::Off => None,
        ConsoleConfig::Stdout => Some(ConsoleOutput::Stdout),
        ConsoleConfig::File(p) if restoring => Some(ConsoleOutput::AppendFile(p.clone())),
        ConsoleConfig::File(p) => Some(ConsoleOutput::File(p.clone())),
        ConsoleConfig::Pty => Some(ConsoleOutput::Pty),
    };
    if let Some(output) = output {
        let id = ids.next().unwrap_or_default();
        let console = Console::new(DevConsoleConfig {
            id: id.clone(),
            output,
            iommu: config.console_iommu,
        })
        .map_err(|e| DeviceCreateError {
            what: "--console",
            id,
            reason: e.to_string(),
        })?;
        out.push(Box::new(console));
    }
    if let Some(r) = &config.rng {
        let id = ids.next().unwrap_or_default();
        out.push(Box::new(Rng::new(DevRngConfig { id, iommu: r.iommu })));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, RngConfig};

    fn disk(iommu: bool) -> DiskConfig {
        DiskConfig {
            path: "/dev/null".into(),
            readonly: false,
            id: None,
            serial: None,
            iommu,
        }
    }

    #[test]
    fn plan_without_iommu_starts_at_slot_1() {
        let c = VmConfig {
            disks: vec![disk(false), disk(false)],
            rng: Some(RngConfig::default()),
            ..Default::default()
        };
        let p = PciPlan::new(&c).unwrap();
        assert_eq!(p.iommu_slot, None);
        assert_eq!(p.devices, [(1, false), (2, false), (3, false)]);
        assert!(p.endpoint_slots().is_empty());
    }

    #[test]
    fn plan_puts_the_iommu_first_and_lists_its_endpoints() {
        let c = VmConfig {
            disks: vec![disk(true), disk(false)],
            console: ConsoleConfig::Pty,
            console_iommu: true,
            rng: Some(RngConfig {
                id: None,
                iommu: true,
            }),
            ..Default::default()
        };
        let p = PciPlan::new(&c).unwrap();
        assert_eq!(p.iommu_slot, Some(1));
        assert_eq!(p.devices, [(2, true), (3, false), (4, true), (5, true)]);
        assert_eq!(p.endpoint_slots(), [2, 4, 5]);
        assert_eq!(endpoint_id(2), 0x10);
    }

    #[test]
    fn plan_refuses_more_devices_than_slots() {
        let mut c = VmConfig {
            disks: (0..31).map(|_| disk(false)).collect(),
            ..Default::default()
        };
        assert!(PciPlan::new(&c).is_ok());
        c.disks[0].iommu = true;
        assert!(PciPlan::new(&c)
            .unwrap_err()
            .to_string()
            .contains("do not fit"));
    }
}
