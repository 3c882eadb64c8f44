//! virtio-blk (device type 2): one request queue, synchronous requests.
//!
//! A request is a chain: 16-byte header (type, reserved, sector; device-readable), optional data
//! buffer, 1-byte status (device-writable).

use alloc::string::String;
use alloc::vec::Vec;

use super::queue::{Buf, Used, Virtqueue};
use super::{Transport, F_INDIRECT_DESC};
use crate::dma;

/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`: the device has a write cache and supports FLUSH.
pub const F_FLUSH: u64 = 1 << 9;

/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Get the 20-byte device ID (serial).
pub const T_GET_ID: u32 = 8;

/// Success.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;
/// What the guest puts in the status byte before submitting (never a device value).
pub const S_UNWRITTEN: u8 = 0xFF;

/// Sector size of virtio-blk request addressing.
pub const SECTOR: usize = 512;

/// How long a well-formed request may take (the guest is emulated on the development host).
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;

/// An initialised virtio-blk device.
pub struct Blk {
    /// Transport.
    pub t: Transport,
    /// Request queue (queue 0).
    pub q: Virtqueue,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether VIRTIO_BLK_F_RO was offered (and accepted).
    pub read_only: bool,
    wanted: u64,
    scratch: u64,
}

impl Blk {
    /// Negotiate (RO, FLUSH and `extra` if offered), read the capacity, set up queue 0 and set
    /// DRIVER_OK.
    pub fn init(t: Transport, extra: u64) -> Result<Blk, String> {
        let mut b = Blk {
            t,
            q: Virtqueue::new(0, 1, 0),
            capacity: 0,
            read_only: false,
            wanted: F_RO | F_FLUSH | extra,
            scratch: dma::alloc(64, 64),
        };
        b.reinit()?;
        Ok(b)
    }

    /// Reset the device and set it up again from scratch (a fresh queue).
    pub fn reinit(&mut self) -> Result<(), String> {
        let features = self.t.negotiate(self.wanted)?;
        self.read_only = features & F_RO != 0;
        self.capacity = self.t.device_config_u64(0);
        self.q = self.t.setup_queue(0, 256, None)?;
        self.t.driver_ok();
        Ok(())
    }

    /// Whether INDIRECT_DESC was negotiated.
    pub fn indirect(&self) -> bool {
        self.t.features & F_INDIRECT_DESC != 0
    }

    /// Address of the shared request header (16 bytes).
    pub fn header_addr(&self) -> u64 {
        self.scratch
    }

    /// Address of the shared status byte.
    pub fn status_addr(&self) -> u64 {
        self.scratch + 16
    }

    /// Fill in the shared header and reset the status byte to [`S_UNWRITTEN`].
    pub fn prepare(&self, kind: u32, sector: u64) {
        dma::write::<u32>(self.scratch, kind);
        dma::write::<u32>(self.scratch + 4, 0);
        dma::write::<u64>(self.scratch + 8, sector);
        dma::write::<u8>(self.status_addr(), S_UNWRITTEN);
    }

    /// The status byte as the device left it.
    pub fn status(&self) -> u8 {
        dma::read::<u8>(self.status_addr())
    }

    /// Run one request and return (status byte, used length).
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<Buf>,
    ) -> Result<(u8, Used), String> {
        self.prepare(kind, sector);
        let mut bufs: Vec<Buf> = Vec::with_capacity(3);
        bufs.push(Buf::out(self.header_addr(), 16));
        bufs.extend(data);
        bufs.push(Buf::input(self.status_addr(), 1));
        let used = self
            .q
            .transfer(&bufs, REQUEST_TIMEOUT_MS)
            .map_err(String::from)?;
        Ok((self.status(), used))
    }

    /// Read `len` bytes (a multiple of 512) from `sector` into `addr`; returns the status.
    pub fn read(&mut self, sector: u64, addr: u64, len: u32) -> Result<u8, String> {
        Ok(self.request(T_IN, sector, Some(Buf::input(addr, len)))?.0)
    }

    /// Write `len` bytes (a multiple of 512) at `addr` to `sector`; returns the status.
    pub fn write(&mut self, sector: u64, addr: u64, len: u32) -> Result<u8, String> {
        Ok(self.request(T_OUT, sector, Some(Buf::out(addr, len)))?.0)
    }

    /// Flush; returns the status.
    pub fn flush(&mut self) -> Result<u8, String> {
        Ok(self.request(T_FLUSH, 0, None)?.0)
    }

    /// GET_ID: (status, the ID up to its first NUL, as text).
    pub fn get_id(&mut self) -> Result<(u8, String), String> {
        let buf = dma::alloc(20, 64);
        let (status, _) = self.request(T_GET_ID, 0, Some(Buf::input(buf, 20)))?;
        let raw = dma::read_bytes(buf, 20);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let id = raw[..end]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '?'
                }
            })
            .collect();
        Ok((status, id))
    }
}
