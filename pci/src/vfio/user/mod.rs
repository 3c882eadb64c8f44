//! vfio-user client: a [`VfioBackend`](crate::vfio::VfioBackend) over a Unix socket, written
//! from QEMU's `docs/interop/vfio-user.rst`, with libvfio-user's choices where they differ.
//!
//! Why not the rust-vmm `vfio_user` crate (0.1.7): its client is strictly request/reply (no
//! thread to serve the DMA_READ/DMA_WRITE a server sends on the same socket while a request is
//! in flight), it has no timeouts, it lacks DEVICE_FEATURE, MIG_DATA_READ/WRITE and the DMA
//! logging features migration needs, and it uses the old command table. One module here covers
//! the specification: `protocol` (wire format), `sock` (fd passing), `client` (the connection)
//! and `backend` (the `VfioBackend`).

pub mod backend;
pub mod client;
pub mod migration;
pub mod protocol;
pub mod sock;

#[cfg(test)]
mod tests;

pub use backend::VfioUserBackend;
pub use client::{Client, ClientOptions, Reply};
