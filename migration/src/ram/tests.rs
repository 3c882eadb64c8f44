//! Tests of the RAM stream: round trips, sizes, dirty passes, and every kind of bad input.

use super::*;
use crate::memory_file::write_memory_file;
use crate::test_util::{contents, guest_mem};
use crate::DirtyBitmap;
use std::io::Cursor;

type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

const MIB: u64 = 1 << 20;
const HEADER_LEN: u64 = 24 + 2 * 16;
const DATA_OVERHEAD: u64 = RECORD_HEAD as u64 + 4;
const END_LEN: u64 = END_HEAD as u64 + 4;

fn mem(layout: &[(u64, u64)]) -> Mem {
    guest_mem(layout)
}

/// Two regions, like RAM below and above the 32-bit hole (scaled down).
fn layout() -> Vec<(u64, u64)> {
    vec![(0, 2 * MIB), (4 * MIB, MIB + 3 * PAGE_SIZE)]
}

/// Non-zero data in 5 pages: 1 page at 0x10, 3 pages from a 5000-byte run, 1 page in region 2.
fn fill(m: &Mem) {
    m.write_slice(b"hello", GuestAddress(0x10)).unwrap();
    m.write_slice(&[0xaa; 5000], GuestAddress(MIB - 100))
        .unwrap();
    m.write_slice(b"end", GuestAddress(5 * MIB + 3 * PAGE_SIZE - 3))
        .unwrap();
}

fn image(m: &Mem) -> Vec<u8> {
    let mut out = Vec::new();
    write_memory_image(m, &mut out).unwrap();
    out
}

fn restore(bytes: &[u8], target_zeroed: bool) -> Result<RamStats> {
    restore_memory_image(&mem(&layout()), &mut Cursor::new(bytes), target_zeroed)
}

#[test]
fn round_trip_skips_zero_pages() {
    let src = mem(&layout());
    fill(&src);
    let mut out = Vec::new();
    let stats = write_memory_image(&src, &mut out).unwrap();
    // Records: page 0; pages 255 and 256..=257 (the run is split where a 1 MiB chunk ends); the
    // last page of region 2.
    assert_eq!(stats.data_pages, 5);
    assert_eq!(stats.records, 4);
    assert_eq!(stats.zero_pages, 0);
    assert_eq!(stats.skipped_zero_pages, 512 + 259 - 5);
    let expected = HEADER_LEN + 4 * DATA_OVERHEAD + 5 * PAGE_SIZE + END_LEN;
    assert_eq!(out.len() as u64, expected);
    assert_eq!(stats.stream_bytes, expected);
    for zeroed in [true, false] {
        let dst = mem(&layout());
        let read = restore_memory_image(&dst, &mut Cursor::new(&out), zeroed).unwrap();
        assert_eq!(read.data_pages, 5);
        assert_eq!(read.stream_bytes, expected);
        assert!(contents(&dst) == contents(&src));
    }
}

#[test]
fn dirty_pass_with_zero_pages_clears_a_stale_target() {
    let src = mem(&layout());
    fill(&src);
    let dst = mem(&layout());
    // First pass: everything, zero pages skipped (the target is fresh).
    let lay = layout();
    let mut w = RamWriter::new(Vec::new(), &lay).unwrap();
    w.write_ranges(&src, lay.iter().copied(), ZeroPages::Skip)
        .unwrap();
    // The guest keeps running: it zeroes page 0 and writes a new page in region 2.
    let mut dirty = DirtyBitmap::new(&lay).unwrap();
    dirty.merge_guest_memory_bitmap(&src).unwrap();
    dirty.clear();
    src.write_slice(&[0; 5], GuestAddress(0x10)).unwrap();
    src.write_slice(&[9; 3], GuestAddress(4 * MIB + 7 * PAGE_SIZE))
        .unwrap();
    dirty.merge_guest_memory_bitmap(&src).unwrap();
    assert_eq!(dirty.pages(), vec![0, 4 * MIB + 7 * PAGE_SIZE]);
    let pass = w.write_ranges(&src, dirty.runs(), ZeroPages::Send).unwrap();
    assert_eq!((pass.data_pages, pass.zero_pages, pass.records), (1, 1, 2));
    let (bytes, total) = w.finish().unwrap();
    assert_eq!(total.data_pages, 6);
    // The target is not zeroed (it got the first pass in an earlier life): fill it the old way.
    fill(&dst);
    let mut r = RamReader::new(Cursor::new(&bytes), &lay).unwrap();
    let stats = r.read_into(&dst, false).unwrap();
    assert_eq!(stats.zero_pages, 1);
    assert!(r.is_finished());
    assert!(matches!(r.read_record(), Err(RamStreamError::Ended)));
    assert!(contents(&dst) == contents(&src));
    let mut first = [1u8; 5];
    dst.read_slice(&mut first, GuestAddress(0x10)).unwrap();
    assert_eq!(first, [0; 5]);
}

