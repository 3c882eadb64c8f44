//! The virtio-pci *modern* transport (virtio 1.x §4.1): vendor-specific capabilities (ID 0x09)
//! locate the common configuration, notification, ISR and device configuration regions in the
//! function's memory BARs. The guest enables memory decoding and bus mastering itself and uses
//! the BAR addresses it finds (assigning one only when a needed BAR is 0 or above 4 GiB).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::queue::Virtqueue;
use super::{status, F_VERSION_1};
use crate::arch::time::Deadline;
use crate::dma;
use crate::pci::msix::{self, Msix};
use crate::pci::{bar, capabilities, command, update_command, ConfigSpace, PciFunction};

/// Common configuration structure.
pub const CAP_COMMON: u8 = 1;
/// Notification structure.
pub const CAP_NOTIFY: u8 = 2;
/// ISR status byte.
pub const CAP_ISR: u8 = 3;
/// Device-specific configuration.
pub const CAP_DEVICE: u8 = 4;

/// `queue_msix_vector` / `config_msix_vector` value meaning "no vector".
pub const NO_VECTOR: u16 = 0xFFFF;

// Common configuration layout (§4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// One vendor capability as found.
#[derive(Clone, Copy, Debug)]
struct VirtioCap {
    bar: u8,
    offset: u32,
    length: u32,
    /// Config-space offset of the capability (for the notify multiplier).
    at: u16,
}

/// A virtio-pci modern function, opened.
pub struct Transport {
    /// Configuration space access.
    pub cfg: &'static dyn ConfigSpace,
    /// The PCI function.
    pub func: PciFunction,
    common: u64,
    notify_base: u64,
    notify_mult: u32,
    isr: u64,
    device: u64,
    /// Length of the device configuration region (0 if the device has none).
    pub device_len: u32,
    /// MSI-X capability, table and PBA resolved (None if the function has none).
    pub msix: Option<Msix>,
    /// Features accepted in the last successful negotiation.
    pub features: u64,
    /// `(bar index, address, size, assigned by the guest)` of every BAR used.
    pub bars: Vec<(u8, u64, u64, bool)>,
}

impl Transport {
    /// Locate the capabilities, make their BARs usable (assigning missing ones, avoiding
    /// `used`), enable memory decoding and bus mastering.
    pub fn open(
        cfg: &'static dyn ConfigSpace,
        func: PciFunction,
        used: &mut Vec<(u64, u64)>,
    ) -> Result<Transport, String> {
        let bdf = func.bdf;
        let mut caps: [Option<VirtioCap>; 5] = [None; 5];
        let mut msix = None;
        for (at, id) in capabilities(cfg, bdf) {
            if id == 0x09 {
                let kind = cfg.read8(bdf, at + 3);
                let bar = cfg.read8(bdf, at + 4);
                if (1..=4).contains(&kind) && bar <= 5 && caps[usize::from(kind)].is_none() {
                    caps[usize::from(kind)] = Some(VirtioCap {
                        bar,
                        offset: cfg.read32(bdf, at + 8),
                        length: cfg.read32(bdf, at + 12),
                        at,
                    });
                }
            } else if id == msix::CAP_ID && msix.is_none() {
                msix = Some(Msix::parse(cfg, bdf, at));
            }
        }
        let need = |kind: u8| {
            caps[usize::from(kind)]
                .ok_or_else(|| format!("{bdf}: no virtio-pci capability of type {kind}"))
        };
        let common = need(CAP_COMMON)?;
        let notify = need(CAP_NOTIFY)?;
        let isr = need(CAP_ISR)?;
        let device = caps[usize::from(CAP_DEVICE)];

        let mut wanted: Vec<u8> = [Some(common), Some(notify), Some(isr), device]
            .iter()
            .flatten()
            .map(|c| c.bar)
            .collect();
        if let Some(m) = &msix {
            wanted.push(m.table_bar);
            wanted.push(m.pba_bar);
        }
        wanted.sort_unstable();
        wanted.dedup();
        let mut bars = Vec::new();
        for index in wanted {
            let (b, assigned) = bar::ensure_assigned(cfg, bdf, index, used)
                .map_err(|e| format!("{bdf}: BAR{index}: {e}"))?;
            bars.push((index, b.addr, b.size, assigned));
        }
        let base = |index: u8| bars.iter().find(|b| b.0 == index).map(|b| b.1).unwrap_or(0);
        let at = |c: VirtioCap| base(c.bar) + u64::from(c.offset);
        if let Some(m) = msix.as_mut() {
            m.resolve(base);
        }
        update_command(cfg, bdf, command::MEMORY | command::BUS_MASTER, command::IO);
        Ok(Transport {
            cfg,
            func,
            common: at(common),
            notify_base: at(notify),
            notify_mult: cfg.read32(bdf, notify.at + 16),
            isr: at(isr),
            device: device.map(at).unwrap_or(0),
            device_len: device.map(|d| d.length).unwrap_or(0),
            msix,
            features: 0,
            bars,
        })
    }

