//! BAR address allocation: first fit, naturally aligned, in the 32-bit MMIO window, the 64-bit
//! MMIO window and the I/O port range above the legacy ports.
//!
//! The placement itself is rust-vmm's `vm-allocator` (an interval tree with
//! [`AllocPolicy::FirstMatch`], i.e. the lowest free address that satisfies the alignment); this
//! file adds the PCI policy on top: BAR sizes are powers of two aligned to themselves, errors name
//! the window, a BAR is released by its address, and small 64-bit BARs prefer the 32-bit window.

use std::collections::BTreeMap;

use thiserror::Error;
use vm_allocator::{AllocPolicy, RangeInclusive};

use crate::configuration::BarKind;

/// First I/O port handed to BARs (everything below is legacy ISA / ACPI / 0xCF8).
pub const PCI_IO_START: u64 = 0x1000;
/// End (exclusive) of the I/O port space.
pub const PCI_IO_END: u64 = 0x1_0000;

/// Errors from [`AddressAllocator`] and [`BarAllocator`].
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AllocError {
    /// Size zero or not a power of two.
    #[error("invalid allocation size {0:#x}")]
    InvalidSize(u64),
    /// No aligned hole of the size is left.
    #[error("no room for {size:#x} bytes in {window}")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// Which window.
        window: &'static str,
    },
    /// The window is empty, overflows, or reaches the last address of the 64-bit space (which
    /// vm-allocator cannot hand out: it computes a range's end as `start + size - 1` in that order).
    #[error("invalid window {start:#x}+{size:#x}")]
    InvalidWindow {
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// Nothing was allocated at the address.
    #[error("nothing allocated at {0:#x}")]
    NotAllocated(u64),
    /// vm-allocator refused an operation for another reason than a full window (it does not for
    /// the naturally aligned requests made here; kept so such an error is reported, not hidden).
    #[error("address allocation in {window} failed")]
    Allocator {
        /// Which window.
        window: &'static str,
        /// vm-allocator's error.
        #[source]
        source: vm_allocator::Error,
    },
}

/// Allocates naturally aligned power-of-two ranges inside `[start, start + size)`, lowest
/// address first.
#[derive(Debug, Clone)]
pub struct AddressAllocator {
    name: &'static str,
    inner: vm_allocator::AddressAllocator,
    /// Allocated ranges by start address, so that [`AddressAllocator::free`] takes an address
    /// (vm-allocator frees by range).
    used: BTreeMap<u64, RangeInclusive>,
}

impl AddressAllocator {
    /// An allocator over `[start, start + size)`, named `name` in errors.
    ///
    /// The window must end below `u64::MAX` (see [`AllocError::InvalidWindow`]); no PCI window
    /// gets near it, guest physical addresses have at most 52 bits.
    pub fn new(name: &'static str, start: u64, size: u64) -> Result<Self, AllocError> {
        if start.checked_add(size).is_none() {
            return Err(AllocError::InvalidWindow { start, size });
        }
        let inner = vm_allocator::AddressAllocator::new(start, size).map_err(|e| match e {
            // Size zero, or a window past the end of the address space.
            vm_allocator::Error::Underflow | vm_allocator::Error::Overflow => {
                AllocError::InvalidWindow { start, size }
            }
            source => AllocError::Allocator {
                window: name,
                source,
            },
        })?;
        Ok(Self {
            name,
            inner,
            used: BTreeMap::new(),
        })
    }

    /// The lowest free range of `size` bytes (a power of two) aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, AllocError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(AllocError::InvalidSize(size));
        }
        let range = self
            .inner
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|e| match e {
                vm_allocator::Error::ResourceNotAvailable => AllocError::Exhausted {
                    size,
                    window: self.name,
                },
                source => AllocError::Allocator {
                    window: self.name,
                    source,
                },
            })?;
        self.used.insert(range.start(), range);
        Ok(range.start())
    }

    /// Release the range allocated at `addr`.
    pub fn free(&mut self, addr: u64) -> Result<(), AllocError> {
        let range = self
            .used
            .remove(&addr)
            .ok_or(AllocError::NotAllocated(addr))?;
        self.inner
            .free(&range)
            .map_err(|source| AllocError::Allocator {
                window: self.name,
                source,
            })
    }
}

