//! State traits every skiff component implements, and the formats that carry state and RAM.
//!
//! Layered as pausable → snapshottable → migratable: a component gets pause/save/restore by
//! implementing two small methods, and live migration by `impl Migratable for X {}` (every
//! migration hook has a default). Modules:
//!
//! - [`codec`]: the little-endian encoding of a section's payload;
//! - [`snapshot`]: the versioned state file (and stream) format that carries sections;
//! - [`dirty`]: [`DirtyBitmap`], dirty 4 KiB guest pages merged from KVM logs, vm-memory's
//!   bitmaps and components' own logs;
//! - [`ram`]: the streamable RAM encoding (header, DATA/ZERO/END records) used for snapshot
//!   memory images and, record by record, by the live-migration stream;
//! - [`memory_file`]: the older sparse RAM image (`SKIFFMEM`), still read on restore;
//! - [`stream`]: the live-migration wire protocol (versioned, framed, checksummed; RAM over
//!   several connections with per-page iteration versions);
//! - [`planner`]: the pre-copy planner (iterate, throttle, switch over or give up);
//! - [`device_fsm`]: the VFIO device migration state machine and the arcs that migrate a VM's
//!   passthrough devices.
//!
//! This crate must not know about KVM, PCI, sockets or HTTP.

pub mod codec;
pub mod device_fsm;
pub mod dirty;
pub mod memory_file;
pub mod planner;
pub mod ram;
pub mod snapshot;
pub mod stream;
#[cfg(test)]
mod test_util;

pub use dirty::DirtyBitmap;

/// Whether a stored checksum matches the computed one. Builds for fuzzing (`--cfg fuzzing`,
/// never a release) take any checksum, so that the fuzzer reaches the parsing behind it.
pub(crate) fn checksum_ok(stored: u32, computed: u32) -> bool {
    cfg!(fuzzing) || stored == computed
}

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
    /// The component does not support an operation (e.g. receiving pre-copy state).
    #[error("{id} does not support {what}")]
    Unsupported {
        /// Component id.
        id: String,
        /// The operation.
        what: String,
    },
    /// The component's own operation failed (a KVM ioctl, a host resource, ...).
    #[error("{id}: {source}")]
    Component {
        /// Component id.
        id: String,
        /// The component's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StateError {
    /// Component `id` failed with `source`.
    pub fn component(
        id: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Component {
            id: id.into(),
            source: Box::new(source),
        }
    }
}

