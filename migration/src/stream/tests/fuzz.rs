//! Thousands of mutated streams: the receiver returns an error or a result, and never panics.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;

/// Damage the bytes as a faulty link would: the frame CRCs are left as they are.
fn mutate_raw(rng: &mut Rng, stream: &[u8]) -> Vec<u8> {
    let mut s = stream.to_vec();
    let at = rng.below(s.len() as u64) as usize;
    match rng.below(4) {
        0 => {
            for _ in 0..=rng.below(3) {
                let i = rng.below(s.len() as u64) as usize;
                s[i] ^= 1 << rng.below(8);
            }
        }
        1 => s.truncate(at),
        2 => {
            let end = (at + 1 + rng.below(5000) as usize).min(s.len());
            s.drain(at..end);
        }
        _ => {
            let end = (at + 1 + rng.below(5000) as usize).min(s.len());
            let copy = s[at..end].to_vec();
            let to = rng.below(s.len() as u64) as usize;
            s.splice(to..to, copy);
        }
    }
    s
}

/// Forge hostile content with valid frame CRCs, so the payload decoders see it.
fn mutate_framed(rng: &mut Rng, stream: &[u8]) -> Vec<u8> {
    let mut frames = split_frames(stream);
    let i = rng.below(frames.len() as u64) as usize;
    let payload = &mut frames[i].1;
    match rng.below(6) {
        0 if !payload.is_empty() => {
            for _ in 0..=rng.below(4) {
                let j = rng.below(payload.len() as u64) as usize;
                payload[j] = rng.next() as u8;
            }
        }
        1 if payload.len() >= 4 => {
            // An extreme count or length at a random place.
            let j = rng.below(payload.len() as u64 - 3) as usize;
            let v = [0u32, 1, 0x7fff_ffff, u32::MAX, 256, 257][rng.below(6) as usize];
            payload[j..j + 4].copy_from_slice(&v.to_le_bytes());
        }
        2 => {
            let len = rng.below(64) as usize;
            *payload = (0..len).map(|_| rng.next() as u8).collect();
        }
        3 => frames[i].0 = rng.next() as u8,
        4 => {
            let j = rng.below(frames.len() as u64) as usize;
            frames.swap(i, j);
        }
        _ => {
            let f = frames[i].clone();
            if rng.below(2) == 0 {
                frames.remove(i);
            } else {
                frames.insert(rng.below(frames.len() as u64) as usize, f);
            }
        }
    }
    join_frames(&frames)
}

#[test]
fn mutated_streams_never_panic() {
    let stream = small_stream(&small_source(), PAGE_SIZE as usize);
    let target = mem(&layout());
    let mut rng = Rng::new(0x5eed);
    let (mut raw_ok, mut framed_err) = (0, 0);
    for case in 0..3000 {
        let framed = case % 2 == 1;
        let bad = if framed {
            mutate_framed(&mut rng, &stream)
        } else {
            mutate_raw(&mut rng, &stream)
        };
        let mut order = Rng::new(case);
        let result = catch_unwind(AssertUnwindSafe(|| {
            receive(std::slice::from_ref(&bad), &target, &mut order)
        }));
        let result = result.unwrap_or_else(|_| panic!("case {case} panicked (framed: {framed})"));
        match (framed, &result) {
            (false, Ok(_)) if bad != stream => raw_ok += 1,
            (true, Err(e)) => {
                framed_err += 1;
                // Every error renders a message.
                assert!(!e.to_string().is_empty());
            }
            _ => {}
        }
        // The reply side reads the same bytes as hostile input too.
        let reply = catch_unwind(AssertUnwindSafe(|| {
            let mut rx = MigrationReceiver::replies(&bad[..])?;
            rx.recv()
        }));
        assert!(reply.is_ok(), "case {case}: the reply receiver panicked");
    }
    assert_eq!(raw_ok, 0, "damaged streams were accepted");
    assert!(
        framed_err > 1000,
        "only {framed_err} forged streams were refused"
    );
}
