//! BAR address allocation: first fit, naturally aligned, in the 32-bit MMIO window, the 64-bit
//! MMIO window and the I/O port range above the legacy ports.

use std::collections::BTreeMap;

use thiserror::Error;

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
    /// The window is empty or overflows.
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
}

/// Allocates naturally aligned power-of-two ranges inside `[start, start + size)`.
#[derive(Debug, Clone)]
pub struct AddressAllocator {
    name: &'static str,
    start: u64,
    /// Last address of the window (inclusive), so a window may end at `u64::MAX`.
    last: u64,
    /// Allocated ranges: start → size.
    used: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// An allocator over `[start, start + size)`, named `name` in errors.
    pub fn new(name: &'static str, start: u64, size: u64) -> Result<Self, AllocError> {
        let last = start
            .checked_add(
                size.checked_sub(1)
                    .ok_or(AllocError::InvalidWindow { start, size })?,
            )
            .ok_or(AllocError::InvalidWindow { start, size })?;
        Ok(Self {
            name,
            start,
            last,
            used: BTreeMap::new(),
        })
    }

    /// The lowest free range of `size` bytes (a power of two) aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, AllocError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(AllocError::InvalidSize(size));
        }
        let exhausted = AllocError::Exhausted {
            size,
            window: self.name,
        };
        let mut candidate = align_up(self.start, size).ok_or(exhausted.clone())?;
        for (&base, &len) in &self.used {
            // `base + len - 1` cannot overflow: allocations lie inside the window.
            if candidate.checked_add(size - 1).ok_or(exhausted.clone())? < base {
                break;
            }
            let end = base + (len - 1);
            if end >= candidate {
                candidate = end
                    .checked_add(1)
                    .and_then(|e| align_up(e, size))
                    .ok_or(exhausted.clone())?;
            }
        }
        match candidate.checked_add(size - 1) {
            Some(last) if last <= self.last => {
                self.used.insert(candidate, size);
                Ok(candidate)
            }
            _ => Err(exhausted),
        }
    }

    /// Release the range allocated at `addr`.
    pub fn free(&mut self, addr: u64) -> Result<(), AllocError> {
        self.used
            .remove(&addr)
            .map(|_| ())
            .ok_or(AllocError::NotAllocated(addr))
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
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
    fn exhaustion_and_window_edges() {
        let mut a = AddressAllocator::new("w", 0x800, 0x1800).unwrap();
        // The first 4 KiB-aligned slot is 0x1000.
        assert_eq!(a.allocate(0x1000), Ok(0x1000));
        assert!(a.allocate(0x1000).is_err());
        assert_eq!(a.allocate(0x800), Ok(0x800));
        assert!(a.allocate(0x10).is_err());
        // A window at the very top of the address space.
        let mut top = AddressAllocator::new("top", u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(top.allocate(0x1000), Ok(u64::MAX - 0xfff));
        assert!(top.allocate(0x10).is_err());
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
