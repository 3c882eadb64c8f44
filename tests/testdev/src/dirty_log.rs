//! DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT`): the device records which
//! pages of IOVA space its own DMA wrote, so that a VMM can migrate guest RAM written by the
//! device. Written from the vfio-user spec's payload tables and the kernel header's comments.
//!
//! Choices where the texts leave room:
//! - the START `page_size` is a hint; it must be a non-zero power of two (EINVAL otherwise) and
//!   we always log at [`LOG_PAGE`] (4 KiB), which the START reply reports;
//! - ranges must be non-empty, 4 KiB aligned, not wrap, not overlap (EINVAL), at most
//!   [`MAX_LOG_RANGES`] of them (E2BIG, as the kernel); `num_ranges` 0 logs every write (the
//!   vfio-user spec);
//! - REPORT `page_size` must be a power of two of at least 4 KiB (as the kernel), `iova` aligned
//!   to it, `length` non-zero and not wrapping; a `length` that is not a multiple of the page
//!   size reports its last partial page too. The bitmap has `ceil(length / page_size)` bits
//!   rounded up to whole u64s; bit `n` (in u64 number `n / 64`, bit `n % 64`) covers
//!   `iova + n * page_size` — the spec's formula, `bitmap[(addr - iova)/page_size] & (1ULL <<
//!   (addr % 64))`, cannot be meant literally. A bitmap that would not fit in one reply
//!   ([`MAX_REPORT_BITMAP`]) is refused with EINVAL. REPORT clears what it reported (the
//!   kernel's "read back and clear").

use std::collections::BTreeSet;

/// Our logging granularity.
pub const LOG_PAGE: u64 = 4096;
/// Most ranges one START may give (a kernel page of 16-byte ranges, the kernel's guarantee).
pub const MAX_LOG_RANGES: usize = 256;
/// Largest REPORT bitmap in bytes: the reply (8-byte feature header, 24-byte report header,
/// bitmap) must fit in one message's data.
pub const MAX_REPORT_BITMAP: u64 = crate::proto::MAX_DATA_XFER as u64 - 32;

/// An active DMA log.
#[derive(Debug, Clone, Default)]
pub struct DmaLog {
    /// Logged ranges as `[start, end)`; empty means everything.
    ranges: Vec<(u64, u64)>,
    /// Dirty page numbers (address / [`LOG_PAGE`]).
    dirty: BTreeSet<u64>,
}

