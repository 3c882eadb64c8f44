//! skiff-testdev: a vfio-user PCI test device (server side), written from the protocol
//! specification independently of skiff's client. A DMA engine with MSI-X/INTx, device memory
//! in BAR2, peer-to-peer writes, the VFIO v2 migration state machine (PRE_COPY, P2P, STOP_COPY,
//! RESUMING) with DMA logging, and violation counters that check the migration ordering.
//!
//! The binary `skiff-testdev` listens on a socket and calls [`serve`] for one client; tests call
//! [`serve`] in-process on one end of a socket pair.

pub mod config;
pub mod conn;
pub mod device;
pub mod digest;
pub mod dirty_log;
pub mod engine;
pub mod fault;
pub mod feature;
pub mod frozen;
pub mod fsm;
pub mod mem;
pub mod migration;
pub mod proto;
pub mod regs;
pub mod server;
pub mod transition;

pub use server::{serve, Options};

use std::fs::File;
use std::io::Write;

/// Errors that end a session (the binary exits non-zero on them).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket I/O failed.
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client closed the connection in the middle of a message.
    #[error("connection closed inside a message")]
    Truncated,
    /// A message size outside `16..=MAX_MSG_SIZE` (answered with E2BIG, then closed).
    #[error("message size {} out of bounds (command {}, id {})", header.msg_size, header.command, header.msg_id)]
    MessageSize {
        /// The offending header.
        header: proto::Header,
    },
    /// More file descriptors than the receive buffer holds (the message is lost, so we close).
    #[error("too many file descriptors in one message")]
    TooManyFds,
    /// Creating device resources (memfd, mapping) failed.
    #[error("device setup: {0}")]
    Setup(std::io::Error),
    /// `--exit-on-arc` fired: the session ended without replying to the state change (the
    /// binary exits with code 3).
    #[error("fault injected: exit on a migration arc")]
    InjectedExit,
}

/// Signals an eventfd (adds 1); failures are logged.
pub fn write_eventfd(f: &File) {
    if let Err(e) = (&*f).write_all(&1u64.to_le_bytes()) {
        log::warn!("signalling an eventfd: {e}");
    }
}
