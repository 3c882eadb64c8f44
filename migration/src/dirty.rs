//! A bitmap of dirty 4 KiB guest pages over a RAM layout of several regions.
//!
//! Live migration merges three sources of dirty pages into one [`DirtyBitmap`]: KVM's dirty log
//! (one bit per page per memory slot, merged with [`DirtyBitmap::merge_words`]), the VMM's own
//! writes through vm-memory's [`AtomicBitmap`] (merged with
//! [`DirtyBitmap::merge_guest_memory_bitmap`]) and components that write guest memory
//! themselves ([`crate::Migratable::sync_dirty_log`], [`DirtyBitmap::mark`]). The RAM writer then
//! sends [`DirtyBitmap::runs`].
//!
//! A layout is a list of `(guest address, length)` regions in address order, each starting on a
//! page boundary and a whole number of pages long, none overlapping: what KVM memory slots and
//! vm-memory's mmap regions are.

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory_file::{describe, MAX_REGIONS, PAGE_SIZE};

/// Errors from dirty page tracking.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// The RAM layout cannot be tracked page by page.
    #[error("invalid RAM layout: {0}")]
    InvalidLayout(String),
    /// Part of a marked range is not guest RAM (the parts that are were marked).
    #[error("dirty range {gpa:#x}+{len:#x} is not all inside guest RAM")]
    OutsideLayout {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// A region index beyond the layout.
    #[error("RAM region #{index} does not exist (the layout has {regions})")]
    NoSuchRegion {
        /// The index given.
        index: usize,
        /// Number of regions in the layout.
        regions: usize,
    },
    /// A dirty log with the wrong number of 64-bit words for its region.
    #[error("dirty log for RAM region #{region} has {found} words, the region needs {expected}")]
    WordCount {
        /// Region index.
        region: usize,
        /// Words the region needs (one bit per page).
        expected: usize,
        /// Words given.
        found: usize,
    },
    /// Two bitmaps (or a bitmap and guest memory) describe different RAM.
    #[error("dirty bitmaps cover different RAM: {ours} vs {theirs}")]
    LayoutMismatch {
        /// This bitmap's layout.
        ours: String,
        /// The other layout.
        theirs: String,
    },
    /// A vm-memory region bitmap does not track 4 KiB pages of the whole region.
    #[error("the dirty bitmap of the RAM region at {gpa:#x} has {bits} bits for {len:#x} bytes; expected one per 4 KiB page")]
    BitmapGeometry {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Bits in its bitmap.
        bits: usize,
    },
}

type Result<T> = std::result::Result<T, DirtyError>;

/// Check that `layout` is page aligned, in address order, non-overlapping and not too long.
pub(crate) fn validate_layout(layout: &[(u64, u64)]) -> std::result::Result<(), String> {
    if layout.len() > MAX_REGIONS {
        return Err(format!(
            "{} RAM regions (at most {MAX_REGIONS})",
            layout.len()
        ));
    }
    let mut prev_end = 0u64;
    for (i, &(gpa, len)) in layout.iter().enumerate() {
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "RAM region {gpa:#x}+{len:#x} is empty or not page aligned"
            ));
        }
        if i > 0 && gpa < prev_end {
            return Err(format!(
                "RAM regions overlap or are out of order: {}",
                describe(layout)
            ));
        }
        prev_end = gpa
            .checked_add(len)
            .ok_or_else(|| format!("RAM region {gpa:#x}+{len:#x} wraps"))?;
    }
    Ok(())
}

/// Dirty bits of one region: bit `i` of word `j` is page `j * 64 + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegionBits {
    gpa: u64,
    pages: u64,
    words: Vec<u64>,
}

impl RegionBits {
    /// Mask of the valid bits of the last word.
    fn last_mask(&self) -> u64 {
        match self.pages % 64 {
            0 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && (gpa - self.gpa) / PAGE_SIZE < self.pages
    }

    fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }

