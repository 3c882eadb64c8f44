//! MSI: the capability in configuration space (ID 0x05).
//!
//! Layout after the 2-byte header: message control (+2), message address low (+4); with 64-bit
//! addresses address high (+8) and data (+0xC), else data (+8); with per-vector masking the mask
//! bits follow the data dword, then the pending bits. Like MSI-X, the guest sends messages to the
//! xAPIC of one CPU: address `0xFEE0_0000 | dest << 12`, data = vector.

use super::{write16, Bdf, ConfigSpace};

/// Capability ID of MSI.
pub const CAP_ID: u8 = 0x05;

/// Message control: MSI enable.
pub const CTRL_ENABLE: u16 = 1 << 0;
/// Message control: Multiple Message Enable (bits 6:4).
pub const CTRL_MME_MASK: u16 = 0x7 << 4;
/// Message control: 64-bit address capable.
pub const CTRL_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
pub const CTRL_PVM: u16 = 1 << 8;

/// The MSI capability of a function.
#[derive(Clone, Copy, Debug)]
pub struct Msi {
    bdf: Bdf,
    /// Config-space offset of the capability.
    pub cap: u16,
    /// Message control as read when parsed.
    pub control: u16,
}

impl Msi {
    /// Parse the capability at `cap`.
    pub fn parse(cfg: &dyn ConfigSpace, bdf: Bdf, cap: u16) -> Msi {
        Msi {
            bdf,
            cap,
            control: cfg.read16(bdf, cap + 2),
        }
    }

    /// 64-bit message address.
    pub fn is64(&self) -> bool {
        self.control & CTRL_64BIT != 0
    }

    /// Per-vector mask and pending bits.
    pub fn per_vector_mask(&self) -> bool {
        self.control & CTRL_PVM != 0
    }

    /// Vectors the function can use (Multiple Message Capable, bits 3:1: log2).
    pub fn vectors_capable(&self) -> u32 {
        1 << ((self.control >> 1) & 0x7).min(5)
    }

    fn data_off(&self) -> u16 {
        self.cap + if self.is64() { 0x0C } else { 0x08 }
    }

    fn mask_off(&self) -> u16 {
        self.cap + if self.is64() { 0x10 } else { 0x0C }
    }

    fn control_now(&self, cfg: &dyn ConfigSpace) -> u16 {
        cfg.read16(self.bdf, self.cap + 2)
    }

    /// Point the message at `vector` on the xAPIC `dest_apic` (address high 0 when 64-bit).
    pub fn program(&self, cfg: &dyn ConfigSpace, vector: u8, dest_apic: u32) {
        cfg.write32(self.bdf, self.cap + 4, self.address_for(dest_apic));
        if self.is64() {
            cfg.write32(self.bdf, self.cap + 8, 0);
        }
        write16(cfg, self.bdf, self.data_off(), u16::from(vector));
    }

    /// The message address of `dest_apic`.
    pub fn address_for(&self, dest_apic: u32) -> u32 {
        0xFEE0_0000 | (dest_apic & 0xFF) << 12
    }

    /// Message address as read back (high dword 0 without 64-bit support).
    pub fn address(&self, cfg: &dyn ConfigSpace) -> u64 {
        let lo = u64::from(cfg.read32(self.bdf, self.cap + 4));
        let hi = if self.is64() {
            u64::from(cfg.read32(self.bdf, self.cap + 8))
        } else {
            0
        };
        lo | hi << 32
    }

    /// Message data as read back.
    pub fn data(&self, cfg: &dyn ConfigSpace) -> u16 {
        cfg.read16(self.bdf, self.data_off())
    }

    /// Enable (one vector: Multiple Message Enable 0) or disable MSI.
    pub fn set_enabled(&self, cfg: &dyn ConfigSpace, on: bool) {
        let ctrl = self.control_now(cfg) & !(CTRL_ENABLE | CTRL_MME_MASK);
        write16(
            cfg,
            self.bdf,
            self.cap + 2,
            if on { ctrl | CTRL_ENABLE } else { ctrl },
        );
    }

    /// Whether the enable bit reads back set.
    pub fn enabled(&self, cfg: &dyn ConfigSpace) -> bool {
        self.control_now(cfg) & CTRL_ENABLE != 0
    }

    /// Mask bits (0 without per-vector masking).
    pub fn mask_bits(&self, cfg: &dyn ConfigSpace) -> u32 {
        if self.per_vector_mask() {
            cfg.read32(self.bdf, self.mask_off())
        } else {
            0
        }
    }

    /// Set or clear the mask bit of `vector` (nothing without per-vector masking).
    pub fn set_masked(&self, cfg: &dyn ConfigSpace, vector: u32, masked: bool) {
        if !self.per_vector_mask() {
            return;
        }
        let bits = self.mask_bits(cfg) & !(1 << vector);
        cfg.write32(
            self.bdf,
            self.mask_off(),
            bits | if masked { 1 << vector } else { 0 },
        );
    }

    /// Pending bits (0 without per-vector masking).
    pub fn pending_bits(&self, cfg: &dyn ConfigSpace) -> u32 {
        if self.per_vector_mask() {
            cfg.read32(self.bdf, self.mask_off() + 4)
        } else {
            0
        }
    }
}
