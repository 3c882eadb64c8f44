//! Guest RAM as a sparse file, written next to a snapshot's state file.
//!
//! Layout (little-endian):
//!
//! ```text
//! 0    magic b"SKIFFMEM" | version u32 | page size u32 | region count u32 | reserved u32
//! 24   per region: guest address u64 | length u64 | file offset u64 | CRC32 u32 | reserved u32
//! ..   CRC32 u32 of the header bytes before it, then zero padding to a page boundary
//! ..   each region's bytes at its file offset (page aligned, regions in guest address order)
//! ```
//!
//! All-zero pages are not written: the writer seeks over them, so they stay holes in the file and
//! a mostly idle guest costs little disk. The header is written last, so an interrupted write
//! leaves a file that is rejected as "not a skiff memory file". Each region's CRC covers its full
//! contents (zeros included), so a restore detects data corruption as well as a layout that does
//! not match the VM being restored ("config does not match the state").
//!
//! Guest memory is accessed through vm-memory's [`GuestMemoryBackend`], never through KVM; the
//! file side is any `Read + Seek` / `Write + Seek`.

use std::io::{self, Read, Seek, SeekFrom, Write};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The first eight bytes of a skiff memory file.
pub const MEMORY_MAGIC: [u8; 8] = *b"SKIFFMEM";
/// The memory file format version this build writes and reads.
pub const MEMORY_FORMAT_VERSION: u32 = 1;
/// Page size of the file: holes and region offsets are aligned to it.
pub const PAGE_SIZE: u64 = 4096;
/// The most RAM regions a memory file may describe.
pub const MAX_REGIONS: usize = 1024;

const FIXED_HEADER: usize = 24;
const ENTRY_LEN: usize = 32;
/// RAM is copied in pieces of this size.
const CHUNK: usize = 1 << 20;

/// Errors while writing or restoring a memory file.
#[derive(Debug, Error)]
pub enum MemoryFileError {
    /// The file does not start with [`MEMORY_MAGIC`] (or its header was never completed).
    #[error("not a skiff memory file")]
    BadMagic,
    /// The file has a version this build does not read.
    #[error("memory file version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file is shorter than its header says.
    #[error("memory file is truncated: it has {len} bytes, its layout needs {expected}")]
    Truncated {
        /// Actual length.
        len: u64,
        /// Length the header implies.
        expected: u64,
    },
    /// A checksum or field is wrong.
    #[error("memory file is corrupt: {0}")]
    Corrupt(String),
    /// The RAM layout of the VM differs from the one saved.
    #[error("config does not match the state: {0}")]
    LayoutMismatch(String),
    /// The guest memory cannot be described by a memory file.
    #[error("cannot save guest memory: {0}")]
    InvalidLayout(String),
    /// Writing must start on an empty file (holes must read as zeros).
    #[error("the memory file must be empty before it is written (it has {0} bytes)")]
    NotEmpty(u64),
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {addr:#x} failed: {reason}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// The vm-memory error.
        reason: String,
    },
    /// Reading or writing the file failed.
    #[error("memory file I/O error: {0}")]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, MemoryFileError>;

/// One RAM region recorded in a memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the region's bytes start in the file.
    pub file_offset: u64,
    /// CRC32 of the region's full contents.
    pub crc: u32,
}

/// The header of a memory file: page size and region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFileHeader {
    /// Page size the file was written with.
    pub page_size: u64,
    /// The regions, in guest address order.
    pub regions: Vec<RegionEntry>,
}

/// Bytes written or restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFileStats {
    /// Total guest RAM covered.
    pub ram_bytes: u64,
    /// Bytes in non-zero pages (written to the file, or to guest memory on a zeroed restore).
    pub data_bytes: u64,
}

/// The (guest address, length) of every region of `mem`, in guest address order.
pub fn memory_layout<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    let mut layout: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    layout.sort_unstable();
    layout
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|v| v / align * align)
}

