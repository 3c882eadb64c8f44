//! skiff's PCI layer: configuration space, the host bridge, and ECAM / 0xCF8 configuration access.
//!
//! The VMM wires [`PciConfigIo`] at I/O port 0xCF8 (length 8) and [`PciConfigMmio`] at the ECAM
//! base (0xE000_0000, length `(last_bus + 1)` MiB), both sharing one `Arc<Mutex<PciBus>>`.

pub mod bus;
pub mod config_io;
pub mod config_mmio;
pub mod configuration;
pub mod device;
pub mod host_bridge;

pub use bus::{PciBus, PciBusError, SharedPciDevice};
pub use config_io::PciConfigIo;
pub use config_mmio::PciConfigMmio;
pub use configuration::{
    BarInfo, BarKind, BarMove, ConfigSpaceSize, PciConfigError, PciConfiguration, PciHeader,
};
pub use device::PciDevice;
pub use host_bridge::PciHostBridge;