/// 64-bit BARs up to this size prefer the 32-bit window.
pub const SMALL_BAR_MAX: u64 = 16 << 20;

/// The three BAR windows of a PCI segment.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    io: AddressAllocator,
}

impl BarAllocator {
    /// Windows given as `(start, size)`; I/O BARs come from `PCI_IO_START..PCI_IO_END`.
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64)) -> Result<Self, AllocError> {
        Ok(Self {
            mmio32: AddressAllocator::new("the 32-bit PCI MMIO window", mmio32.0, mmio32.1)?,
            mmio64: AddressAllocator::new("the 64-bit PCI MMIO window", mmio64.0, mmio64.1)?,
            io: AddressAllocator::new(
                "the PCI I/O port range",
                PCI_IO_START,
                PCI_IO_END - PCI_IO_START,
            )?,
        })
    }

    fn window(&mut self, kind: BarKind) -> &mut AddressAllocator {
        match kind {
            BarKind::Io => &mut self.io,
            BarKind::Mem32 { .. } => &mut self.mmio32,
            BarKind::Mem64 { .. } => &mut self.mmio64,
        }
    }

    /// An address for a BAR of `size` bytes decoding `kind`, aligned to `size`.
    ///
    /// Small 64-bit BARs (up to [`SMALL_BAR_MAX`], e.g. virtio's) are placed in the 32-bit window
    /// while it has room — like firmware does, so that drivers limited to 32-bit addresses work —
    /// and large ones (GPU apertures) in the 64-bit window. Either falls back to the other window.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError> {
        if matches!(kind, BarKind::Mem64 { .. }) {
            let (first, second) = if size <= SMALL_BAR_MAX {
                (&mut self.mmio32, &mut self.mmio64)
            } else {
                (&mut self.mmio64, &mut self.mmio32)
            };
            return match first.allocate(size) {
                Err(AllocError::Exhausted { .. }) => second.allocate(size),
                r => r,
            };
        }
        self.window(kind).allocate(size)
    }

    /// Release a BAR allocated at `addr` for `kind`.
    pub fn free(&mut self, kind: BarKind, addr: u64) -> Result<(), AllocError> {
        match self.window(kind).free(addr) {
            Err(AllocError::NotAllocated(_)) if matches!(kind, BarKind::Mem64 { .. }) => {
                let other = if addr < 1 << 32 {
                    &mut self.mmio32
                } else {
                    &mut self.mmio64
                };
                other.free(addr)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_with_natural_alignment() {
        let mut a = AddressAllocator::new("w", 0x1000, 0x10000).unwrap();
        assert_eq!(a.allocate(0x100), Ok(0x1000));
        assert_eq!(a.allocate(0x1000), Ok(0x2000));
        assert_eq!(a.allocate(0x100), Ok(0x1100));
        assert_eq!(a.allocate(0x4000), Ok(0x4000));
        assert_eq!(a.allocate(0x800), Ok(0x1800));
        assert_eq!(a.allocate(0x8000), Ok(0x8000));
        assert!(matches!(
            a.allocate(0x8000),
            Err(AllocError::Exhausted { .. })
        ));
        a.free(0x4000).unwrap();
        assert_eq!(a.allocate(0x2000), Ok(0x4000));
        assert_eq!(a.free(0x4321), Err(AllocError::NotAllocated(0x4321)));
        assert_eq!(a.allocate(0), Err(AllocError::InvalidSize(0)));
        assert_eq!(a.allocate(0x300), Err(AllocError::InvalidSize(0x300)));
        assert!(a.allocate(1 << 63).is_err());
    }

    #[test]
    fn freed_neighbours_merge_again() {
        let mut a = AddressAllocator::new("w", 0, 0x4000).unwrap();
        let bars: Vec<u64> = (0..4).map(|_| a.allocate(0x1000).unwrap()).collect();
        assert_eq!(bars, [0, 0x1000, 0x2000, 0x3000]);
        assert!(a.allocate(0x2000).is_err());
        // Freed out of order: the holes merge on both sides into one window-sized hole.
        for addr in [0x1000, 0x3000, 0x2000] {
            a.free(addr).unwrap();
        }
        assert_eq!(a.allocate(0x2000), Ok(0x2000));
        a.free(0).unwrap();
        assert_eq!(a.allocate(0x2000), Ok(0));
        assert_eq!(a.free(0x1000), Err(AllocError::NotAllocated(0x1000)));
    }

    #[test]
    fn exhaustion_and_window_edges() {
        let mut a = AddressAllocator::new("w", 0x800, 0x1800).unwrap();
        // The first 4 KiB-aligned slot is 0x1000.
        assert_eq!(a.allocate(0x1000), Ok(0x1000));
        assert!(a.allocate(0x1000).is_err());
        assert_eq!(a.allocate(0x800), Ok(0x800));
        assert!(a.allocate(0x10).is_err());
        // A window just below the top of the address space; one that includes the last address
        // is refused (vm-allocator cannot place a range ending there).
        let mut top = AddressAllocator::new("top", u64::MAX - 0x1fff, 0x1000).unwrap();
        assert_eq!(top.allocate(0x1000), Ok(u64::MAX - 0x1fff));
        assert!(top.allocate(0x10).is_err());
        top.free(u64::MAX - 0x1fff).unwrap();
        assert_eq!(top.allocate(0x1000), Ok(u64::MAX - 0x1fff));
        assert_eq!(
            AddressAllocator::new("top", u64::MAX - 0xfff, 0x1000).unwrap_err(),
            AllocError::InvalidWindow {
                start: u64::MAX - 0xfff,
                size: 0x1000
            }
        );
        assert!(AddressAllocator::new("bad", 0, 0).is_err());
        assert!(AddressAllocator::new("bad", u64::MAX, 2).is_err());
    }

    #[test]
    fn bar_windows() {
        let mut b = BarAllocator::new((0xc000_0000, 0x2000_0000), (1 << 36, 1 << 30)).unwrap();
        let m64 = BarKind::Mem64 {
            prefetchable: false,
        };
        let m32 = BarKind::Mem32 {
            prefetchable: false,
        };
        // A small 64-bit BAR goes to the 32-bit window (like firmware), aligned to its size.
        assert_eq!(b.allocate(m64, 0x4000), Ok(0xc000_0000));
        assert_eq!(b.allocate(m32, 0x1000), Ok(0xc000_4000));
        assert_eq!(b.allocate(BarKind::Io, 0x20), Ok(0x1000));
        assert_eq!(b.allocate(BarKind::Io, 0x100), Ok(0x1100));
        // A large 64-bit BAR goes to the 64-bit window.
        assert_eq!(b.allocate(m64, 0x1000_0000), Ok(1 << 36));
        // Too big for both windows.
        assert_eq!(
            b.allocate(m64, 1 << 31),
            Err(AllocError::Exhausted {
                size: 1 << 31,
                window: "the 32-bit PCI MMIO window"
            })
        );
        assert!(b.allocate(BarKind::Io, 0x1_0000).is_err());
        b.free(m64, 0xc000_0000).unwrap();
        assert_eq!(b.allocate(m64, 0x4000), Ok(0xc000_0000));
        b.free(m64, 1 << 36).unwrap();
        assert_eq!(b.allocate(m64, 0x1000_0000), Ok(1 << 36));
        // When the 32-bit window is full, small 64-bit BARs go high.
        let mut full = BarAllocator::new((0xc000_0000, 0x4000), (1 << 36, 1 << 30)).unwrap();
        assert_eq!(full.allocate(m64, 0x4000), Ok(0xc000_0000));
        assert_eq!(full.allocate(m64, 0x4000), Ok(1 << 36));
        b.free(BarKind::Io, 0x1000).unwrap();
        assert!(b.free(BarKind::Io, 0x1000).is_err());
    }
}