#[test]
fn interleaved_records_through_the_record_api() {
    let src = mem(&layout());
    fill(&src);
    let lay = layout();
    let mut w = RamWriter::new(Vec::new(), &lay).unwrap();
    w.write_ranges(&src, [(0, PAGE_SIZE)], ZeroPages::Skip)
        .unwrap();
    // A frame of the outer protocol, between RAM records.
    w.get_mut().extend_from_slice(b"X123");
    w.write_zero(4 * MIB, 2).unwrap();
    let (bytes, _) = w.finish().unwrap();
    let dst = mem(&lay);
    dst.write_slice(&[5; 8], GuestAddress(4 * MIB + PAGE_SIZE))
        .unwrap();
    let mut r = RamReader::new(Cursor::new(&bytes), &lay).unwrap();
    let mut frames = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        r.get_mut().read_exact(&mut tag).unwrap();
        if tag[0] == b'X' {
            let mut body = [0u8; 3];
            r.get_mut().read_exact(&mut body).unwrap();
            frames.push(body);
            continue;
        }
        let rec = r.read_record_body(tag[0]).unwrap();
        if let RamRecord::End { pages, records } = rec {
            assert_eq!((pages, records), (3, 2));
            break;
        }
        apply_record(&dst, &rec, false).unwrap();
    }
    assert_eq!(frames, vec![*b"123"]);
    let mut page = [0u8; PAGE];
    dst.read_slice(&mut page, GuestAddress(0)).unwrap();
    assert_eq!(&page[0x10..0x15], b"hello");
    dst.read_slice(&mut page, GuestAddress(4 * MIB + PAGE_SIZE))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0));
}

#[test]
fn writer_refuses_bad_ranges_and_layouts() {
    let lay = layout();
    let src = mem(&lay);
    let mut w = RamWriter::new(Vec::new(), &lay).unwrap();
    for (gpa, len) in [(2 * MIB, 1), (MIB, 2 * MIB), (u64::MAX - 10, 20)] {
        assert!(
            matches!(
                w.write_ranges(&src, [(gpa, len)], ZeroPages::Skip),
                Err(RamStreamError::InvalidRange { .. })
            ),
            "{gpa:#x}+{len:#x}"
        );
    }
    assert!(w.write_data(0, &[0; 100]).is_err());
    assert!(w.write_data(0x800, &[0; PAGE]).is_err());
    assert!(w.write_zero(0, MAX_RECORD_PAGES + 1).is_err());
    assert!(w.write_zero(2 * MIB - PAGE_SIZE, 2).is_err());
    let other = mem(&[(0, 2 * MIB)]);
    assert!(matches!(
        w.write_ranges(&other, [(0, PAGE_SIZE)], ZeroPages::Skip),
        Err(RamStreamError::LayoutMismatch(_))
    ));
    assert!(matches!(
        RamWriter::new(Vec::new(), &[(0, 100)]),
        Err(RamStreamError::InvalidLayout(_))
    ));
}

