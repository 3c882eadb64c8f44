//! Device memory as it must stay while the device is stopped, to notice writes that arrive
//! through the shared mapping while it must not change (see [`DeviceState::freezes_memory`]
//! for the rule and why). A REGION_WRITE into BAR2 is seen as it arrives; a store through the
//! mapping (the guest's through the VMM's mapping, or a peer's DMA a VMM maps straight into
//! BAR2) is made by another process and can only be found by looking at the bytes.
//!
//! What is kept per 4 KiB chunk is what it must hold, as bytes or as a [`Digest`], and the
//! reference comes for free from what the arc already has: the bytes STOP_COPY saved (the
//! saving session's copy, handed over), or, when the device stops from a running state, the
//! digests of the memory (one read of it, no copy to allocate and fault in); chunks RESUMING
//! loads replace their reference as they arrive. A chunk is checked when something touches it
//! anyway (a REGION_WRITE into it, a loaded chunk about to replace it). The whole memory is
//! compared only where a change could otherwise never be told apart from a legitimate one or
//! would be lost ([`FrozenMemory::changed_chunks`]: leaving the frozen states, saving the
//! counters, a reset, a read of the counters, the end of the session). See `transition.rs` for
//! where.
//!
//! [`DeviceState::freezes_memory`]: crate::device::DeviceState::freezes_memory

use crate::digest::{all_digests, chunk_digest, digest, Digest};
use crate::mem::Mapping;
use crate::migration::CHUNK;

/// What every chunk must hold.
#[derive(Debug)]
enum Reference {
    /// The bytes (a saving session's copy of what it sent).
    Bytes(Vec<u8>),
    /// Their digests.
    Digests(Vec<Digest>),
}

/// Device memory as it must stay (STOP, STOP_COPY, RESUMING), chunk by chunk.
#[derive(Debug)]
pub struct FrozenMemory {
    reference: Reference,
}

impl FrozenMemory {
    /// Takes the digests of all of `mem` now (one read of it: used only when the device stops
    /// from a running state, where nothing else has a reference).
    pub fn of(mem: &Mapping) -> FrozenMemory {
        FrozenMemory {
            reference: Reference::Digests(all_digests(mem)),
        }
    }

    /// Takes `copy` (device memory as it is now, taken elsewhere: the bytes a saving session
    /// just sent) as the reference, without copying again.
    pub fn from_copy(copy: Vec<u8>) -> FrozenMemory {
        FrozenMemory {
            reference: Reference::Bytes(copy),
        }
    }

    fn chunks(&self) -> usize {
        match &self.reference {
            Reference::Bytes(b) => b.len() / CHUNK,
            Reference::Digests(d) => d.len(),
        }
    }

    /// Whether chunk `index` changed since its reference was taken (or last checked); the
    /// reference then follows it, so that a change is counted once. False outside the memory.
    pub fn changed_chunk(&mut self, mem: &Mapping, index: usize) -> bool {
        match &mut self.reference {
            Reference::Bytes(b) => {
                let Some((off, kept)) = chunk_of(b, index) else {
                    return false;
                };
                let mut now = [0u8; CHUNK];
                if !mem.read(off as u64, &mut now) || now[..] == *kept {
                    return false;
                }
                kept.copy_from_slice(&now);
                true
            }
            Reference::Digests(d) => {
                let (Some(now), Some(kept)) = (chunk_digest(mem, index), d.get_mut(index)) else {
                    return false;
                };
                let changed = now != *kept;
                *kept = now;
                changed
            }
        }
    }

