//! Holes of the file behind guest RAM: pages never written (a fresh memfd, or pages a restore
//! left out because they were zero) read as zeros. Reading them through the mapping would make
//! the kernel allocate and zero a page for each, so the RAM writers ask the file where its data
//! is (`SEEK_DATA` / `SEEK_HOLE`) and treat the holes as zero pages without touching them.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory_file::PAGE_SIZE;

/// One stretch of guest RAM: `(guest address, length, hole)`.
pub(crate) type Extent = (u64, u64, bool);

fn seek(fd: i32, offset: u64, whence: i32) -> Option<u64> {
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek only reads its arguments; an invalid fd or offset is an error return.
    let at = unsafe { libc::lseek(fd, offset, whence) };
    u64::try_from(at).ok()
}

/// A stretch of a file known to hold data: `(fd, from, to)` in file offsets. Finding where
/// data ends (`SEEK_HOLE`) costs time proportional to the data scanned (about 10 ms per GiB
/// here), so each answer is kept for the next chunks. Only data is remembered: a hole may fill
/// at any time, while pages that were data stay readable (at worst they read as zeros).
pub(crate) type KnownData = Option<(i32, u64, u64)>;

/// Cut `gpa..gpa + len` (whole pages inside one region of `mem`) into data and hole extents, in
/// order, into `out` (cleared first). Memory without a file, or a file that cannot tell, is one
/// data extent. Extents are whole pages; a page partly data counts as data.
pub(crate) fn extents<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    len: u64,
    known: &mut KnownData,
    out: &mut Vec<Extent>,
) {
    out.clear();
    let file = mem.find_region(GuestAddress(gpa)).and_then(|r| {
        r.file_offset()
            .map(|f| (f.file().as_raw_fd(), f.start() + (gpa - r.start_addr().0)))
    });
    let Some((fd, base)) = file else {
        out.push((gpa, len, false));
        return;
    };
    let end = base + len;
    let mut pos = base;
    let mut push = |from: u64, to: u64, hole: bool| {
        if to > from {
            out.push((gpa + (from - base), to - from, hole));
        }
    };
    while pos < end {
        if let Some((_, _, to)) = known.filter(|&(f, from, to)| f == fd && from <= pos && pos < to)
        {
            push(pos, to.min(end), false);
            pos = to.min(end);
            continue;
        }
        // No data after `pos` (ENXIO) makes the rest a hole.
        let data = match seek(fd, pos, libc::SEEK_DATA) {
            Some(d) => (d - d % PAGE_SIZE).clamp(pos, end),
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => end,
            None => {
                push(pos, end, false);
                return;
            }
        };
        push(pos, data, true);
        if data >= end {
            return;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)
            .map_or(end, |h| h.next_multiple_of(PAGE_SIZE))
            .max(data + PAGE_SIZE);
        *known = Some((fd, data, hole));
        push(data, hole.min(end), false);
        pos = hole.min(end);
    }
}
