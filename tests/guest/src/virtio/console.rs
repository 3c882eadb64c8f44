//! virtio-console (device type 3) as a plain, single-port console: receive queue 0, transmit
//! queue 1. VIRTIO_CONSOLE_F_MULTIPORT is never accepted (a multiport device such as QEMU's
//! virtio-serial then behaves as a single console on port 0).

use alloc::string::String;

use super::queue::{Buf, Virtqueue};
use super::Transport;
use crate::dma;

/// `VIRTIO_CONSOLE_F_MULTIPORT` (offered by some devices, never accepted here).
pub const F_MULTIPORT: u64 = 1 << 1;

/// An initialised virtio-console.
pub struct Console {
    /// Transport.
    pub t: Transport,
    /// Receive queue (port 0 input; a few buffers are posted).
    pub rx: Virtqueue,
    /// Transmit queue (port 0 output).
    pub tx: Virtqueue,
}

impl Console {
    /// Negotiate (VERSION_1 only), set up queues 0 and 1, set DRIVER_OK, post 4 receive buffers.
    pub fn init(mut t: Transport) -> Result<Console, String> {
        t.negotiate(0)?;
        let rx = t.setup_queue(0, 16, None)?;
        let tx = t.setup_queue(1, 16, None)?;
        t.driver_ok();
        let mut c = Console { t, rx, tx };
        for _ in 0..4 {
            let buf = dma::alloc(256, 64);
            c.rx.submit(&[Buf::input(buf, 256)]);
        }
        Ok(c)
    }

    /// Send `bytes` on the transmit queue and wait until the device has consumed them.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let buf = dma::alloc(bytes.len(), 64);
        dma::write_bytes(buf, bytes);
        self.tx
            .transfer(
                &[Buf::out(buf, bytes.len() as u32)],
                super::blk::REQUEST_TIMEOUT_MS,
            )
            .map(|_| ())
            .map_err(String::from)
    }
}
