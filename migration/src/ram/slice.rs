//! Reading RAM records straight out of a buffer that holds them all (a migration RAM frame's
//! payload), and writing their pages to guest memory through the memory's backing file.
//!
//! [`RamSliceReader`] checks exactly what [`super::RamReader`] checks (tags, bounds, every CRC,
//! END's counts and chain); DATA records borrow the buffer, so nothing is copied before the pages
//! reach guest memory.

use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{
    in_one_region, u32_at, u64_at, RamRecord, RamStats, RamStreamError, Result, END_HEAD,
    MAX_RECORD_PAGES, PAGE, RECORD_HEAD, TAG_DATA, TAG_END, TAG_ZERO, ZERO_PAGE,
};
use crate::memory_file::PAGE_SIZE;

/// Reads the records of a RAM stream (without its header) from a byte slice.
#[derive(Debug)]
pub struct RamSliceReader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Stream offset of `buf[0]`, for error messages.
    base: u64,
    layout: &'a [(u64, u64)],
    chain: crc32fast::Hasher,
    stats: RamStats,
    ended: bool,
    /// Bare records ([`RamWriter::bare`](super::RamWriter::bare)): no CRCs, no END.
    bare: bool,
}

impl<'a> RamSliceReader<'a> {
    /// Records in `buf` for RAM with `layout`; `base` is the stream offset of `buf[0]` (errors
    /// name stream offsets).
    pub fn new(buf: &'a [u8], layout: &'a [(u64, u64)], base: u64) -> Self {
        Self {
            buf,
            pos: 0,
            base,
            layout,
            chain: crc32fast::Hasher::new(),
            stats: RamStats::default(),
            ended: false,
            bare: false,
        }
    }

    /// Bare records in `buf` ([`RamWriter::bare`](super::RamWriter::bare)): DATA and ZERO
    /// records without CRCs, up to the end of `buf`, which stands for END (the container
    /// checksums and counts them). Bounds are checked as for [`Self::new`].
    pub fn bare(buf: &'a [u8], layout: &'a [(u64, u64)], base: u64) -> Self {
        Self {
            bare: true,
            ..Self::new(buf, layout, base)
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> RamStats {
        self.stats
    }

    /// The bytes after the last record read.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let buf: &'a [u8] = self.buf;
        match buf.get(self.pos..self.pos + n) {
            Some(b) => {
                self.pos += n;
                Ok(b)
            }
            None => Err(RamStreamError::Truncated {
                offset: self.base + buf.len() as u64,
                what,
            }),
        }
    }

    /// The next record, checked (CRC, bounds, and for END the counts and chain).
    pub fn next_record(&mut self) -> Result<RamRecord<'a>> {
        if self.ended {
            return Err(RamStreamError::Ended);
        }
        let start = self.base + self.pos as u64;
        let corrupt = |reason: String| RamStreamError::Corrupt {
            offset: start,
            reason,
        };
        if self.bare && self.pos == self.buf.len() {
            self.ended = true;
            return Ok(RamRecord::End {
                pages: self.stats.data_pages + self.stats.zero_pages,
                records: self.stats.records,
            });
        }
        let tag = self.take(1, "record tag (END missing)")?[0];
        match tag {
            TAG_DATA | TAG_ZERO => {}
            TAG_END if !self.bare => return self.end(start),
            _ => return Err(corrupt(format!("unknown record tag {tag:#04x}"))),
        }
        let at = self.pos - 1;
        self.take(RECORD_HEAD - 1, "record header")?;
        let head = &self.buf[at..at + RECORD_HEAD];
        let gpa = u64_at(head, 1);
        let pages = u32_at(head, 9);
        if pages == 0 || pages > MAX_RECORD_PAGES {
            return Err(corrupt(format!(
                "a record of {pages} pages (1 to {MAX_RECORD_PAGES})"
            )));
        }
        if !in_one_region(self.layout, gpa, u64::from(pages)) {
            return Err(corrupt(format!(
                "{pages} pages at {gpa:#x} are not inside one RAM region"
            )));
        }
        let len = if tag == TAG_DATA {
            pages as usize * PAGE
        } else {
            0
        };
        let data = self.take(len, "record data")?;
        if !self.bare {
            let sum = self.take(4, "record data")?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(head);
            crc.update(data);
            let crc = crc.finalize();
            if crc != u32_at(sum, 0) {
                return Err(corrupt(format!(
                    "checksum mismatch in the record at {gpa:#x}"
                )));
            }
            self.chain.update(&crc.to_le_bytes());
        }
        self.stats.records += 1;
        self.stats.stream_bytes = self.pos as u64;
        if tag == TAG_DATA {
            self.stats.data_pages += u64::from(pages);
            Ok(RamRecord::Data { gpa, data })
        } else {
            self.stats.zero_pages += u64::from(pages);
            Ok(RamRecord::Zero { gpa, pages })
        }
    }

