//! The versioned binary state file: a header, a sequence of [`StateSection`]s, an end marker.
//!
//! Snapshot files and the migration stream share this format. Everything is little-endian:
//!
//! ```text
//! header   magic b"SKIFFST\0" | format version u32 | flags u32 (0 in version 1)
//! section  tag 'S' u8 | id length u8 | id (UTF-8, 1..=255 bytes) | section version u16
//!          | payload length u64 (<= MAX_SECTION_LEN) | payload | CRC32 u32
//!          (the CRC covers the section from its tag to the end of its payload)
//! end      tag 'E' u8 | section count u32 | CRC32 u32 of every byte of the file before it
//! ```
//!
//! A state file is untrusted input: the reader checks every length before it allocates (a payload
//! is read in bounded chunks, so a huge length field in a short file costs nothing), verifies
//! every CRC, rejects duplicate section ids and trailing bytes after the end marker, and reports
//! a precise [`SnapshotError`] instead of panicking.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use thiserror::Error;

use crate::StateSection;

/// The first eight bytes of every skiff state file.
pub const MAGIC: [u8; 8] = *b"SKIFFST\0";
/// The state file format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest section payload accepted (1 GiB).
pub const MAX_SECTION_LEN: u64 = 1 << 30;
/// The longest section id, in bytes.
pub const MAX_ID_LEN: usize = 255;

const TAG_SECTION: u8 = b'S';
const TAG_END: u8 = b'E';
/// Payloads are read in pieces of this size so memory grows only with data actually present.
const READ_CHUNK: usize = 64 * 1024;

