//! Every kind of damaged or hostile stream is refused with a clear error.

use super::*;

fn base() -> (Mem, Vec<u8>) {
    let source = small_source();
    // Small RAM frames: the full pass takes several.
    let stream = small_stream(&source, PAGE_SIZE as usize);
    (source, stream)
}

fn run(stream: &[u8]) -> Result<Received> {
    receive(&[stream.to_vec()], &mem(&layout()), &mut Rng::new(7))
}

/// Byte offsets where each frame starts, and the stream length.
fn boundaries(stream: &[u8]) -> Vec<usize> {
    let mut at = frame::START_LEN;
    let mut out = vec![at];
    for (_, payload) in split_frames(stream) {
        at += payload.len() + frame::FRAME_OVERHEAD;
        out.push(at);
    }
    out
}

#[test]
fn the_base_stream_is_good() {
    let (source, stream) = base();
    let target = mem(&layout());
    let got = receive(std::slice::from_ref(&stream), &target, &mut Rng::new(1)).unwrap();
    assert!(crate::test_util::contents(&target) == crate::test_util::contents(&source));
    assert!(got.stats.frames >= 5, "{:?}", got.stats);
    assert!(split_frames(&stream).len() > 10);
}

#[test]
fn truncation_at_every_frame_boundary_and_mid_frame() {
    let (_, stream) = base();
    let bounds = boundaries(&stream);
    assert_eq!(*bounds.last().unwrap(), stream.len());
    for w in bounds.windows(2) {
        for cut in [w[0], w[0] + 1, w[0] + 5, (w[0] + w[1]) / 2, w[1] - 1] {
            let err = run(&stream[..cut]).unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }
    for cut in 0..frame::START_LEN {
        let err = run(&stream[..cut]).unwrap_err();
        assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
    }
    let err = run(&stream[..bounds[3]]).unwrap_err();
    assert!(
        err.to_string().contains("the stream ended before COMPLETE"),
        "{err}"
    );
}

#[test]
fn every_flipped_byte_is_caught() {
    let (_, stream) = base();
    for at in 0..stream.len() {
        let mut bad = stream.clone();
        bad[at] ^= 0x20;
        assert!(run(&bad).is_err(), "a flip at byte {at} went unnoticed");
    }
    // A payload flip is a checksum error naming the frame.
    let bounds = boundaries(&stream);
    let mut bad = stream.clone();
    bad[bounds[2] + 7] ^= 1;
    let err = run(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Checksum {
                kind: FrameKind::Ram,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("checksum mismatch in the RAM frame at byte {}", bounds[2])
    );
}

#[test]
fn reordered_frames_are_caught() {
    let (_, stream) = base();
    let frames = split_frames(&stream);
    let ram = FrameKind::Ram as u8;
    let i = frames
        .windows(2)
        .position(|w| w[0].0 == ram && w[1].0 == ram)
        .unwrap();
    // Two RAM frames of the same shape swapped as sent: the first one out of place fails its CRC.
    let mut raw = split_raw(&stream);
    raw.swap(i, i + 1);
    let swapped: Vec<u8> = stream[..frame::START_LEN]
        .iter()
        .chain(raw.concat().iter())
        .copied()
        .collect();
    let err = run(&swapped).unwrap_err();
    let at = boundaries(&stream)[i] as u64;
    assert!(
        matches!(err, StreamError::Checksum { kind: FrameKind::Ram, offset } if offset == at),
        "{err}"
    );
    // A dropped RAM frame: ITERATION_END's page count no longer matches.
    let mut dropped = frames.clone();
    dropped.remove(i);
    let err = run(&join_frames(&dropped)).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Sequence {
                kind: FrameKind::IterationEnd,
                ..
            }
        ),
        "{err}"
    );
    // A repeated DEVICE_PRECOPY frame: COMPLETE's frame count no longer matches.
    let mut repeated = frames.clone();
    let d = frames
        .iter()
        .position(|f| f.0 == FrameKind::DevicePrecopy as u8)
        .unwrap();
    repeated.insert(d, frames[d].clone());
    let err = run(&join_frames(&repeated)).unwrap_err();
    assert!(
        matches!(err, StreamError::CompleteMismatch { what: "frames", .. }),
        "{err}"
    );
    // RAM of the next iteration before the current one ended.
    let mut early = frames.clone();
    let end = frames
        .iter()
        .position(|f| f.0 == FrameKind::IterationEnd as u8)
        .unwrap();
    early.swap(end, end + 1);
    let err = run(&join_frames(&early)).unwrap_err();
    assert!(
        err.to_string()
            .contains("RAM of iteration 1 while iteration 0 is open"),
        "{err}"
    );
}