#[test]
fn layout_mismatch_magic_and_version() {
    let src = mem(&layout());
    fill(&src);
    let bytes = image(&src);
    let other = mem(&[(0, 2 * MIB)]);
    let err = restore_memory_image(&other, &mut Cursor::new(&bytes), true).unwrap_err();
    assert!(matches!(err, RamStreamError::LayoutMismatch(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("config does not match the state"),
        "{err}"
    );
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"SKIFFST\0");
    let err = restore(&bad, true).unwrap_err();
    assert_eq!(err.to_string(), "not a skiff memory image");
    assert!(matches!(
        restore(&[], true),
        Err(RamStreamError::NotAMemoryImage)
    ));
    assert!(matches!(
        RamReader::new(Cursor::new(&bad), &layout()),
        Err(RamStreamError::BadMagic)
    ));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(
        restore(&v2, true),
        Err(RamStreamError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ));
    let mut trailing = bytes.clone();
    trailing.push(0);
    let err = restore(&trailing, true).unwrap_err();
    assert!(err.to_string().contains("after the END record"), "{err}");
}

/// Offsets where each record of `bytes` (a stream of `image`) starts, END included.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = HEADER_LEN as usize;
    loop {
        starts.push(at);
        match bytes[at] {
            TAG_DATA => at += RECORD_HEAD + 4 + u32_at(bytes, at + 9) as usize * PAGE,
            TAG_ZERO => at += RECORD_HEAD + 4,
            _ => return starts,
        }
    }
}

#[test]
fn flipped_bytes_and_truncation_are_detected() {
    let src = mem(&layout());
    fill(&src);
    let bytes = image(&src);
    let starts = record_starts(&bytes);
    assert_eq!(starts.len(), 5);
    // A data byte, a record header byte, a header byte, an END byte.
    let data_byte = starts[1] + RECORD_HEAD + 17;
    for at in [data_byte, starts[1] + 3, 30, starts[4] + 5] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x04;
        let err = restore(&bad, true).unwrap_err();
        assert!(matches!(err, RamStreamError::Corrupt { .. }), "{at}: {err}");
    }
    // A record whose data is damaged is refused before any of it reaches guest memory.
    let mut bad = bytes.clone();
    bad[data_byte] ^= 0x04;
    let dst = mem(&layout());
    let err = restore_memory_image(&dst, &mut Cursor::new(&bad), true).unwrap_err();
    assert!(
        err.to_string().contains("checksum mismatch in the record"),
        "{err}"
    );
    let mut page = [0u8; PAGE];
    dst.read_slice(&mut page, GuestAddress(MIB - PAGE_SIZE))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0));
    let mut cuts: Vec<usize> = starts.clone();
    cuts.extend(starts.iter().map(|s| s + 5));
    cuts.extend([0, 7, 8, 20, HEADER_LEN as usize - 1, bytes.len() - 1]);
    cuts.push(starts[1] + RECORD_HEAD + 100);
    for cut in cuts {
        let err = restore(&bytes[..cut], true).unwrap_err();
        assert!(
            matches!(
                err,
                RamStreamError::Truncated { .. } | RamStreamError::NotAMemoryImage
            ),
            "cut at {cut}: {err}"
        );
    }
    // Records swapped: each is intact, END's chain catches the order.
    let mut swapped = bytes[..starts[0]].to_vec();
    swapped.extend_from_slice(&bytes[starts[1]..starts[2]]);
    swapped.extend_from_slice(&bytes[starts[0]..starts[1]]);
    swapped.extend_from_slice(&bytes[starts[2]..]);
    let err = restore(&swapped, true).unwrap_err();
    assert!(err.to_string().contains("out of order"), "{err}");
    // A record dropped: the counts do not match.
    let mut dropped = bytes[..starts[1]].to_vec();
    dropped.extend_from_slice(&bytes[starts[2]..]);
    assert!(restore(&dropped, true).is_err());
}

/// A stream of the test layout with one hand-made record (valid CRC) and a matching END.
fn with_record(tag: u8, gpa: u64, pages: u32, data: &[u8]) -> Vec<u8> {
    let mut head = vec![tag];
    head.extend_from_slice(&gpa.to_le_bytes());
    head.extend_from_slice(&pages.to_le_bytes());
    head.extend_from_slice(data);
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    let mut bytes = encode_header(&layout());
    bytes.extend_from_slice(&head);
    let mut end = vec![TAG_END];
    end.extend_from_slice(&u64::from(pages).to_le_bytes());
    end.extend_from_slice(&1u64.to_le_bytes());
    end.extend_from_slice(&crc32fast::hash(&crc.to_le_bytes()).to_le_bytes());
    let end_crc = crc32fast::hash(&end);
    end.extend_from_slice(&end_crc.to_le_bytes());
    bytes.extend_from_slice(&end);
    bytes
}

