//! virtio-net: one RX/TX queue pair backed by a Linux TAP interface.
//!
//! | file | what |
//! |---|---|
//! | `device.rs` | [`Net`]: features, configuration space, activation, pause/resume, snapshot |
//! | `event_handler.rs` | the worker: TX kick → TAP, TAP readable → RX buffers |
//! | `tap.rs` | opening and configuring the TAP |
//! | `persist.rs` | the versioned state section |
//! | `metrics.rs` | counters |
//!
//! Queue 0 is RX, queue 1 TX, each at most [`NET_QUEUE_SIZE`] entries. Every frame on both queues
//! starts with a 12-byte `virtio_net_hdr_v1` ([`VNET_HDR_LEN`]); the TAP is opened with
//! `IFF_VNET_HDR` and the same header size, so headers pass through unchanged and the host kernel
//! does the checksum/segmentation work the guest offloads. Which offloaded frames the TAP may send
//! to the guest follows the guest's acked `GUEST_*` features (`TUNSETOFFLOAD`).

mod device;
mod event_handler;
mod metrics;
mod persist;
mod tap;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;

pub use crate::virtio::common::GuestIoVecs;
pub use device::Net;
pub use metrics::NetMetrics;
pub use persist::NET_STATE_VERSION;
pub use tap::{tun_available, Tap};

/// Size of the `virtio_net_hdr_v1` in front of every frame (VERSION_1 is required): 12 bytes.
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();
/// Largest size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest frame (header included) the device sends to the TAP: a 64 KiB GSO frame plus Ethernet
/// and VLAN headers.
pub const MAX_TX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Smallest TX chain: the header plus an Ethernet header.
pub const MIN_TX_FRAME: usize = VNET_HDR_LEN + 14;

/// Queue indices.
pub mod queues {
    /// receiveq1.
    pub const RX: u16 = 0;
    /// transmitq1.
    pub const TX: u16 = 1;
}

/// virtio-net feature bits (virtio 1.x, 5.1.3) as masks of virtio-bindings' bit numbers.
pub mod features {
    use crate::virtio::features::bit;
    use virtio_bindings::virtio_net as vn;

    /// The device handles packets with partial checksum (guest → host checksum offload).
    pub const CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
    /// The driver handles packets with partial checksum (host → guest).
    pub const GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
    /// The device has a MAC address in its configuration space.
    pub const MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
    /// The driver can receive TSO with ECN.
    pub const GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
    /// The device can receive TSOv4 (guest → host segmentation offload).
    pub const HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
    /// The device can receive TSO with ECN.
    pub const HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
    /// The configuration space has a link status field.
    pub const STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random unicast, locally administered address.
    pub fn random_local() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // getrandom on 6 bytes does not fail on Linux ≥ 3.17; fall back to time and pid anyway.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id()) << 32;
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & !0x01) | 0x02;
        Self(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Where a virtio-net device's TAP comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// A TAP interface by name; created when absent (needs CAP_NET_ADMIN).
    Name(String),
    /// An open TAP descriptor inherited from the parent (attached with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); skiff duplicates it.
    Fd(RawFd),
}

/// Configuration of a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Device id (counters, API, migration).
    pub id: String,
    /// The TAP backend.
    pub tap: TapSource,
    /// MAC address; random locally administered when `None`.
    pub mac: Option<MacAddr>,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (the device sits behind the virtual IOMMU).
    pub iommu: bool,
}

/// Errors creating a virtio-net device.
#[derive(Debug, Error)]
pub enum NetError {
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {source} (is the tun module loaded?)")]
    TunDevice {
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating or attaching the TAP was refused.
    #[error(
        "TAP {name}: permission denied: creating or attaching a TAP needs CAP_NET_ADMIN (run skiff \
         as root or give it the capability), or create the TAP beforehand with \
         `ip tuntap add {name} mode tap user <user>`"
    )]
    TapPermission {
        /// TAP name.
        name: String,
    },
    /// Another process (or device) holds the TAP.
    #[error("TAP {name} is already in use by another process")]
    TapBusy {
        /// TAP name.
        name: String,
    },
    /// The TAP name is not a valid interface name.
    #[error("invalid TAP name {name:?}: 1 to 15 bytes, no '/' or NUL")]
    InvalidTapName {
        /// The name given.
        name: String,
    },
    /// An inherited descriptor is not a usable TAP.
    #[error("TAP fd {fd}: {reason}")]
    TapFd {
        /// The descriptor number.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// Configuring the TAP failed.
    #[error("TAP {tap}: {op} failed: {source}")]
    TapIoctl {
        /// TAP name.
        tap: String,
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Where the device's frames go and come from: a TAP in production, anything with a pollable fd
/// in tests and benchmarks. Every frame starts with the 12-byte `virtio_net_hdr_v1`.
///
/// The default methods do `writev`/`readv` on [`AsRawFd::as_raw_fd`], which suits any fd that
/// preserves frame boundaries (a TAP, a datagram socket) or discards them (`/dev/null`).
pub trait NetBackend: AsRawFd + Send {
    /// Send one frame gathered from guest memory; returns the bytes sent.
    fn send(&mut self, frame: &GuestIoVecs<'_>) -> io::Result<usize> {
        frame.writev_to(self.as_raw_fd())
    }
    /// Receive one frame into guest memory; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut GuestIoVecs<'_>) -> io::Result<usize> {
        buf.readv_from(self.as_raw_fd())
    }
    /// Which offloaded frames (`TUN_F_*`) the backend may deliver to the guest.
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
    /// What the backend is, for log messages.
    fn describe(&self) -> String {
        format!("fd {}", self.as_raw_fd())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tests_support;
