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

/// Guest memory as skiff has it: the regions are shared mappings of one tmpfs file (a memfd in
/// skiff), at successive offsets. Returns the memory and the file.
pub(crate) fn file_mem<B: NewBitmap>(layout: &[(u64, u64)]) -> (GuestMemoryMmap<B>, std::fs::File) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!(
        "skiff-migration-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(layout.iter().map(|&(_, l)| l).sum()).unwrap();
    let mut offset = 0;
    let ranges: Vec<_> = layout
        .iter()
        .map(|&(a, l)| {
            let fo = vm_memory::FileOffset::new(file.try_clone().unwrap(), offset);
            offset += l;
            (GuestAddress(a), l as usize, Some(fo))
        })
        .collect();
    (
        GuestMemoryMmap::from_ranges_with_files(&ranges).unwrap(),
        file,
    )
}

/// Bytes of `file` the filesystem holds (its holes excluded).
pub(crate) fn allocated_bytes(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
}
