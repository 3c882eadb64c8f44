//! The virtio-net state section.
//!
//! Layout (version 1, little endian): acked features `u64`, MAC `[u8; 6]`, queue count `u8`
//! (0 before activation, 2 after), then per queue its `QueueState` (see
//! [`crate::virtio::common::write_queue_states`]). Frames in flight are not saved: the TAP keeps what the
//! guest has not received yet, and TX chains are completed before the worker stops.

use migration::{StateError, StateSection};
use virtio_queue::QueueState;

use super::MacAddr;
use crate::legacy::state::{StateReader, StateWriter};
use crate::virtio::common::{read_queue_states, write_queue_states};

/// Version of the virtio-net state section.
pub const NET_STATE_VERSION: u16 = 1;

/// What a virtio-net device saves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetState {
    pub acked_features: u64,
    pub mac: MacAddr,
    pub queues: Vec<QueueState>,
}

impl NetState {
    pub fn encode(&self, id: &str) -> StateSection {
        let mut w = StateWriter::new();
        w.u64(self.acked_features).raw(&self.mac.0);
        write_queue_states(&mut w, &self.queues);
        w.into_section(id, NET_STATE_VERSION)
    }

    pub fn decode(section: &StateSection, id: &str) -> Result<Self, StateError> {
        let mut r = StateReader::open(section, id, NET_STATE_VERSION)?;
        let acked_features = r.u64()?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(r.raw(6)?);
        // The count (0 or 2) is checked by `WorkerSlot::check_restore`.
        let queues = read_queue_states(&mut r, 2)?;
        r.finish()?;
        Ok(Self {
            acked_features,
            mac: MacAddr(mac),
            queues,
        })
    }
}