#[test]
fn bad_records_are_refused() {
    // The hand-made stream is accepted when the record is sound.
    let good = with_record(TAG_ZERO, 4 * MIB, 3, &[]);
    assert_eq!(restore(&good, false).unwrap().zero_pages, 3);
    let cases = [
        (with_record(TAG_ZERO, 0, MAX_RECORD_PAGES + 1, &[]), "pages"),
        (with_record(TAG_DATA, 0, u32::MAX, &[]), "pages"),
        (with_record(TAG_ZERO, 0, 0, &[]), "pages"),
        (
            with_record(TAG_ZERO, 2 * MIB, 1, &[]),
            "inside one RAM region",
        ),
        (
            with_record(TAG_ZERO, 2 * MIB - PAGE_SIZE, 2, &[]),
            "inside one RAM region",
        ),
        (
            with_record(TAG_ZERO, u64::MAX - PAGE_SIZE + 1, 1, &[]),
            "inside one RAM region",
        ),
        (
            with_record(TAG_DATA, 0x10, 1, &[1; PAGE]),
            "inside one RAM region",
        ),
        (with_record(b'?', 0, 1, &[]), "unknown record tag"),
    ];
    for (bytes, what) in cases {
        let err = restore(&bytes, true).unwrap_err();
        assert!(matches!(err, RamStreamError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn v1_memory_file_restores_through_restore_memory_image() {
    let src = mem(&layout());
    fill(&src);
    let mut file = Cursor::new(Vec::new());
    write_memory_file(&src, &mut file).unwrap();
    let dst = mem(&layout());
    let stats = restore_memory_image(&dst, &mut file, true).unwrap();
    assert_eq!(stats.data_pages, 5);
    assert!(contents(&dst) == contents(&src));
    // Its own errors come through, e.g. a layout mismatch.
    let other = mem(&[(0, 2 * MIB)]);
    let err = restore_memory_image(&other, &mut file, true).unwrap_err();
    assert!(matches!(
        err,
        RamStreamError::MemoryFile(MemoryFileError::LayoutMismatch(_))
    ));
    assert!(err
        .to_string()
        .starts_with("config does not match the state"));
}

/// xorshift64*: a small deterministic generator for the randomized test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mutated_streams_never_panic() {
    let lay = vec![(0, 8 * PAGE_SIZE), (64 * PAGE_SIZE, 4 * PAGE_SIZE)];
    let src = mem(&lay);
    src.write_slice(&[3; 3 * PAGE], GuestAddress(PAGE_SIZE))
        .unwrap();
    src.write_slice(&[4; 10], GuestAddress(66 * PAGE_SIZE))
        .unwrap();
    let mut w = RamWriter::new(Vec::new(), &lay).unwrap();
    w.write_ranges(&src, lay.iter().copied(), ZeroPages::Send)
        .unwrap();
    let (good, _) = w.finish().unwrap();
    let dst = mem(&lay);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let started = std::time::Instant::now();
    for round in 0..3000 {
        let mut bytes = good.clone();
        let single_flip = match round % 4 {
            0 => {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
                true
            }
            1 => {
                bytes.truncate(rng.below(good.len()));
                false
            }
            2 => {
                let at = rng.below(bytes.len() - 4);
                let v = rng.next() as u32;
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
                false
            }
            _ => {
                // Valid header, then random bytes with plausible tags.
                bytes.truncate(HEADER_LEN as usize - 16);
                for _ in 0..rng.below(64) {
                    let b = match rng.below(4) {
                        0 => TAG_DATA,
                        1 => TAG_ZERO,
                        2 => TAG_END,
                        _ => rng.next() as u8,
                    };
                    bytes.push(b);
                }
                false
            }
        };
        let result = RamReader::new(Cursor::new(&bytes), &lay)
            .and_then(|mut r| r.read_into(&dst, round % 2 == 0));
        if single_flip || round % 4 == 1 {
            assert!(result.is_err(), "round {round}: damage went unnoticed");
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}
