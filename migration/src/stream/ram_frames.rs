//! RAM frames: building them from guest memory, and applying them without ever putting an older
//! copy of a page over a newer one.

use vm_memory::GuestMemoryBackend;

use super::message::{RamFrame, RAM_HEAD};
use super::{Result, StreamError, MAX_ITERATION};
use crate::dirty::validate_layout;
use crate::memory_file::PAGE_SIZE;
use crate::ram::{
    apply_record_via, RamRecord, RamSliceReader, RamStats, RamStreamError, RamWriter,
};

const PAGE: usize = PAGE_SIZE as usize;

/// Split `ranges` ((guest address, length), non-overlapping at page granularity) into pieces of
/// at most `chunk` bytes (rounded up to whole pages), widened to whole pages, and deal them
/// round-robin to `connections` lists (at least one). Each page lands in exactly one list; a
/// range that wraps around the address space is passed on whole (the sender refuses it).
pub fn spread_ranges<I>(ranges: I, connections: usize, chunk: u64) -> Vec<Vec<(u64, u64)>>
where
    I: IntoIterator<Item = (u64, u64)>,
{
    let n = connections.max(1);
    let chunk = chunk.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut out = vec![Vec::new(); n];
    let mut next = 0;
    for (gpa, len) in ranges {
        match page_pieces(gpa, len, chunk) {
            Some(pieces) => {
                for piece in pieces {
                    out[next].push(piece);
                    next = (next + 1) % n;
                }
            }
            // Wraps: left whole, for the sender to refuse.
            None => out[next].push((gpa, len)),
        }
    }
    out
}

/// `gpa..gpa + len` widened to whole pages and cut at page boundaries into pieces of at most
/// `piece` bytes (a multiple of the page size); `None` if the range wraps.
pub(crate) fn page_pieces(
    gpa: u64,
    len: u64,
    piece: u64,
) -> Option<impl Iterator<Item = (u64, u64)>> {
    let start = gpa - gpa % PAGE_SIZE;
    let end = if len == 0 {
        start
    } else {
        gpa.checked_add(len)?.checked_next_multiple_of(PAGE_SIZE)?
    };
    let piece = piece.max(PAGE_SIZE);
    Some(
        (0..(end - start).div_ceil(piece))
            .map(move |i| (start + i * piece, (end - start - i * piece).min(piece))),
    )
}

/// Records of one RAM frame being built: a [`RamWriter::bare`] over the frame payload (no RAM
/// stream header, record CRCs or END: the frame's CRC covers the records, its header counts
/// their pages), whose first [`RAM_HEAD`] bytes are filled at the end.
#[derive(Debug)]
pub(crate) struct RamBatch {
    writer: RamWriter<Vec<u8>>,
}

impl RamBatch {
    /// An empty batch over `layout` in `buf` (a recycled payload: its contents are dropped, its
    /// allocation kept), with room for about `capacity` bytes.
    pub fn new(
        layout: &[(u64, u64)],
        mut buf: Vec<u8>,
        capacity: usize,
    ) -> std::result::Result<Self, RamStreamError> {
        buf.clear();
        buf.reserve(capacity);
        buf.resize(RAM_HEAD, 0);
        Ok(Self {
            writer: RamWriter::bare(buf, layout)?,
        })
    }

    /// The writer, to add records.
    pub fn writer(&mut self) -> &mut RamWriter<Vec<u8>> {
        &mut self.writer
    }

    /// Payload bytes so far.
    pub fn len(&mut self) -> usize {
        self.writer.get_mut().len()
    }

    /// DATA and ZERO records so far.
    pub fn records(&self) -> u64 {
        self.writer.stats().records
    }

    /// Fill the header: the frame payload and its counts.
    pub fn finish(
        self,
        iteration: u32,
    ) -> std::result::Result<(Vec<u8>, RamStats), RamStreamError> {
        let (mut buf, stats) = self.writer.finish()?;
        let pages = u32::try_from(stats.data_pages + stats.zero_pages).map_err(|_| {
            RamStreamError::InvalidRange {
                gpa: 0,
                len: 0,
                reason: "more than 2^32 pages in one frame",
            }
        })?;
        buf[..4].copy_from_slice(&iteration.to_le_bytes());
        buf[4..RAM_HEAD].copy_from_slice(&pages.to_le_bytes());
        Ok((buf, stats))
    }
}

