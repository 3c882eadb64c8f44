//! virtio-net (device type 1): receive queue 0, transmit queue 1, no offloads, no mergeable
//! buffers. Every buffer starts with the 12-byte `virtio_net_hdr` (VERSION_1 layout), all zero
//! on transmit.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::queue::{Buf, Virtqueue};
use super::Transport;
use crate::dma;

/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its config.
pub const F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr` with VERSION_1.
pub const HDR_LEN: usize = 12;
/// Size of each receive buffer (header + a full 1514-byte frame, rounded up).
pub const RX_BUF_LEN: usize = 2048;

/// An initialised virtio-net device.
pub struct Net {
    /// Transport.
    pub t: Transport,
    /// Receive queue.
    pub rx: Virtqueue,
    /// Transmit queue.
    pub tx: Virtqueue,
    /// MAC address from the config (zeros without VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// Receive buffer address per head descriptor.
    rx_bufs: Vec<Option<u64>>,
}

impl Net {
    /// Negotiate (MAC), read the MAC, set up both queues, set DRIVER_OK and post `rx_buffers`
    /// receive buffers.
    pub fn init(mut t: Transport, rx_buffers: usize) -> Result<Net, String> {
        let features = t.negotiate(F_MAC)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            mac.copy_from_slice(&t.device_config(0, 6));
        }
        let rx = t.setup_queue(0, 64, None)?;
        let tx = t.setup_queue(1, 64, None)?;
        t.driver_ok();
        let n = usize::from(rx.size);
        let mut net = Net {
            t,
            rx,
            tx,
            mac,
            rx_bufs: vec![None; n],
        };
        for _ in 0..rx_buffers.min(n) {
            let buf = dma::alloc(RX_BUF_LEN, 64);
            net.post_rx(buf)?;
        }
        Ok(net)
    }

    fn post_rx(&mut self, buf: u64) -> Result<(), String> {
        let head = self
            .rx
            .submit(&[Buf::input(buf, RX_BUF_LEN as u32)])
            .ok_or("receive queue full")?;
        self.rx_bufs[usize::from(head)] = Some(buf);
        Ok(())
    }

    /// Send one Ethernet frame (without FCS); waits for the device to take it.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        let buf = dma::alloc(HDR_LEN + frame.len(), 64);
        dma::write_bytes(buf + HDR_LEN as u64, frame);
        self.tx
            .transfer(
                &[Buf::out(buf, (HDR_LEN + frame.len()) as u32)],
                super::blk::REQUEST_TIMEOUT_MS,
            )
            .map(|_| ())
            .map_err(String::from)
    }

    /// A received frame (header stripped), if one is waiting; its buffer is posted again.
    pub fn poll_rx(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(used) = self.rx.poll() else {
            return Ok(None);
        };
        let buf = self
            .rx_bufs
            .get_mut(used.id as usize)
            .and_then(|b| b.take())
            .ok_or("device returned an unknown receive buffer")?;
        let len = (used.len as usize).min(RX_BUF_LEN);
        let frame = if len > HDR_LEN {
            dma::read_bytes(buf + HDR_LEN as u64, len - HDR_LEN)
        } else {
            Vec::new()
        };
        self.post_rx(buf)?;
        Ok(Some(frame))
    }
}
