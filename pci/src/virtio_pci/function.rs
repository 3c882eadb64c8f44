//! The virtio-pci transport as a [`PciFunction`]: one trapped memory BAR with a queue
//! notification ioeventfd per queue, MSI-X and INTx pin A.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use migration::Migratable;

use super::{VirtioPciDevice, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR_INDEX};
use crate::configuration::NUM_BAR_REGS;
use crate::function::{BarRequest, IoEventFd, PciFunction, PciFunctionError};

/// The `vm.info` kind of a virtio device type.
pub fn virtio_kind(device_type: u32) -> &'static str {
    use devices::virtio::device_type::*;
    match device_type {
        NET => "virtio-net",
        BLOCK => "virtio-blk",
        CONSOLE => "virtio-console",
        RNG => "virtio-rng",
        IOMMU => "virtio-iommu",
        _ => "virtio",
    }
}

impl Migratable for VirtioPciDevice {}

impl PciFunction for VirtioPciDevice {
    fn kind(&self) -> &'static str {
        virtio_kind(self.virtio_device().device_type())
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        (0..NUM_BAR_REGS)
            .filter_map(|index| {
                self.config.bar(index).map(|b| BarRequest {
                    index,
                    size: b.size,
                    kind: b.kind,
                    mapped: Vec::new(),
                })
            })
            .collect()
    }

    fn set_bar(&mut self, index: usize, addr: u64) -> Result<(), PciFunctionError> {
        self.config
            .set_bar_address(index, addr)
            .map_err(|source| PciFunctionError::Config {
                id: self.id.clone(),
                source,
            })
    }

    fn bar_address(&self, index: usize) -> Option<u64> {
        self.config.bar_address(index)
    }

    fn ioeventfds(&self, index: usize, bar_base: u64) -> Vec<IoEventFd<'_>> {
        if index != VIRTIO_BAR_INDEX {
            return Vec::new();
        }
        // One notification address per queue: `NOTIFY_OFFSET + queue * NOTIFY_OFF_MULTIPLIER`
        // (any access length, no datamatch).
        self.ioeventfds
            .iter()
            .enumerate()
            .map(|(i, fd)| IoEventFd {
                fd,
                addr: bar_base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
            })
            .collect()
    }

    fn intx_resample_fd(&self) -> Option<RawFd> {
        self.resamplefd.as_ref().map(|fd| fd.as_raw_fd())
    }

    fn handle_intx_resample(&self) -> io::Result<()> {
        if let Some(fd) = &self.resamplefd {
            // Non-blocking: nothing to read is fine.
            let _ = fd.read();
        }
        self.intx.resample()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.virtio_device().counters()
    }
}
