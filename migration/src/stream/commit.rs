//! The source's last word after its COMPLETE on connection 0 (see "The commit" in the module
//! documentation): the commit ([`COMMIT`]), or a withdrawal ([`WITHDRAW`], a u16 LE length and
//! the reason in UTF-8) that tells the target why it must drop the VM it loaded.

use std::io::{self, Read};

use super::COMMIT;

/// The source's withdrawal: written raw on connection 0 after its COMPLETE instead of the
/// commit, followed by a u16 LE length and the reason; the target drops the VM it never ran.
pub const WITHDRAW: [u8; 8] = *b"SKIFF-NO";
/// The longest withdrawal reason sent (longer ones are cut at a character boundary).
pub const MAX_WITHDRAW_REASON: usize = 1024;

/// What the source said after its COMPLETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitWord {
    /// The commit: the target may run the VM.
    Commit,
    /// The source withdrew (cancelled or failed), with its reason.
    Withdraw(String),
}

/// The bytes of a withdrawal with `reason` (cut to [`MAX_WITHDRAW_REASON`] bytes).
pub fn withdrawal(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_WITHDRAW_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(WITHDRAW.len() + 2 + reason.len());
    out.extend_from_slice(&WITHDRAW);
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out
}

/// Read the source's commit or withdrawal from `r`. Anything else (other bytes, a reason longer
/// than [`MAX_WITHDRAW_REASON`], an early end) is an error: the target must then drop the VM.
pub fn read_commit_word(r: &mut impl Read) -> io::Result<CommitWord> {
    let mut word = [0u8; 8];
    r.read_exact(&mut word)?;
    if word == COMMIT {
        return Ok(CommitWord::Commit);
    }
    if word != WITHDRAW {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the source sent {word:02x?} instead of its commit"),
        ));
    }
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let len = usize::from(u16::from_le_bytes(len));
    if len > MAX_WITHDRAW_REASON {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a withdrawal reason of {len} bytes (at most {MAX_WITHDRAW_REASON})"),
        ));
    }
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason)?;
    Ok(CommitWord::Withdraw(
        String::from_utf8_lossy(&reason).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_and_withdrawal_round_trip_and_anything_else_is_refused() {
        assert_eq!(
            read_commit_word(&mut &COMMIT[..]).unwrap(),
            CommitWord::Commit
        );
        let w = withdrawal("cancelled");
        assert_eq!(
            read_commit_word(&mut &w[..]).unwrap(),
            CommitWord::Withdraw("cancelled".into())
        );
        // A long reason is cut at a character boundary and still reads back.
        let long = "é".repeat(MAX_WITHDRAW_REASON);
        let w = withdrawal(&long);
        match read_commit_word(&mut &w[..]).unwrap() {
            CommitWord::Withdraw(r) => assert_eq!(r.len(), MAX_WITHDRAW_REASON),
            other => panic!("{other:?}"),
        }
        // Other bytes, truncation, an oversized length: errors, never a panic.
        assert!(read_commit_word(&mut &b"SKIFF-GX"[..]).is_err());
        assert!(read_commit_word(&mut &COMMIT[..4]).is_err());
        assert!(read_commit_word(&mut &w[..w.len() - 1]).is_err());
        let mut big = WITHDRAW.to_vec();
        big.extend_from_slice(&u16::MAX.to_le_bytes());
        big.resize(big.len() + usize::from(u16::MAX), b'x');
        assert!(read_commit_word(&mut &big[..]).is_err());
    }
}
