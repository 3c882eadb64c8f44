//! Guest RAM: one memfd, mapped shared, split into regions around the 32-bit PCI hole.
//!
//! The memfd lets later code hand guest RAM to vfio-user servers and to a local migration target;
//! every region carries a dirty bitmap so VMM-side writes are tracked for migration.

use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress};

use crate::boot::ram_ranges;

/// Guest memory with a dirty bitmap on every region, so VMM-side writes are tracked for migration.
pub type GuestMemoryMmap = devices::GuestMemoryMmap;
/// One mapped region of guest memory.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors while creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest RAM file: {0}")]
    Memfd(#[source] std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map {size} bytes of guest RAM: {reason}")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// The host cannot back the requested size.
    #[error("--memory: size={size} is larger than the host can back ({host} bytes of RAM + swap)")]
    TooLarge {
        /// Requested size.
        size: u64,
        /// What the host has.
        host: u64,
    },
}

/// RAM plus swap of the host, from /proc/meminfo (bytes), if readable.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut total = 0u64;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(k @ ("MemTotal:" | "SwapTotal:")), Some(v)) = (it.next(), it.next()) {
            let _ = k;
            total += v.parse::<u64>().ok()? * 1024;
        }
    }
    (total > 0).then_some(total)
}

/// Refuse sizes the host cannot back with RAM + swap.
pub fn check_host_can_back(size: u64) -> Result<(), MemoryError> {
    match host_memory_bytes() {
        Some(host) if size > host => Err(MemoryError::TooLarge { size, host }),
        _ => Ok(()),
    }
}

/// Create guest RAM of `size` bytes backed by a memfd; returns the memory and the memfd.
pub fn create_guest_memory(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    check_host_can_back(size)?;
    // SAFETY: the name is a valid NUL-terminated string; flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(c"skiff-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    guest_memory_from(file, size)
}

/// Guest RAM of `size` bytes in an existing memfd (another skiff's guest RAM, handed over for a
/// local migration): it must be exactly `size` bytes long.
pub fn guest_memory_from(file: File, size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    let len = file.metadata().map_err(MemoryError::Memfd)?.len();
    if len != size {
        return Err(MemoryError::Map {
            size,
            reason: format!("the guest RAM file has {len} bytes, the VM needs {size}"),
        });
    }
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(clone, offset)),
        ));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| MemoryError::Map {
        size,
        reason: e.to_string(),
    })?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memfd_backed_and_shared() {
        let (mem, file) = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        // The write is visible through the memfd: the mapping is shared.
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        // The VMM-side write is dirty-tracked.
        let region = mem.find_region(GuestAddress(0x1000)).unwrap();
        assert!(region.bitmap().dirty_at(0x1000));
        assert!(!region.bitmap().dirty_at(0x10000));
    }

    #[test]
    fn too_large_is_refused() {
        let host = host_memory_bytes().unwrap();
        assert!(matches!(
            create_guest_memory(host * 2),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