/// Per page of guest RAM, the last iteration whose copy was applied: one byte per 4 KiB page
/// (256 KiB per GiB of RAM), 0 meaning "never".
///
/// The rule: a page's copy from iteration `i` is applied only if no copy from an iteration
/// `> i` was applied (see the module doc of [`crate::stream`] for what the sender guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageVersions {
    layout: Vec<(u64, u64)>,
    versions: Vec<Vec<u8>>,
}

impl PageVersions {
    /// No page applied yet, over `layout` ((guest address, length) regions in address order).
    pub fn new(layout: &[(u64, u64)]) -> std::result::Result<Self, RamStreamError> {
        validate_layout(layout).map_err(RamStreamError::InvalidLayout)?;
        let versions = layout
            .iter()
            .map(|&(gpa, len)| {
                usize::try_from(len / PAGE_SIZE)
                    .map(|pages| vec![0u8; pages])
                    .map_err(|_| RamStreamError::InvalidLayout(format!("region {gpa:#x} too big")))
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            layout: layout.to_vec(),
            versions,
        })
    }

    /// (region index, page index) of the page holding `gpa`, if it is RAM.
    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        let i = self
            .layout
            .partition_point(|&(start, _)| start <= gpa)
            .checked_sub(1)?;
        let (start, len) = self.layout[i];
        (gpa - start < len).then(|| (i, ((gpa - start) / PAGE_SIZE) as usize))
    }

    /// The last iteration applied to the page holding `gpa`; `None` if never (or not RAM).
    pub fn last_applied(&self, gpa: u64) -> Option<u32> {
        let (r, p) = self.locate(gpa)?;
        self.versions[r][p].checked_sub(1).map(u32::from)
    }

    /// Whether a copy of the page at `gpa` from `iteration` must be dropped: a copy from a later
    /// iteration was applied.
    pub fn is_stale(&self, gpa: u64, iteration: u32) -> bool {
        self.last_applied(gpa).is_some_and(|last| last > iteration)
    }

    /// Where the version bytes of the `pages` pages from `gpa` lie: the region holding `gpa`
    /// and the range of its pages the run covers (fewer than `pages` if the run leaves the
    /// region); `None` if `gpa` is not RAM.
    fn run_at(&self, gpa: u64, pages: u64) -> Option<(usize, std::ops::Range<usize>)> {
        let (r, p) = self.locate(gpa)?;
        let end = p
            .saturating_add(usize::try_from(pages).unwrap_or(usize::MAX))
            .min(self.versions[r].len());
        Some((r, p..end))
    }

    /// Record that the copy from `iteration` (at most [`MAX_ITERATION`]) of `pages` pages from
    /// `gpa` was applied; pages outside RAM are ignored.
    pub fn mark_applied(&mut self, gpa: u64, pages: u64, iteration: u32) {
        let v = iteration.min(MAX_ITERATION) as u8 + 1;
        let mut done = 0;
        while done < pages {
            let Some(at) = gpa.checked_add(done * PAGE_SIZE) else {
                return;
            };
            match self.run_at(at, pages - done) {
                Some((r, run)) => {
                    done += run.len() as u64;
                    self.versions[r][run].fill(v);
                }
                // Not RAM: skip the page.
                None => done += 1,
            }
        }
    }

    /// The runs `(page offset, pages)` of the `pages` pages from `gpa` (inside one region) whose
    /// copy from `iteration` is not stale.
    pub fn fresh_runs(&self, gpa: u64, pages: u64, iteration: u32) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut push = |page: u64| match runs.last_mut() {
            Some((first, n)) if *first + *n == page => *n += 1,
            _ => runs.push((page, 1)),
        };
        // A copy is stale if a later iteration's was applied: version byte > iteration + 1.
        let limit = u64::from(iteration) + 1;
        let mut page = 0;
        while page < pages {
            // Past the end of the address space: stale (never written).
            let Some(at) = gpa.checked_add(page * PAGE_SIZE) else {
                page += 1;
                continue;
            };
            match self.run_at(at, pages - page) {
                Some((r, run)) => {
                    for &version in &self.versions[r][run] {
                        if u64::from(version) <= limit {
                            push(page);
                        }
                        page += 1;
                    }
                }
                // Not RAM: never applied, so not stale.
                None => {
                    push(page);
                    page += 1;
                }
            }
        }
        runs
    }

    /// Bytes this table uses.
    pub fn memory_bytes(&self) -> usize {
        self.versions.iter().map(Vec::len).sum()
    }
}

