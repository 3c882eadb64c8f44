//! The little-endian state encoding now lives in the `migration` crate ([`migration::codec`]);
//! this re-export keeps `devices::legacy::state::{StateReader, StateWriter}` working.

pub use migration::codec::{StateReader, StateWriter};
