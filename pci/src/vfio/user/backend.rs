//! [`VfioUserBackend`]: a [`VfioBackend`] over a vfio-user [`Client`].

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::client::{Client, ClientOptions, Reply};
use super::protocol::{
    Command, DeviceFeature, DeviceInfoWire, DmaMap, DmaUnmap, IrqInfoWire, IrqSet, MigData,
    RegionAccess, RegionInfoWire, WireError, DMA_FLAG_READ, DMA_FLAG_WRITE, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, MAX_REGION_INFO_ARGSZ,
    REGION_INFO_SIZE,
};
use crate::vfio::backend::{VFIO_PCI_INTX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP};
use crate::vfio::mig_backend::MigrationBackend;
use crate::vfio::{
    DeviceInfo, DmaBacking, DmaHandler, DmaProt, IrqInfo, RegionInfo, VfioBackend, VfioError,
};

/// What a first region info request accepts: the fixed part and room for a sparse mmap
/// capability of 16 areas; a larger chain is fetched again with the size the server asks for.
/// An eventfd's descriptor, borrowed for as long as the eventfd.
fn borrow_eventfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `e`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

const REGION_INFO_FIRST_ARGSZ: u32 = (REGION_INFO_SIZE + 16 + 16 * 16) as u32;

fn malformed(what: &'static str) -> impl Fn(WireError) -> VfioError {
    move |e| VfioError::Protocol {
        what,
        reason: e.to_string(),
    }
}

fn mismatch(what: &'static str, reason: String) -> VfioError {
    VfioError::Protocol { what, reason }
}

/// A device reached over the vfio-user protocol.
pub struct VfioUserBackend {
    client: Client,
    socket: Option<std::path::PathBuf>,
}

impl VfioUserBackend {
    /// Connect to the server at `path` and negotiate the protocol version.
    pub fn connect(path: &Path, options: ClientOptions) -> Result<Self, VfioError> {
        Ok(VfioUserBackend {
            client: Client::connect(path, options)?,
            socket: Some(path.to_path_buf()),
        })
    }

    /// Use a connected socket (a server started with `--fd`, a socketpair).
    pub fn from_stream(stream: UnixStream, options: ClientOptions) -> Result<Self, VfioError> {
        Ok(VfioUserBackend {
            client: Client::from_stream(stream, options)?,
            socket: None,
        })
    }

    /// The connection (negotiated version, server capabilities, raw requests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// DEVICE_FEATURE with `flags` (feature index | GET/SET/PROBE) and `data`; returns the
    /// reply's data. `max_reply` bounds the data a GET may return.
    pub fn device_feature(
        &self,
        flags: u32,
        data: &[u8],
        max_reply: u32,
    ) -> Result<Vec<u8>, VfioError> {
        self.device_feature_within(flags, data, max_reply, self.client.options().timeout)
    }

