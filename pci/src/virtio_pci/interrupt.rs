//! How a virtio-pci device raises interrupts: the MSI-X vector the driver assigned when MSI-X is
//! enabled, INTx plus the ISR status byte otherwise.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::Vectors;
use super::{VIRTIO_ISR_CONFIG, VIRTIO_ISR_QUEUE, VIRTIO_MSI_NO_VECTOR};
use crate::msix::MsixConfig;

/// The INTx side: ISR byte, irqfd and the command register's INTx-disable bit.
#[derive(Debug)]
pub(crate) struct IntxState {
    /// ISR status (bit 0 queue, bit 1 config), cleared by a guest read.
    pub(crate) isr: AtomicU8,
    /// Command register bit 10.
    pub(crate) disabled: AtomicBool,
    /// Asserts the line (an irqfd with resample), when the device has INTx.
    pub(crate) irqfd: Option<EventFd>,
}

impl IntxState {
    /// Re-assert the line if an interrupt is still pending (after KVM's resample).
    pub(crate) fn resample(&self) -> io::Result<()> {
        match &self.irqfd {
            Some(fd)
                if self.isr.load(Ordering::SeqCst) != 0
                    && !self.disabled.load(Ordering::SeqCst) =>
            {
                fd.write(1)
            }
            _ => Ok(()),
        }
    }
}

/// The [`VirtioInterrupt`] handed to the device on activation.
pub(crate) struct VirtioPciInterrupt {
    pub(crate) msix: Arc<Mutex<MsixConfig>>,
    pub(crate) vectors: Arc<Vectors>,
    pub(crate) intx: Arc<IntxState>,
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, int: VirtioInterruptType) -> io::Result<()> {
        let (vector, isr_bit) = match int {
            VirtioInterruptType::Config => (
                self.vectors.config.load(Ordering::SeqCst),
                VIRTIO_ISR_CONFIG,
            ),
            VirtioInterruptType::Queue(q) => (
                self.vectors
                    .queues
                    .get(usize::from(q))
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, format!("no queue {q}"))
                    })?
                    .load(Ordering::SeqCst),
                VIRTIO_ISR_QUEUE,
            ),
        };
        {
            let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            if msix.enabled() {
                // With MSI-X enabled, an event without a vector raises nothing (virtio 4.1.5.1.2).
                if vector == VIRTIO_MSI_NO_VECTOR {
                    return Ok(());
                }
                return msix.trigger(vector);
            }
        }
        self.intx.isr.fetch_or(isr_bit, Ordering::SeqCst);
        match &self.intx.irqfd {
            Some(fd) if !self.intx.disabled.load(Ordering::SeqCst) => fd.write(1),
            _ => Ok(()),
        }
    }
}