    fn r8(&self, off: u64) -> u8 {
        dma::read::<u8>(self.common + off)
    }
    fn r16(&self, off: u64) -> u16 {
        dma::read::<u16>(self.common + off)
    }
    fn r32(&self, off: u64) -> u32 {
        dma::read::<u32>(self.common + off)
    }
    fn w8(&self, off: u64, v: u8) {
        dma::write::<u8>(self.common + off, v)
    }
    fn w16(&self, off: u64, v: u16) {
        dma::write::<u16>(self.common + off, v)
    }
    fn w32(&self, off: u64, v: u32) {
        dma::write::<u32>(self.common + off, v)
    }
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    /// Device status register.
    pub fn status(&self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    /// Write the device status register.
    pub fn set_status(&self, s: u8) {
        self.w8(DEVICE_STATUS, s)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.r16(NUM_QUEUES)
    }

    /// Reset the device (status 0) and wait (bounded) until it reads back 0.
    pub fn reset(&self) -> Result<(), String> {
        self.set_status(0);
        let deadline = Deadline::after_ms(1000);
        while self.status() != 0 {
            if deadline.expired() {
                return Err(format!("{}: device did not reset", self.func.bdf));
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// All 64 device feature bits.
    pub fn device_features(&self) -> u64 {
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `wanted & offered` (VERSION_1 is required) and
    /// complete the FEATURES_OK handshake. Returns the accepted features.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, String> {
        let bdf = self.func.bdf;
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            self.set_status(status::FAILED);
            return Err(format!("{bdf}: device does not offer VIRTIO_F_VERSION_1"));
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, accepted as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (accepted >> 32) as u32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(format!(
                "{bdf}: device rejected features {accepted:#x} (FEATURES_OK not set)"
            ));
        }
        self.features = accepted;
        Ok(accepted)
    }

    /// Set up queue `index` with at most `max_size` descriptors, optionally routed to MSI-X
    /// table entry `msix_entry`, and enable it.
    pub fn setup_queue(
        &self,
        index: u16,
        max_size: u16,
        msix_entry: Option<u16>,
    ) -> Result<Virtqueue, String> {
        self.setup_queue_translated(index, max_size, msix_entry, &mut |gpa, _| Ok(gpa))
    }

    /// Like [`Transport::setup_queue`], for a device whose DMA goes through an IOMMU: `translate`
    /// is called once per ring (descriptor table, available ring, used ring) with its
    /// guest-physical address and length, makes it reachable for the device (maps it) and returns
    /// the address the device must be given (its IOVA). The driver keeps using the
    /// guest-physical addresses itself.
    pub fn setup_queue_translated(
        &self,
        index: u16,
        max_size: u16,
        msix_entry: Option<u16>,
        translate: &mut dyn FnMut(u64, usize) -> Result<u64, String>,
    ) -> Result<Virtqueue, String> {
        let bdf = self.func.bdf;
        self.w16(QUEUE_SELECT, index);
        let offered = self.r16(QUEUE_SIZE);
        if offered == 0 {
            return Err(format!("{bdf}: queue {index} does not exist"));
        }
        let size = offered.min(max_size);
        self.w16(QUEUE_SIZE, size);
        let notify =
            self.notify_base + u64::from(self.r16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_mult);
        let q = Virtqueue::new(index, size, notify);
        let [desc, avail, used] = q.regions();
        self.w64(QUEUE_DESC, translate(desc.0, desc.1)?);
        self.w64(QUEUE_DRIVER, translate(avail.0, avail.1)?);
        self.w64(QUEUE_DEVICE, translate(used.0, used.1)?);
        if let Some(entry) = msix_entry {
            self.w16(QUEUE_MSIX_VECTOR, entry);
            let back = self.r16(QUEUE_MSIX_VECTOR);
            if back != entry {
                return Err(format!(
                    "{bdf}: queue {index} MSI-X vector reads back {back:#x}, wrote {entry}"
                ));
            }
        }
        self.w16(QUEUE_ENABLE, 1);
        Ok(q)
    }

    /// Route queue `index`'s interrupt to MSI-X entry `entry` (or [`NO_VECTOR`]); returns what
    /// reads back.
    pub fn set_queue_vector(&self, index: u16, entry: u16) -> u16 {
        self.w16(QUEUE_SELECT, index);
        self.w16(QUEUE_MSIX_VECTOR, entry);
        self.r16(QUEUE_MSIX_VECTOR)
    }

    /// Route configuration-change interrupts to MSI-X entry `entry` (or [`NO_VECTOR`]); returns
    /// what reads back.
    pub fn set_config_vector(&self, entry: u16) -> u16 {
        self.w16(CONFIG_MSIX_VECTOR, entry);
        self.r16(CONFIG_MSIX_VECTOR)
    }

    /// Set DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.set_status(self.status() | status::DRIVER_OK);
    }

    /// Address of the ISR status byte (reading it clears it and deasserts INTx).
    pub fn isr_addr(&self) -> u64 {
        self.isr
    }

    /// Read (and thereby clear) the ISR status byte.
    pub fn read_isr(&self) -> u8 {
        dma::read::<u8>(self.isr)
    }

    fn config_generation(&self) -> u8 {
        self.r8(CONFIG_GENERATION)
    }

    /// Read `len` bytes of device configuration at `off` (consistent across
    /// `config_generation`; naturally aligned accesses of up to 4 bytes).
    pub fn device_config(&self, off: u32, len: u32) -> Vec<u8> {
        assert!(
            off + len <= self.device_len,
            "device config read beyond its region"
        );
        loop {
            let before = self.config_generation();
            let mut out = Vec::with_capacity(len as usize);
            let mut i = 0;
            while i < len {
                let a = self.device + u64::from(off + i);
                if (off + i).is_multiple_of(4) && len - i >= 4 {
                    out.extend_from_slice(&dma::read::<u32>(a).to_le_bytes());
                    i += 4;
                } else {
                    out.push(dma::read::<u8>(a));
                    i += 1;
                }
            }
            if self.config_generation() == before {
                return out;
            }
        }
    }

    /// Write one byte of device configuration at `off` (the few writable config fields, such
    /// as virtio-iommu's `bypass`).
    pub fn device_config_write_u8(&self, off: u32, value: u8) {
        assert!(
            off < self.device_len,
            "device config write beyond its region"
        );
        dma::write::<u8>(self.device + u64::from(off), value);
    }

    /// A little-endian `u32` of device configuration at `off`.
    pub fn device_config_u32(&self, off: u32) -> u32 {
        let b = self.device_config(off, 4);
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }

    /// A little-endian `u64` of device configuration at `off`.
    pub fn device_config_u64(&self, off: u32) -> u64 {
        let b = self.device_config(off, 8);
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }
}