/// A component whose activity can be stopped and restarted (vCPUs, device workers).
///
/// Stopping a VM is two passes over every component, after every vCPU is parked: first
/// [`Pausable::quiesce`] on all of them, then [`Pausable::pause`] on all of them. Starting it
/// mirrors that: [`Pausable::resume_quiesced`] on all, then [`Pausable::resume`] on all, then
/// the vCPUs. The middle state is VFIO's P2P grace state (RUNNING_P2P): a passthrough device in
/// it starts no new peer-to-peer DMA but still accepts a peer's, so no device is stopped (and
/// its state read) while a peer may still write into it. Components without peers keep the
/// defaults.
pub trait Pausable {
    /// Stop initiating peer-to-peer DMA, keep accepting it (VFIO RUNNING_P2P). Called on every
    /// component before any is paused; [`Pausable::resume`] must also work from here.
    fn quiesce(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Stop all activity; when this returns the component touches neither guest memory nor interrupts.
    fn pause(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// From paused to quiesced (VFIO STOP -> RUNNING_P2P): called on every component before
    /// any is resumed.
    fn resume_quiesced(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Continue exactly where [`Pausable::pause`] (or [`Pausable::quiesce`]) stopped.
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

/// A component that can be live-migrated: dirty page logging and pre-copy state on top of
/// [`Snapshottable`] (whose snapshot stays the state saved after stop). Every method has a
/// default, so a component without its own DMA or pre-copy state adds only
/// `impl Migratable for X {}`.
pub trait Migratable: Snapshottable {
    /// Start logging guest pages this component writes itself (e.g. device DMA not done through
    /// the VMM's dirty-tracked guest memory).
    fn start_dirty_log(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Stop logging guest pages (migration finished or cancelled).
    fn stop_dirty_log(&mut self) -> Result<(), StateError> {
        Ok(())
    }
    /// Merge the guest pages written since the last call into `into`, and clear the component's log.
    fn sync_dirty_log(&mut self, into: &mut DirtyBitmap) -> Result<(), StateError> {
        let _ = into;
        Ok(())
    }
    /// Bytes of state that could be sent now while the component keeps running (pre-copy); 0 = none.
    fn precopy_pending(&self) -> u64 {
        0
    }
    /// At most `max` bytes of state while running; `Ok(None)` = nothing more for now.
    fn precopy_read(&mut self, max: usize) -> Result<Option<Vec<u8>>, StateError> {
        let _ = max;
        Ok(None)
    }
    /// Target side: accept a chunk produced by [`Migratable::precopy_read`] on the source.
    /// Default: refused with [`StateError::Unsupported`].
    fn precopy_write(&mut self, data: &[u8]) -> Result<(), StateError> {
        let _ = data;
        Err(StateError::Unsupported {
            id: self.id(),
            what: "pre-copy state".into(),
        })
    }
    /// After the pause, before [`Snapshottable::snapshot`]: at most `max` bytes of the state the
    /// component produces once stopped, when that is too large for one section (a passthrough
    /// device's STOP_COPY data); `Ok(None)` = nothing (more). What was read here is not in the
    /// snapshot; the target takes it through [`Migratable::precopy_write`].
    fn stop_copy_read(&mut self, max: usize) -> Result<Option<Vec<u8>>, StateError> {
        let _ = max;
        Ok(None)
    }
    /// Estimated bytes of the state saved after stop (its snapshot), counted in the downtime estimate.
    fn stop_state_size(&self) -> u64 {
        0
    }
    /// A passthrough device's migration support and options, for the device migration plan
    /// ([`device_fsm::plan_device_migration`]); `None` for everything else.
    fn passthrough_migration(&self) -> Option<device_fsm::PassthroughMigInfo> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain device: pause/resume defaults, a one-byte state, and no migration hooks.
    struct Plain(u8);

    impl Pausable for Plain {}

    impl Snapshottable for Plain {
        fn id(&self) -> String {
            "plain0".into()
        }
        fn snapshot(&mut self) -> Result<StateSection, StateError> {
            Ok(StateSection {
                id: self.id(),
                version: 1,
                data: vec![self.0],
            })
        }
        fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
            self.0 = section.data.first().copied().unwrap_or_default();
            Ok(())
        }
    }

    impl Migratable for Plain {}

    #[test]
    fn migratable_defaults() {
        let mut dev = Plain(7);
        dev.start_dirty_log().unwrap();
        let mut dirty = DirtyBitmap::new(&[(0, 1 << 20)]).unwrap();
        dirty.mark(0x2000, 1).unwrap();
        dev.sync_dirty_log(&mut dirty).unwrap();
        // The default sync adds nothing and removes nothing.
        assert_eq!(dirty.pages(), vec![0x2000]);
        assert_eq!(dev.precopy_pending(), 0);
        assert_eq!(dev.precopy_read(4096).unwrap(), None);
        let err = dev.precopy_write(b"x").unwrap_err();
        assert!(matches!(err, StateError::Unsupported { ref id, .. } if id == "plain0"));
        assert_eq!(err.to_string(), "plain0 does not support pre-copy state");
        assert_eq!(dev.stop_state_size(), 0);
        dev.stop_dirty_log().unwrap();
        // The state after stop is still the snapshot.
        assert_eq!(dev.snapshot().unwrap().data, vec![7]);
    }
}
