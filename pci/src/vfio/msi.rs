//! MSI (not MSI-X) for passthrough devices: an emulated MSI capability in the virtual
//! configuration space, vectors on KVM GSI routes whose irqfds the device signals directly, and
//! per-vector masking with pending bits emulated in the VMM (the capability always offers
//! per-vector masking, whether the device has it or not).
//!
//! Layout shown to the guest (64-bit, per-vector masking; PCI Local Bus 3.0, 6.8.1):
//!
//! ```text
//! +0  id 0x05 | next | message control (enable, MMC, MME, 64-bit, per-vector mask)
//! +4  message address (low)
//! +8  message address (high)
//! +12 message data (16 bits)
//! +16 mask bits
//! +20 pending bits (read-only)
//! ```

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::configuration::{PciConfigError, PciConfiguration, CAP_ID_MSI};
use crate::interrupt::{InterruptManager, MsiVector};

/// Message control: MSI enable.
const MSI_ENABLE: u16 = 1 << 0;
/// Message control: 64-bit address capable.
const MSI_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
/// Bytes of the emulated capability.
const MSI_CAP_LEN: usize = 24;

/// The device's MSI capability, from its configuration space: the vectors it can use
/// (Multiple Message Capable, as a count).
pub(super) fn find_msi(cfg: &[u8], max_caps: usize) -> Option<u32> {
    let mut ptr = usize::from(cfg[0x34] & 0xfc);
    for _ in 0..max_caps {
        if ptr < 0x40 || ptr + 4 > cfg.len() {
            return None;
        }
        if cfg[ptr] == CAP_ID_MSI {
            let control = u16::from_le_bytes([cfg[ptr + 2], cfg[ptr + 3]]);
            return Some(1 << ((control >> 1) & 7).min(5));
        }
        ptr = usize::from(cfg[ptr + 1] & 0xfc);
    }
    None
}

/// What the device must be told after a guest write to the capability.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MsiChange {
    /// Nothing.
    None,
    /// MSI turned on: give the device these eventfds (vectors 0..n) and turn INTx off.
    Enable,
    /// MSI turned off: take the eventfds back, INTx may come back.
    Disable,
    /// Some vectors switched between their irqfd and their parking eventfd.
    Vectors(Vec<u32>),
}

/// The emulated MSI capability and its vectors.
pub(super) struct Msi {
    cap_reg: usize,
    max_vectors: u32,
    vectors: Vec<MsiVector>,
    parking: Vec<EventFd>,
    /// For each vector, whether the device signals its irqfd (unmasked) or its parking fd.
    direct: Vec<bool>,
    routed: Vec<Option<(u64, u32)>>,
    /// Interrupts signalled while masked, not yet delivered.
    pending: u32,
    enabled: u32,
    interrupts: Arc<dyn InterruptManager>,
}

impl Msi {
    /// Add an MSI capability for `max_vectors` (1..=32, a power of two) to `config`, with
    /// vectors from `interrupts`.
    pub(super) fn new(
        config: &mut PciConfiguration,
        max_vectors: u32,
        interrupts: Arc<dyn InterruptManager>,
    ) -> Result<Self, MsiError> {
        let max_vectors = max_vectors.clamp(1, 32).next_power_of_two();
        let mmc = max_vectors.trailing_zeros() as u16;
        let control = (mmc << 1) | MSI_64BIT | MSI_PER_VECTOR_MASK;
        let mut cap = [0u8; MSI_CAP_LEN];
        cap[0] = CAP_ID_MSI;
        cap[2..4].copy_from_slice(&control.to_le_bytes());
        let cap_reg = config.add_capability(&cap).map_err(MsiError::Config)? / 4;
        // Enable and Multiple Message Enable; address (dword aligned); data; mask bits.
        config.set_writable_bits(cap_reg, u32::from(MSI_ENABLE | (7 << 4)) << 16);
        config.set_writable_bits(cap_reg + 1, 0xffff_fffc);
        config.set_writable_bits(cap_reg + 2, 0xffff_ffff);
        config.set_writable_bits(cap_reg + 3, 0xffff);
        config.set_writable_bits(cap_reg + 4, vector_bits(max_vectors));
        let n = max_vectors as usize;
        let vectors = (0..n)
            .map(|_| interrupts.allocate_msi())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(MsiError::Interrupts)?;
        let parking = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(MsiError::Interrupts)?;
        Ok(Self {
            cap_reg,
            max_vectors,
            vectors,
            parking,
            direct: vec![false; n],
            routed: vec![None; n],
            pending: 0,
            enabled: 0,
            interrupts,
        })
    }

