//! The virtio-pci modern transport (virtio 1.x, section 4.1).
//!
//! A [`VirtioPciDevice`] wraps a transport-independent [`devices::virtio::VirtioDevice`] into a
//! PCI function with vendor 0x1af4 and device id 0x1040 + virtio type. Everything lives in one
//! 64-bit, non-prefetchable memory BAR (BAR 0):
//!
//! | offset | region | capability |
//! |---|---|---|
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | 0x1000 | ISR status (1 byte, read-to-clear) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | 0x2000 | device-specific configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | 0x3000 | notifications: queue `n` at `0x3000 + 4 n` | `VIRTIO_PCI_CAP_NOTIFY_CFG` |
//! | 0x4000 | MSI-X table (one vector per queue + one for configuration changes) | MSI-X |
//! | 0x6000 | MSI-X pending bit array | MSI-X |
//!
//! The VMM registers one ioeventfd per queue at its notification address (see
//! [`VirtioPciDevice::ioeventfds`]), so queue kicks go straight to the device's worker.

mod common_config;
mod device;
mod function;
mod interrupt;
#[cfg(test)]
mod tests;

pub use device::{
    VirtioPciDevice, VirtioPciError, VIRTIO_PCI_SECTION_PREFIX, VIRTIO_PCI_STATE_VERSION,
};
pub use function::virtio_kind;

// The capability types, ISR bits and "no vector" value are from Linux
// `include/uapi/linux/virtio_pci.h`; virtio-bindings 0.2 has no `virtio_pci` module, so they are
// kept here.

/// Vendor id of virtio devices (Red Hat, Inc.).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id reported by modern virtio devices.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No MSI-X vector" in `msix_config` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Virtio capability `cfg_type`: common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Virtio capability `cfg_type`: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// Virtio capability `cfg_type`: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Virtio capability `cfg_type`: device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// ISR bit: a queue has used buffers.
pub const VIRTIO_ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed.
pub const VIRTIO_ISR_CONFIG: u8 = 2;

/// The BAR holding every virtio region and the MSI-X table.
pub const VIRTIO_BAR_INDEX: usize = 0;
/// Size of [`VIRTIO_BAR_INDEX`].
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration (`virtio_pci_common_cfg`).
pub const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Length of the ISR region.
pub const ISR_LEN: u64 = 1;
/// Offset of the device-specific configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device-specific configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification region.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have (bounded by the notification region and the MSI-X table).
pub const MAX_QUEUES: usize =
    ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / crate::msix::MSIX_TABLE_ENTRY_SIZE) as usize - 1;

/// PCI class code (base, sub-class, programming interface) for a virtio device type.
pub fn class_code(device_type: u32) -> (u8, u8, u8) {
    use devices::virtio::device_type::*;
    match device_type {
        BLOCK => (0x01, 0x80, 0x00),
        NET => (0x02, 0x00, 0x00),
        CONSOLE => (0x07, 0x80, 0x00),
        IOMMU => (0x08, 0x80, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}
