//! The live-migration wire protocol: a versioned stream of checksummed frames.
//!
//! Works on plain [`std::io::Read`] / [`std::io::Write`]; the VMM supplies sockets. Everything is
//! little-endian.
//!
//! ```text
//! start   magic (8 bytes) | protocol version u32
//!         magic b"SKIFFMIG" on a migration stream (source → target),
//!               b"SKIFFRPL" on its reply stream (target → source, same connection)
//! frame   kind u8 | length u32 (<= MAX_FRAME_LEN) | payload | CRC32 u32
//! ```
//!
//! A frame's CRC32 covers its index in the stream (u64 LE, not sent, 0 for the first frame after
//! the start), its kind, length and payload: a frame moved to another place fails its CRC (see
//! the frame module for why the index is needed at all).
//!
//! Frame kinds ([`FrameKind`]) and their payloads ([`Message`]):
//!
//! | kind | dir | payload |
//! |---|---|---|
//! | HELLO | → | protocol version, software, features, connection index and count |
//! | CONFIG | → | VM configuration (opaque JSON), host record `(name, value)`, RAM layout, devices |
//! | RAM | → | iteration u32, pages u32, then bare [`crate::ram`] records (see below) |
//! | DEVICE_PRECOPY | → | component id, an opaque chunk of its pre-copy state |
//! | STATE | → | state sections in the [`crate::snapshot`] file format |
//! | ITERATION_END | → | iteration u32, pages this connection carried in it u64 |
//! | COMPLETE | → | frames, bytes, RAM pages, iterations, and the chain of every frame CRC |
//! | ABORT | → | reason |
//! | ACCEPT / REFUSE | ← | — / reason (the answer to CONFIG) |
//! | READY | ← | — (everything arrived and checked out; the VM is loaded, stopped) |
//! | RESUMED / FAILED | ← | — / reason (the target's final answer) |
//!
//! # The commit (fencing)
//!
//! The target never runs the VM on its own: after every connection's COMPLETE it loads the
//! state, answers READY and waits. Only then does the source, whose VM stays paused, write the
//! commit — the 8 bytes [`COMMIT`], raw, after COMPLETE on connection 0 — and the target
//! resumes the VM and answers RESUMED. So a source that has not sent the commit knows the
//! target never ran the VM and may resume its own; a source that sent it and heard no RESUMED
//! cannot know, and stays paused rather than risk two running copies of one VM (split brain).
//! A target that gets anything but the commit (EOF, a timeout, other bytes) drops the VM.
//! A source that gives up after its COMPLETE but before the commit (a cancel, no READY in
//! time) writes a withdrawal instead ([`withdrawal`]: [`WITHDRAW`] and its reason), so the target
//! can say why it dropped the VM.
//!
//! A RAM frame's records are [`crate::ram`] DATA (`'D'` | guest address u64 | pages u32 | the
//! pages) and ZERO (`'Z'` | guest address u64 | pages u32) records without their own CRC and
//! without END ([`crate::ram::RamWriter::bare`]): the frame CRC covers them, the header's page
//! count must match theirs, and they must fill the payload exactly.
//!
//! Strings are a u32 length and UTF-8 bytes, lists a u32 count and their items ([`crate::codec`]).
//! COMPLETE counts the frames and bytes before it and carries `chain`, the CRC32 of the CRCs (u32
//! LE) of every frame before it in stream order: a receiver that checks COMPLETE
//! ([`MigrationReceiver::recv`] does) has caught truncation, dropped, repeated or reordered frames.
//! The stream is untrusted: every length is bounded before anything is allocated, every CRC is
//! checked before a payload is decoded, and every problem is a [`StreamError`], never a panic.
//! Nothing received may be used (RAM run, state restored) before COMPLETE was verified.
//!
//! # Several connections
//!
//! A migration uses `connections` (1..=[`MAX_CONNECTIONS`]) streams, each with its own start,
//! HELLO (with its index), RAM / ITERATION_END frames and COMPLETE; CONFIG, DEVICE_PRECOPY, STATE
//! and the replies use connection 0. RAM of one iteration may be spread over every connection
//! ([`spread_ranges`]), so the receiver may see pages of iteration `i + 1` on one connection
//! before pages of iteration `i` on another. Every RAM frame carries its iteration, and the
//! receiver applies it through [`PageVersions`] with this rule:
//!
//! > a page's copy from iteration `i` is applied only if no copy from an iteration `> i` was
//! > applied.
//!
//! That rule is correct because the sender guarantees (and [`MigrationSender`] enforces the parts
//! it can see):
//!
//! 1. iteration numbers start at 0 and grow by one; on every connection, iteration `i` ends with
//!    ITERATION_END `i` (also when the connection carried no page of it), and iteration `i + 1`'s
//!    pages are written to any connection only after ITERATION_END `i` was written on every
//!    connection;
//! 2. a page is sent at most once per iteration, over all connections together (ranges given to
//!    one iteration never overlap);
//! 3. the copy sent in iteration `i` is read from guest memory after the dirty log that selected
//!    it was collected and cleared, so every later write to the page is in a later iteration;
//! 4. the last iteration is collected after every vCPU and device stopped.
//!
//! Within a connection frames arrive in order, so [`MigrationReceiver`] checks iteration numbers
//! and per-connection page counts at each ITERATION_END. Iterations are numbered
//! 0..=[`MAX_ITERATION`], which keeps [`PageVersions`] at one byte per 4 KiB page.