    fn set(&mut self, page: u64) {
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    fn get(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
}

/// One bit per 4 KiB page of guest RAM, over a layout of several regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    layout: Vec<(u64, u64)>,
    regions: Vec<RegionBits>,
}

impl DirtyBitmap {
    /// An all-clean bitmap over `layout` ((guest address, length) regions, see the module doc).
    pub fn new(layout: &[(u64, u64)]) -> Result<Self> {
        validate_layout(layout).map_err(DirtyError::InvalidLayout)?;
        let regions = layout
            .iter()
            .map(|&(gpa, len)| {
                let pages = len / PAGE_SIZE;
                let words = usize::try_from(pages.div_ceil(64))
                    .map_err(|_| DirtyError::InvalidLayout(format!("region {gpa:#x} too big")))?;
                Ok(RegionBits {
                    gpa,
                    pages,
                    words: vec![0; words],
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layout: layout.to_vec(),
            regions,
        })
    }

    /// The RAM layout this bitmap covers.
    pub fn layout(&self) -> &[(u64, u64)] {
        &self.layout
    }

    /// Index of the region holding `gpa`, if it is guest RAM.
    pub fn region_index(&self, gpa: u64) -> Option<usize> {
        // Regions are sorted: the candidate is the last one starting at or below gpa.
        let i = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        self.regions[i].contains(gpa).then_some(i)
    }

    /// Mark every page touched by `gpa..gpa + len`. Pages inside the layout are marked even when
    /// part of the range is not RAM; that case is reported as [`DirtyError::OutsideLayout`].
    pub fn mark(&mut self, gpa: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let outside = || DirtyError::OutsideLayout { gpa, len };
        let last = gpa.checked_add(len - 1).ok_or_else(outside)?;
        let mut covered = 0u64;
        for r in &mut self.regions {
            let lo = gpa.max(r.gpa);
            let hi = last.min(r.end() - 1);
            if lo > hi {
                continue;
            }
            covered += hi - lo + 1;
            for page in (lo - r.gpa) / PAGE_SIZE..=(hi - r.gpa) / PAGE_SIZE {
                r.set(page);
            }
        }
        if covered == len {
            Ok(())
        } else {
            Err(outside())
        }
    }

    /// OR a KVM-style dirty log into region `region`: bit `i` of `words[j]` is page `j * 64 + i`
    /// of the region, and `words` has exactly one bit per page rounded up to whole words (what
    /// KVM_GET_DIRTY_LOG returns for a slot of that size). Bits past the region's end are ignored.
    pub fn merge_words(&mut self, region: usize, words: &[u64]) -> Result<()> {
        let regions = self.regions.len();
        let r = self
            .regions
            .get_mut(region)
            .ok_or(DirtyError::NoSuchRegion {
                index: region,
                regions,
            })?;
        if words.len() != r.words.len() {
            return Err(DirtyError::WordCount {
                region,
                expected: r.words.len(),
                found: words.len(),
            });
        }
        for (dst, src) in r.words.iter_mut().zip(words) {
            *dst |= src;
        }
        let mask = r.last_mask();
        if let Some(last) = r.words.last_mut() {
            *last &= mask;
        }
        Ok(())
    }

    /// OR another bitmap over the same layout into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        self.check_same_layout(&other.layout)?;
        for (dst, src) in self.regions.iter_mut().zip(&other.regions) {
            for (d, s) in dst.words.iter_mut().zip(&src.words) {
                *d |= s;
            }
        }
        Ok(())
    }

    fn check_same_layout(&self, theirs: &[(u64, u64)]) -> Result<()> {
        if self.layout == theirs {
            return Ok(());
        }
        Err(DirtyError::LayoutMismatch {
            ours: describe(&self.layout),
            theirs: describe(theirs),
        })
    }

    /// Merge the dirty bitmaps vm-memory keeps for every region of `mem` and clear them.
    ///
    /// Each 64-page word of a region bitmap is read and cleared in one atomic operation
    /// ([`AtomicBitmap::get_and_reset`]), so a page marked concurrently by another thread is
    /// either in this merge or still set for the next one: no mark is lost. vm-memory marks a
    /// page after the write to it completes, so copying the pages of this merge afterwards sends
    /// data at least as new as every mark it includes. `mem` must have this bitmap's layout.
    pub fn merge_guest_memory_bitmap<M>(&mut self, mem: &M) -> Result<()>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<AtomicBitmap>>,
    {
        let theirs = crate::memory_file::memory_layout(mem);
        self.check_same_layout(&theirs)?;
        for region in mem.iter() {
            let (gpa, len) = (region.start_addr().0, region.len());
            // `GuestRegionMmap` derefs to its `MmapRegion`, which owns the whole-region bitmap.
            let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
            // Only 4 KiB pages give one bit per page here (bitmaps round their length up).
            if bitmap.byte_size() as u64 != len || bitmap.len() as u64 != len / PAGE_SIZE {
                return Err(DirtyError::BitmapGeometry {
                    gpa,
                    len,
                    bits: bitmap.len(),
                });
            }
            let index = self
                .region_index(gpa)
                .ok_or(DirtyError::OutsideLayout { gpa, len })?;
            self.merge_words(index, &bitmap.get_and_reset())?;
        }
        Ok(())
    }

    /// Whether the page holding `gpa` is dirty (false outside the layout).
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.region_index(gpa).is_some_and(|i| {
            let r = &self.regions[i];
            r.get((gpa - r.gpa) / PAGE_SIZE)
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Bytes in dirty pages.
    pub fn dirty_bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    /// Contiguous dirty `(guest address, length)` ranges in address order; a range never spans
    /// two regions.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            region: 0,
            page: 0,
        }
    }

    /// The guest address of every dirty page, in address order.
    pub fn pages(&self) -> Vec<u64> {
        self.runs()
            .flat_map(|(gpa, len)| (0..len / PAGE_SIZE).map(move |p| gpa + p * PAGE_SIZE))
            .collect()
    }

    /// Mark every page clean.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.words.fill(0);
        }
    }