/// `[addr+len, ...]` for error messages.
pub(crate) fn describe(layout: &[(u64, u64)]) -> String {
    let parts: Vec<String> = layout
        .iter()
        .map(|(a, l)| format!("{a:#x}+{l:#x}"))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Why a saved RAM layout does not fit the VM's (the text after "config does not match the state").
pub(crate) fn layout_mismatch(saved: &[(u64, u64)], vm: &[(u64, u64)]) -> String {
    let total = |l: &[(u64, u64)]| l.iter().map(|(_, len)| len).sum::<u64>();
    format!(
        "the state has {} bytes of RAM in {}, the VM has {} bytes in {}",
        total(saved),
        describe(saved),
        total(vm),
        describe(vm)
    )
}

impl MemoryFileHeader {
    /// The header for a RAM layout ((guest address, length) pairs in address order), with file
    /// offsets assigned and CRCs still zero.
    pub fn for_layout(layout: &[(u64, u64)]) -> Result<Self> {
        let invalid = |reason: String| MemoryFileError::InvalidLayout(reason);
        if layout.len() > MAX_REGIONS {
            return Err(invalid(format!(
                "{} RAM regions; a memory file holds at most {MAX_REGIONS}",
                layout.len()
            )));
        }
        let header_len = Self::header_len(layout.len());
        let mut offset = header_len;
        let mut regions = Vec::with_capacity(layout.len());
        let mut prev_end = 0u64;
        for (i, &(guest_addr, len)) in layout.iter().enumerate() {
            if len == 0 {
                return Err(invalid(format!("RAM region {guest_addr:#x} is empty")));
            }
            if i > 0 && guest_addr < prev_end {
                return Err(invalid(format!(
                    "RAM regions overlap or are out of order: {}",
                    describe(layout)
                )));
            }
            prev_end = guest_addr
                .checked_add(len)
                .ok_or_else(|| invalid(format!("RAM region {guest_addr:#x}+{len:#x} wraps")))?;
            regions.push(RegionEntry {
                guest_addr,
                len,
                file_offset: offset,
                crc: 0,
            });
            offset = offset
                .checked_add(len)
                .and_then(|o| round_up(o, PAGE_SIZE))
                .ok_or_else(|| invalid("RAM is larger than a file can be".into()))?;
        }
        Ok(Self {
            page_size: PAGE_SIZE,
            regions,
        })
    }

    /// Size of the encoded header for `n` regions, padded to a page.
    fn header_len(n: usize) -> u64 {
        // n <= MAX_REGIONS keeps this small.
        let raw = (FIXED_HEADER + n * ENTRY_LEN + 4) as u64;
        raw.div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// The length a complete file with this header has.
    pub fn file_len(&self) -> u64 {
        self.regions
            .last()
            .map(|r| r.file_offset + r.len)
            .unwrap_or_else(|| Self::header_len(0))
    }

    /// The (guest address, length) pairs this header describes.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.guest_addr, r.len)).collect()
    }

    /// Check that the VM's RAM layout is the saved one.
    pub fn check_layout(&self, layout: &[(u64, u64)]) -> Result<()> {
        let saved = self.layout();
        if saved != layout {
            return Err(MemoryFileError::LayoutMismatch(layout_mismatch(
                &saved, layout,
            )));
        }
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let len = Self::header_len(self.regions.len()) as usize;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&MEMORY_MAGIC);
        b.extend_from_slice(&MEMORY_FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(self.page_size as u32).to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.guest_addr.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&r.file_offset.to_le_bytes());
            b.extend_from_slice(&r.crc.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(len, 0);
        b
    }

    /// Read and check the header at the current position of `input` (the start of the file).
    pub fn read_from<R: Read>(input: &mut R) -> Result<Self> {
        let mut fixed = [0u8; FIXED_HEADER];
        let got = read_up_to(input, &mut fixed)?;
        if got < 8 || fixed[..8] != MEMORY_MAGIC {
            return Err(MemoryFileError::BadMagic);
        }
        if got < FIXED_HEADER {
            return Err(MemoryFileError::Truncated {
                len: got as u64,
                expected: FIXED_HEADER as u64,
            });
        }
        let word = |at: usize| {
            u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let version = word(8);
        if version != MEMORY_FORMAT_VERSION {
            return Err(MemoryFileError::UnsupportedVersion {
                found: version,
                supported: MEMORY_FORMAT_VERSION,
            });
        }
        let page_size = u64::from(word(12));
        if page_size != PAGE_SIZE {
            return Err(MemoryFileError::Corrupt(format!(
                "page size {page_size} (this build uses {PAGE_SIZE})"
            )));
        }
        let count = word(16) as usize;
        if count > MAX_REGIONS {
            return Err(MemoryFileError::Corrupt(format!(
                "{count} RAM regions (at most {MAX_REGIONS})"
            )));
        }
        let mut rest = vec![0u8; count * ENTRY_LEN + 4];
        let got = read_up_to(input, &mut rest)?;
        if got < rest.len() {
            return Err(MemoryFileError::Truncated {
                len: (FIXED_HEADER + got) as u64,
                expected: (FIXED_HEADER + rest.len()) as u64,
            });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed);
        crc.update(&rest[..count * ENTRY_LEN]);
        let at = count * ENTRY_LEN;
        let stored = u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        if !crate::checksum_ok(stored, crc.finalize()) {
            return Err(MemoryFileError::Corrupt("header checksum mismatch".into()));
        }
        let mut regions = Vec::with_capacity(count);
        for e in rest[..count * ENTRY_LEN].chunks_exact(ENTRY_LEN) {
            let u64_at = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&e[i..i + 8]);
                u64::from_le_bytes(a)
            };
            regions.push(RegionEntry {
                guest_addr: u64_at(0),
                len: u64_at(8),
                file_offset: u64_at(16),
                crc: u32::from_le_bytes([e[24], e[25], e[26], e[27]]),
            });
        }
        let header = Self { page_size, regions };
        // Offsets are a function of the layout; anything else is not a file this code wrote.
        let expected = Self::for_layout(&header.layout())
            .map_err(|e| MemoryFileError::Corrupt(e.to_string()))?;
        if expected
            .regions
            .iter()
            .zip(&header.regions)
            .any(|(a, b)| a.file_offset != b.file_offset)
        {
            return Err(MemoryFileError::Corrupt(
                "region file offsets do not follow the layout".into(),
            ));
        }
        Ok(header)
    }
}

