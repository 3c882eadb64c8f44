//! Chunk digests: a 128-bit fingerprint of a 4 KiB chunk of device memory, so that "did this
//! chunk change since then?" needs no kept copy of it where no copy exists anyway: when the
//! device stops from a running state (`frozen.rs`), a copy of the whole device memory would
//! mean allocating and faulting in tens of MiB at the arc; its digests are one read of it.
//!
//! Four independent lanes (words `i % 4`), each `s = rotl((s ^ w) * K, 29)`: every step is a
//! bijection of the state and of the word, so a change of any single 64-bit word always changes
//! the digest; several changed words give the same digest with a chance of about 2^-64, which
//! is the price of not keeping the bytes. Not a cryptographic hash (nothing here is hostile:
//! the writers are the VMM, the guest and peers under test).

use crate::mem::Mapping;
use crate::migration::CHUNK;

/// A chunk's fingerprint.
pub type Digest = u128;

const K: u64 = 0x9e37_79b9_7f4a_7c15;
const SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

#[inline(always)]
fn step(s: u64, w: u64) -> u64 {
    ((s ^ w).wrapping_mul(K)).rotate_left(29)
}

/// The digest of `bytes` (any length; a chunk in practice). The length is mixed in, so a
/// shorter run of zeroes differs from a longer one.
pub fn digest(bytes: &[u8]) -> Digest {
    let mut s = SEEDS;
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        for (j, lane) in s.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * j..8 * j + 8]);
            *lane = step(*lane, u64::from_le_bytes(w));
        }
    }
    let rest = blocks.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 32];
        tail[..rest.len()].copy_from_slice(rest);
        for (j, lane) in s.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&tail[8 * j..8 * j + 8]);
            *lane = step(*lane, u64::from_le_bytes(w));
        }
    }
    s[0] = step(s[0], bytes.len() as u64);
    let hi = s[0] ^ s[2].rotate_left(17);
    let lo = s[1] ^ s[3].rotate_left(17);
    (u128::from(hi) << 64) | u128::from(lo)
}

/// The digest of chunk `index` of `mem` as it is now; `None` when the chunk lies outside it.
pub fn chunk_digest(mem: &Mapping, index: usize) -> Option<Digest> {
    let mut buf = [0u8; CHUNK];
    let off = u64::try_from(index.checked_mul(CHUNK)?).ok()?;
    mem.read(off, &mut buf).then(|| digest(&buf))
}

/// The digests of every chunk of `mem` (one read of it).
pub fn all_digests(mem: &Mapping) -> Vec<Digest> {
    (0..mem.len() / CHUNK)
        .map(|i| chunk_digest(mem, i).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_word_change_changes_the_digest() {
        let base: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + 3) as u8).collect();
        let d = digest(&base);
        assert_eq!(d, digest(&base.clone()), "deterministic");
        for at in (0..CHUNK).step_by(8) {
            for flip in [1u8, 0x80] {
                let mut b = base.clone();
                b[at] ^= flip;
                assert_ne!(digest(&b), d, "byte {at} ^ {flip:#x}");
            }
        }
        // Swapped words, zero chunks of other lengths, a short tail.
        let mut b = base.clone();
        b[..16].rotate_left(8);
        assert_ne!(digest(&b), d);
        assert_ne!(digest(&[0; 4096]), digest(&[0; 4064]));
        assert_ne!(digest(&[1, 2, 3]), digest(&[1, 2, 3, 0]));
    }
}