/// What [`RamApplier::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// RAM frames applied.
    pub frames: u64,
    /// Pages written to guest memory.
    pub applied_pages: u64,
    /// Pages dropped because a copy from a later iteration was already applied.
    pub stale_pages: u64,
}

/// Target side: applies RAM frames from every connection to guest memory, page by page through
/// [`PageVersions`].
///
/// It takes `&mut self`: with one receiving thread per connection, share it behind a lock held
/// for each [`RamApplier::apply`], so a page's check and write are not split by another frame.
#[derive(Debug)]
pub struct RamApplier {
    layout: Vec<(u64, u64)>,
    versions: PageVersions,
    stats: ApplyStats,
    /// Write pages through the guest memory's backing file (see [`Self::write_through_files`]).
    via_file: bool,
}

impl RamApplier {
    /// An applier for guest RAM with `layout` (the layout CONFIG announced and the target has).
    pub fn new(layout: &[(u64, u64)]) -> std::result::Result<Self, RamStreamError> {
        let versions = PageVersions::new(layout)?;
        Ok(Self {
            layout: layout.to_vec(),
            versions,
            stats: ApplyStats::default(),
            via_file: false,
        })
    }

    /// Write pages through the file behind each file-backed region of guest memory (`pwrite`)
    /// instead of through its mapping. On a fresh memfd this spares the kernel zeroing every
    /// page it allocates before the page's data overwrites it — the biggest cost of receiving
    /// RAM. Only for memory whose file-backed regions are shared mappings that no vCPU runs on
    /// yet (a migration target's RAM); such writes bypass the guest memory's dirty bitmap.
    pub fn write_through_files(&mut self, on: bool) {
        self.via_file = on;
    }

    /// The page versions so far.
    pub fn versions(&self) -> &PageVersions {
        &self.versions
    }

    /// Totals of every frame applied.
    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    /// Check `frame`'s records (bounds, the page count in its header; the frame's CRC covered
    /// their bytes) and write every page not stale to `mem`. Pages written before an error stay written.
    pub fn apply<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        frame: &RamFrame,
    ) -> Result<ApplyStats> {
        let iteration = frame.iteration;
        if iteration > MAX_ITERATION {
            return Err(StreamError::RamFrame {
                iteration,
                reason: format!("iterations are numbered 0 to {MAX_ITERATION}"),
            });
        }
        let ram = |source| StreamError::Ram { iteration, source };
        // Offsets in errors count from the start of the frame payload.
        let mut reader = RamSliceReader::bare(frame.records(), &self.layout, RAM_HEAD as u64);
        let mut stats = ApplyStats {
            frames: 1,
            ..ApplyStats::default()
        };
        loop {
            let record = reader.next_record().map_err(ram)?;
            let (gpa, pages) = match record {
                RamRecord::End { pages, .. } => {
                    if pages != u64::from(frame.pages) {
                        return Err(StreamError::RamFrame {
                            iteration,
                            reason: format!(
                                "the header announces {} pages, the records hold {pages}",
                                frame.pages
                            ),
                        });
                    }
                    break;
                }
                RamRecord::Data { gpa, data } => (gpa, (data.len() / PAGE) as u64),
                RamRecord::Zero { gpa, pages } => (gpa, u64::from(pages)),
            };
            let runs = self.versions.fresh_runs(gpa, pages, iteration);
            for &(first, n) in &runs {
                let run_gpa = gpa + first * PAGE_SIZE;
                let part = match record {
                    RamRecord::Data { data, .. } => RamRecord::Data {
                        gpa: run_gpa,
                        data: &data[first as usize * PAGE..(first + n) as usize * PAGE],
                    },
                    // n <= pages <= MAX_RECORD_PAGES.
                    _ => RamRecord::Zero {
                        gpa: run_gpa,
                        pages: n as u32,
                    },
                };
                apply_record_via(mem, &part, false, self.via_file).map_err(ram)?;
                self.versions.mark_applied(run_gpa, n, iteration);
                stats.applied_pages += n;
            }
            stats.stale_pages += pages - runs.iter().map(|&(_, n)| n).sum::<u64>();
        }
        self.stats.frames += 1;
        self.stats.applied_pages += stats.applied_pages;
        self.stats.stale_pages += stats.stale_pages;
        Ok(stats)
    }
}