    /// [`Self::device_feature`] with its own reply timeout (a migration-state arc may have a
    /// large state to save or load).
    pub fn device_feature_within(
        &self,
        flags: u32,
        data: &[u8],
        max_reply: u32,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>, VfioError> {
        const WHAT: &str = "VFIO_USER_DEVICE_FEATURE";
        let req = DeviceFeature {
            argsz: 8u32.saturating_add(max_reply.max(data.len() as u32)),
            flags,
            data: data.to_vec(),
        };
        let reply = self.client.request_within(
            WHAT,
            Command::DeviceFeature,
            &req.encode(),
            &[],
            timeout,
        )?;
        let r = DeviceFeature::decode(&reply.payload).map_err(malformed(WHAT))?;
        if r.data.len() > max_reply.max(data.len() as u32) as usize {
            return Err(mismatch(WHAT, format!("{} bytes of data", r.data.len())));
        }
        Ok(r.data)
    }

    /// MIG_DATA_READ of at most `size` bytes (fewer: the stream has ended).
    pub fn mig_data_read(&self, size: u32) -> Result<Vec<u8>, VfioError> {
        const WHAT: &str = "VFIO_USER_MIG_DATA_READ";
        let size = size.min(self.client.max_xfer() as u32);
        let req = MigData {
            argsz: 8 + size,
            size,
            data: Vec::new(),
        };
        let reply = self
            .client
            .request(WHAT, Command::MigDataRead, &req.encode(), &[])?;
        let r = MigData::decode(&reply.payload).map_err(malformed(WHAT))?;
        if r.size > size {
            return Err(mismatch(WHAT, format!("{} bytes for {size} asked", r.size)));
        }
        Ok(r.data)
    }

    /// MIG_DATA_WRITE of `data`, split at the transfer limit.
    pub fn mig_data_write(&self, data: &[u8]) -> Result<(), VfioError> {
        for chunk in data.chunks(self.client.max_xfer()) {
            let req = MigData {
                argsz: 8,
                size: chunk.len() as u32,
                data: chunk.to_vec(),
            };
            self.client.request(
                "VFIO_USER_MIG_DATA_WRITE",
                Command::MigDataWrite,
                &req.encode(),
                &[],
            )?;
        }
        Ok(())
    }

    fn set_irqs(
        &self,
        what: &'static str,
        set: IrqSet,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, VfioError> {
        let payload = set.encode().map_err(|e| VfioError::Invalid {
            what,
            reason: e.to_string(),
        })?;
        self.client
            .request(what, Command::DeviceSetIrqs, &payload, fds)
    }

    fn region_info_once(
        &self,
        index: u32,
        argsz: u32,
    ) -> Result<(RegionInfoWire, Reply), VfioError> {
        const WHAT: &str = "VFIO_USER_DEVICE_GET_REGION_INFO";
        let reply = self.client.request(
            WHAT,
            Command::DeviceGetRegionInfo,
            &RegionInfoWire::request(index, argsz),
            &[],
        )?;
        let info = RegionInfoWire::decode(&reply.payload).map_err(malformed(WHAT))?;
        if info.index != index {
            return Err(mismatch(
                WHAT,
                format!("asked for region {index}, got region {}", info.index),
            ));
        }
        Ok((info, reply))
    }

    fn set_eventfd_run(
        &self,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
        count: u32,
    ) -> Result<(), VfioError> {
        let set = IrqSet {
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
            data: Vec::new(),
        };
        self.set_irqs("VFIO_USER_DEVICE_SET_IRQS", set, fds)
            .map(drop)
    }
}

impl VfioBackend for VfioUserBackend {
    fn kind(&self) -> &'static str {
        "vfio-user"
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        self.socket
            .iter()
            .map(|p| ("socket", p.display().to_string()))
            .collect()
    }

    fn device_info(&self) -> Result<DeviceInfo, VfioError> {
        const WHAT: &str = "VFIO_USER_DEVICE_GET_INFO";
        let reply = self.client.request(
            WHAT,
            Command::DeviceGetInfo,
            &DeviceInfoWire::request(),
            &[],
        )?;
        let d = DeviceInfoWire::decode(&reply.payload).map_err(malformed(WHAT))?;
        Ok(DeviceInfo {
            flags: d.flags,
            num_regions: d.num_regions,
            num_irqs: d.num_irqs,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError> {
        const WHAT: &str = "VFIO_USER_DEVICE_GET_REGION_INFO";
        let (mut info, mut reply) = self.region_info_once(index, REGION_INFO_FIRST_ARGSZ)?;
        if info.caps_truncated {
            // libvfio-user answers a too-small argsz with the fixed part and the size needed.
            if info.argsz > MAX_REGION_INFO_ARGSZ {
                return Err(mismatch(WHAT, format!("argsz {} is absurd", info.argsz)));
            }
            (info, reply) = self.region_info_once(index, info.argsz)?;
            if info.caps_truncated {
                return Err(mismatch(WHAT, "capabilities truncated twice".into()));
            }
        }
        let mut flags = info.flags;
        let mut fds = reply.fds.into_iter();
        let mmap_fd: Option<Arc<dyn AsRawFd + Send + Sync>> =
            if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
                match fds.next() {
                    Some(fd) => Some(Arc::new(fd)),
                    None => {
                        log::warn!("vfio-user: region {index} is mappable but came without fd");
                        flags &= !VFIO_REGION_INFO_FLAG_MMAP;
                        None
                    }
                }
            } else {
                None
            };
        if fds.len() > 0 {
            log::warn!(
                "vfio-user: {} unexpected fds with region {index}: closed",
                fds.len()
            );
        }
        Ok(RegionInfo {
            index,
            flags,
            size: info.size,
            offset: info.offset,
            mmap_fd,
            sparse: info.sparse,
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
        const WHAT: &str = "VFIO_USER_DEVICE_GET_IRQ_INFO";
        let reply = self.client.request(
            WHAT,
            Command::DeviceGetIrqInfo,
            &IrqInfoWire::request(index),
            &[],
        )?;
        let i = IrqInfoWire::decode(&reply.payload).map_err(malformed(WHAT))?;
        if i.index != index {
            return Err(mismatch(
                WHAT,
                format!("asked for interrupt index {index}, got {}", i.index),
            ));
        }
        Ok(IrqInfo {
            index,
            flags: i.flags,
            count: i.count,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError> {
        const WHAT: &str = "VFIO_USER_REGION_READ";
        let mut off = offset;
        for chunk in data.chunks_mut(self.client.max_xfer()) {
            let req = RegionAccess {
                offset: off,
                region: index,
                count: chunk.len() as u32,
                data: Vec::new(),
            };
            let reply = self
                .client
                .request(WHAT, Command::RegionRead, &req.encode(), &[])?;
            let r = RegionAccess::decode(&reply.payload).map_err(malformed(WHAT))?;
            if r.offset != off || r.region != index || r.count != req.count {
                return Err(mismatch(
                    WHAT,
                    format!("reply for {r:?} to a read of {req:?}"),
                ));
            }
            if r.data.len() != chunk.len() {
                return Err(mismatch(
                    WHAT,
                    format!("{} data bytes for {} asked", r.data.len(), chunk.len()),
                ));
            }
            chunk.copy_from_slice(&r.data);
            off = off.wrapping_add(chunk.len() as u64);
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        const WHAT: &str = "VFIO_USER_REGION_WRITE";
        let mut off = offset;
        for chunk in data.chunks(self.client.max_xfer()) {
            let req = RegionAccess {
                offset: off,
                region: index,
                count: chunk.len() as u32,
                data: chunk.to_vec(),
            };
            let reply = self
                .client
                .request(WHAT, Command::RegionWrite, &req.encode(), &[])?;
            let r = RegionAccess::decode(&reply.payload).map_err(malformed(WHAT))?;
            if r.offset != off || r.region != index || r.count != req.count {
                return Err(mismatch(
                    WHAT,
                    format!(
                        "reply for {}+{} of region {} to a write of {off:#x}+{}",
                        r.offset, r.count, r.region, req.count
                    ),
                ));
            }
            off = off.wrapping_add(chunk.len() as u64);
        }
        Ok(())
    }

    /// Runs of present eventfds go in messages of at most the server's `max_msg_fds`; runs of
    /// absent ones are sent as DATA_EVENTFD without fds, which the spec defines as de-assigning
    /// those vectors (there is no way to pass "-1" through SCM_RIGHTS).
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), VfioError> {
        let max = self.client.max_send_fds();
        let mut i = 0;
        while i < fds.len() {
            let present = fds[i].is_some();
            let mut j = i;
            while j < fds.len() && fds[j].is_some() == present && (!present || j - i < max) {
                j += 1;
            }
            if present && max == 0 {
                return Err(VfioError::Invalid {
                    what: "VFIO_USER_DEVICE_SET_IRQS",
                    reason: "the server accepts no file descriptors".into(),
                });
            }
            let run: Vec<BorrowedFd<'_>> = fds[i..j]
                .iter()
                .flatten()
                .map(|e| borrow_eventfd(e))
                .collect();
            self.set_eventfd_run(index, start + i as u32, &run, (j - i) as u32)?;
            i = j;
        }
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioError> {
        let set = IrqSet {
            flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
            data: Vec::new(),
        };
        self.set_irqs("VFIO_USER_DEVICE_SET_IRQS", set, &[])
            .map(drop)
    }

    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<(), VfioError> {
        let set = IrqSet {
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
            index: VFIO_PCI_INTX_IRQ_INDEX,
            start: 0,
            count: 1,
            data: Vec::new(),
        };
        self.set_irqs("VFIO_USER_DEVICE_SET_IRQS", set, &[borrow_eventfd(fd)])
            .map(drop)
    }

    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        backing: DmaBacking<'_>,
        prot: DmaProt,
    ) -> Result<(), VfioError> {
        const WHAT: &str = "VFIO_USER_DMA_MAP";
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(VfioError::Invalid {
                what: WHAT,
                reason: format!("range {iova:#x}+{size:#x}"),
            });
        }
        let flags =
            if prot.read { DMA_FLAG_READ } else { 0 } | if prot.write { DMA_FLAG_WRITE } else { 0 };
        let (offset, fd) = match backing {
            DmaBacking::Memory { fd, offset, .. } => (offset, Some(fd)),
            DmaBacking::Trapped => (0, None),
        };
        let map = DmaMap {
            flags,
            offset,
            addr: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.client
            .request(WHAT, Command::DmaMap, &map.encode(), &fds)
            .map(drop)
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), VfioError> {
        let unmap = DmaUnmap {
            flags: 0,
            addr: iova,
            size,
        };
        self.client
            .request(
                "VFIO_USER_DMA_UNMAP",
                Command::DmaUnmap,
                &unmap.encode(),
                &[],
            )
            .map(drop)
    }

    fn reset(&self) -> Result<(), VfioError> {
        self.client
            .request("VFIO_USER_DEVICE_RESET", Command::DeviceReset, &[], &[])
            .map(drop)
    }

    fn set_dma_handler(&self, handler: Arc<dyn DmaHandler>) {
        self.client.set_dma_handler(handler);
    }

    fn set_failure_hook(&self, hook: Arc<dyn Fn(&str) + Send + Sync>) {
        self.client.set_failure_hook(hook);
    }

    fn migration(&self) -> Option<&dyn MigrationBackend> {
        Some(self)
    }
}
