//! Guest RAM as a stream of bounded records, for snapshot memory images and live migration.
//!
//! Works on plain [`Read`] / [`Write`] (no seeking). Everything is little-endian:
//!
//! ```text
//! header  magic b"SKIFFRAM" | version u32 | page size u32 | region count u32
//!         | per region: guest address u64 | length u64 | CRC32 u32 of the header before it
//! DATA    'D' | guest address u64 | pages u32 (1..=256) | the pages' bytes | CRC32 u32
//! ZERO    'Z' | guest address u64 | pages u32 (1..=256) | CRC32 u32
//! END     'E' | pages u64 | records u64 | chain u32 | CRC32 u32
//! ```
//!
//! Each record's CRC covers the record from its tag to just before the CRC. A ZERO record says its
//! pages are all zeros: a full pass skips them (the target starts zeroed), but a pass over dirty
//! pages sends them, since the target already holds older data there. END counts the pages and the
//! DATA/ZERO records sent, and `chain` is the CRC32 of every record CRC (u32 LE) in stream order,
//! so dropped, duplicated or reordered records are detected. A record holds at most
//! [`MAX_RECORD_PAGES`] pages (1 MiB), so both ends need bounded memory.
//!
//! The stream is untrusted input: the reader checks every length before it allocates, checks that
//! every record lies inside one RAM region of the expected layout, verifies every CRC before it
//! writes a record to guest memory, and reports a [`RamStreamError`] instead of panicking. Records
//! applied before an error stay in guest memory: a caller must not run the VM unless
//! [`RamReader::read_into`] (which checks END) returned `Ok`.
//!
//! # Embedding in a bigger stream
//!
//! Records are self-delimiting and start with one of [`TAG_DATA`], [`TAG_ZERO`], [`TAG_END`]. A
//! migration stream can write its own frames between RAM records (through
//! [`RamWriter::get_mut`]) as long as their first byte is not one of those tags. Its reader peeks
//! the tag byte of each frame and hands RAM records to [`RamReader::read_record_body`], applying
//! them with [`apply_record`]; the END record closes the RAM part (its counts and chain cover RAM
//! records only). Several passes of a migration (full, then dirty) are one RAM stream: call
//! [`RamWriter::write_ranges`] once per pass and [`RamWriter::finish`] at the end.
//!
//! # Bare records
//!
//! A container that checksums and counts records itself (a migration RAM frame) uses
//! [`RamWriter::bare`] and [`RamSliceReader::bare`]: the same DATA and ZERO records without their
//! CRC, no header and no END.
//!
//! # File-backed memory
//!
//! When guest memory is a shared mapping of a file (skiff's memfd), the writer asks the file
//! where its data is and treats its holes as zero pages without reading them (reading a hole
//! through the mapping would allocate and zero a page), and [`apply_record_via`] can write
//! records through the file (a `pwrite` fills a new page without zeroing it first).

use std::io::{self, Read, Seek, SeekFrom, Write};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::dirty::validate_layout;
use crate::memory_file::{
    is_zero, layout_mismatch, memory_layout, read_up_to, restore_memory_file, MemoryFileError,
    MAX_REGIONS, MEMORY_MAGIC, PAGE_SIZE,
};

mod holes;
mod slice;

pub use slice::{apply_record_via, write_guest, RamSliceReader};

/// The first eight bytes of a RAM stream.
pub const RAM_MAGIC: [u8; 8] = *b"SKIFFRAM";
/// The RAM stream format version this build writes and reads.
pub const RAM_FORMAT_VERSION: u32 = 1;
/// The most pages one DATA or ZERO record carries.
pub const MAX_RECORD_PAGES: u32 = 256;
/// First byte of a DATA record.
pub const TAG_DATA: u8 = b'D';
/// First byte of a ZERO record.
pub const TAG_ZERO: u8 = b'Z';
/// First byte of the END record.
pub const TAG_END: u8 = b'E';

