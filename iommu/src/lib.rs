//! skiff's virtual IOMMU (virtio-iommu).
//!
//! - [`device`]: [`device::VirtioIommu`], the virtio device (request and event queues, worker,
//!   fault reporting, save/restore).
//! - [`protocol`]: the virtio-iommu wire format and request parsing (the only place guest request
//!   bytes are trusted or rejected).
//! - [`endpoint`]: [`endpoint::EndpointAccess`], one endpoint's DMA view (implements
//!   `devices::virtio::AccessPlatform` for the devices behind the IOMMU).
//! - [`domain`]: one translation domain, its mappings and IOVA → guest-physical translation.
//! - [`iommu`]: the device state machine (endpoints, domains, attach/detach/map/unmap/probe), the
//!   [`iommu::ExternalMappingListener`] trait VFIO uses to follow the guest's mappings, the
//!   thread-safe [`iommu::Translator`] devices call, and versioned save/restore.

pub mod device;
pub mod domain;
pub mod endpoint;
pub mod iommu;
pub mod protocol;

pub use device::{FaultReporter, IommuMetrics, VirtioIommu};
pub use domain::{Access, Domain, Fault, FaultReason, Mapping};
pub use endpoint::EndpointAccess;
pub use iommu::{ExternalMappingListener, IommuState, Translator};
pub use protocol::{IommuConfig, IommuStatus, Request};