    fn end(&mut self, start: u64) -> Result<RamRecord<'a>> {
        let corrupt = |reason: &str| RamStreamError::Corrupt {
            offset: start,
            reason: format!("END record: {reason}"),
        };
        let at = self.pos - 1;
        self.take(END_HEAD + 3, "END record")?;
        let end = &self.buf[at..at + END_HEAD + 4];
        if crc32fast::hash(&end[..END_HEAD]) != u32_at(end, END_HEAD) {
            return Err(corrupt("checksum mismatch"));
        }
        let (pages, records) = (u64_at(end, 1), u64_at(end, 9));
        let got_pages = self.stats.data_pages + self.stats.zero_pages;
        if pages != got_pages || records != self.stats.records {
            return Err(corrupt(&format!(
                "{records} records of {pages} pages were sent, {} of {got_pages} received",
                self.stats.records
            )));
        }
        if u32_at(end, 17) != self.chain.clone().finalize() {
            return Err(corrupt("records are missing, repeated or out of order"));
        }
        self.ended = true;
        self.stats.stream_bytes = self.pos as u64;
        Ok(RamRecord::End { pages, records })
    }
}

/// Write `data` (inside one RAM region) to guest memory at `gpa`: with `via_file`, through the
/// file behind the region when it has one (a `pwrite`, which fills a hole of a memfd without
/// first zeroing the new page, as a store through the mapping would), else through the mapping.
///
/// `via_file` is only for memory whose file-backed regions are shared mappings of their file
/// (skiff's guest RAM) that nothing runs on yet: a write through the file bypasses the guest
/// memory's dirty bitmap.
pub fn write_guest<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    data: &[u8],
    via_file: bool,
) -> Result<()> {
    if via_file {
        if let Some(region) = mem.find_region(GuestAddress(gpa)) {
            let offset = gpa - region.start_addr().0;
            let fits = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= region.len());
            if let (Some(file), true) = (region.file_offset(), fits) {
                return file
                    .file()
                    .write_all_at(data, file.start() + offset)
                    .map_err(|source| RamStreamError::GuestFile { addr: gpa, source });
            }
        }
    }
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|source| RamStreamError::GuestMemory { addr: gpa, source })
}

/// [`super::apply_record`] with the writes of [`write_guest`].
pub fn apply_record_via<M: GuestMemoryBackend>(
    mem: &M,
    record: &RamRecord<'_>,
    target_zeroed: bool,
    via_file: bool,
) -> Result<u64> {
    match *record {
        RamRecord::Data { gpa, data } => write_guest(mem, gpa, data, via_file).map(|()| 0),
        RamRecord::Zero { pages, .. } if target_zeroed => Ok(u64::from(pages)),
        RamRecord::Zero { gpa, pages } => {
            for page in 0..u64::from(pages) {
                write_guest(mem, gpa + page * PAGE_SIZE, &ZERO_PAGE, via_file)?;
            }
            Ok(0)
        }
        RamRecord::End { .. } => Ok(0),
    }
}