/// Read until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_up_to<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    // Most pages are either all zero or non-zero near their start: a look at the first bytes
    // settles the common case without reading the whole page; the rest is folded without
    // early exit, a form that vectorizes well.
    let (head, tail) = page.split_at(page.len().min(64));
    head.iter().fold(0u8, |acc, &b| acc | b) == 0 && tail.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// The (offset, length) runs of consecutive pages of `chunk` that are not all zero.
fn nonzero_runs(chunk: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
        if is_zero(page) {
            continue;
        }
        let start = i * PAGE_SIZE as usize;
        match runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += page.len(),
            _ => runs.push((start, page.len())),
        }
    }
    runs
}

fn guest_err(addr: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> MemoryFileError {
    move |e| MemoryFileError::GuestMemory {
        addr,
        reason: e.to_string(),
    }
}

/// Write every RAM region of `mem` to `out`, which must be empty; all-zero pages become holes.
///
/// Guest memory must not change while this runs (vCPUs and device workers paused), or the saved
/// image is inconsistent with its checksums.
pub fn write_memory_file<M, W>(mem: &M, out: &mut W) -> Result<MemoryFileStats>
where
    M: GuestMemoryBackend,
    W: Write + Seek,
{
    let existing = out.seek(SeekFrom::End(0))?;
    if existing != 0 {
        return Err(MemoryFileError::NotEmpty(existing));
    }
    let mut header = MemoryFileHeader::for_layout(&memory_layout(mem))?;
    let mut stats = MemoryFileStats::default();
    let mut buf = vec![0u8; CHUNK];
    let mut written_end = 0u64;
    for region in &mut header.regions {
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0u64;
        while done < region.len {
            // At most CHUNK: fits in usize.
            let n = (region.len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            let addr = region.guest_addr + done;
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(guest_err(addr))?;
            crc.update(chunk);
            for (start, len) in nonzero_runs(chunk) {
                let at = region.file_offset + done + start as u64;
                out.seek(SeekFrom::Start(at))?;
                out.write_all(&chunk[start..start + len])?;
                written_end = written_end.max(at + len as u64);
                stats.data_bytes += len as u64;
            }
            done += n as u64;
        }
        region.crc = crc.finalize();
        stats.ram_bytes += region.len;
    }
    let file_len = header.file_len();
    if written_end < file_len {
        // Give the file its full length; the zero byte is part of a zero page anyway.
        out.seek(SeekFrom::Start(file_len - 1))?;
        out.write_all(&[0])?;
    }
    out.seek(SeekFrom::Start(0))?;
    out.write_all(&header.encode())?;
    out.flush()?;
    Ok(stats)
}

/// Load a memory file written by [`write_memory_file`] into `mem`, after checking that `mem` has
/// the saved RAM layout.
///
/// With `target_zeroed` (fresh guest memory, which reads as zeros), zero pages are not written,
/// so untouched guest RAM stays unallocated on the host; otherwise every byte is written. When a
/// region's checksum does not match, guest memory holds the (corrupt) data and the error says so:
/// the caller must not start the VM.
pub fn restore_memory_file<M, R>(
    mem: &M,
    input: &mut R,
    target_zeroed: bool,
) -> Result<MemoryFileStats>
where
    M: GuestMemoryBackend,
    R: Read + Seek,
{
    input.seek(SeekFrom::Start(0))?;
    let header = MemoryFileHeader::read_from(input)?;
    header.check_layout(&memory_layout(mem))?;
    let len = input.seek(SeekFrom::End(0))?;
    let expected = header.file_len();
    if len < expected {
        return Err(MemoryFileError::Truncated { len, expected });
    }
    let mut stats = MemoryFileStats::default();
    let mut buf = vec![0u8; CHUNK];
    for region in &header.regions {
        input.seek(SeekFrom::Start(region.file_offset))?;
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0u64;
        while done < region.len {
            let n = (region.len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            input.read_exact(chunk).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => MemoryFileError::Truncated { len, expected },
                _ => MemoryFileError::Io(e),
            })?;
            crc.update(chunk);
            let addr = region.guest_addr + done;
            if target_zeroed {
                for (start, run) in nonzero_runs(chunk) {
                    let at = addr + start as u64;
                    mem.write_slice(&chunk[start..start + run], GuestAddress(at))
                        .map_err(guest_err(at))?;
                    stats.data_bytes += run as u64;
                }
            } else {
                mem.write_slice(chunk, GuestAddress(addr))
                    .map_err(guest_err(addr))?;
                stats.data_bytes += n as u64;
            }
            done += n as u64;
        }
        if !crate::checksum_ok(region.crc, crc.finalize()) {
            return Err(MemoryFileError::Corrupt(format!(
                "checksum mismatch in the RAM region at {:#x}",
                region.guest_addr
            )));
        }
        stats.ram_bytes += region.len;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{contents, guest_mem};
    use std::io::Cursor;
    use std::os::unix::fs::MetadataExt;

    type Mem = vm_memory::GuestMemoryMmap<()>;

    const MIB: u64 = 1 << 20;

    fn mem(layout: &[(u64, u64)]) -> Mem {
        guest_mem(layout)
    }

    fn layout() -> Vec<(u64, u64)> {
        vec![(0, 8 * MIB), (16 * MIB, 4 * MIB + PAGE_SIZE)]
    }

    fn dirty(m: &Mem) {
        m.write_slice(b"hello", GuestAddress(0x10)).unwrap();
        m.write_slice(&[0xaa; 5000], GuestAddress(3 * MIB - 100))
            .unwrap();
        m.write_slice(b"end", GuestAddress(20 * MIB + PAGE_SIZE - 3))
            .unwrap();
        m.write_slice(&[1], GuestAddress(17 * MIB)).unwrap();
    }

    #[test]
    fn round_trip_in_memory() {
        let src = mem(&layout());
        dirty(&src);
        let mut file = Cursor::new(Vec::new());
        let stats = write_memory_file(&src, &mut file).unwrap();
        assert_eq!(stats.ram_bytes, 12 * MIB + PAGE_SIZE);
        // "hello", the 5000-byte run over 3 pages, "end", one byte.
        assert_eq!(stats.data_bytes, 6 * PAGE_SIZE);
        let header = MemoryFileHeader::read_from(&mut Cursor::new(file.get_ref())).unwrap();
        assert_eq!(file.get_ref().len() as u64, header.file_len());
        assert_eq!(header.layout(), layout());

        for zeroed in [true, false] {
            let dst = mem(&layout());
            let stats = restore_memory_file(&dst, &mut file, zeroed).unwrap();
            assert_eq!(stats.ram_bytes, 12 * MIB + PAGE_SIZE);
            assert!(contents(&dst) == contents(&src));
        }
        // Overwriting non-zeroed memory clears what the snapshot has as zero.
        let dst = mem(&layout());
        dst.write_slice(&[7; 64], GuestAddress(5 * MIB)).unwrap();
        restore_memory_file(&dst, &mut file, false).unwrap();
        assert!(contents(&dst) == contents(&src));
    }

    #[test]
    fn file_is_sparse() {
        let dir = std::env::temp_dir().join(format!("skiff-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let src = mem(&[(0, 64 * MIB)]);
        src.write_slice(&[0x55; 8192], GuestAddress(32 * MIB))
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_memory_file(&src, &mut f).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), PAGE_SIZE + 64 * MIB);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < MIB,
            "{allocated} bytes allocated for a 64 MiB image with 8 KiB of data"
        );
        // Writing again onto the non-empty file is refused.
        assert!(matches!(
            write_memory_file(&src, &mut f),
            Err(MemoryFileError::NotEmpty(_))
        ));
        let dst = mem(&[(0, 64 * MIB)]);
        let mut f = std::fs::File::open(&path).unwrap();
        let stats = restore_memory_file(&dst, &mut f, true).unwrap();
        assert_eq!(stats.data_bytes, 8192);
        assert!(contents(&dst) == contents(&src));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layout_mismatch_is_reported() {
        let src = mem(&layout());
        let mut file = Cursor::new(Vec::new());
        write_memory_file(&src, &mut file).unwrap();
        let other = mem(&[(0, 8 * MIB)]);
        let err = restore_memory_file(&other, &mut file, true).unwrap_err();
        assert!(matches!(err, MemoryFileError::LayoutMismatch(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("config does not match the state"),
            "{err}"
        );
        let bigger = mem(&[(0, 8 * MIB), (16 * MIB, 8 * MIB)]);
        assert!(matches!(
            restore_memory_file(&bigger, &mut file, true),
            Err(MemoryFileError::LayoutMismatch(_))
        ));
    }

    #[test]
    fn truncation_and_corruption_are_detected() {
        let src = mem(&layout());
        dirty(&src);
        let mut file = Cursor::new(Vec::new());
        write_memory_file(&src, &mut file).unwrap();
        let bytes = file.into_inner();
        let dst = mem(&layout());
        for len in [0, 5, 8, 23, 24, 100, 4095, 4096, 4097, bytes.len() - 1] {
            let err = restore_memory_file(&dst, &mut Cursor::new(&bytes[..len]), true).unwrap_err();
            assert!(
                matches!(
                    err,
                    MemoryFileError::Truncated { .. } | MemoryFileError::BadMagic
                ),
                "truncated to {len}: {err}"
            );
        }
        // Every header byte that matters.
        for at in 0..FIXED_HEADER + 2 * ENTRY_LEN + 4 {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                restore_memory_file(&dst, &mut Cursor::new(&bad), true).is_err(),
                "header corruption at {at} unnoticed"
            );
        }
        // Data corruption: a bit flipped in a page that was written, and one in a hole.
        for at in [PAGE_SIZE + 0x10, PAGE_SIZE + 5 * MIB] {
            let mut bad = bytes.clone();
            bad[at as usize] ^= 1;
            let err = restore_memory_file(&dst, &mut Cursor::new(&bad), true).unwrap_err();
            assert!(err.to_string().contains("checksum mismatch"), "{err}");
        }
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(b"SKIFFST\0");
        assert_eq!(
            restore_memory_file(&dst, &mut Cursor::new(&bad), true)
                .unwrap_err()
                .to_string(),
            "not a skiff memory file"
        );
    }

    #[test]
    fn invalid_layouts() {
        assert!(MemoryFileHeader::for_layout(&[(0, 0)]).is_err());
        assert!(
            MemoryFileHeader::for_layout(&[(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)]).is_err()
        );
        assert!(MemoryFileHeader::for_layout(&[(u64::MAX - 1, 4)]).is_err());
        let many: Vec<(u64, u64)> = (0..=MAX_REGIONS as u64)
            .map(|i| (i * PAGE_SIZE, PAGE_SIZE))
            .collect();
        assert!(MemoryFileHeader::for_layout(&many).is_err());
        let h = MemoryFileHeader::for_layout(&[(0, 100), (PAGE_SIZE, PAGE_SIZE)]).unwrap();
        assert_eq!(h.regions[0].file_offset, PAGE_SIZE);
        assert_eq!(h.regions[1].file_offset, 2 * PAGE_SIZE);
        assert_eq!(h.file_len(), 3 * PAGE_SIZE);
    }
}