const PAGE: usize = PAGE_SIZE as usize;
const MAX_RECORD_BYTES: usize = MAX_RECORD_PAGES as usize * PAGE;
/// Tag, guest address and page count of a DATA or ZERO record.
const RECORD_HEAD: usize = 13;
/// Tag, pages, records and chain of the END record.
const END_HEAD: usize = 21;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Errors while writing or reading a RAM stream or memory image.
#[derive(Debug, Error)]
pub enum RamStreamError {
    /// The stream does not start with [`RAM_MAGIC`].
    #[error("not a skiff RAM stream")]
    BadMagic,
    /// A memory image is neither a RAM stream nor a v1 memory file.
    #[error("not a skiff memory image")]
    NotAMemoryImage,
    /// The stream has a version this build does not read.
    #[error("RAM stream version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the stream.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The stream ends early.
    #[error("RAM stream is truncated at byte {offset} (reading the {what})")]
    Truncated {
        /// Byte offset where data ran out.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A checksum does not match or a field holds an impossible value.
    #[error("RAM stream is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the header or record at fault.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The RAM layout of the VM differs from the one in the stream.
    #[error("config does not match the state: {0}")]
    LayoutMismatch(String),
    /// The guest memory cannot be described by a RAM stream.
    #[error("cannot stream guest memory: {0}")]
    InvalidLayout(String),
    /// The writer was asked to send something that is not a valid record.
    #[error("cannot send RAM at {gpa:#x}+{len:#x}: {reason}")]
    InvalidRange {
        /// Guest address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A record was requested after END.
    #[error("the RAM stream has already ended")]
    Ended,
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {addr:#x} failed: {source}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing guest memory through its backing file failed.
    #[error("writing guest memory at {addr:#x} through its file failed: {source}")]
    GuestFile {
        /// Guest physical address.
        addr: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the stream failed.
    #[error("RAM stream I/O error: {0}")]
    Io(#[from] io::Error),
    /// Restoring an old (v1, `SKIFFMEM`) memory file failed.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
}

type Result<T> = std::result::Result<T, RamStreamError>;

/// What [`RamWriter::write_ranges`] does with all-zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Leave them out (the target is zeroed: a first full pass or a snapshot).
    Skip,
    /// Send ZERO records (re-sent dirty pages: the target holds older data).
    Send,
}

/// Counts of what was written or read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages carried by DATA records.
    pub data_pages: u64,
    /// Pages carried by ZERO records.
    pub zero_pages: u64,
    /// All-zero pages not written: writer, pages left out with [`ZeroPages::Skip`]; reader,
    /// ZERO-record pages left untouched on a zeroed target.
    pub skipped_zero_pages: u64,
    /// DATA and ZERO records.
    pub records: u64,
    /// Stream bytes written or read (header and END included).
    pub stream_bytes: u64,
}

impl RamStats {
    /// Bytes of page data carried by DATA records.
    pub fn data_bytes(&self) -> u64 {
        self.data_pages * PAGE_SIZE
    }

    fn since(&self, before: &RamStats) -> RamStats {
        RamStats {
            data_pages: self.data_pages - before.data_pages,
            zero_pages: self.zero_pages - before.zero_pages,
            skipped_zero_pages: self.skipped_zero_pages - before.skipped_zero_pages,
            records: self.records - before.records,
            stream_bytes: self.stream_bytes - before.stream_bytes,
        }
    }
}

/// One decoded record; DATA borrows the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamRecord<'a> {
    /// Whole pages of data starting at `gpa`.
    Data {
        /// Guest address of the first page.
        gpa: u64,
        /// The pages' bytes (a multiple of the page size).
        data: &'a [u8],
    },
    /// `pages` all-zero pages starting at `gpa`.
    Zero {
        /// Guest address of the first page.
        gpa: u64,
        /// Number of pages.
        pages: u32,
    },
    /// The end of the RAM stream (already checked against the records read).
    End {
        /// Pages carried by DATA and ZERO records.
        pages: u64,
        /// DATA and ZERO records.
        records: u64,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Whether `gpa..gpa + pages` pages lie inside one region of `layout` (`gpa` page aligned).
fn in_one_region(layout: &[(u64, u64)], gpa: u64, pages: u64) -> bool {
    let Some(end) = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| gpa.checked_add(len))
    else {
        return false;
    };
    gpa.is_multiple_of(PAGE_SIZE)
        && layout
            .iter()
            .any(|&(start, len)| gpa >= start && end <= start + len)
}

fn check_mem_layout<M: GuestMemoryBackend>(mem: &M, layout: &[(u64, u64)]) -> Result<()> {
    let vm = memory_layout(mem);
    if vm == layout {
        Ok(())
    } else {
        Err(RamStreamError::LayoutMismatch(layout_mismatch(layout, &vm)))
    }
}

fn encode_header(layout: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + layout.len() * 16);
    b.extend_from_slice(&RAM_MAGIC);
    b.extend_from_slice(&RAM_FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    // validate_layout bounds the count by MAX_REGIONS.
    b.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    for &(gpa, len) in layout {
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Writes a RAM stream: the header on creation, then records, then END on [`RamWriter::finish`].
#[derive(Debug)]
pub struct RamWriter<W: Write> {
    out: W,
    layout: Vec<(u64, u64)>,
    chain: crc32fast::Hasher,
    stats: RamStats,
    buf: Vec<u8>,
    /// Scratch list of data and hole extents.
    extents: Vec<holes::Extent>,
    /// Where the memory's file is known to hold data.
    known_data: holes::KnownData,
    /// Bare records ([`Self::bare`]): no header, record CRCs or END.
    bare: bool,
}

impl<W: Write> RamWriter<W> {
    /// Write the header for `layout` ((guest address, length) regions in address order, page
    /// aligned) to `out`.
    pub fn new(mut out: W, layout: &[(u64, u64)]) -> Result<Self> {
        validate_layout(layout).map_err(RamStreamError::InvalidLayout)?;
        let header = encode_header(layout);
        out.write_all(&header)?;
        Ok(Self {
            out,
            layout: layout.to_vec(),
            chain: crc32fast::Hasher::new(),
            stats: RamStats {
                stream_bytes: header.len() as u64,
                ..RamStats::default()
            },
            buf: Vec::new(),
            extents: Vec::new(),
            known_data: None,
            bare: false,
        })
    }

    /// A writer of bare records for `layout`: DATA and ZERO records without their CRC, no
    /// header, and no END ([`Self::finish`] only flushes). For a container that checksums and
    /// counts the records itself (a migration RAM frame); [`RamSliceReader::bare`] reads them.
    pub fn bare(out: W, layout: &[(u64, u64)]) -> Result<Self> {
        validate_layout(layout).map_err(RamStreamError::InvalidLayout)?;
        Ok(Self {
            out,
            layout: layout.to_vec(),
            chain: crc32fast::Hasher::new(),
            stats: RamStats::default(),
            buf: Vec::new(),
            extents: Vec::new(),
            known_data: None,
            bare: true,
        })
    }

    /// The RAM layout in the header.
    pub fn layout(&self) -> &[(u64, u64)] {
        &self.layout
    }

    /// Totals so far.
    pub fn stats(&self) -> RamStats {
        self.stats
    }

    /// The underlying writer, to put other frames between records (see the module doc).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    fn check_record(&self, gpa: u64, len: u64) -> Result<u32> {
        let invalid = |reason| RamStreamError::InvalidRange { gpa, len, reason };
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len > MAX_RECORD_BYTES as u64 {
            return Err(invalid("a record holds 1 to 256 whole pages"));
        }
        if !in_one_region(&self.layout, gpa, len / PAGE_SIZE) {
            return Err(invalid("not whole pages inside one RAM region"));
        }
        Ok((len / PAGE_SIZE) as u32)
    }

    fn emit(&mut self, head: &[u8], data: &[u8]) -> Result<()> {
        if self.bare {
            self.out.write_all(head)?;
            self.out.write_all(data)?;
            self.stats.records += 1;
            self.stats.stream_bytes += (head.len() + data.len()) as u64;
            return Ok(());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(data);
        let crc = crc.finalize().to_le_bytes();
        self.out.write_all(head)?;
        self.out.write_all(data)?;
        self.out.write_all(&crc)?;
        self.chain.update(&crc);
        self.stats.records += 1;
        self.stats.stream_bytes += (head.len() + data.len() + crc.len()) as u64;
        Ok(())
    }

    fn record_head(tag: u8, gpa: u64, pages: u32) -> [u8; RECORD_HEAD] {
        let mut head = [0u8; RECORD_HEAD];
        head[0] = tag;
        head[1..9].copy_from_slice(&gpa.to_le_bytes());
        head[9..13].copy_from_slice(&pages.to_le_bytes());
        head
    }

    /// Write one DATA record: `data` is 1..=[`MAX_RECORD_PAGES`] whole pages at `gpa`, inside
    /// one RAM region.
    pub fn write_data(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        let pages = self.check_record(gpa, data.len() as u64)?;
        self.emit(&Self::record_head(TAG_DATA, gpa, pages), data)?;
        self.stats.data_pages += u64::from(pages);
        Ok(())
    }

    /// Write one ZERO record: `pages` (1..=[`MAX_RECORD_PAGES`]) all-zero pages at `gpa`.
    pub fn write_zero(&mut self, gpa: u64, pages: u32) -> Result<()> {
        self.check_record(gpa, u64::from(pages) * PAGE_SIZE)?;
        self.emit(&Self::record_head(TAG_ZERO, gpa, pages), &[])?;
        self.stats.zero_pages += u64::from(pages);
        Ok(())
    }

    /// Send the pages of `ranges` ((guest address, length), each widened to whole pages and
    /// inside one RAM region) from `mem`; all-zero pages are skipped or sent as ZERO records.
    /// Holes of the file behind the memory count as zero pages and are not read (see the module
    /// doc). Returns the counts of this call.
    pub fn write_ranges<M, I>(&mut self, mem: &M, ranges: I, zeros: ZeroPages) -> Result<RamStats>
    where
        M: GuestMemoryBackend,
        I: IntoIterator<Item = (u64, u64)>,
    {
        check_mem_layout(mem, &self.layout)?;
        let before = self.stats;
        for (gpa, len) in ranges {
            self.each_chunk(mem, gpa, len, zeros, &mut |w: &mut Self, at, n| {
                let mut buf = std::mem::take(&mut w.buf);
                buf.resize(MAX_RECORD_BYTES, 0);
                let chunk = &mut buf[..n];
                let read = mem
                    .read_slice(chunk, GuestAddress(at))
                    .map_err(|source| RamStreamError::GuestMemory { addr: at, source });
                let result = read.and_then(|()| w.write_chunk(at, chunk, zeros));
                w.buf = buf;
                result
            })?;
        }
        Ok(self.stats.since(&before))
    }

    /// Widen `gpa..gpa + len` to whole pages, check it lies inside one region, account for its
    /// holes (skipped or ZERO records) and hand every data chunk (at most one record's worth)
    /// to `chunk` as (guest address, bytes).
    fn each_chunk<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        gpa: u64,
        len: u64,
        zeros: ZeroPages,
        chunk: &mut dyn FnMut(&mut Self, u64, usize) -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let start = gpa - gpa % PAGE_SIZE;
        let end = gpa
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE));
        let Some(end) =
            end.filter(|&e| in_one_region(&self.layout, start, (e - start) / PAGE_SIZE))
        else {
            return Err(RamStreamError::InvalidRange {
                gpa,
                len,
                reason: "not inside one RAM region",
            });
        };
        let mut extents = std::mem::take(&mut self.extents);
        holes::extents(mem, start, end - start, &mut self.known_data, &mut extents);
        let result = extents.iter().try_for_each(|&(at, len, hole)| {
            if hole {
                return self.write_hole(at, len, zeros);
            }
            let mut at = at;
            let end = at + len;
            while at < end {
                // At most MAX_RECORD_BYTES: fits in usize.
                let n = (end - at).min(MAX_RECORD_BYTES as u64) as usize;
                chunk(self, at, n)?;
                at += n as u64;
            }
            Ok(())
        });
        self.extents = extents;
        result
    }

    /// What this writer learnt of where the memory's file holds data, for a writer that carries
    /// on with the same memory ([`Self::learn_data`]).
    pub(crate) fn known_data(&self) -> holes::KnownData {
        self.known_data
    }

    /// Start from what another writer learnt ([`Self::known_data`]) about the same memory.
    pub(crate) fn learn_data(&mut self, known: holes::KnownData) {
        self.known_data = known;
    }

    /// Zero pages known without reading them (a hole of the memory's file).
    fn write_hole(&mut self, gpa: u64, len: u64, zeros: ZeroPages) -> Result<()> {
        if zeros == ZeroPages::Skip {
            self.stats.skipped_zero_pages += len / PAGE_SIZE;
            return Ok(());
        }
        let mut at = gpa;
        while at < gpa + len {
            let pages = ((gpa + len - at) / PAGE_SIZE).min(u64::from(MAX_RECORD_PAGES));
            // pages <= MAX_RECORD_PAGES: fits in u32.
            self.write_zero(at, pages as u32)?;
            at += pages * PAGE_SIZE;
        }
        Ok(())
    }

    /// Write `chunk` (whole pages read from `gpa`) as runs of DATA and ZERO (or skipped) pages.
    fn write_chunk(&mut self, gpa: u64, chunk: &[u8], zeros: ZeroPages) -> Result<()> {
        let pages: Vec<bool> = chunk.chunks(PAGE).map(is_zero).collect();
        let mut first = 0;
        while first < pages.len() {
            let zero = pages[first];
            let run = pages[first..].iter().take_while(|&&z| z == zero).count();
            let run_gpa = gpa + (first * PAGE) as u64;
            match (zero, zeros) {
                (false, _) => {
                    self.write_data(run_gpa, &chunk[first * PAGE..(first + run) * PAGE])?
                }
                // run <= MAX_RECORD_PAGES: fits in u32.
                (true, ZeroPages::Send) => self.write_zero(run_gpa, run as u32)?,
                (true, ZeroPages::Skip) => self.stats.skipped_zero_pages += run as u64,
            }
            first += run;
        }
        Ok(())
    }

    /// Write END (not for bare records) and flush; returns the writer and the totals.
    pub fn finish(mut self) -> Result<(W, RamStats)> {
        if self.bare {
            self.out.flush()?;
            return Ok((self.out, self.stats));
        }
        let mut head = [0u8; END_HEAD];
        head[0] = TAG_END;
        head[1..9].copy_from_slice(&(self.stats.data_pages + self.stats.zero_pages).to_le_bytes());
        head[9..17].copy_from_slice(&self.stats.records.to_le_bytes());
        head[17..21].copy_from_slice(&self.chain.clone().finalize().to_le_bytes());
        let crc = crc32fast::hash(&head).to_le_bytes();
        self.out.write_all(&head)?;
        self.out.write_all(&crc)?;
        self.out.flush()?;
        self.stats.stream_bytes += (END_HEAD + 4) as u64;
        Ok((self.out, self.stats))
    }
}

impl RamWriter<Vec<u8>> {
    /// [`Self::write_ranges`] into the output buffer, reading guest memory straight into it:
    /// a chunk of non-zero pages becomes a DATA record where it was read, without another copy
    /// (chunks that mix zero and non-zero pages take the ordinary way).
    pub fn append_ranges<M, I>(&mut self, mem: &M, ranges: I, zeros: ZeroPages) -> Result<RamStats>
    where
        M: GuestMemoryBackend,
        I: IntoIterator<Item = (u64, u64)>,
    {
        check_mem_layout(mem, &self.layout)?;
        let before = self.stats;
        for (gpa, len) in ranges {
            self.each_chunk(mem, gpa, len, zeros, &mut |w: &mut Self, at, n| {
                w.append_chunk(mem, at, n, zeros)
            })?;
        }
        Ok(self.stats.since(&before))
    }

    fn append_chunk<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        gpa: u64,
        n: usize,
        zeros: ZeroPages,
    ) -> Result<()> {
        let pages = self.check_record(gpa, n as u64)?;
        let slice = mem
            .get_slice(GuestAddress(gpa), n)
            .map_err(|source| RamStreamError::GuestMemory { addr: gpa, source })?;
        let base = self.out.len();
        let data_at = base + RECORD_HEAD;
        self.out.reserve(RECORD_HEAD + n + 4);
        self.out
            .extend_from_slice(&Self::record_head(TAG_DATA, gpa, pages));
        let guard = slice.ptr_guard();
        // SAFETY: `reserve` left room for `n` more bytes after `data_at` (the buffer's length);
        // the source is `n` bytes of mapped guest memory (`get_slice` checked the range), which
        // is not the heap buffer, so they do not overlap; the copy initialises exactly the bytes
        // `set_len` then adds. The guest may write its memory meanwhile: the copy may then hold
        // a mix of old and new bytes, which the dirty log has the page sent again for.
        unsafe {
            std::ptr::copy_nonoverlapping(guard.as_ptr(), self.out.as_mut_ptr().add(data_at), n);
            self.out.set_len(data_at + n);
        }
        if self.out[data_at..].chunks(PAGE).all(|p| !is_zero(p)) {
            let mut len = RECORD_HEAD + n;
            if !self.bare {
                let crc = crc32fast::hash(&self.out[base..]).to_le_bytes();
                self.out.extend_from_slice(&crc);
                self.chain.update(&crc);
                len += crc.len();
            }
            self.stats.records += 1;
            self.stats.stream_bytes += len as u64;
            self.stats.data_pages += u64::from(pages);
            return Ok(());
        }
        // Zero pages among them: move the chunk aside and write its runs.
        let mut chunk = std::mem::take(&mut self.buf);
        chunk.clear();
        chunk.extend_from_slice(&self.out[data_at..]);
        self.out.truncate(base);
        let result = self.write_chunk(gpa, &chunk, zeros);
        self.buf = chunk;
        result
    }
}

/// Read exactly `buf.len()` bytes at stream offset `*offset`, advancing it.
fn read_at<R: Read>(
    input: &mut R,
    offset: &mut u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<()> {
    let got = read_up_to(input, buf)?;
    *offset += got as u64;
    if got < buf.len() {
        return Err(RamStreamError::Truncated {
            offset: *offset,
            what,
        });
    }
    Ok(())
}

/// Reads a RAM stream: the header on creation, then records up to END.
#[derive(Debug)]
pub struct RamReader<R: Read> {
    input: R,
    layout: Vec<(u64, u64)>,
    chain: crc32fast::Hasher,
    stats: RamStats,
    buf: Vec<u8>,
    ended: bool,
}

impl<R: Read> RamReader<R> {
    /// Read and check the header; its layout must be `expected_layout` (the VM's RAM).
    pub fn new(input: R, expected_layout: &[(u64, u64)]) -> Result<Self> {
        Self::with_buffer(input, expected_layout, Vec::new())
    }

    /// [`Self::new`] reading records into `buf` (a buffer from [`Self::into_parts`], so that
    /// a reader per frame does not allocate a fresh record buffer each time).
    pub fn with_buffer(mut input: R, expected_layout: &[(u64, u64)], buf: Vec<u8>) -> Result<Self> {
        let mut offset = 0u64;
        let mut fixed = [0u8; 20];
        let got = read_up_to(&mut input, &mut fixed)?;
        if got < 8 || fixed[..8] != RAM_MAGIC {
            return Err(RamStreamError::BadMagic);
        }
        offset += got as u64;
        if got < fixed.len() {
            return Err(RamStreamError::Truncated {
                offset,
                what: "header",
            });
        }
        let corrupt = |reason: String| RamStreamError::Corrupt { offset: 0, reason };
        let version = u32_at(&fixed, 8);
        if version != RAM_FORMAT_VERSION {
            return Err(RamStreamError::UnsupportedVersion {
                found: version,
                supported: RAM_FORMAT_VERSION,
            });
        }
        let page_size = u64::from(u32_at(&fixed, 12));
        if page_size != PAGE_SIZE {
            return Err(corrupt(format!(
                "page size {page_size} (this build uses {PAGE_SIZE})"
            )));
        }
        let count = u32_at(&fixed, 16) as usize;
        if count > MAX_REGIONS {
            return Err(corrupt(format!(
                "{count} RAM regions (at most {MAX_REGIONS})"
            )));
        }
        let mut rest = vec![0u8; count * 16 + 4];
        read_at(&mut input, &mut offset, &mut rest, "header")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed);
        crc.update(&rest[..count * 16]);
        if !crate::checksum_ok(u32_at(&rest, count * 16), crc.finalize()) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let layout: Vec<(u64, u64)> = rest[..count * 16]
            .chunks_exact(16)
            .map(|e| (u64_at(e, 0), u64_at(e, 8)))
            .collect();
        validate_layout(&layout).map_err(corrupt)?;
        if layout != expected_layout {
            return Err(RamStreamError::LayoutMismatch(layout_mismatch(
                &layout,
                expected_layout,
            )));
        }
        Ok(Self {
            input,
            layout,
            chain: crc32fast::Hasher::new(),
            stats: RamStats {
                stream_bytes: offset,
                ..RamStats::default()
            },
            buf,
            ended: false,
        })
    }

    /// The RAM layout in the header.
    pub fn layout(&self) -> &[(u64, u64)] {
        &self.layout
    }

    /// Totals so far.
    pub fn stats(&self) -> RamStats {
        self.stats
    }

    /// Whether END has been read.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// The underlying reader, to read other frames between records (see the module doc).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// The underlying reader, positioned after the last record read.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The underlying reader and the record buffer (see [`Self::with_buffer`]).
    pub fn into_parts(self) -> (R, Vec<u8>) {
        (self.input, self.buf)
    }

    /// Read the next record, checked (CRC, bounds, and for END the counts and chain).
    pub fn read_record(&mut self) -> Result<RamRecord<'_>> {
        if self.ended {
            return Err(RamStreamError::Ended);
        }
        let mut tag = [0u8; 1];
        read_at(
            &mut self.input,
            &mut self.stats.stream_bytes,
            &mut tag,
            "record tag (END missing)",
        )?;
        self.read_body(tag[0], self.stats.stream_bytes - 1)
    }

