//! Builds the virtio devices a [`VmConfig`] asks for, in a stable order (disks, nets, console, rng)
//! with the ids `VmConfig::device_ids` reports. Each device is then put on the PCI bus by
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

/// Create every configured virtio device.
pub fn create_virtio_devices(
    config: &VmConfig,
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
        ConsoleConfig::File(p) => Some(ConsoleOutput::File(p.clone())),
        ConsoleConfig::Pty => Some(ConsoleOutput::Pty),
    };
    if let Some(output) = output {
        let id = ids.next().unwrap_or_default();
        let console = Console::new(DevConsoleConfig {
            id: id.clone(),
            output,
            iommu: false,
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