    /// Vectors the capability offers.
    pub(super) fn max_vectors(&self) -> u32 {
        self.max_vectors
    }

    /// Whether configuration register `reg` belongs to the capability.
    pub(super) fn owns(&self, reg: usize) -> bool {
        (self.cap_reg..self.cap_reg + MSI_CAP_LEN / 4).contains(&reg)
    }

    /// Register index of the pending bits.
    pub(super) fn pending_reg(&self) -> usize {
        self.cap_reg + 5
    }

    /// Whether MSI is on (vectors handed to the device).
    pub(super) fn enabled(&self) -> bool {
        self.enabled > 0
    }

    /// The eventfd the device should signal for vector `v` now.
    pub(super) fn device_fd(&self, v: u32) -> &EventFd {
        let i = v as usize;
        if self.direct[i] {
            &self.vectors[i].irqfd
        } else {
            &self.parking[i]
        }
    }

    /// Vectors enabled now.
    pub(super) fn enabled_vectors(&self) -> u32 {
        self.enabled
    }

    /// Collect what masked vectors signalled into the pending bits; their value.
    pub(super) fn pending_bits(&mut self) -> u32 {
        for v in 0..self.enabled {
            let i = v as usize;
            if !self.direct[i] && self.parking[i].read().is_ok_and(|n| n > 0) {
                self.pending |= 1 << v;
            }
        }
        self.pending
    }

    /// Apply the capability as the guest left it after a write: routes, masks, enable.
    pub(super) fn sync(&mut self, config: &PciConfiguration) -> MsiChange {
        let control = (config.read_reg(self.cap_reg) >> 16) as u16;
        let address = u64::from(config.read_reg(self.cap_reg + 1))
            | u64::from(config.read_reg(self.cap_reg + 2)) << 32;
        let data = config.read_reg(self.cap_reg + 3) & 0xffff;
        let mask = config.read_reg(self.cap_reg + 4);
        let count = if control & MSI_ENABLE != 0 {
            (1u32 << ((control >> 4) & 7).min(5)).min(self.max_vectors)
        } else {
            0
        };
        let was = self.enabled;
        if count == 0 {
            self.enabled = 0;
            self.direct.iter_mut().for_each(|d| *d = false);
            return if was > 0 {
                MsiChange::Disable
            } else {
                MsiChange::None
            };
        }
        let mut changed = Vec::new();
        for v in 0..count {
            let i = v as usize;
            // Multiple vectors: the low bits of the data select the vector.
            let msg = (address, data | v);
            if self.routed[i] != Some(msg) {
                match self
                    .interrupts
                    .update_msi(self.vectors[i].gsi, msg.0, msg.1)
                {
                    Ok(()) => self.routed[i] = Some(msg),
                    Err(e) => log::warn!("MSI: cannot route vector {v}: {e}"),
                }
            }
            let want = mask & (1 << v) == 0 && self.routed[i].is_some();
            if want != self.direct[i] {
                self.direct[i] = want;
                changed.push(v);
            }
        }
        self.enabled = count;
        if was != count {
            return MsiChange::Enable;
        }
        if changed.is_empty() {
            MsiChange::None
        } else {
            MsiChange::Vectors(changed)
        }
    }

    /// After vector `v` was unmasked and its irqfd handed to the device: deliver what it
    /// signalled while masked.
    pub(super) fn deliver_pending(&mut self, v: u32) {
        let i = v as usize;
        let parked = self.parking[i].read().is_ok_and(|n| n > 0);
        if parked || self.pending & (1 << v) != 0 {
            self.pending &= !(1 << v);
            if let Err(e) = self.vectors[i].irqfd.write(1) {
                log::warn!("MSI: cannot deliver pending vector {v}: {e}");
            }
        }
    }
}

/// Bits for `n` vectors.
fn vector_bits(n: u32) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1 << n) - 1
    }
}

/// Errors setting up MSI.
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// The capability does not fit the configuration space.
    #[error("MSI capability: {0}")]
    Config(#[source] PciConfigError),
    /// Vectors or eventfds could not be allocated.
    #[error("MSI vectors: {0}")]
    Interrupts(#[source] std::io::Error),
}