mod commit;
mod frame;
mod message;
mod ram_frames;
mod session;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;

use thiserror::Error;

use crate::ram::RamStreamError;
use crate::snapshot::SnapshotError;
use crate::StateError;

pub use commit::{read_commit_word, withdrawal, CommitWord, MAX_WITHDRAW_REASON, WITHDRAW};
pub use message::{
    Complete, Config, DeviceEntry, Hello, IterationEnd, Message, RamFrame, FEATURE_LOCAL_MEMFD,
    FEATURE_PRECOPY,
};
pub use ram_frames::{spread_ranges, ApplyStats, PageVersions, RamApplier};
pub use session::{MigrationReceiver, MigrationSender};

/// The first eight bytes of a migration stream (source → target).
pub const MIGRATION_MAGIC: [u8; 8] = *b"SKIFFMIG";
/// The first eight bytes of a reply stream (target → source).
pub const REPLY_MAGIC: [u8; 8] = *b"SKIFFRPL";
/// The protocol version this build writes and reads.
///
/// Version 2: RAM frames carry bare records (no per-record CRC, no END record); the frame CRC,
/// which covers every byte of the payload, is their checksum.
pub const PROTOCOL_VERSION: u32 = 2;

/// The source's commit: written raw on connection 0 after its COMPLETE, once the target
/// answered READY (see "The commit" above).
pub const COMMIT: [u8; 8] = *b"SKIFF-GO";
/// The largest frame payload accepted (16 MiB).
pub const MAX_FRAME_LEN: u32 = 16 << 20;
/// The highest iteration number (iterations are 0..=254).
pub const MAX_ITERATION: u32 = 254;
/// The most connections one migration uses.
pub const MAX_CONNECTIONS: u16 = 64;

/// Which way a stream goes; each frame kind belongs to one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source → target: HELLO, CONFIG, RAM, DEVICE_PRECOPY, STATE, ITERATION_END, COMPLETE, ABORT.
    Migration,
    /// Target → source: ACCEPT, REFUSE, RESUMED, FAILED.
    Reply,
}

impl Direction {
    /// The magic that starts a stream in this direction.
    pub fn magic(self) -> [u8; 8] {
        match self {
            Direction::Migration => MIGRATION_MAGIC,
            Direction::Reply => REPLY_MAGIC,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Direction::Migration => "migration stream",
            Direction::Reply => "migration reply stream",
        }
    }
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Protocol version, features and connection index.
    Hello = 1,
    /// The VM configuration and host compatibility record.
    Config = 2,
    /// The target accepts the configuration.
    Accept = 3,
    /// The target refuses the configuration.
    Refuse = 4,
    /// Guest RAM records of one iteration.
    Ram = 5,
    /// A chunk of a component's pre-copy state.
    DevicePrecopy = 6,
    /// State sections saved after stop.
    State = 7,
    /// The end of an iteration on this connection.
    IterationEnd = 8,
    /// The end of this connection's stream, with totals.
    Complete = 9,
    /// The source gives up.
    Abort = 10,
    /// The target runs the VM.
    Resumed = 11,
    /// The target failed to load or run the VM.
    Failed = 12,
    /// The target loaded and checked everything and waits, the VM stopped, for the commit.
    Ready = 13,
}

