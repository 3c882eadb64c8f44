//! One translation domain: a set of non-overlapping IOVA → guest-physical mappings.
//!
//! Mappings live in a `BTreeMap` keyed by their first IOVA, so lookup, insertion and removal are
//! logarithmic in the number of mappings.

use std::collections::BTreeMap;

use crate::protocol::{
    IommuStatus, VIRTIO_IOMMU_MAP_F_MASK, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
};

/// One mapping of a domain, keyed in the domain by its first IOVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Last IOVA of the mapping (inclusive).
    pub iova_end: u64,
    /// Guest-physical address of the first IOVA.
    pub phys: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` flags.
    pub flags: u32,
}

/// The kind of access a device makes through the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device reads guest memory.
    Read,
    /// The device writes guest memory.
    Write,
}

impl Access {
    fn required_flag(self) -> u32 {
        match self {
            Access::Read => VIRTIO_IOMMU_MAP_F_READ,
            Access::Write => VIRTIO_IOMMU_MAP_F_WRITE,
        }
    }
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The endpoint is not attached to any domain and bypass is off.
    NoDomain,
    /// No mapping covers the address.
    Unmapped,
    /// A mapping covers the address but does not allow the access.
    Permission,
    /// The buffer wraps around the end of the 64-bit IOVA space.
    Overflow,
}

/// A failed translation: the first faulting IOVA and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("IOMMU fault at IOVA {iova:#x} ({access:?}): {reason:?}")]
pub struct Fault {
    /// First IOVA that could not be translated.
    pub iova: u64,
    /// The access that faulted.
    pub access: Access,
    /// Why it faulted.
    pub reason: FaultReason,
}

/// A translation domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domain {
    bypass: bool,
    mappings: BTreeMap<u64, Mapping>,
}

impl Domain {
    /// An empty translating domain.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bypass domain: every IOVA is the guest-physical address itself; it holds no mappings.
    pub fn new_bypass() -> Self {
        Self {
            bypass: true,
            mappings: BTreeMap::new(),
        }
    }

    /// Whether this is a bypass domain.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether the domain has no mappings.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Iterate over `(iova_start, mapping)` in IOVA order.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, &Mapping)> + '_ {
        self.mappings.iter().map(|(k, v)| (*k, v))
    }

    /// Add a mapping of `[iova_start, iova_end]` to `phys`.
    ///
    /// `INVAL` for a bypass domain, unknown flags, `iova_start > iova_end` or an overlap with an
    /// existing mapping; `RANGE` when the physical range would wrap around 2^64.
    pub fn map(
        &mut self,
        iova_start: u64,
        iova_end: u64,
        phys: u64,
        flags: u32,
    ) -> Result<(), IommuStatus> {
        if self.bypass || iova_start > iova_end || flags & !VIRTIO_IOMMU_MAP_F_MASK != 0 {
            return Err(IommuStatus::Inval);
        }
        if phys.checked_add(iova_end - iova_start).is_none() {
            return Err(IommuStatus::Range);
        }
        // The mapping with the greatest start <= iova_end is the only candidate for an overlap:
        // any overlapping mapping starts at or before iova_end, and mappings are disjoint.
        if let Some((_, m)) = self.mappings.range(..=iova_end).next_back() {
            if m.iova_end >= iova_start {
                return Err(IommuStatus::Inval);
            }
        }
        self.mappings.insert(
            iova_start,
            Mapping {
                iova_end,
                phys,
                flags,
            },
        );
        Ok(())
    }

    /// Remove every mapping inside `[iova_start, iova_end]` (virtio-iommu 1.x semantics) and
    /// return the removed `(iova_start, mapping)` pairs.
    ///
    /// `RANGE` (and nothing removed) when the range would split a mapping; `INVAL` when
    /// `iova_start > iova_end`. A range that covers no mapping is not an error.
    pub fn unmap(
        &mut self,
        iova_start: u64,
        iova_end: u64,
    ) -> Result<Vec<(u64, Mapping)>, IommuStatus> {
        if iova_start > iova_end {
            return Err(IommuStatus::Inval);
        }
        // A mapping that starts before the range and reaches into it would be split.
        if let Some((_, m)) = self.mappings.range(..iova_start).next_back() {
            if m.iova_end >= iova_start {
                return Err(IommuStatus::Range);
            }
        }
        // The last mapping starting inside the range must end inside it.
        if let Some((_, m)) = self.mappings.range(iova_start..=iova_end).next_back() {
            if m.iova_end > iova_end {
                return Err(IommuStatus::Range);
            }
        }
        let keys: Vec<u64> = self
            .mappings
            .range(iova_start..=iova_end)
            .map(|(k, _)| *k)
            .collect();
        Ok(keys
            .into_iter()
            .filter_map(|k| self.mappings.remove(&k).map(|m| (k, m)))
            .collect())
    }

    /// Translate the `len`-byte buffer at `iova` for `access` into guest-physical segments
    /// `(phys, len)`. Adjacent mappings that are also physically contiguous yield one segment.
    /// A zero-length buffer yields no segment. A bypass domain translates to itself.
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Result<Vec<(u64, u64)>, Fault> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        self.translate_each(iova, len, access, |phys, chunk| match out.last_mut() {
            Some((p, l)) if p.checked_add(*l) == Some(phys) => *l += chunk,
            _ => out.push((phys, chunk)),
        })?;
        Ok(out)
    }

    /// Like [`Domain::translate`], without allocating: `segment(phys, len)` is called for the
    /// part of the buffer inside each mapping, in IOVA order (physically contiguous neighbours are
    /// not merged). On a fault some segments may already have been passed.
    pub fn translate_each(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        mut segment: impl FnMut(u64, u64),
    ) -> Result<(), Fault> {
        let fault = |iova, reason| Fault {
            iova,
            access,
            reason,
        };
        if len == 0 {
            return Ok(());
        }
        if iova.checked_add(len - 1).is_none() {
            return Err(fault(iova, FaultReason::Overflow));
        }
        if self.bypass {
            segment(iova, len);
            return Ok(());
        }
        let mut cur = iova;
        let mut remaining = len;
        while remaining > 0 {
            let (start, m) = match self.mappings.range(..=cur).next_back() {
                Some((s, m)) if m.iova_end >= cur => (*s, m),
                _ => return Err(fault(cur, FaultReason::Unmapped)),
            };
            if m.flags & access.required_flag() == 0 {
                return Err(fault(cur, FaultReason::Permission));
            }
            // Bytes available from `cur` to the end of the mapping; may be 2^64, hence u128.
            let avail = u128::from(m.iova_end - cur) + 1;
            let chunk = u64::try_from(avail.min(u128::from(remaining))).unwrap_or(remaining);
            // Cannot overflow: map() checked phys + (iova_end - start) fits.
            segment(m.phys + (cur - start), chunk);
            remaining -= chunk;
            if remaining > 0 {
                // The buffer was checked not to wrap, so there is a next byte.
                cur += chunk;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    const R: u32 = VIRTIO_IOMMU_MAP_F_READ;

    #[test]
    fn map_rejects_overlaps_and_bad_ranges() {
        let mut d = Domain::new();
        d.map(0x1000, 0x1fff, 0x10000, RW).unwrap();
        d.map(0x3000, 0x3fff, 0x20000, RW).unwrap();
        for (s, e) in [
            (0x1000, 0x1fff),
            (0x0, 0x1000),
            (0x1fff, 0x2fff),
            (0x1800, 0x1900),
            (0x0, 0xffff),
            (0x2000, 0x3000),
        ] {
            assert_eq!(d.map(s, e, 0, RW), Err(IommuStatus::Inval), "{s:#x}-{e:#x}");
        }
        d.map(0x2000, 0x2fff, 0, RW).unwrap();
        assert_eq!(d.map(5, 4, 0, RW), Err(IommuStatus::Inval));
        assert_eq!(d.map(0x10000, 0x10fff, 0, 0x10), Err(IommuStatus::Inval));
        assert_eq!(
            d.map(0x10000, 0x11fff, u64::MAX - 0xfff, RW),
            Err(IommuStatus::Range)
        );
        d.map(0, 0xfff, 0, RW).unwrap();
        assert_eq!(d.len(), 4);
        let mut b = Domain::new_bypass();
        assert_eq!(b.map(0, 0xfff, 0, RW), Err(IommuStatus::Inval));
    }

    #[test]
    fn unmap_semantics() {
        let mut d = Domain::new();
        d.map(0x1000, 0x1fff, 0, RW).unwrap();
        d.map(0x2000, 0x3fff, 0, RW).unwrap();
        d.map(0x8000, 0x8fff, 0, RW).unwrap();
        // Would split 0x2000-0x3fff.
        assert_eq!(d.unmap(0x1000, 0x2fff), Err(IommuStatus::Range));
        assert_eq!(d.unmap(0x3000, 0x9fff), Err(IommuStatus::Range));
        assert_eq!(d.len(), 3);
        // Nothing there: OK.
        assert_eq!(d.unmap(0x4000, 0x7fff), Ok(vec![]));
        assert_eq!(d.unmap(5, 4), Err(IommuStatus::Inval));
        let removed = d.unmap(0x0, 0x3fff).unwrap();
        assert_eq!(
            removed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![0x1000, 0x2000]
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d.unmap(0, u64::MAX).unwrap().len(), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn translate_within_and_across_mappings() {
        let mut d = Domain::new();
        d.map(0x1000, 0x1fff, 0x10000, RW).unwrap();
        // Physically contiguous continuation.
        d.map(0x2000, 0x2fff, 0x11000, RW).unwrap();
        // Physically discontiguous continuation, read-only.
        d.map(0x3000, 0x3fff, 0x50000, R).unwrap();

        assert_eq!(
            d.translate(0x1800, 0x10, Access::Write),
            Ok(vec![(0x10800, 0x10)])
        );
        assert_eq!(
            d.translate(0x1800, 0x1000, Access::Read),
            Ok(vec![(0x10800, 0x1000)])
        );
        assert_eq!(
            d.translate(0x1f00, 0x1200, Access::Read),
            Ok(vec![(0x10f00, 0x1100), (0x50000, 0x100)])
        );
        assert_eq!(d.translate(0x1f00, 0, Access::Read), Ok(vec![]));
        let f = d.translate(0x2f00, 0x200, Access::Write).unwrap_err();
        assert_eq!((f.iova, f.reason), (0x3000, FaultReason::Permission));
        let f = d.translate(0x3f00, 0x200, Access::Read).unwrap_err();
        assert_eq!((f.iova, f.reason), (0x4000, FaultReason::Unmapped));
        let f = d.translate(0x800, 0x10, Access::Read).unwrap_err();
        assert_eq!((f.iova, f.reason), (0x800, FaultReason::Unmapped));
        let f = d.translate(u64::MAX, 2, Access::Read).unwrap_err();
        assert_eq!(f.reason, FaultReason::Overflow);
    }

    #[test]
    fn whole_address_space_mapping() {
        let mut d = Domain::new();
        d.map(0, u64::MAX, 0, RW).unwrap();
        assert_eq!(
            d.translate(u64::MAX, 1, Access::Read),
            Ok(vec![(u64::MAX, 1)])
        );
        assert_eq!(
            d.translate(0, u64::MAX, Access::Read),
            Ok(vec![(0, u64::MAX)])
        );
        let b = Domain::new_bypass();
        assert_eq!(b.translate(0x1234, 8, Access::Write), Ok(vec![(0x1234, 8)]));
    }

    #[test]
    fn hundred_thousand_mappings() {
        let mut d = Domain::new();
        const N: u64 = 100_000;
        // Every other page mapped, in reverse order to exercise insertion anywhere.
        for i in (0..N).rev() {
            let iova = i * 0x2000;
            d.map(iova, iova + 0xfff, 0x1_0000_0000 + i * 0x1000, RW)
                .unwrap();
        }
        assert_eq!(d.len(), N as usize);
        for i in (0..N).step_by(997) {
            let iova = i * 0x2000;
            assert_eq!(
                d.translate(iova + 0x10, 0x20, Access::Read),
                Ok(vec![(0x1_0000_0000 + i * 0x1000 + 0x10, 0x20)])
            );
            // The hole after each mapping faults.
            assert!(d.translate(iova + 0x1000, 1, Access::Read).is_err());
            // Cannot map over an existing page.
            assert_eq!(
                d.map(iova + 0x800, iova + 0x1fff, 0, RW),
                Err(IommuStatus::Inval)
            );
        }
        // Remove the first half in one request.
        let removed = d.unmap(0, (N / 2) * 0x2000 - 1).unwrap();
        assert_eq!(removed.len(), (N / 2) as usize);
        assert_eq!(d.len(), (N / 2) as usize);
    }
}