    /// How many chunks of `mem` changed since the reference (each counted once): the whole
    /// memory is read.
    pub fn changed_chunks(&mut self, mem: &Mapping) -> u32 {
        let n = (0..self.chunks())
            .filter(|&i| self.changed_chunk(mem, i))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// [`FrozenMemory::changed_chunks`] for the chunks `[off, off + len)` touches only.
    pub fn changed_in(&mut self, mem: &Mapping, off: u64, len: usize) -> u32 {
        let n = chunk_span(off, len).filter(|&i| self.changed_chunk(mem, i));
        u32::try_from(n.count()).unwrap_or(u32::MAX)
    }

    /// Takes the current bytes of the chunks `[off, off + len)` touches as the reference (a
    /// write there was counted another way: a REGION_WRITE).
    pub fn absorb(&mut self, mem: &Mapping, off: u64, len: usize) {
        for i in chunk_span(off, len) {
            self.changed_chunk(mem, i);
        }
    }

    /// Sets chunk `index`'s reference to `bytes` (RESUMING loaded them into it).
    pub fn set(&mut self, index: usize, bytes: &[u8]) {
        match &mut self.reference {
            Reference::Bytes(b) => {
                if let Some((_, kept)) = chunk_of(b, index) {
                    if kept.len() == bytes.len() {
                        kept.copy_from_slice(bytes);
                    }
                }
            }
            Reference::Digests(d) => {
                if let Some(kept) = d.get_mut(index) {
                    *kept = digest(bytes);
                }
            }
        }
    }
}

/// Chunk `index` of `bytes` and its offset (`None` outside).
fn chunk_of(bytes: &mut [u8], index: usize) -> Option<(usize, &mut [u8])> {
    let off = index.checked_mul(CHUNK)?;
    let chunk = bytes.get_mut(off..off.checked_add(CHUNK)?)?;
    Some((off, chunk))
}

/// The chunk indices `[off, off + len)` touches (empty for `len` 0 or an overflowing span).
fn chunk_span(off: u64, len: usize) -> std::ops::Range<usize> {
    let end = off.checked_add(len as u64).filter(|_| len > 0);
    match (
        usize::try_from(off),
        end.and_then(|e| usize::try_from(e).ok()),
    ) {
        (Ok(o), Some(e)) => o / CHUNK..e.div_ceil(CHUNK),
        _ => 0..0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::DEVICE_MEMORY_SIZE;

    fn memory(size: u64) -> Mapping {
        let fd = crate::mem::memfd("t", size).unwrap();
        Mapping::new(&fd, 0, size, true).unwrap()
    }

    #[test]
    fn writes_are_noticed_once_and_absorbed_ones_not_at_all() {
        let mem = memory(DEVICE_MEMORY_SIZE);
        assert!(mem.write(0, b"before"));
        let mut f = FrozenMemory::of(&mem);
        assert_eq!(f.changed_chunks(&mem), 0, "taken with the write");
        assert!(mem.write(3 * CHUNK as u64, b"late"));
        assert!(mem.write(9 * CHUNK as u64 - 1, b"xy"));
        assert_eq!(f.changed_chunks(&mem), 3, "three chunks changed");
        assert_eq!(f.changed_chunks(&mem), 0, "counted once");
        assert!(mem.write(100, b"absorbed"));
        f.absorb(&mem, 100, 8);
        assert_eq!(f.changed_chunks(&mem), 0, "a write counted elsewhere");
        f.absorb(&mem, DEVICE_MEMORY_SIZE - 4, 8);
        f.absorb(&mem, u64::MAX, 8);
    }

    #[test]
    fn a_span_checks_only_the_chunks_it_touches() {
        let mem = memory(DEVICE_MEMORY_SIZE);
        let mut f = FrozenMemory::of(&mem);
        assert!(mem.write(5 * CHUNK as u64 - 2, b"abcd"));
        assert!(mem.write(40 * CHUNK as u64, b"far"));
        assert_eq!(f.changed_in(&mem, 5 * CHUNK as u64, 1), 1, "chunk 5 only");
        assert_eq!(f.changed_in(&mem, 0, 0), 0, "empty");
        assert_eq!(f.changed_in(&mem, u64::MAX, 2), 0, "overflowing");
        assert_eq!(f.changed_chunks(&mem), 2, "chunks 4 and 40 were left");
        assert!(!f.changed_chunk(&mem, usize::MAX / CHUNK));
    }

    #[test]
    fn a_set_reference_is_what_counts_with_bytes_or_digests() {
        let mem = memory(DEVICE_MEMORY_SIZE);
        let copy = vec![0u8; DEVICE_MEMORY_SIZE as usize];
        for mut f in [FrozenMemory::of(&mem), FrozenMemory::from_copy(copy)] {
            let chunk = vec![0x5a; CHUNK];
            assert!(mem.write(7 * CHUNK as u64, &chunk));
            f.set(7, &chunk);
            f.set(usize::MAX / CHUNK, &chunk);
            assert_eq!(f.changed_chunks(&mem), 0, "loaded, not changed");
            assert!(mem.write(7 * CHUNK as u64 + 9, b"late"));
            assert!(mem.write(8 * CHUNK as u64, b"late"));
            assert_eq!(f.changed_in(&mem, 7 * CHUNK as u64, 1), 1);
            assert_eq!(f.changed_chunks(&mem), 1, "chunk 8");
            assert!(mem.write(0, &[0; 16]) && mem.write(7 * CHUNK as u64, &[0; CHUNK]));
            assert!(mem.write(8 * CHUNK as u64, &[0; 4]));
            f.changed_chunks(&mem);
        }
    }
}
