//! A small explicit little-endian encoding for state sections.
//!
//! Every component (legacy devices, PCI configuration space, virtio devices, vCPUs, the VM-level
//! KVM state) writes its state with [`StateWriter`] and reads it back with [`StateReader`], which
//! checks the section id and version and rejects truncated or oversized input with a
//! [`StateError`] instead of panicking. The encoding has no self-description: a section's version
//! names its layout.

use crate::{StateError, StateSection};

/// Builds the byte payload of a [`StateSection`].
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Append a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a little-endian `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a little-endian `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a little-endian `u128`.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Append a `bool` as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Append a `u32` count followed by each value as a little-endian `u32`.
    pub fn u32_slice(&mut self, v: &[u32]) -> &mut Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        for x in v.iter().take(len as usize) {
            self.u32(*x);
        }
        self
    }

    /// Number of payload bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Append raw bytes whose length the reader knows (a fixed-size array).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Append a `u32` length followed by the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Lengths written by skiff are small (device buffers); saturate rather than wrap, and never
        // write more bytes than the length says.
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(&v[..len as usize]);
        self
    }

    /// Wrap the payload in a section.
    pub fn into_section(self, id: &str, version: u16) -> StateSection {
        StateSection {
            id: id.to_string(),
            version,
            data: self.buf,
        }
    }

    /// The payload written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads back a payload written by [`StateWriter`].
#[derive(Debug)]
pub struct StateReader<'a> {
    id: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> StateReader<'a> {
    /// Check that `section` belongs to `id` and has exactly `version`, and start reading it.
    pub fn open(section: &'a StateSection, id: &'a str, version: u16) -> Result<Self, StateError> {
        if section.id != id {
            return Err(StateError::Malformed {
                id: id.to_string(),
                reason: format!("section belongs to {:?}", section.id),
            });
        }
        if section.version != version {
            return Err(StateError::Version {
                id: id.to_string(),
                found: section.version,
                supported: version,
            });
        }
        Ok(Self::from_bytes(id, &section.data))
    }

    /// Read a bare payload (no section header) on behalf of component `id`.
    pub fn from_bytes(id: &'a str, data: &'a [u8]) -> Self {
        Self { id, data, pos: 0 }
    }

    /// A `Malformed` error for this component.
    pub fn malformed(&self, reason: impl Into<String>) -> StateError {
        StateError::Malformed {
            id: self.id.to_string(),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "truncated: need {n} bytes at offset {}, have {}",
                    self.pos,
                    self.data.len().saturating_sub(self.pos)
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Read exactly `N` raw bytes into an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Read one byte.
    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }

    /// Read a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Read a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Read a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Read a little-endian `i64`.
    pub fn i64(&mut self) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Read a little-endian `i32`.
    pub fn i32(&mut self) -> Result<i32, StateError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    /// Read a little-endian `u128`.
    pub fn u128(&mut self) -> Result<u128, StateError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    /// Read a `bool` written by [`StateWriter::bool`]; any byte other than 0 or 1 is malformed.
    pub fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.malformed(format!("invalid boolean byte {v:#x}"))),
        }
    }

    /// Read a `u32` count (at most `max`) followed by that many little-endian `u32` values.
    pub fn u32_slice(&mut self, max: usize) -> Result<Vec<u32>, StateError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.malformed(format!("count {len} exceeds the maximum {max}")));
        }
        // Check the bytes are there before allocating.
        let raw = self.take(len.saturating_mul(4))?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Read exactly `n` raw bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        self.take(n)
    }

    /// Read a `u32` length (at most `max`) followed by that many bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], StateError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.malformed(format!("length {len} exceeds the maximum {max}")));
        }
        self.take(len)
    }

    /// Fail unless every byte was consumed.
    pub fn finish(self) -> Result<(), StateError> {
        if self.pos != self.data.len() {
            return Err(self.malformed(format!(
                "{} unexpected trailing bytes",
                self.data.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let mut w = StateWriter::new();
        w.u8(1)
            .u16(0x203)
            .u32(0x4050607)
            .u64(u64::MAX)
            .i64(-5)
            .bytes(b"abc");
        let s = w.into_section("dev", 1);
        let mut r = StateReader::open(&s, "dev", 1).unwrap();
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x203);
        assert_eq!(r.u32().unwrap(), 0x4050607);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.i64().unwrap(), -5);
        assert_eq!(r.bytes(3).unwrap(), b"abc");
        r.finish().unwrap();

        assert!(matches!(
            StateReader::open(&s, "dev", 2),
            Err(StateError::Version {
                found: 1,
                supported: 2,
                ..
            })
        ));
        assert!(StateReader::open(&s, "other", 1).is_err());

        let mut r = StateReader::open(&s, "dev", 1).unwrap();
        r.raw(15).unwrap();
        assert!(r.bytes(2).is_err(), "length above the maximum");

        let short = StateSection {
            id: "dev".into(),
            version: 1,
            data: vec![1, 2],
        };
        let mut r = StateReader::open(&short, "dev", 1).unwrap();
        assert!(r.u32().is_err());

        let mut r = StateReader::open(&short, "dev", 1).unwrap();
        r.u8().unwrap();
        assert!(r.finish().is_err());

        // A huge declared length must not panic or allocate.
        let bogus = StateSection {
            id: "dev".into(),
            version: 1,
            data: vec![0xff, 0xff, 0xff, 0xff],
        };
        let mut r = StateReader::open(&bogus, "dev", 1).unwrap();
        assert!(r.bytes(usize::MAX).is_err());
        let mut r = StateReader::open(&bogus, "dev", 1).unwrap();
        assert!(r.u32_slice(usize::MAX).is_err());
    }

    #[test]
    fn wider_types() {
        let mut w = StateWriter::new();
        assert!(w.is_empty());
        w.i32(-7)
            .u128(u128::MAX - 3)
            .bool(true)
            .bool(false)
            .u32_slice(&[1, 0xdead_beef])
            .raw(&[9, 8, 7]);
        assert_eq!(w.len(), 4 + 16 + 2 + 4 + 8 + 3);
        let s = w.into_section("x", 3);
        let mut r = StateReader::open(&s, "x", 3).unwrap();
        assert_eq!(r.i32().unwrap(), -7);
        assert_eq!(r.u128().unwrap(), u128::MAX - 3);
        assert!(r.bool().unwrap());
        assert!(!r.bool().unwrap());
        assert_eq!(r.u32_slice(2).unwrap(), vec![1, 0xdead_beef]);
        assert_eq!(r.remaining(), 3);
        assert_eq!(r.array::<3>().unwrap(), [9, 8, 7]);
        r.finish().unwrap();

        let bad = StateSection {
            id: "x".into(),
            version: 1,
            data: vec![2],
        };
        assert!(StateReader::from_bytes("x", &bad.data).bool().is_err());
        let mut w = StateWriter::new();
        w.u32_slice(&[1, 2, 3]);
        let b = w.into_bytes();
        assert!(StateReader::from_bytes("x", &b).u32_slice(2).is_err());
    }
}
