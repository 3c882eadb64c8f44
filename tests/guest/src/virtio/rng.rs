//! virtio-rng (device type 4): one request queue of device-writable buffers.

use alloc::string::String;
use alloc::vec::Vec;

use super::queue::{Buf, Virtqueue};
use super::Transport;
use crate::dma;

/// An initialised virtio-rng.
pub struct Rng {
    /// Transport.
    pub t: Transport,
    /// Request queue (queue 0).
    pub q: Virtqueue,
    msix_entry: Option<u16>,
}

impl Rng {
    /// Negotiate (VERSION_1 only), set up queue 0 (routed to MSI-X entry `msix_entry` if given)
    /// and set DRIVER_OK.
    pub fn init(t: Transport, msix_entry: Option<u16>) -> Result<Rng, String> {
        let mut r = Rng {
            t,
            q: Virtqueue::new(0, 1, 0),
            msix_entry,
        };
        r.reinit()?;
        Ok(r)
    }

    /// Reset the device and set it up again (a fresh queue).
    pub fn reinit(&mut self) -> Result<(), String> {
        self.t.negotiate(0)?;
        self.q = self.t.setup_queue(0, 64, self.msix_entry)?;
        self.t.driver_ok();
        Ok(())
    }

    /// Post a `len`-byte request without waiting; returns (head, buffer address).
    pub fn submit(&mut self, len: u32) -> Result<(u16, u64), String> {
        let buf = dma::alloc(len as usize, 64);
        let head = self
            .q
            .submit(&[Buf::input(buf, len)])
            .ok_or("rng queue full")?;
        Ok((head, buf))
    }

    /// Collect exactly `len` random bytes (the device may return fewer per request).
    pub fn read(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(len);
        let mut empty = 0;
        while out.len() < len {
            let want = (len - out.len()) as u32;
            let (head, buf) = self.submit(want)?;
            let used = self
                .q
                .wait_for(head, super::blk::REQUEST_TIMEOUT_MS)
                .ok_or("rng request timed out")?;
            let got = (used.len as usize).min(want as usize);
            if got == 0 {
                empty += 1;
                if empty > 16 {
                    return Err("rng keeps returning 0 bytes".into());
                }
            }
            out.extend(dma::read_bytes(buf, got));
        }
        Ok(out)
    }
}
