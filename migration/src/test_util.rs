//! Helpers shared by the unit tests of this crate.

use vm_memory::bitmap::NewBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memory_file::memory_layout;

/// Anonymous guest memory with the given (guest address, length) regions.
pub(crate) fn guest_mem<B: NewBitmap>(layout: &[(u64, u64)]) -> GuestMemoryMmap<B> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// Every byte of guest RAM, regions in address order.
pub(crate) fn contents<M: GuestMemoryBackend>(m: &M) -> Vec<u8> {
    let mut all = Vec::new();
    for (a, l) in memory_layout(m) {
        let mut b = vec![0u8; l as usize];
        m.read_slice(&mut b, GuestAddress(a)).unwrap();
        all.extend_from_slice(&b);
    }
    all
}
