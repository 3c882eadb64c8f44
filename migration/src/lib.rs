//! State traits every skiff component implements: pause/resume and versioned save/restore.
//!
//! Layered as pausable → snapshottable: a component gets pause/save/restore by implementing two small
//! methods. [`codec`] is the little-endian encoding of a section's payload, [`snapshot`] the
//! versioned binary file (and stream) format that carries sections, and [`memory_file`] the sparse
//! guest RAM image written next to it. This crate must not know about KVM, PCI or HTTP.

pub mod codec;
pub mod memory_file;
pub mod snapshot;

use thiserror::Error;

/// Errors raised while pausing, resuming, saving or restoring a component.
#[derive(Debug, Error)]
pub enum StateError {
    /// The component could not be paused.
    #[error("cannot pause {id}: {reason}")]
    Pause {
        /// Component id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The component could not be resumed.
    #[error("cannot resume {id}: {reason}")]
    Resume {
        /// Component id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// A saved section has a version this build does not understand.
    #[error("{id}: state version {found} is not supported (this build reads up to {supported})")]
    Version {
        /// Component id.
        id: String,
        /// Version found in the section.
        found: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// A saved section is truncated or malformed.
    #[error("{id}: malformed state: {reason}")]
    Malformed {
        /// Component id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A component whose activity can be stopped and restarted (vCPUs, device workers).
pub trait Pausable {
    /// Stop all activity; when this returns the component touches neither guest memory nor interrupts.
    fn pause(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Continue exactly where [`Pausable::pause`] stopped.
    fn resume(&mut self) -> Result<(), StateError> {
        Ok(())
    }
}

/// One versioned section of saved state, as written to a snapshot or migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSection {
    /// Stable id of the component that owns the section (e.g. `serial0`, `cpu1`).
    pub id: String,
    /// Version of the section's layout.
    pub version: u16,
    /// Serialized state.
    pub data: Vec<u8>,
}

/// A component whose state can be saved and restored in a versioned section.
pub trait Snapshottable: Pausable {
    /// Stable id used to match sections on restore.
    fn id(&self) -> String;
    /// Save the component's state. Called only while paused.
    fn snapshot(&mut self) -> Result<StateSection, StateError>;
    /// Restore the component's state from a section written by [`Snapshottable::snapshot`].
    fn restore(&mut self, section: &StateSection) -> Result<(), StateError>;
}

/// A component that can be live-migrated: dirty logging of memory it writes itself, state sent in
/// bounded chunks while running (pre-copy), and the rest after stop (its snapshot).
pub trait Migratable: Snapshottable {
    /// Start logging guest pages this component writes itself.
    fn start_dirty_log(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Stop logging.
    fn stop_dirty_log(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Bytes of state that could be sent now while running (pre-copy); 0 = none.
    fn precopy_pending(&self) -> u64 {
        0
    }
    /// Estimated bytes of the state saved after stop.
    fn stop_state_size(&self) -> u64 {
        0
    }
}