#[test]
fn wrong_magic_and_version() {
    let (_, stream) = base();
    let mut bad = stream.clone();
    bad[..8].copy_from_slice(b"SKIFFST\0");
    let err = run(&bad).unwrap_err();
    assert!(matches!(err, StreamError::BadMagic { .. }), "{err}");
    assert!(err.to_string().starts_with("not a skiff migration stream"));
    assert!(!err.to_string().contains("TLS"), "{err}");
    // A TLS alert where the stream should start: the peer uses TLS, this side does not.
    let mut tls = stream.clone();
    tls[..7].copy_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]);
    let err = run(&tls).unwrap_err().to_string();
    assert!(err.contains("the peer uses tls"), "{err}");
    // A peer of the previous version (RAM records with their own CRCs and END) is refused.
    for other in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let mut bad = stream.clone();
        bad[8..12].copy_from_slice(&other.to_le_bytes());
        let err = run(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                StreamError::UnsupportedVersion { found, supported }
                    if found == other && supported == PROTOCOL_VERSION
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("migration protocol version {other}; this build speaks version 2")
        );
    }
}

#[test]
fn oversized_length_and_unknown_kind() {
    let (_, stream) = base();
    let at = frame::START_LEN;
    let mut bad = stream.clone();
    bad[at + 1..at + 5].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
    let err = run(&bad).unwrap_err();
    assert!(
        matches!(err, StreamError::Oversized { offset: 12, .. }),
        "{err}"
    );
    bad[at + 1..at + 5].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(run(&bad), Err(StreamError::Oversized { .. })));

    let mut frames = split_frames(&stream);
    frames.insert(2, (0x7f, b"future".to_vec()));
    let err = run(&join_frames(&frames)).unwrap_err();
    assert!(
        matches!(err, StreamError::UnknownKind { kind: 0x7f, .. }),
        "{err}"
    );
    let mut frames = split_frames(&stream);
    frames[0].0 = 0;
    assert!(matches!(
        run(&join_frames(&frames)),
        Err(StreamError::UnknownKind { kind: 0, .. })
    ));
}