impl FrameKind {
    /// The kind for a kind byte, if it is one.
    pub fn from_u8(v: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Config,
            3 => Accept,
            4 => Refuse,
            5 => Ram,
            6 => DevicePrecopy,
            7 => State,
            8 => IterationEnd,
            9 => Complete,
            10 => Abort,
            11 => Resumed,
            12 => Failed,
            13 => Ready,
            _ => return None,
        })
    }

    /// The direction this kind travels in.
    pub fn direction(self) -> Direction {
        use FrameKind::*;
        match self {
            Accept | Refuse | Resumed | Failed | Ready => Direction::Reply,
            _ => Direction::Migration,
        }
    }

    /// The protocol name of the kind (`HELLO`, `RAM`, ...).
    pub fn name(self) -> &'static str {
        use FrameKind::*;
        match self {
            Hello => "HELLO",
            Config => "CONFIG",
            Accept => "ACCEPT",
            Refuse => "REFUSE",
            Ram => "RAM",
            DevicePrecopy => "DEVICE_PRECOPY",
            State => "STATE",
            IterationEnd => "ITERATION_END",
            Complete => "COMPLETE",
            Abort => "ABORT",
            Resumed => "RESUMED",
            Failed => "FAILED",
            Ready => "READY",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors while writing or reading a migration stream.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The stream does not start with the expected magic.
    #[error(
        "not a skiff {expected}: it starts with {found:02x?}{}",
        tls_hint(found)
    )]
    BadMagic {
        /// What was expected.
        expected: &'static str,
        /// The first bytes received.
        found: Vec<u8>,
    },
    /// The peer speaks another protocol version.
    #[error("migration protocol version {found}; this build speaks version {supported}")]
    UnsupportedVersion {
        /// Version received.
        found: u32,
        /// Version this build speaks.
        supported: u32,
    },
    /// The stream ended early.
    #[error("migration stream truncated at byte {offset} (reading {what})")]
    Truncated {
        /// Byte offset where data ran out.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A frame declares a payload above [`MAX_FRAME_LEN`].
    #[error("frame at byte {offset} declares {len} bytes of payload; at most {max} are accepted")]
    Oversized {
        /// Byte offset of the frame.
        offset: u64,
        /// Declared length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame kind byte this build does not know.
    #[error("unknown frame kind {kind:#04x} at byte {offset}")]
    UnknownKind {
        /// Byte offset of the frame.
        offset: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A frame's CRC does not match its contents.
    #[error("checksum mismatch in the {kind} frame at byte {offset}")]
    Checksum {
        /// Byte offset of the frame.
        offset: u64,
        /// Its kind.
        kind: FrameKind,
    },
    /// A frame's payload cannot be decoded.
    #[error("malformed {kind} frame at byte {offset}: {source}")]
    Malformed {
        /// Byte offset of the frame.
        offset: u64,
        /// Its kind.
        kind: FrameKind,
        /// What is wrong with it.
        #[source]
        source: StateError,
    },
    /// A well-formed frame that the protocol does not allow here.
    #[error("{kind} frame at byte {offset} is out of sequence: {reason}")]
    Sequence {
        /// Byte offset of the frame.
        offset: u64,
        /// Its kind.
        kind: FrameKind,
        /// What the protocol expected.
        reason: String,
    },
    /// COMPLETE does not match what was received: frames were lost, repeated, reordered or altered.
    #[error("COMPLETE does not match the stream ({what}: the source sent {sent}, {received} arrived): frames were lost, repeated or reordered")]
    CompleteMismatch {
        /// The total that differs.
        what: &'static str,
        /// The source's figure.
        sent: u64,
        /// The receiver's figure.
        received: u64,
    },
    /// The RAM records of a RAM frame are invalid or cannot be written.
    #[error("RAM frame of iteration {iteration}: {source}")]
    Ram {
        /// The frame's iteration.
        iteration: u32,
        /// The RAM stream error.
        #[source]
        source: RamStreamError,
    },
    /// A RAM frame's header disagrees with its records or the protocol.
    #[error("RAM frame of iteration {iteration}: {reason}")]
    RamFrame {
        /// The frame's iteration.
        iteration: u32,
        /// What is wrong.
        reason: String,
    },
    /// The state sections of a STATE frame are invalid.
    #[error("STATE frame: {source}")]
    State {
        /// The state file error.
        #[source]
        source: SnapshotError,
    },
    /// The sender was asked to send something the protocol cannot carry.
    #[error("cannot send {kind}: {reason}")]
    Invalid {
        /// The frame kind.
        kind: FrameKind,
        /// Why.
        reason: String,
    },
    /// A frame was asked for after COMPLETE or ABORT.
    #[error("the migration stream has already ended (COMPLETE or ABORT was received)")]
    Ended,
    /// Bytes follow COMPLETE.
    #[error("unexpected data after COMPLETE at byte {offset}")]
    TrailingData {
        /// Byte offset of the first extra byte.
        offset: u64,
    },
    /// Reading or writing the connection failed.
    #[error("migration stream I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Result of the stream functions.
pub type Result<T> = std::result::Result<T, StreamError>;

/// Whether `bytes` start a TLS record (content type 20..=23, version 3.x): what a peer that
/// speaks TLS sends where a migration stream should start.
pub fn starts_tls_record(bytes: &[u8]) -> bool {
    matches!(bytes, [20..=23, 3, 0..=4, ..])
}

/// A hint for [`StreamError::BadMagic`] when the bytes start a TLS record: the peer uses TLS and
/// this side does not.
fn tls_hint(found: &[u8]) -> &'static str {
    if starts_tls_record(found) {
        " (a TLS record: the peer uses tls, so this side needs it too)"
    } else {
        ""
    }
}
