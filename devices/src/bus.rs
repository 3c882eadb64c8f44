//! An address-ranged bus that routes vCPU PIO or MMIO accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// Errors from bus registration and dispatch.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one that is already registered.
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length or overflowing range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// No device claims the address.
    #[error("no device at {0:#x}")]
    NoDevice(u64),
}

/// A device reachable through PIO or MMIO.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Shared handle to a device on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `device` for `[base, base + len)`.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Remove the device registered at exactly `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NoDevice(base))
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, SharedBusDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = ranges.range(..=addr).next_back()?;
        let last = addr.checked_add(len.max(1) as u64 - 1)?;
        if last < base + entry.len {
            Some((*base, entry.device.clone()))
        } else {
            None
        }
    }

    /// Dispatch a read; fails when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, dev) = self
            .resolve(addr, data.len())
            .ok_or(BusError::NoDevice(addr))?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(base, addr - base, data);
        Ok(())
    }

    /// Dispatch a write; fails when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (base, dev) = self
            .resolve(addr, data.len())
            .ok_or(BusError::NoDevice(addr))?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(base, addr - base, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(0x10))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(0x20))), 0x110, 0x10)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 2),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 2
            })
        );
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x0, 0).is_err());
        let mut b = [0u8; 1];
        bus.read(0x103, &mut b).unwrap();
        assert_eq!(b[0], 0x13);
        bus.write(0x110, &[0x40]).unwrap();
        bus.read(0x111, &mut b).unwrap();
        assert_eq!(b[0], 0x41);
        assert_eq!(bus.read(0x120, &mut b), Err(BusError::NoDevice(0x120)));
        // An access straddling the end of a range is not claimed.
        let mut w = [0u8; 2];
        assert!(bus.read(0x11f, &mut w).is_err());
        bus.remove(0x110).unwrap();
        assert!(bus.read(0x110, &mut b).is_err());
    }
}