    /// Read the rest of a record whose tag byte the caller has already consumed from the
    /// underlying reader (interleaved streams, see the module doc).
    pub fn read_record_body(&mut self, tag: u8) -> Result<RamRecord<'_>> {
        if self.ended {
            return Err(RamStreamError::Ended);
        }
        self.stats.stream_bytes += 1;
        self.read_body(tag, self.stats.stream_bytes - 1)
    }

    fn read_body(&mut self, tag: u8, start: u64) -> Result<RamRecord<'_>> {
        let corrupt = |reason: String| RamStreamError::Corrupt {
            offset: start,
            reason,
        };
        match tag {
            TAG_DATA | TAG_ZERO => {}
            TAG_END => return self.read_end(start),
            _ => return Err(corrupt(format!("unknown record tag {tag:#04x}"))),
        }
        let mut head = [0u8; RECORD_HEAD];
        head[0] = tag;
        let offset = &mut self.stats.stream_bytes;
        read_at(&mut self.input, offset, &mut head[1..], "record header")?;
        let gpa = u64_at(&head, 1);
        let pages = u32_at(&head, 9);
        if pages == 0 || pages > MAX_RECORD_PAGES {
            return Err(corrupt(format!(
                "a record of {pages} pages (1 to {MAX_RECORD_PAGES})"
            )));
        }
        if !in_one_region(&self.layout, gpa, u64::from(pages)) {
            return Err(corrupt(format!(
                "{pages} pages at {gpa:#x} are not inside one RAM region"
            )));
        }
        let len = if tag == TAG_DATA {
            pages as usize * PAGE
        } else {
            0
        };
        self.buf.resize(len + 4, 0);
        read_at(&mut self.input, offset, &mut self.buf, "record data")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&self.buf[..len]);
        let crc = crc.finalize();
        if !crate::checksum_ok(u32_at(&self.buf, len), crc) {
            return Err(corrupt(format!(
                "checksum mismatch in the record at {gpa:#x}"
            )));
        }
        self.chain.update(&crc.to_le_bytes());
        self.stats.records += 1;
        if tag == TAG_DATA {
            self.stats.data_pages += u64::from(pages);
            Ok(RamRecord::Data {
                gpa,
                data: &self.buf[..len],
            })
        } else {
            self.stats.zero_pages += u64::from(pages);
            Ok(RamRecord::Zero { gpa, pages })
        }
    }

    fn read_end(&mut self, start: u64) -> Result<RamRecord<'_>> {
        let corrupt = |reason: &str| RamStreamError::Corrupt {
            offset: start,
            reason: format!("END record: {reason}"),
        };
        let mut end = [0u8; END_HEAD + 4];
        end[0] = TAG_END;
        let offset = &mut self.stats.stream_bytes;
        read_at(&mut self.input, offset, &mut end[1..], "END record")?;
        if !crate::checksum_ok(u32_at(&end, END_HEAD), crc32fast::hash(&end[..END_HEAD])) {
            return Err(corrupt("checksum mismatch"));
        }
        let (pages, records) = (u64_at(&end, 1), u64_at(&end, 9));
        if pages != self.stats.data_pages + self.stats.zero_pages || records != self.stats.records {
            return Err(corrupt(&format!(
                "{records} records of {pages} pages were sent, {} of {} received",
                self.stats.records,
                self.stats.data_pages + self.stats.zero_pages
            )));
        }
        if !crate::checksum_ok(u32_at(&end, 17), self.chain.clone().finalize()) {
            return Err(corrupt("records are missing, repeated or out of order"));
        }
        self.ended = true;
        Ok(RamRecord::End { pages, records })
    }

    /// Read records up to and including END into `mem` (which must have the stream's layout).
    /// With `target_zeroed` (fresh guest memory), ZERO records are not written, so untouched RAM
    /// stays unallocated. Returns the totals of the stream.
    pub fn read_into<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        target_zeroed: bool,
    ) -> Result<RamStats> {
        check_mem_layout(mem, &self.layout)?;
        loop {
            let skipped = match self.read_record()? {
                RamRecord::End { .. } => return Ok(self.stats),
                record => apply_record(mem, &record, target_zeroed)?,
            };
            self.stats.skipped_zero_pages += skipped;
        }
    }
}

