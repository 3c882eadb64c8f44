//! Tests of the RAM stream over file-backed guest memory (skiff's memfd): holes are zero pages
//! that are never read, in-place appends write the same stream as the ordinary writer, and
//! records reach guest memory through its file.

use super::*;
use crate::test_util::{allocated_bytes, contents, file_mem, guest_mem};

type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

const MIB: u64 = 1 << 20;

fn layout() -> Vec<(u64, u64)> {
    vec![(0, 2 * MIB), (4 * MIB, MIB + 3 * PAGE_SIZE)]
}

/// Data around 1 MiB chunk ends, zero pages written explicitly (data, not holes, in the file)
/// and holes.
fn fill(m: &Mem) {
    m.write_slice(b"hello", GuestAddress(0x10)).unwrap();
    m.write_slice(&[0xaa; 5000], GuestAddress(MIB - 100))
        .unwrap();
    // Written zeros: allocated in the file, still zero pages.
    m.write_slice(&[0u8; 3 * PAGE], GuestAddress(MIB + 8 * PAGE_SIZE))
        .unwrap();
    m.write_slice(&[7u8; 2 * PAGE], GuestAddress(MIB + 11 * PAGE_SIZE))
        .unwrap();
    m.write_slice(b"end", GuestAddress(5 * MIB + 3 * PAGE_SIZE - 3))
        .unwrap();
}

fn stream(m: &Mem, zeros: ZeroPages, in_place: bool) -> (Vec<u8>, RamStats) {
    let layout = layout();
    let mut w = RamWriter::new(Vec::new(), &layout).unwrap();
    let ranges = layout.iter().copied();
    if in_place {
        w.append_ranges(m, ranges, zeros).unwrap();
    } else {
        w.write_ranges(m, ranges, zeros).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn holes_are_zero_pages_and_stay_holes() {
    let (src, file) = file_mem::<vm_memory::bitmap::AtomicBitmap>(&layout());
    let anon: Mem = guest_mem(&layout());
    fill(&src);
    fill(&anon);
    let allocated = allocated_bytes(&file);
    for zeros in [ZeroPages::Skip, ZeroPages::Send] {
        let (_, expected_stats) = stream(&anon, zeros, false);
        for in_place in [false, true] {
            let (out, stats) = stream(&src, zeros, in_place);
            assert_eq!(
                stats.data_pages, expected_stats.data_pages,
                "{zeros:?} {in_place}"
            );
            assert_eq!(
                stats.zero_pages + stats.skipped_zero_pages,
                expected_stats.zero_pages + expected_stats.skipped_zero_pages
            );
            for zeroed in [true, false] {
                let dst: Mem = guest_mem(&layout());
                dst.write_slice(&[9u8; 64], GuestAddress(MIB + 9 * PAGE_SIZE))
                    .unwrap();
                let mut r = RamReader::new(&out[..], &layout()).unwrap();
                r.read_into(&dst, zeroed && zeros == ZeroPages::Skip)
                    .unwrap();
                if zeros == ZeroPages::Send {
                    assert!(contents(&dst) == contents(&anon), "in place {in_place}");
                }
            }
        }
    }
    // Nothing was read from the holes: they were not filled in.
    assert_eq!(allocated_bytes(&file), allocated);
}

#[test]
fn in_place_appends_match_the_ordinary_writer() {
    let src: Mem = guest_mem(&layout());
    fill(&src);
    for zeros in [ZeroPages::Skip, ZeroPages::Send] {
        assert_eq!(stream(&src, zeros, true), stream(&src, zeros, false));
    }
    // An append that does not fit the layout is refused like a write.
    let mut w = RamWriter::new(Vec::new(), &layout()).unwrap();
    assert!(w
        .append_ranges(&src, [(3 * MIB, PAGE_SIZE)], ZeroPages::Send)
        .is_err());
}

#[test]
fn records_reach_guest_memory_through_its_file() {
    let src: Mem = guest_mem(&layout());
    fill(&src);
    let layout = layout();
    for zeros in [ZeroPages::Skip, ZeroPages::Send] {
        let (dst, file) = file_mem::<vm_memory::bitmap::AtomicBitmap>(&layout);
        if zeros == ZeroPages::Send {
            // Older data where the stream has zero pages.
            dst.write_slice(&[1u8; PAGE], GuestAddress(MIB + 9 * PAGE_SIZE))
                .unwrap();
        }
        let (out, _) = stream(&src, zeros, true);
        let mut slices = RamSliceReader::new(&out[HEADER_BYTES..], &layout, 0);
        loop {
            let record = slices.next_record().unwrap();
            if let RamRecord::End { .. } = record {
                break;
            }
            apply_record_via(&dst, &record, false, true).unwrap();
        }
        assert!(slices.rest().is_empty());
        if zeros == ZeroPages::Skip {
            // Only the data pages were allocated (reading a hole through the mapping would
            // allocate it: this is checked first).
            assert!(allocated_bytes(&file) <= 16 * PAGE_SIZE);
        }
        // Written through the file, seen through the mapping.
        assert!(contents(&dst) == contents(&src), "{zeros:?}");
    }
}

#[test]
fn the_slice_reader_refuses_what_the_stream_reader_refuses() {
    let src: Mem = guest_mem(&layout());
    fill(&src);
    let (out, _) = stream(&src, ZeroPages::Send, false);
    let records = &out[HEADER_BYTES..];
    let layout = layout();
    let check = |bytes: &[u8]| -> bool {
        let mut r = RamSliceReader::new(bytes, &layout, 0);
        loop {
            match r.next_record() {
                Ok(RamRecord::End { .. }) => return r.rest().is_empty(),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    assert!(check(records));
    // Every truncation and every single flipped byte is caught.
    for cut in [0, 1, 12, 13, 100, records.len() - 1] {
        assert!(!check(&records[..cut]), "cut at {cut}");
    }
    for at in (0..records.len()).step_by(97) {
        let mut bad = records.to_vec();
        bad[at] ^= 0x20;
        assert!(!check(&bad), "flip at {at}");
    }
}

/// Bytes of the RAM stream header for [`layout`].
const HEADER_BYTES: usize = 24 + 2 * 16;