impl DmaLog {
    /// Starts logging `ranges` (`(iova, length)` pairs) with the hinted `page_size`.
    pub fn start(page_size: u64, ranges: &[(u64, u64)]) -> Result<DmaLog, i32> {
        if !page_size.is_power_of_two() {
            return Err(libc::EINVAL);
        }
        if ranges.len() > MAX_LOG_RANGES {
            return Err(libc::E2BIG);
        }
        let mut r = Vec::with_capacity(ranges.len());
        for &(iova, length) in ranges {
            let end = iova.checked_add(length).ok_or(libc::EINVAL)?;
            if length == 0 || !iova.is_multiple_of(LOG_PAGE) || !length.is_multiple_of(LOG_PAGE) {
                return Err(libc::EINVAL);
            }
            r.push((iova, end));
        }
        r.sort_unstable();
        if r.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(libc::EINVAL);
        }
        Ok(DmaLog {
            ranges: r,
            dirty: BTreeSet::new(),
        })
    }

    /// Records a device DMA write of `len` bytes at `addr` (the parts inside logged ranges).
    pub fn record(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        if self.ranges.is_empty() {
            self.mark(addr, end);
            return;
        }
        for i in 0..self.ranges.len() {
            let (s, e) = self.ranges[i];
            let (a, b) = (addr.max(s), end.min(e));
            if a < b {
                self.mark(a, b);
            }
        }
    }

    fn mark(&mut self, start: u64, end: u64) {
        for p in start / LOG_PAGE..=(end - 1) / LOG_PAGE {
            self.dirty.insert(p);
        }
    }

    /// Checks a REPORT request; the bitmap's size in bytes.
    pub fn bitmap_len(iova: u64, length: u64, page_size: u64) -> Result<usize, i32> {
        if !page_size.is_power_of_two() || page_size < LOG_PAGE || !iova.is_multiple_of(page_size) {
            return Err(libc::EINVAL);
        }
        iova.checked_add(length).ok_or(libc::EINVAL)?;
        if length == 0 {
            return Err(libc::EINVAL);
        }
        let bytes = 8 * length.div_ceil(page_size).div_ceil(64);
        if bytes > MAX_REPORT_BITMAP {
            return Err(libc::EINVAL);
        }
        Ok(bytes as usize)
    }

    /// The bitmap of `[iova, iova + length)` at `page_size` as u64 words; clears those pages.
    pub fn report(&mut self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, i32> {
        let mut bitmap = vec![0u64; Self::bitmap_len(iova, length, page_size)? / 8];
        let end = iova + length;
        let first = iova / LOG_PAGE;
        let last = (end - 1) / LOG_PAGE;
        let hits: Vec<u64> = self.dirty.range(first..=last).copied().collect();
        for p in hits {
            // page_size >= LOG_PAGE and iova is page_size aligned: a log page lies inside one
            // report page.
            let n = (p * LOG_PAGE - iova) / page_size;
            bitmap[(n / 64) as usize] |= 1 << (n % 64);
            self.dirty.remove(&p);
        }
        Ok(bitmap)
    }

    /// Number of dirty log pages (tests).
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_validates_page_size_and_ranges() {
        assert_eq!(DmaLog::start(0, &[]).unwrap_err(), libc::EINVAL);
        assert_eq!(DmaLog::start(3000, &[]).unwrap_err(), libc::EINVAL);
        DmaLog::start(512, &[]).unwrap();
        DmaLog::start(1 << 21, &[(0, 4096)]).unwrap();
        for bad in [
            [(0x1000, 0)],
            [(0x1800, 0x1000)],
            [(0x1000, 0x1800)],
            [(u64::MAX - 0xfff, 0x2000)],
        ] {
            assert_eq!(
                DmaLog::start(4096, &bad).unwrap_err(),
                libc::EINVAL,
                "{bad:?}"
            );
        }
        let overlap = [(0x1000, 0x2000), (0x2000, 0x1000)];
        assert_eq!(DmaLog::start(4096, &overlap).unwrap_err(), libc::EINVAL);
        DmaLog::start(4096, &[(0x3000, 0x1000), (0x1000, 0x2000)]).unwrap();
        let many: Vec<(u64, u64)> = (0..=MAX_LOG_RANGES as u64)
            .map(|i| (i * 0x2000, 0x1000))
            .collect();
        assert_eq!(DmaLog::start(4096, &many).unwrap_err(), libc::E2BIG);
        DmaLog::start(4096, &many[..MAX_LOG_RANGES]).unwrap();
    }

    #[test]
    fn bitmap_contents_and_clearing() {
        let mut l = DmaLog::start(4096, &[(0x10_0000, 0x10_0000)]).unwrap();
        l.record(0x10_0000 + 0x100, 10); // page 0
        l.record(0x10_0000 + 0x2fff, 2); // pages 2 and 3
        l.record(0x10_0000 + 65 * 4096, 4096); // page 65 exactly
        l.record(0x0ff0, 0x20); // outside the range
        l.record(0x1f_f000, 0x2000); // last page of the range, and beyond
        assert_eq!(l.dirty_pages(), 5);
        let b = l.report(0x10_0000, 0x10_0000, 4096).unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b[0], 0b1101);
        assert_eq!(b[1], 1 << 1);
        assert_eq!(b[2], 0);
        assert_eq!(b[3], 1 << 63);
        assert_eq!(l.dirty_pages(), 0, "the report cleared them");
        assert_eq!(l.report(0x10_0000, 0x10_0000, 4096).unwrap(), vec![0; 4]);

        // Coarser report pages; a partial window clears only what it covers.
        l.record(0x10_0000 + 0x1000, 1);
        l.record(0x10_0000 + 0x9000, 1);
        let b = l.report(0x10_0000, 0x8000, 0x8000).unwrap();
        assert_eq!(b, vec![1]);
        assert_eq!(l.dirty_pages(), 1);
        // A length that is not a page multiple reports its partial last page.
        let b = l.report(0x10_8000, 0x1001, 4096).unwrap();
        assert_eq!(b, vec![0b10]);
        // Bad reports.
        for (iova, len, ps) in [
            (0x10_0000, 0x1000, 2048),
            (0x10_0000, 0x1000, 3 << 12),
            (0x10_0800, 0x1000, 4096),
            (0x10_0000, 0, 4096),
            (u64::MAX - 0xfff, 0x2000, 4096),
            (0, 1 << 40, 4096),
        ] {
            assert_eq!(l.report(iova, len, ps).unwrap_err(), libc::EINVAL);
        }
        // The largest bitmap that fits is accepted.
        let bits = MAX_REPORT_BITMAP * 8;
        assert_eq!(
            l.report(0, bits * 4096, 4096).unwrap().len() as u64 * 8,
            MAX_REPORT_BITMAP
        );
    }

    #[test]
    fn no_ranges_logs_everything() {
        let mut l = DmaLog::start(4096, &[]).unwrap();
        l.record(0xdead_0000, 0x3000);
        assert_eq!(l.report(0xdead_0000, 0x4000, 4096).unwrap(), vec![0b111]);
    }
}
