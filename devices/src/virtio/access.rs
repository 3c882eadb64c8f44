//! DMA through a (virtual) IOMMU. A device that negotiated `VIRTIO_F_ACCESS_PLATFORM` takes I/O
//! virtual addresses from the guest (ring addresses and every buffer); an [`AccessPlatform`]
//! turns them into guest-physical segments, or refuses with a [`DmaFault`] that it has already
//! reported to the guest (virtio-iommu fault event).

use std::fmt;

use thiserror::Error;
use vm_memory::GuestAddress;

/// Direction of a DMA access, seen from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaAccess {
    /// The device reads guest memory (a device-readable buffer).
    Read,
    /// The device writes guest memory (a device-writable buffer).
    Write,
}

/// A device address the platform would not translate.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("IOMMU fault: {access:?} access at device address {addr:#x} is not mapped for the device")]
pub struct DmaFault {
    /// First device address that could not be translated.
    pub addr: u64,
    /// The access that faulted.
    pub access: DmaAccess,
}

/// Translates the device addresses of one endpoint (implemented by the virtio-iommu).
pub trait AccessPlatform: Send + Sync + fmt::Debug {
    /// Translate the `len`-byte buffer at device address `addr` for `access`, appending its
    /// guest-physical segments to `out` (a buffer crossing mappings gives several segments). On a
    /// fault the platform reports it to the guest and returns it; `out` is then unspecified.
    fn translate(
        &self,
        addr: u64,
        len: u64,
        access: DmaAccess,
        out: &mut Vec<(GuestAddress, u64)>,
    ) -> Result<(), DmaFault>;

    /// Translate a buffer that must be contiguous in guest-physical memory (a virtqueue ring):
    /// its guest-physical address, or why it cannot be used.
    fn translate_contiguous(
        &self,
        addr: u64,
        len: u64,
        access: DmaAccess,
    ) -> Result<GuestAddress, String> {
        let mut segs = Vec::with_capacity(1);
        self.translate(addr, len, access, &mut segs)
            .map_err(|e| e.to_string())?;
        match segs.as_slice() {
            [(gpa, l)] if *l == len => Ok(*gpa),
            [] if len == 0 => Ok(GuestAddress(0)),
            _ => Err(format!(
                "{len:#x} bytes at device address {addr:#x} are mapped to {} discontiguous guest-physical ranges",
                segs.len()
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A fixed-table [`AccessPlatform`] for device tests.

    use std::sync::Mutex;

    use super::*;

    /// Maps `[iova, iova + len)` to `gpa`; both directions allowed. Records faults.
    #[derive(Debug, Default)]
    pub struct TableAccess {
        /// `(iova, gpa, len)`.
        pub maps: Mutex<Vec<(u64, u64, u64)>>,
        /// Faults reported so far.
        pub faults: Mutex<Vec<DmaFault>>,
    }

    impl TableAccess {
        /// A platform with the given mappings.
        pub fn new(maps: &[(u64, u64, u64)]) -> Self {
            Self {
                maps: Mutex::new(maps.to_vec()),
                faults: Mutex::default(),
            }
        }
    }

    impl AccessPlatform for TableAccess {
        fn translate(
            &self,
            addr: u64,
            len: u64,
            access: DmaAccess,
            out: &mut Vec<(GuestAddress, u64)>,
        ) -> Result<(), DmaFault> {
            let maps = self.maps.lock().unwrap();
            let (mut cur, mut left) = (addr, len);
            while left > 0 {
                let Some(&(iova, gpa, mlen)) =
                    maps.iter().find(|(i, _, l)| cur >= *i && cur < i + l)
                else {
                    let f = DmaFault { addr: cur, access };
                    self.faults.lock().unwrap().push(f);
                    return Err(f);
                };
                let n = (iova + mlen - cur).min(left);
                out.push((GuestAddress(gpa + (cur - iova)), n));
                cur += n;
                left -= n;
            }
            Ok(())
        }
    }
}