/// Write a DATA or ZERO record to `mem` (ZERO records are skipped when `target_zeroed`); END does
/// nothing. Returns the number of zero pages left untouched.
pub fn apply_record<M: GuestMemoryBackend>(
    mem: &M,
    record: &RamRecord<'_>,
    target_zeroed: bool,
) -> Result<u64> {
    apply_record_via(mem, record, target_zeroed, false)
}

/// A full RAM stream of `mem` (all regions, zero pages skipped) to `out`; for snapshots.
///
/// Guest memory must not change while this runs (vCPUs and device workers paused).
pub fn write_all_ram<M: GuestMemoryBackend, W: Write>(mem: &M, out: W) -> Result<(W, RamStats)> {
    let layout = memory_layout(mem);
    let mut writer = RamWriter::new(out, &layout)?;
    writer.write_ranges(mem, layout.iter().copied(), ZeroPages::Skip)?;
    writer.finish()
}

/// Write a snapshot memory image of `mem` (a full RAM stream) to `out`.
pub fn write_memory_image<M: GuestMemoryBackend, W: Write>(
    mem: &M,
    out: &mut W,
) -> Result<RamStats> {
    write_all_ram(mem, out).map(|(_, stats)| stats)
}

/// Restore a snapshot memory image into `mem`: a RAM stream ([`write_memory_image`]) or an old
/// v1 memory file ([`crate::memory_file::write_memory_file`]), told apart by their magic.
/// `target_zeroed` as for [`RamReader::read_into`]; bytes after END are refused.
pub fn restore_memory_image<M: GuestMemoryBackend, R: Read + Seek>(
    mem: &M,
    input: &mut R,
    target_zeroed: bool,
) -> Result<RamStats> {
    input.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 8];
    let got = read_up_to(input, &mut magic)?;
    input.seek(SeekFrom::Start(0))?;
    if got == magic.len() && magic == MEMORY_MAGIC {
        let stats = restore_memory_file(mem, input, target_zeroed)?;
        return Ok(RamStats {
            data_pages: stats.data_bytes.div_ceil(PAGE_SIZE),
            stream_bytes: input.stream_position()?,
            ..RamStats::default()
        });
    }
    if got < magic.len() || magic != RAM_MAGIC {
        return Err(RamStreamError::NotAMemoryImage);
    }
    let mut reader = RamReader::new(&mut *input, &memory_layout(mem))?;
    let stats = reader.read_into(mem, target_zeroed)?;
    if read_up_to(input, &mut [0u8; 1])? != 0 {
        return Err(RamStreamError::Corrupt {
            offset: stats.stream_bytes,
            reason: "data after the END record".into(),
        });
    }
    Ok(stats)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_file;
