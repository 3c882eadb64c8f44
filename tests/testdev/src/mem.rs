//! Shared memory: memfd creation, MAP_SHARED mappings, and the table of the client's DMA regions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::proto::{DMA_FLAG_READ, DMA_FLAG_WRITE, MAX_DMA_MAPS};

/// Creates a memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size =
        libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fd` is a valid memfd; the return value is checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A MAP_SHARED mapping of (part of) a file; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    base: *mut u8,
    map_len: usize,
    /// Where the caller's view starts inside the mapping (file offset alignment slack).
    skew: usize,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that stays valid until drop; every access copies
// bytes in or out through raw pointers (no references into it are handed out), so it can be
// used from any thread. Concurrent writers (the client) can only make the bytes racy, not unsound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: accesses are byte copies through raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from file offset `offset`, writable when `writable`.
    pub fn new(fd: &impl AsRawFd, offset: u64, len: u64, writable: bool) -> io::Result<Mapping> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let skew = offset % page;
        let map_off = offset - skew;
        let len_usize = usize::try_from(len).map_err(|_| einval())?;
        let map_len =
            usize::try_from(len.checked_add(skew).ok_or_else(einval)?).map_err(|_| einval())?;
        if len == 0 {
            return Err(einval());
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let off = libc::off_t::try_from(map_off).map_err(|_| einval())?;
        // SAFETY: a fresh mapping at an address the kernel chooses; the fd is valid for the call;
        // the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base: p.cast(),
            map_len,
            skew: skew as usize,
            len: len_usize,
        })
    }

    /// Length of the mapped view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty (never: `new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range_ok(&self, off: u64, n: usize) -> Option<usize> {
        let off = usize::try_from(off).ok()?;
        (off.checked_add(n)? <= self.len).then_some(off + self.skew)
    }

    /// Copies `buf.len()` bytes at `off` into `buf`; false when out of range.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        let Some(start) = self.range_ok(off, buf.len()) else {
            return false;
        };
        // SAFETY: `start + buf.len() <= skew + len == map_len` was checked, so the source lies in
        // the live mapping; `buf` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(start), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` to `off`; false when out of range.
    pub fn write(&self, off: u64, data: &[u8]) -> bool {
        let Some(start) = self.range_ok(off, data.len()) else {
            return false;
        };
        // SAFETY: bounds checked as in `read`; the mapping is writable whenever a caller writes
        // (read-only DMA regions are refused before reaching here).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(start), data.len()) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` describe the mapping made in `new`, unmapped exactly once.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// How the device reaches a DMA region.
#[derive(Debug)]
pub enum Backing {
    /// The client passed an fd: direct access through our mapping.
    Mapped(Mapping),
    /// No fd: accesses become DMA_READ/DMA_WRITE requests to the client.
    Remote,
}

/// One DMA_MAP'ed region.
#[derive(Debug)]
pub struct DmaRegion {
    /// First DMA address.
    pub iova: u64,
    /// Size in bytes (> 0).
    pub size: u64,
    /// `DMA_FLAG_*`.
    pub flags: u32,
    /// Direct or remote.
    pub backing: Backing,
}

impl DmaRegion {
    /// Whether `addr` falls inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.iova && addr - self.iova < self.size
    }
    /// Whether the device may read it.
    pub fn readable(&self) -> bool {
        self.flags & DMA_FLAG_READ != 0
    }
    /// Whether the device may write it.
    pub fn writable(&self) -> bool {
        self.flags & DMA_FLAG_WRITE != 0
    }
}

/// The client's DMA regions, sorted by address, never overlapping.
#[derive(Debug, Default)]
pub struct DmaTable {
    regions: Vec<DmaRegion>,
}

impl DmaTable {
    /// Adds a region: EEXIST when it overlaps one, ENOSPC past `MAX_DMA_MAPS`.
    pub fn map(&mut self, r: DmaRegion) -> Result<(), i32> {
        let end = r.iova.checked_add(r.size).ok_or(libc::EINVAL)?;
        if self.regions.len() >= MAX_DMA_MAPS {
            return Err(libc::ENOSPC);
        }
        // Regions are half-open [iova, iova + size).
        if self
            .regions
            .iter()
            .any(|o| r.iova < o.iova + o.size && o.iova < end)
        {
            return Err(libc::EEXIST);
        }
        let pos = self.regions.partition_point(|o| o.iova < r.iova);
        self.regions.insert(pos, r);
        Ok(())
    }

    /// Removes the region that matches exactly (ENOENT otherwise). Dropping it unmaps the fd.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<DmaRegion, i32> {
        let pos = self
            .regions
            .iter()
            .position(|o| o.iova == iova && o.size == size)
            .ok_or(libc::ENOENT)?;
        Ok(self.regions.remove(pos))
    }

    /// The region containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&DmaRegion> {
        let pos = self.regions.partition_point(|o| o.iova <= addr);
        pos.checked_sub(1)
            .map(|i| &self.regions[i])
            .filter(|r| r.contains(addr))
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Drops every region (client gone).
    pub fn clear(&mut self) {
        self.regions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(iova: u64, size: u64) -> DmaRegion {
        DmaRegion {
            iova,
            size,
            flags: DMA_FLAG_READ | DMA_FLAG_WRITE,
            backing: Backing::Remote,
        }
    }

    #[test]
    fn overlap_and_lookup() {
        let mut t = DmaTable::default();
        t.map(remote(0x1000, 0x1000)).unwrap();
        t.map(remote(0x3000, 0x1000)).unwrap();
        assert_eq!(t.map(remote(0x1800, 0x1000)).unwrap_err(), libc::EEXIST);
        assert_eq!(t.map(remote(u64::MAX - 1, 4)).unwrap_err(), libc::EINVAL);
        t.map(remote(0x2000, 0x1000)).unwrap();
        assert_eq!(t.find(0x2fff).unwrap().iova, 0x2000);
        assert!(t.find(0x4000).is_none());
        assert!(t.find(0xfff).is_none());
        assert_eq!(t.unmap(0x2000, 0x800).unwrap_err(), libc::ENOENT);
        t.unmap(0x2000, 0x1000).unwrap();
        assert!(t.find(0x2000).is_none());
    }

    #[test]
    fn mapping_bounds() {
        let fd = memfd("t", 8192).unwrap();
        let m = Mapping::new(&fd, 4096 + 16, 64, true).unwrap();
        assert!(m.write(0, &[1, 2, 3]));
        assert!(!m.write(62, &[1, 2, 3]));
        let whole = Mapping::new(&fd, 0, 8192, false).unwrap();
        let mut b = [0u8; 3];
        assert!(whole.read(4096 + 16, &mut b));
        assert_eq!(b, [1, 2, 3]);
        assert!(!whole.read(u64::MAX, &mut b));
    }
}