    /// Mark every page dirty (the first pass of a migration sends all RAM).
    pub fn set_all(&mut self) {
        for r in &mut self.regions {
            r.words.fill(u64::MAX);
            let mask = r.last_mask();
            if let Some(last) = r.words.last_mut() {
                *last &= mask;
            }
        }
    }
}

/// Iterator over the dirty runs of a [`DirtyBitmap`], from [`DirtyBitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a DirtyBitmap,
    region: usize,
    page: u64,
}

/// The first page at or after `from` whose bit equals `set`, or `pages` when there is none.
fn find_page(r: &RegionBits, from: u64, set: bool) -> u64 {
    let mut page = from;
    while page < r.pages {
        let word = r.words[(page / 64) as usize];
        let word = if set { word } else { !word } >> (page % 64);
        if word != 0 {
            return (page + u64::from(word.trailing_zeros())).min(r.pages);
        }
        page = (page / 64 + 1) * 64;
    }
    r.pages
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        while let Some(r) = self.bitmap.regions.get(self.region) {
            let start = find_page(r, self.page, true);
            if start < r.pages {
                let end = find_page(r, start, false);
                self.page = end;
                return Some((r.gpa + start * PAGE_SIZE, (end - start) * PAGE_SIZE));
            }
            self.region += 1;
            self.page = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;
    const LOW: u64 = 0x1000;

    /// Two regions around a hole, like RAM below and above the 32-bit PCI hole.
    fn layout() -> Vec<(u64, u64)> {
        vec![(0, 100 * PAGE_SIZE), (4 << 30, 130 * PAGE_SIZE)]
    }

    #[test]
    fn invalid_layouts_are_refused() {
        for bad in [
            vec![(0, 0)],
            vec![(0, 100)],
            vec![(0x800, PAGE_SIZE)],
            vec![(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)],
            vec![(MIB, PAGE_SIZE), (0, PAGE_SIZE)],
            vec![(u64::MAX - PAGE_SIZE + 1, PAGE_SIZE)],
        ] {
            assert!(
                matches!(DirtyBitmap::new(&bad), Err(DirtyError::InvalidLayout(_))),
                "{bad:x?}"
            );
        }
        let b = DirtyBitmap::new(&layout()).unwrap();
        assert_eq!(b.layout(), layout().as_slice());
        assert_eq!(b.count(), 0);
        assert_eq!(b.runs().next(), None);
    }

    #[test]
    fn mark_spans_pages_and_reports_outside() {
        let mut b = DirtyBitmap::new(&layout()).unwrap();
        b.mark(LOW - 1, 2).unwrap();
        assert!(b.is_dirty(0) && b.is_dirty(LOW) && !b.is_dirty(2 * LOW));
        b.mark(5 * LOW + 10, 0).unwrap();
        assert!(!b.is_dirty(5 * LOW));
        // Partly past the end of the first region: the RAM part is still marked.
        let err = b.mark(99 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap_err();
        assert!(matches!(err, DirtyError::OutsideLayout { .. }), "{err}");
        assert!(b.is_dirty(99 * PAGE_SIZE));
        assert!(b.mark(u64::MAX, 2).is_err());
        assert!(b.mark(1 << 40, 1).is_err());
        assert_eq!(b.count(), 3);
        assert_eq!(b.dirty_bytes(), 3 * PAGE_SIZE);
        assert!(!b.is_dirty(1 << 40));
        assert_eq!(b.region_index(4 << 30), Some(1));
        assert_eq!(b.region_index(100 * PAGE_SIZE), None);
    }

    #[test]
    fn runs_pages_clear_and_set_all() {
        let mut b = DirtyBitmap::new(&layout()).unwrap();
        let high = 4u64 << 30;
        for page in [3, 4, 5, 63, 64, 99] {
            b.mark(page * PAGE_SIZE, 1).unwrap();
        }
        b.mark(high + 127 * PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(
            runs,
            vec![
                (3 * PAGE_SIZE, 3 * PAGE_SIZE),
                (63 * PAGE_SIZE, 2 * PAGE_SIZE),
                (99 * PAGE_SIZE, PAGE_SIZE),
                (high + 127 * PAGE_SIZE, 3 * PAGE_SIZE),
            ]
        );
        assert_eq!(b.pages().len(), 9);
        assert_eq!(b.pages()[3], 63 * PAGE_SIZE);
        b.set_all();
        assert_eq!(b.count(), 230);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(0, 100 * PAGE_SIZE), (high, 130 * PAGE_SIZE)]
        );
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn kvm_words_merge_on_second_region() {
        let mut b = DirtyBitmap::new(&layout()).unwrap();
        let high = 4u64 << 30;
        // 130 pages -> 3 words; bits past page 129 are ignored.
        let words = [1u64 << 1, 1u64 << 63, 0b11 | (1 << 5)];
        b.merge_words(1, &words).unwrap();
        assert_eq!(
            b.pages(),
            vec![
                high + PAGE_SIZE,
                high + 127 * PAGE_SIZE,
                high + 128 * PAGE_SIZE,
                high + 129 * PAGE_SIZE
            ]
        );
        assert!(!b.is_dirty(PAGE_SIZE));
        assert!(matches!(
            b.merge_words(1, &[0, 0]),
            Err(DirtyError::WordCount { expected: 3, .. })
        ));
        assert!(matches!(
            b.merge_words(2, &[]),
            Err(DirtyError::NoSuchRegion { .. })
        ));
        let mut other = DirtyBitmap::new(&layout()).unwrap();
        other.mark(0, 1).unwrap();
        b.merge(&other).unwrap();
        assert_eq!(b.count(), 5);
        let different = DirtyBitmap::new(&[(0, 100 * PAGE_SIZE)]).unwrap();
        assert!(matches!(
            b.merge(&different),
            Err(DirtyError::LayoutMismatch { .. })
        ));
    }

    type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

    fn mem(layout: &[(u64, u64)]) -> Mem {
        crate::test_util::guest_mem(layout)
    }

    #[test]
    fn guest_memory_bitmap_is_merged_and_reset() {
        let layout = [(0, MIB), (4 * MIB, 2 * MIB)];
        let m = mem(&layout);
        let mut b = DirtyBitmap::new(&layout).unwrap();
        m.write_slice(&[1; 10], GuestAddress(PAGE_SIZE - 5))
            .unwrap();
        m.write_slice(&[2], GuestAddress(5 * MIB)).unwrap();
        b.merge_guest_memory_bitmap(&m).unwrap();
        assert_eq!(b.pages(), vec![0, PAGE_SIZE, 5 * MIB]);
        // The vm-memory bitmaps were cleared: a second merge into a clean bitmap finds nothing.
        let mut again = DirtyBitmap::new(&layout).unwrap();
        again.merge_guest_memory_bitmap(&m).unwrap();
        assert_eq!(again.count(), 0);
        // Reads do not dirty pages; later writes do.
        let mut buf = [0u8; 16];
        m.read_slice(&mut buf, GuestAddress(3 * PAGE_SIZE)).unwrap();
        m.write_slice(&[3], GuestAddress(4 * MIB)).unwrap();
        again.merge_guest_memory_bitmap(&m).unwrap();
        assert_eq!(again.pages(), vec![4 * MIB]);
        let mut wrong = DirtyBitmap::new(&[(0, MIB)]).unwrap();
        assert!(matches!(
            wrong.merge_guest_memory_bitmap(&m),
            Err(DirtyError::LayoutMismatch { .. })
        ));
    }

    #[test]
    fn concurrent_marks_are_not_lost() {
        let layout = [(0, 4 * MIB)];
        let m = std::sync::Arc::new(mem(&layout));
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || {
                for page in 0..1024u64 {
                    m.write_slice(&[1], GuestAddress(page * PAGE_SIZE)).unwrap();
                }
            })
        };
        let mut b = DirtyBitmap::new(&layout).unwrap();
        while !writer.is_finished() {
            b.merge_guest_memory_bitmap(&*m).unwrap();
        }
        writer.join().unwrap();
        b.merge_guest_memory_bitmap(&*m).unwrap();
        assert_eq!(b.count(), 1024);
    }
}
