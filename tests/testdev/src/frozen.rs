//! Device memory as it was when the device stopped, to notice peer writes that arrive through
//! the mapping while it must not change (see [`DeviceState::freezes_memory`] for the rule and
//! why). A REGION_WRITE is seen as it arrives; a store through the shared mapping (a peer's
//! DMA the VMM maps straight into BAR2, or the guest's own) is only seen by comparing the
//! bytes with this copy, at the next check (see `transition.rs`).
//!
//! [`DeviceState::freezes_memory`]: crate::device::DeviceState::freezes_memory

use crate::mem::Mapping;
use crate::migration::{CHUNK, CHUNKS};
use crate::regs::DEVICE_MEMORY_SIZE;

/// A copy of device memory taken when the device entered STOP, STOP_COPY or RESUMING.
#[derive(Debug)]
pub struct FrozenMemory {
    copy: Vec<u8>,
}

impl FrozenMemory {
    /// Copies `mem` now.
    pub fn of(mem: &Mapping) -> FrozenMemory {
        let mut copy = vec![0; DEVICE_MEMORY_SIZE as usize];
        // Cannot fail for the whole BAR; a failure leaves zeroes (changes then show up once).
        if !mem.read(0, &mut copy) {
            log::warn!("device memory could not be copied to notice late writes");
        }
        FrozenMemory { copy }
    }

    /// How many chunks of `mem` changed since the copy (or the last call): writes made
    /// through the mapping while the device was stopped. Each is counted once (the copy is
    /// updated).
    pub fn changed_chunks(&mut self, mem: &Mapping) -> u32 {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        for i in 0..CHUNKS {
            let off = i * CHUNK;
            if mem.read(off as u64, &mut buf) && buf[..] != self.copy[off..off + CHUNK] {
                self.copy[off..off + CHUNK].copy_from_slice(&buf);
                n += 1;
            }
        }
        n
    }

    /// Takes the current bytes of `[off, off + len)` into the copy (a write there was already
    /// counted another way: a REGION_WRITE).
    pub fn absorb(&mut self, mem: &Mapping, off: u64, len: usize) {
        let Some(end) = off.checked_add(len as u64) else {
            return;
        };
        if len == 0 || end > DEVICE_MEMORY_SIZE {
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

    #[test]
    fn writes_are_noticed_once_and_absorbed_ones_not_at_all() {
        let fd = crate::mem::memfd("t", DEVICE_MEMORY_SIZE).unwrap();
        let mem = Mapping::new(&fd, 0, DEVICE_MEMORY_SIZE, true).unwrap();
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
}
