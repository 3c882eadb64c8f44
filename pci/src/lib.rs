//! skiff's PCI layer: configuration space, the host bridge, ECAM / 0xCF8 configuration access,
//! BAR allocation, MSI-X and the virtio-pci transport.
//!
//! The VMM wires [`PciConfigIo`] at I/O port 0xCF8 (length 8) and [`PciConfigMmio`] at the ECAM
//! base (0xE000_0000, length `(last_bus + 1)` MiB), both sharing one `Arc<Mutex<PciBus>>`. Devices
//! raise interrupts through an [`InterruptManager`] the VMM implements over KVM; BAR moves the
//! guest makes reach the VMM through [`PciBus::set_bar_move_handler`].

pub mod allocator;
pub mod bus;
pub mod config_io;
pub mod config_mmio;
pub mod configuration;
pub mod device;
pub mod function;
pub mod host_bridge;
pub mod interrupt;
pub mod msix;
pub mod vfio;
pub mod virtio_pci;

pub use allocator::{AddressAllocator, AllocError, BarAllocator};
pub use bus::{BarMoveHandler, PciBus, PciBusError, SharedPciDevice};
pub use config_io::PciConfigIo;
pub use config_mmio::PciConfigMmio;
pub use configuration::{
    BarInfo, BarKind, BarMove, ConfigSpaceSize, PciConfigError, PciConfiguration, PciHeader,
};
pub use device::PciDevice;
pub use function::{BarRequest, IoEventFd, MappedArea, PciFunction, PciFunctionError};
pub use host_bridge::PciHostBridge;
pub use interrupt::{InterruptManager, IntxLine, MsiVector};
pub use msix::MsixConfig;
pub use virtio_pci::{VirtioPciDevice, VirtioPciError};
