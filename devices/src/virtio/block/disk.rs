//! The raw disk image behind a block device: opening and probing it, and positioned I/O between
//! the image and guest memory without bounce buffers.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::device::BlockError;
use crate::GuestMemoryMmap;

/// Size of a virtio-blk sector in bytes (fixed by the specification).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Most iovecs one `preadv`/`pwritev` call accepts (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// A range of guest memory taking part in a request, checked to lie in guest RAM when the
/// request was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// An opened raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    capacity: u64,
    punch_hole: bool,
    zero_range: bool,
    block_size: u64,
}

impl DiskImage {
    /// Open the image at `path` (read-only when `readonly`) and probe what it supports.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, BlockError> {
        let meta = std::fs::metadata(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            readonly,
            source,
        })?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(BlockError::NotAnImage {
                path: path.to_path_buf(),
                what: "a directory",
            });
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotAnImage {
                path: path.to_path_buf(),
                what: "neither a regular file nor a block device",
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                readonly,
                source,
            })?;
        // Seeking to the end gives the size of regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let capacity = size >> SECTOR_SHIFT;
        let (punch_hole, zero_range) = if readonly {
            (false, false)
        } else {
            probe_fallocate(&file, size)
        };
        let block_size = if ft.is_file() {
            meta.blksize()
        } else {
            SECTOR_SIZE
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            readonly,
            capacity,
            punch_hole,
            zero_range,
            block_size: block_size.clamp(SECTOR_SIZE, 1 << 20),
        })
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Capacity in 512-byte sectors (the image size rounded down).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the host file can deallocate ranges (`FALLOC_FL_PUNCH_HOLE`); backs discard.
    pub fn supports_punch_hole(&self) -> bool {
        self.punch_hole
    }

    /// Whether the host file can zero ranges in place (`FALLOC_FL_ZERO_RANGE`).
    pub fn supports_zero_range(&self) -> bool {
        self.zero_range
    }

    /// Host block size of the image's file system, in bytes (at least 512).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Read `segments.len()` guest ranges' worth of data from byte `offset` of the image straight
    /// into guest memory, marking the written guest pages dirty.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        self.transfer(mem, segments, offset, false)
    }

    /// Write the guest ranges in `segments` to the image at byte `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.transfer(mem, segments, offset, true)
    }

    /// Flush written data to stable storage (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocate `len` bytes at `offset`; they read back as zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zero `len` bytes at `offset`, keeping them allocated when the file system can.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
        to_image: bool,
    ) -> io::Result<()> {
        let mut slices = Vec::with_capacity(segments.len());
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                // The parser checked every range; a failure here means the memory map changed.
                slices.push(slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?);
            }
        }
        let mut iovs: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let result = rw_vectored(self.file.as_raw_fd(), &mut iovs, offset, to_image);
        if !to_image {
            // Mark what the kernel may have written, also after a partial failure.
            for s in &slices {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
        result
    }
}

/// Run `preadv` (`to_file` false) or `pwritev` over all of `iovs` from byte `offset`, retrying
/// short transfers and `EINTR`. `iovs` is consumed (advanced) in the process.
fn rw_vectored(
    fd: libc::c_int,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    to_file: bool,
) -> io::Result<()> {
    let mut first = 0;
    while first < iovs.len() {
        if iovs[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let count = (iovs.len() - first).min(IOV_MAX);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let batch = &iovs[first..first + count];
        let n = if to_file {
            // SAFETY: every iovec describes a live range of the guest memory mapping (built from
            // VolatileSlices of `mem`, which the caller borrows for the whole call); pwritev only
            // reads those bytes.
            unsafe { libc::pwritev(fd, batch.as_ptr(), count as libc::c_int, off) }
        } else {
            // SAFETY: as above; preadv writes only within those ranges. The guest may access the
            // same memory concurrently, as with any DMA; the ranges are never Rust references.
            unsafe { libc::preadv(fd, batch.as_ptr(), count as libc::c_int, off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        if n == 0 {
            return Err(if to_file {
                io::Error::new(io::ErrorKind::WriteZero, "image accepted no data")
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read beyond the end of the image",
                )
            });
        }
        offset += n as u64;
        while n > 0 && first < iovs.len() {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same range.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    loop {
        // SAFETY: fallocate only acts on the file behind a valid, owned descriptor; no memory is
        // passed to the kernel.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Find out whether the image's file system supports punching holes and zeroing ranges, by trying
/// both on one sector just beyond the end of the image with `KEEP_SIZE` (which changes no data).
fn probe_fallocate(file: &File, size: u64) -> (bool, bool) {
    let punch = |f: &File| {
        fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            size,
            SECTOR_SIZE,
        )
    };
    let punch_hole = punch(file).is_ok();
    let zero_range = fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        size,
        SECTOR_SIZE,
    )
    .is_ok();
    if zero_range && punch_hole {
        // Zeroing beyond the end may have allocated a block there; give it back.
        let _ = punch(file);
    }
    (punch_hole, zero_range)
}