/// Errors while writing or reading a state file.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file does not start with [`MAGIC`].
    #[error("not a skiff state file")]
    BadMagic,
    /// The file has a format version this build does not read.
    #[error("state file version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file ends early.
    #[error("state file is truncated at byte {offset} (while reading section #{at_section})")]
    Truncated {
        /// Number of complete sections before the point where data ran out.
        at_section: usize,
        /// Byte offset where data ran out.
        offset: u64,
    },
    /// A checksum does not match or a field holds an impossible value.
    #[error("state file is corrupt in {section}: {reason}")]
    Corrupt {
        /// The section id (or `header`, `end marker`, `section #N` when no id was read).
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// Two sections carry the same id.
    #[error("state file has section {0:?} more than once")]
    DuplicateSection(String),
    /// A section's payload is larger than [`MAX_SECTION_LEN`].
    #[error("section {section} is {len} bytes; at most {max} are accepted")]
    Oversized {
        /// The section id (or `section #N`).
        section: String,
        /// Declared or actual length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A section the restore needs is not in the state.
    #[error("the state has no section {0:?}")]
    MissingSection(String),
    /// A section id cannot be written (empty or longer than [`MAX_ID_LEN`] bytes).
    #[error("invalid section id {id:?}: {reason}")]
    InvalidId {
        /// The id.
        id: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Reading or writing the underlying file failed.
    #[error("state file I/O error: {0}")]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// Writes a state file section by section.
#[derive(Debug)]
pub struct SnapshotWriter<W: Write> {
    out: W,
    file_crc: crc32fast::Hasher,
    count: u32,
    ids: HashSet<String>,
}

impl<W: Write> SnapshotWriter<W> {
    /// Start a state file on `out` by writing the header.
    pub fn new(out: W) -> Result<Self> {
        let mut w = Self {
            out,
            file_crc: crc32fast::Hasher::new(),
            count: 0,
            ids: HashSet::new(),
        };
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.file_crc.update(bytes);
        Ok(())
    }

    /// Append one section. Ids must be unique, non-empty and at most [`MAX_ID_LEN`] bytes.
    pub fn write_section(&mut self, section: &StateSection) -> Result<()> {
        let id = section.id.as_bytes();
        let invalid = |reason| SnapshotError::InvalidId {
            id: section.id.clone(),
            reason,
        };
        if id.is_empty() {
            return Err(invalid("empty"));
        }
        let id_len = u8::try_from(id.len()).map_err(|_| invalid("longer than 255 bytes"))?;
        if self.ids.contains(&section.id) {
            return Err(SnapshotError::DuplicateSection(section.id.clone()));
        }
        let len = section.data.len() as u64;
        if len > MAX_SECTION_LEN {
            return Err(SnapshotError::Oversized {
                section: section.id.clone(),
                len,
                max: MAX_SECTION_LEN,
            });
        }
        if self.count == u32::MAX {
            return Err(invalid("too many sections"));
        }
        let mut head = Vec::with_capacity(2 + id.len() + 10);
        head.push(TAG_SECTION);
        head.push(id_len);
        head.extend_from_slice(id);
        head.extend_from_slice(&section.version.to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&section.data);
        self.put(&head)?;
        self.put(&section.data)?;
        self.put(&crc.finalize().to_le_bytes())?;
        self.ids.insert(section.id.clone());
        self.count += 1;
        Ok(())
    }

    /// Write the end marker, flush, and hand back the output.
    pub fn finish(mut self) -> Result<W> {
        let mut end = [0u8; 5];
        end[0] = TAG_END;
        end[1..].copy_from_slice(&self.count.to_le_bytes());
        self.put(&end)?;
        let crc = self.file_crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Write a complete state file holding `sections`, in order.
pub fn write_snapshot<W: Write>(out: W, sections: &[StateSection]) -> Result<W> {
    let mut w = SnapshotWriter::new(out)?;
    for s in sections {
        w.write_section(s)?;
    }
    w.finish()
}

/// Reads a state file section by section, verifying it as it goes.
#[derive(Debug)]
pub struct SnapshotReader<R: Read> {
    input: R,
    file_crc: crc32fast::Hasher,
    offset: u64,
    count: usize,
    ids: HashSet<String>,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    /// Check the header of the state file on `input`.
    pub fn new(input: R) -> Result<Self> {
        let mut r = Self {
            input,
            file_crc: crc32fast::Hasher::new(),
            offset: 0,
            count: 0,
            ids: HashSet::new(),
            done: false,
        };
        let mut magic = [0u8; 8];
        let got = r.fill(&mut magic)?;
        if magic[..got] != MAGIC[..got] {
            return Err(SnapshotError::BadMagic);
        }
        if got < magic.len() {
            return Err(r.truncated(got));
        }
        r.commit(&magic);
        let version = u32::from_le_bytes(r.array()?);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u32::from_le_bytes(r.array()?);
        if flags != 0 {
            return Err(SnapshotError::Corrupt {
                section: "header".into(),
                reason: format!("unknown flags {flags:#x}"),
            });
        }
        Ok(r)
    }

    /// Read the whole state file on `input`: every section, in file order.
    pub fn read_all(input: R) -> Result<Vec<StateSection>> {
        let mut r = Self::new(input)?;
        let mut sections = Vec::new();
        while let Some(s) = r.next_section()? {
            sections.push(s);
        }
        Ok(sections)
    }

    /// Read up to `buf.len()` bytes; returns how many were read (fewer only at end of input).
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(filled)
    }

    fn truncated(&self, got: usize) -> SnapshotError {
        SnapshotError::Truncated {
            at_section: self.count,
            offset: self.offset + got as u64,
        }
    }

    /// Account for bytes that were read and belong to the file checksum.
    fn commit(&mut self, bytes: &[u8]) {
        self.file_crc.update(bytes);
        self.offset += bytes.len() as u64;
    }

    /// Read exactly `buf.len()` bytes into the file checksum.
    fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let got = self.fill(buf)?;
        if got < buf.len() {
            return Err(self.truncated(got));
        }
        self.commit(buf);
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.exact(&mut a)?;
        Ok(a)
    }

    /// The next section, or `None` after the end marker (which is then verified, as is the
    /// absence of trailing bytes).
    pub fn next_section(&mut self) -> Result<Option<StateSection>> {
        if self.done {
            return Ok(None);
        }
        let place = format!("section #{}", self.count);
        let corrupt = |section: &str, reason: String| SnapshotError::Corrupt {
            section: section.to_string(),
            reason,
        };
        let [tag] = self.array::<1>()?;
        match tag {
            TAG_SECTION => {}
            TAG_END => return self.end_marker().map(|()| None),
            t => return Err(corrupt(&place, format!("unknown record tag {t:#04x}"))),
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[tag]);
        let [id_len] = self.array::<1>()?;
        crc.update(&[id_len]);
        let mut id = vec![0u8; usize::from(id_len)];
        self.exact(&mut id)?;
        crc.update(&id);
        let version_bytes = self.array::<2>()?;
        crc.update(&version_bytes);
        let len_bytes = self.array::<8>()?;
        crc.update(&len_bytes);
        let len = u64::from_le_bytes(len_bytes);
        // Name the section in later errors only if its id is at least valid UTF-8.
        let name = std::str::from_utf8(&id)
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| format!("section {s:?}"))
            .unwrap_or(place);
        if len > MAX_SECTION_LEN {
            return Err(SnapshotError::Oversized {
                section: name,
                len,
                max: MAX_SECTION_LEN,
            });
        }
        // `len` is at most 1 GiB: it fits in usize on the 64-bit hosts skiff runs on.
        let len = len as usize;
        let mut data = Vec::new();
        while data.len() < len {
            let start = data.len();
            let n = (len - start).min(READ_CHUNK);
            data.resize(start + n, 0);
            self.exact(&mut data[start..])?;
        }
        crc.update(&data);
        let stored = u32::from_le_bytes(self.array()?);
        let computed = crc.finalize();
        if !crate::checksum_ok(stored, computed) {
            return Err(corrupt(
                &name,
                format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
            ));
        }
        let id = String::from_utf8(id)
            .map_err(|_| corrupt(&name, "the section id is not UTF-8".into()))?;
        if id.is_empty() {
            return Err(corrupt(&name, "empty section id".into()));
        }
        if !self.ids.insert(id.clone()) {
            return Err(SnapshotError::DuplicateSection(id));
        }
        self.count += 1;
        Ok(Some(StateSection {
            id,
            version: u16::from_le_bytes(version_bytes),
            data,
        }))
    }

    fn end_marker(&mut self) -> Result<()> {
        let corrupt = |reason: String| SnapshotError::Corrupt {
            section: "end marker".into(),
            reason,
        };
        let count = u32::from_le_bytes(self.array()?);
        let computed = self.file_crc.clone().finalize();
        let mut crc = [0u8; 4];
        let got = self.fill(&mut crc)?;
        if got < crc.len() {
            return Err(self.truncated(got));
        }
        self.offset += 4;
        let stored = u32::from_le_bytes(crc);
        if !crate::checksum_ok(stored, computed) {
            return Err(corrupt(format!(
                "file checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        if count as usize != self.count {
            return Err(corrupt(format!(
                "it counts {count} sections, the file has {}",
                self.count
            )));
        }
        let mut extra = [0u8; 1];
        if self.fill(&mut extra)? != 0 {
            return Err(corrupt(format!("trailing data after byte {}", self.offset)));
        }
        self.done = true;
        Ok(())
    }
}

/// The section with `id`, if present.
pub fn find_section<'a>(sections: &'a [StateSection], id: &str) -> Option<&'a StateSection> {
    sections.iter().find(|s| s.id == id)
}

/// The section with `id`, or [`SnapshotError::MissingSection`].
pub fn require_section<'a>(sections: &'a [StateSection], id: &str) -> Result<&'a StateSection> {
    find_section(sections, id).ok_or_else(|| SnapshotError::MissingSection(id.to_string()))
}

/// Check that every id in `ids` has a section; the error names the first missing one.
pub fn require_sections(sections: &[StateSection], ids: &[&str]) -> Result<()> {
    for id in ids {
        require_section(sections, id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<StateSection> {
        vec![
            StateSection {
                id: "cpu0".into(),
                version: 1,
                data: vec![1, 2, 3, 4, 5],
            },
            StateSection {
                id: "irqchip".into(),
                version: 7,
                data: vec![],
            },
            StateSection {
                id: "serial0".into(),
                version: 2,
                data: (0..40).collect(),
            },
        ]
    }

    fn file(sections: &[StateSection]) -> Vec<u8> {
        write_snapshot(Vec::new(), sections).unwrap()
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = file(&s);
        assert_eq!(&bytes[..8], b"SKIFFST\0");
        assert_eq!(SnapshotReader::read_all(&bytes[..]).unwrap(), s);
        // An empty state file is valid too.
        assert!(SnapshotReader::read_all(&file(&[])[..]).unwrap().is_empty());
        // Section by section.
        let mut r = SnapshotReader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_section().unwrap().unwrap().id, "cpu0");
        assert_eq!(r.next_section().unwrap().unwrap().id, "irqchip");
        assert_eq!(r.next_section().unwrap().unwrap().id, "serial0");
        assert!(r.next_section().unwrap().is_none());
        assert!(r.next_section().unwrap().is_none());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let bytes = file(&sample());
        for offset in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[offset] ^= flip;
                assert!(
                    SnapshotReader::read_all(&bad[..]).is_err(),
                    "corruption at byte {offset} (xor {flip:#x}) went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = file(&sample());
        for len in 0..bytes.len() {
            let err = SnapshotReader::read_all(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated { offset, .. } if offset == len as u64),
                "truncation to {len} bytes: {err}"
            );
        }
        let err = SnapshotReader::read_all(&bytes[..45]).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Truncated {
                    at_section: 1,
                    offset: 45
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn trailing_data_is_rejected() {
        let mut bytes = file(&sample());
        bytes.push(0);
        let err = SnapshotReader::read_all(&bytes[..]).unwrap_err();
        assert!(err.to_string().contains("trailing data"), "{err}");
    }

    #[test]
    fn wrong_magic_and_version() {
        let mut bytes = file(&sample());
        bytes[0] = b'X';
        let err = SnapshotReader::read_all(&bytes[..]).unwrap_err();
        assert!(matches!(err, SnapshotError::BadMagic));
        assert_eq!(err.to_string(), "not a skiff state file");
        assert!(matches!(
            SnapshotReader::read_all(&b"{\"json\": 1}"[..]),
            Err(SnapshotError::BadMagic)
        ));

        let mut bytes = file(&sample());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = SnapshotReader::read_all(&bytes[..]).unwrap_err();
        assert!(matches!(
            err,
            SnapshotError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert_eq!(
            err.to_string(),
            "state file version 2; this build reads version 1"
        );
    }

    #[test]
    fn section_crc_mismatch_names_the_section() {
        let mut bytes = file(&sample());
        // The first payload byte of cpu0: header 16, tag, len, "cpu0", version 2, length 8.
        bytes[16 + 2 + 4 + 2 + 8] ^= 1;
        let err = SnapshotReader::read_all(&bytes[..]).unwrap_err();
        match err {
            SnapshotError::Corrupt { section, reason } => {
                assert_eq!(section, "section \"cpu0\"");
                assert!(reason.contains("checksum"), "{reason}");
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    /// A reader that yields `prefix` and then counts how many bytes are asked of it.
    struct Counting<'a> {
        prefix: &'a [u8],
        served: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.prefix.len().min(buf.len());
            buf[..n].copy_from_slice(&self.prefix[..n]);
            self.prefix = &self.prefix[n..];
            self.served += n;
            Ok(n)
        }
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        // A section whose length field says 1 GiB - 1 in a file that ends right after it: the
        // reader must report truncation after reading a bounded amount, not allocate 1 GiB.
        let mut bytes = file(&[]);
        bytes.truncate(16);
        bytes.extend_from_slice(&[TAG_SECTION, 1, b'x', 1, 0]);
        bytes.extend_from_slice(&(MAX_SECTION_LEN - 1).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 100]);
        let mut input = Counting {
            prefix: &bytes,
            served: 0,
        };
        let err = SnapshotReader::read_all(&mut input).unwrap_err();
        assert!(matches!(err, SnapshotError::Truncated { .. }), "{err:?}");
        assert_eq!(input.served, bytes.len());

        // Above the limit: rejected from the length field alone.
        let mut bytes = file(&[]);
        bytes.truncate(16);
        bytes.extend_from_slice(&[TAG_SECTION, 1, b'x', 1, 0]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = SnapshotReader::read_all(&bytes[..]).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Oversized { len: u64::MAX, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn duplicates_and_invalid_ids() {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        let s = &sample()[0];
        w.write_section(s).unwrap();
        assert!(matches!(
            w.write_section(s),
            Err(SnapshotError::DuplicateSection(id)) if id == "cpu0"
        ));
        let long = StateSection {
            id: "x".repeat(256),
            version: 1,
            data: vec![],
        };
        assert!(matches!(
            w.write_section(&long),
            Err(SnapshotError::InvalidId { .. })
        ));
        let empty = StateSection {
            id: String::new(),
            version: 1,
            data: vec![],
        };
        assert!(matches!(
            w.write_section(&empty),
            Err(SnapshotError::InvalidId { .. })
        ));
        let max = StateSection {
            id: "y".repeat(255),
            version: 1,
            data: vec![1],
        };
        w.write_section(&max).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(SnapshotReader::read_all(&bytes[..]).unwrap().len(), 2);

        // A duplicate forged into a file (with valid checksums) is rejected by the reader.
        let mut forged = file(&sample()[..1]);
        let sec_len = 2 + 4 + 2 + 8 + 5 + 4;
        let section = forged[16..16 + sec_len].to_vec();
        forged.truncate(16 + sec_len);
        forged.extend_from_slice(&section);
        forged.push(TAG_END);
        forged.extend_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&forged);
        forged.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SnapshotReader::read_all(&forged[..]),
            Err(SnapshotError::DuplicateSection(id)) if id == "cpu0"
        ));
    }

    #[test]
    fn lookup_helpers() {
        let s = sample();
        assert_eq!(find_section(&s, "irqchip").unwrap().version, 7);
        assert!(find_section(&s, "pit").is_none());
        require_sections(&s, &["cpu0", "serial0"]).unwrap();
        let err = require_sections(&s, &["cpu0", "pit", "clock"]).unwrap_err();
        assert!(matches!(&err, SnapshotError::MissingSection(id) if id == "pit"));
        assert_eq!(err.to_string(), "the state has no section \"pit\"");
        assert_eq!(require_section(&s, "cpu0").unwrap().data.len(), 5);
    }
}
