//! Device memory as it was when the device stopped, to notice peer writes that arrive through
//! the mapping while it must not change (see [`DeviceState::freezes_memory`] for the rule and
//! why). A REGION_WRITE is seen as it arrives; a store through the shared mapping (a peer's
//! DMA the VMM maps straight into BAR2, or the guest's own) is only seen by comparing the
//! bytes with this copy, at the next check (see `transition.rs`): all of them at a state change
//! request or a REGION_WRITE into BAR2 ([`FrozenMemory::changed_chunks`]), a share at a
//! MIG_DATA_READ ([`FrozenMemory::changed_chunks_some`]), so that draining a large memory in
//! many reads costs one comparison of it in all, not one per read.
//!
//! [`DeviceState::freezes_memory`]: crate::device::DeviceState::freezes_memory

use crate::mem::Mapping;
use crate::migration::CHUNK;

/// A copy of device memory taken when the device entered STOP, STOP_COPY or RESUMING.
#[derive(Debug)]
pub struct FrozenMemory {
    copy: Vec<u8>,
    /// Where the next partial check starts (a chunk index, round robin).
    cursor: usize,
}

impl FrozenMemory {
    /// Copies `mem` (all of BAR 2) now.
    pub fn of(mem: &Mapping) -> FrozenMemory {
        let mut copy = vec![0; mem.len()];
        // Cannot fail for the whole BAR; a failure leaves zeroes (changes then show up once).
        if !mem.read(0, &mut copy) {
            log::warn!("device memory could not be copied to notice late writes");
        }
        FrozenMemory { copy, cursor: 0 }
    }

    /// Takes `copy` (device memory as it is now, taken elsewhere: the bytes a saving session
    /// just sent, or a resuming session just loaded) as the copy, without copying again.
    pub fn from_copy(copy: Vec<u8>) -> FrozenMemory {
        FrozenMemory { copy, cursor: 0 }
    }

    /// How many chunks of `mem` changed since the copy (or since they were last checked):
    /// writes made through the mapping while the device was stopped. Each is counted once (the
    /// copy is updated).
    pub fn changed_chunks(&mut self, mem: &Mapping) -> u32 {
        let n = self.copy.len() / CHUNK;
        self.changed_chunks_some(mem, n)
    }

    /// [`FrozenMemory::changed_chunks`] for `count` chunks only (at least one, at most all),
    /// from where the last partial check stopped, round robin.
    pub fn changed_chunks_some(&mut self, mem: &Mapping, count: usize) -> u32 {
        let total = self.copy.len() / CHUNK;
        if total == 0 {
            return 0;
        }
        let count = count.clamp(1, total);
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        for k in 0..count {
            let off = (self.cursor + k) % total * CHUNK;
            if mem.read(off as u64, &mut buf) && buf[..] != self.copy[off..off + CHUNK] {
                self.copy[off..off + CHUNK].copy_from_slice(&buf);
                n += 1;
            }
        }
        self.cursor = (self.cursor + count) % total;
        n
    }

    /// Takes the current bytes of `[off, off + len)` into the copy (a write there was already
    /// counted another way: a REGION_WRITE).
    pub fn absorb(&mut self, mem: &Mapping, off: u64, len: usize) {
        let Some(end) = off.checked_add(len as u64) else {
            return;
        };
        if len == 0 || end > self.copy.len() as u64 {
            return;
        }
        let (o, e) = (off as usize, end as usize);
        // Cannot fail for an in-range span; a failure leaves the old bytes.
        let _ = mem.read(off, &mut self.copy[o..e]);
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
        assert_eq!(f.changed_chunks(&mem), 0, "copied with the write");
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
    fn partial_checks_go_round_robin_over_a_larger_memory() {
        let size = 4 * DEVICE_MEMORY_SIZE;
        let mem = memory(size);
        let mut f = FrozenMemory::of(&mem);
        let total = size as usize / CHUNK;
        assert!(mem.write(0, b"first"));
        assert!(mem.write(size - 1, b"z"));
        // Chunk 0 is in the first share, the last chunk only in the last one.
        assert_eq!(f.changed_chunks_some(&mem, 10), 1);
        assert_eq!(f.changed_chunks_some(&mem, total - 20), 0);
        assert_eq!(f.changed_chunks_some(&mem, 10), 1, "the last chunk");
        // Zero still checks one chunk; more than all checks each chunk once.
        assert!(mem.write(0, b"again"));
        assert_eq!(f.changed_chunks_some(&mem, 0), 1);
        assert!(mem.write(5 * CHUNK as u64, b"x"));
        assert_eq!(f.changed_chunks_some(&mem, 10 * total), 1);
        assert_eq!(f.changed_chunks(&mem), 0);
    }
}
