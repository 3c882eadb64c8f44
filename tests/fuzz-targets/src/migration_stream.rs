//! The live-migration stream as the target receives it.

use std::io::Cursor;

use devices::GuestMemoryMmap;
use migration::stream::{Message, MigrationReceiver, RamApplier};
use vm_memory::GuestAddress;

/// The target VM's RAM layout.
pub const RAM_LAYOUT: [(u64, usize); 2] = [(0, 0x8000), (0x10000, 0x4000)];

/// A migration stream (magic, frames) read by the target until it ends or fails; RAM frames
/// are applied to guest memory laid out as [`RAM_LAYOUT`], as the target does, and STATE
/// sections restored into fresh devices.
pub fn receive(data: &[u8]) {
    let Ok(mut rx) = MigrationReceiver::new(Cursor::new(data)) else {
        return;
    };
    let ranges: Vec<_> = RAM_LAYOUT
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let layout: Vec<(u64, u64)> = RAM_LAYOUT.iter().map(|&(a, l)| (a, l as u64)).collect();
    let mut ram = RamApplier::new(&layout).expect("a valid layout");
    // The stream is bounded by the input, so this ends.
    while let Ok(msg) = rx.recv() {
        match msg {
            Message::Ram(frame) => {
                let _ = ram.apply(&mem, &frame);
                rx.recycle(frame);
            }
            Message::Complete(_) => {
                let _ = rx.expect_end();
                break;
            }
            Message::State(sections) => crate::migration_files::restore_sections(&sections),
            _ => {}
        }
        if rx.is_complete() {
            break;
        }
    }
}
