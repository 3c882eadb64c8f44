//! The DMA view of one endpoint behind the virtio-iommu: what a virtio device with
//! `VIRTIO_F_ACCESS_PLATFORM` translates its addresses through.

use devices::virtio::{AccessPlatform, DmaAccess, DmaFault};
use vm_memory::GuestAddress;

use crate::device::FaultReporter;
use crate::domain::Access;
use crate::iommu::Translator;

/// Translates the device addresses of one endpoint (PCI requester id) through the domain it is
/// attached to; a fault is reported to the guest on the IOMMU's event queue.
#[derive(Debug, Clone)]
pub struct EndpointAccess {
    endpoint: u32,
    translator: Translator,
    faults: FaultReporter,
}

impl EndpointAccess {
    /// The view of `endpoint` through `translator`, reporting faults to `faults`.
    pub fn new(endpoint: u32, translator: Translator, faults: FaultReporter) -> Self {
        Self {
            endpoint,
            translator,
            faults,
        }
    }
}

impl AccessPlatform for EndpointAccess {
    fn translate(
        &self,
        addr: u64,
        len: u64,
        access: DmaAccess,
        out: &mut Vec<(GuestAddress, u64)>,
    ) -> Result<(), DmaFault> {
        let dir = match access {
            DmaAccess::Read => Access::Read,
            DmaAccess::Write => Access::Write,
        };
        let res =
            self.translator
                .read()
                .translate_each(self.endpoint, addr, len, dir, |phys, n| {
                    out.push((GuestAddress(phys), n))
                });
        res.map_err(|fault| {
            log::debug!("endpoint {:#x}: {fault}", self.endpoint);
            self.faults.report_fault(self.endpoint, &fault);
            DmaFault {
                addr: fault.iova,
                access,
            }
        })
    }
}