#[test]
fn complete_with_a_wrong_checksum() {
    let (_, stream) = base();
    let mut frames = split_frames(&stream);
    let last = frames.last_mut().unwrap();
    assert_eq!(last.0, FrameKind::Complete as u8);
    let n = last.1.len();
    last.1[n - 4] ^= 0xff;
    let err = run(&join_frames(&frames)).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::CompleteMismatch {
                what: "frame checksum chain",
                ..
            }
        ),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("frames were lost, repeated or reordered"));
    // Wrong page total.
    let mut frames = split_frames(&stream);
    let last = frames.last_mut().unwrap();
    last.1[16] ^= 1;
    let err = run(&join_frames(&frames)).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::CompleteMismatch {
                what: "RAM pages",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sequencing_rules() {
    let (_, stream) = base();
    let frames = split_frames(&stream);
    let sequence_error = |frames: &[(u8, Vec<u8>)], needle: &str| {
        let err = run(&join_frames(frames)).unwrap_err();
        assert!(matches!(err, StreamError::Sequence { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    };
    // HELLO first, once.
    sequence_error(&frames[1..], "the first frame must be HELLO");
    let mut twice = frames.clone();
    twice.insert(1, frames[0].clone());
    sequence_error(&twice, "a second HELLO");
    let mut twice = frames.clone();
    twice.insert(2, frames[1].clone());
    sequence_error(&twice, "a second CONFIG");
    // A HELLO announcing another version.
    let mut v2 = frames.clone();
    v2[0].1[..4].copy_from_slice(&1u32.to_le_bytes());
    sequence_error(&v2, "HELLO announces version 1");
    // A second connection may carry only RAM.
    let mut second = frames.clone();
    second[0].1 = hello(1, 2).encode().unwrap();
    sequence_error(&second, "connection 1 carries only RAM");
    // A duplicated state section across STATE frames.
    let mut dup = frames.clone();
    let s = frames
        .iter()
        .position(|f| f.0 == FrameKind::State as u8)
        .unwrap();
    dup.insert(s, frames[s].clone());
    sequence_error(&dup, "state section \"cpu0\" was already sent");
    // Frames after COMPLETE.
    let mut after = stream.clone();
    let index = split_frames(&stream).len() as u64;
    after.extend_from_slice(&raw_frame(index, FrameKind::Abort as u8, &[0, 0, 0, 0]));
    let err = run(&after).unwrap_err();
    assert!(matches!(err, StreamError::TrailingData { .. }), "{err}");
    let mut rx = MigrationReceiver::new(&after[..]).unwrap();
    while !rx.is_complete() {
        rx.recv().unwrap();
    }
    let err = rx.recv().unwrap_err();
    assert!(err.to_string().contains("already ended"), "{err}");
}

#[test]
fn hostile_payloads_are_malformed_not_panics() {
    let (_, stream) = base();
    let frames = split_frames(&stream);
    // A HELLO claiming four billion features.
    let mut bad = frames.clone();
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    bad[0].1 = p;
    let err = run(&join_frames(&bad)).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Malformed {
                kind: FrameKind::Hello,
                ..
            }
        ),
        "{err}"
    );
    // Connection 3 of 2.
    let mut bad = frames.clone();
    let mut h = hello(0, 2).encode().unwrap();
    let n = h.len();
    h[n - 4..n - 2].copy_from_slice(&3u16.to_le_bytes());
    bad[0].1 = h;
    let err = run(&join_frames(&bad)).unwrap_err();
    assert!(err.to_string().contains("connection 3 of 2"), "{err}");
    // Trailing bytes in a payload.
    let mut bad = frames.clone();
    bad[0].1.push(0);
    let err = run(&join_frames(&bad)).unwrap_err();
    assert!(err.to_string().contains("trailing bytes"), "{err}");
    // A RAM frame whose header lies about its page count, and one with an unknown iteration.
    let ram = frames
        .iter()
        .position(|f| f.0 == FrameKind::Ram as u8)
        .unwrap();
    let mut bad = frames.clone();
    bad[ram].1[4] ^= 1;
    let err = run(&join_frames(&bad)).unwrap_err();
    assert!(
        matches!(err, StreamError::RamFrame { iteration: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("the header announces"), "{err}");
    let mut bad = frames.clone();
    bad[ram].1[..4].copy_from_slice(&300u32.to_le_bytes());
    assert!(matches!(
        run(&join_frames(&bad)),
        Err(StreamError::Sequence { .. })
    ));
    let target = mem(&layout());
    let mut applier = RamApplier::new(&layout()).unwrap();
    let frame = RamFrame::new(300, 0, &[]);
    let err = applier.apply(&target, &frame).unwrap_err();
    assert!(err.to_string().contains("numbered 0 to 254"), "{err}");
    // An empty frame applies nothing; one whose header counts pages it does not carry is refused.
    let stats = applier.apply(&target, &RamFrame::new(0, 0, &[])).unwrap();
    assert_eq!(stats.applied_pages, 0);
    let err = applier
        .apply(&target, &RamFrame::new(0, 1, &[]))
        .unwrap_err();
    assert!(err.to_string().contains("the header announces"), "{err}");
    // A RAM record outside the RAM layout (the frame's CRC, checked before, would be right).
    let mut rec = vec![crate::ram::TAG_ZERO];
    rec.extend_from_slice(&(3 * MIB).to_le_bytes());
    rec.extend_from_slice(&1u32.to_le_bytes());
    let err = applier
        .apply(&target, &RamFrame::new(0, 1, &rec))
        .unwrap_err();
    assert!(
        err.to_string().contains("not inside one RAM region"),
        "{err}"
    );
    // A record cut short, an unknown tag, and an END (not part of a version 2 frame).
    let mut data = vec![crate::ram::TAG_DATA];
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&1u32.to_le_bytes());
    data.extend_from_slice(&[7u8; 100]);
    let err = applier
        .apply(&target, &RamFrame::new(0, 1, &data))
        .unwrap_err();
    assert!(matches!(err, StreamError::Ram { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    for tag in [b'X', crate::ram::TAG_END] {
        let err = applier
            .apply(&target, &RamFrame::new(0, 0, &[tag; 30]))
            .unwrap_err();
        assert!(err.to_string().contains("unknown record tag"), "{err}");
    }
    // A STATE frame that is not a state file.
    let s = frames
        .iter()
        .position(|f| f.0 == FrameKind::State as u8)
        .unwrap();
    let mut bad = frames.clone();
    bad[s].1 = b"nonsense".to_vec();
    assert!(matches!(
        run(&join_frames(&bad)),
        Err(StreamError::State { .. })
    ));
}
