//! PCI passthrough over VFIO: one passthrough PCI function ([`VfioBackend`] users) above three
//! backends — vfio-user over a Unix socket, kernel VFIO container/group, kernel VFIO iommufd.

pub mod backend;
pub mod device;
pub mod dma_space;
pub mod kernel;
pub mod mig_backend;
mod msi;
pub mod sysfs;
pub mod user;

pub use backend::{
    DeviceInfo, DmaBacking, DmaHandler, DmaProt, IrqInfo, RegionInfo, SparseArea, VfioBackend,
    VfioError,
};
pub use device::{VfioMigrationOptions, VfioPciDevice, VfioPciError, VfioStats};
pub use dma_space::{DmaMapping, DmaSpace};
