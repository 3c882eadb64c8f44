//! The vfio-user client's handling of what a device server sends: replies to its requests and
//! the server's own DMA_READ / DMA_WRITE requests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use pci::vfio::backend::DmaHandler;
use pci::vfio::user::client::replay_server_messages;
use pci::vfio::user::protocol::{
    Command, DeviceFeature, DeviceInfoWire, IrqInfoWire, MigData, RegionAccess, RegionInfoWire,
    Version,
};
use pci::vfio::user::ClientOptions;

/// Bytes of the input read as the server's messages at most (the rest is ignored); keeps the
/// write into the socket below its buffer size.
pub const MAX_INPUT: usize = 64 << 10;

/// Guest memory the server's DMA reaches: 64 KiB at address 0x1000.
struct Ram(Mutex<Vec<u8>>);

impl Ram {
    fn range(&self, addr: u64, len: usize) -> std::io::Result<std::ops::Range<usize>> {
        let bad = || std::io::Error::from_raw_os_error(libc::EFAULT);
        let start =
            usize::try_from(addr.checked_sub(0x1000).ok_or_else(bad)?).map_err(|_| bad())?;
        let end = start.checked_add(len).ok_or_else(bad)?;
        if end > 64 << 10 {
            return Err(bad());
        }
        Ok(start..end)
    }
}

impl DmaHandler for Ram {
    fn dma_read(&self, addr: u64, data: &mut [u8]) -> std::io::Result<()> {
        let r = self.range(addr, data.len())?;
        data.copy_from_slice(&self.0.lock().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        let r = self.range(addr, data.len())?;
        self.0.lock().unwrap_or_else(|e| e.into_inner())[r].copy_from_slice(data);
        Ok(())
    }
}

/// The requests in flight while the input is read, by message id: one of each command whose
/// reply the client decodes.
pub const PENDING: [(u16, Command); 8] = [
    (0, Command::Version),
    (1, Command::DeviceGetInfo),
    (2, Command::DeviceGetRegionInfo),
    (3, Command::DeviceGetIrqInfo),
    (4, Command::RegionRead),
    (5, Command::RegionWrite),
    (6, Command::DeviceFeature),
    (7, Command::MigDataRead),
];

/// The bytes a server sends, read by the client's receive path with the [`PENDING`] requests in
/// flight; server DMA requests reach a 64 KiB guest memory at 0x1000. Each reply that matched a
/// request is then decoded as the client's backend decodes that command's reply.
pub fn client(data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    let (mut server, input) = UnixStream::pair().expect("a socket pair");
    let (answers, mut answers_peer) = UnixStream::pair().expect("a socket pair");
    // Drain the client's answers so that it never blocks on a full socket.
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(answers_peer.read(&mut buf), Ok(n) if n > 0) {}
    });
    // At most MAX_INPUT bytes: they fit in the socket's buffer, no reader needed yet.
    let _ = server.write_all(data);
    drop(server);
    let options = ClientOptions {
        max_data_xfer_size: 4096,
        ..ClientOptions::default()
    };
    let ram: Arc<dyn DmaHandler> = Arc::new(Ram(Mutex::new(vec![0; 64 << 10])));
    let (mut replies, _failure) =
        replay_server_messages(&input, answers, &PENDING, Some(ram), options);
    drop(input);
    let _ = drain.join();
    replies.sort_by_key(|r| r.header.id);
    for r in &replies {
        if r.header.is_error() {
            continue;
        }
        let p = &r.payload;
        match Command::from_u16(r.header.command) {
            Some(Command::Version) => {
                let _ = Version::decode(p);
            }
            Some(Command::DeviceGetInfo) => {
                let _ = DeviceInfoWire::decode(p);
            }
            Some(Command::DeviceGetRegionInfo) => {
                let _ = RegionInfoWire::decode(p);
            }
            Some(Command::DeviceGetIrqInfo) => {
                let _ = IrqInfoWire::decode(p);
            }
            Some(Command::RegionRead | Command::RegionWrite) => {
                let _ = RegionAccess::decode(p);
            }
            Some(Command::DeviceFeature) => {
                let _ = DeviceFeature::decode(p);
            }
            Some(Command::MigDataRead) => {
                let _ = MigData::decode(p);
            }
            _ => {}
        }
    }
}
