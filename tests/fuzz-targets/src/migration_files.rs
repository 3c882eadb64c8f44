//! The snapshot files a restore reads: the state file (and the device state sections in it)
//! and the memory file.

use std::io::Cursor;

use devices::GuestMemoryMmap;
use migration::memory_file::{restore_memory_file, MemoryFileHeader};
use migration::snapshot::SnapshotReader;
use vm_memory::GuestAddress;

/// The guest RAM layout the memory file target restores into.
pub const MEMORY_LAYOUT: [(u64, usize); 2] = [(0, 0x4000), (0x10000, 0x2000)];

/// A snapshot state file; every section it holds is then restored into a fresh device of each
/// virtio kind (renamed to the device's id), so each device's state decoder sees it.
pub fn snapshot_state(data: &[u8]) {
    let Ok(sections) = SnapshotReader::read_all(Cursor::new(data)) else {
        return;
    };
    restore_sections(&sections);
}

/// Restore every section into a fresh device of each virtio kind, renamed to its id.
pub(crate) fn restore_sections(sections: &[migration::StateSection]) {
    if sections.is_empty() {
        return;
    }
    let mut devices = crate::virtio::fresh_devices();
    for section in sections {
        for dev in devices.iter_mut() {
            let mut s = section.clone();
            s.id = dev.id();
            let _ = dev.restore(&s);
        }
    }
}

/// A snapshot memory file: byte 0 bit 0 says whether the target memory is fresh (zero pages
/// skipped), the rest is the file, restored into RAM laid out as [`MEMORY_LAYOUT`].
pub fn memory_file(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let _ = MemoryFileHeader::read_from(&mut Cursor::new(file));
    let ranges: Vec<_> = MEMORY_LAYOUT
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let _ = restore_memory_file(&mem, &mut Cursor::new(file), flags & 1 != 0);
}
