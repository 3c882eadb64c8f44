//! The DMA side of passthrough devices: what each device's DMA space holds, and how the VMM
//! serves the DMA a device cannot do by itself.
//!
//! A device's DMA space (without the virtual IOMMU, or while its endpoint bypasses it) maps
//! guest RAM at its guest physical addresses, backed by the guest-RAM memfd, so the device (a
//! vfio-user server, or the host IOMMU for kernel VFIO) reaches RAM directly. Unless the device
//! is `p2p=off`, the PCI MMIO windows are mapped too, without memory behind them: a vfio-user
//! server's DMA there comes back as DMA_READ/DMA_WRITE, which [`PassthroughDma`] serves through
//! the guest physical address space — a peer passthrough device's BAR (forwarded to that
//! device as a region access), or any other device's BAR on the MMIO bus. That is peer-to-peer
//! DMA over vfio-user. A `p2p=off` device's DMA space has RAM only, and DMA from a peer into its
//! BARs is refused: it can neither reach nor be reached by a peer (the two-domain scheme device
//! migration relies on).
//!
//! Behind the virtual IOMMU (`iommu=on`), the DMA space follows the guest's MAP/UNMAP requests
//! for the device's endpoint exactly ([`ExternalMappingListener`]): a mapping of RAM is mapped
//! with memory behind it, a mapping of anything else (a peer's BAR) without, and DMA served
//! here is translated with the mappings recorded by the listener (not by locking the IOMMU:
//! the listener runs under the IOMMU's lock while it waits for the device, and the device may
//! be waiting for a DMA served here).
//!
//! A device's [`DmaSpace`] is the one record of what its DMA space holds (identity, or the
//! guest's mappings, each one mapping of the backend): the listener asks it what to undo on an
//! unmap or a bypass change, DMA served here is translated with it, and the device's migration
//! translates its DMA dirty log with it. A mapping is recorded before the device can use it,
//! and a removal (unmap, bypass change, a map the device refused) only once the device's space
//! no longer has it, so that a write the device made through a mapping is either reported
//! through it or counted with the removed mapping's pages.

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, RwLock};

use devices::Bus;
use iommu::ExternalMappingListener;
use pci::vfio::{
    DmaBacking, DmaHandler, DmaMapping, DmaProt, DmaSpace, VfioBackend, VfioError, VfioStats,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, GuestRegionMmap};
use crate::pci_devices::BarWindows;

/// A passthrough device the DMA of others may target: its slot, its backend (peer-to-peer
/// writes are forwarded to it as region accesses, never through its lock) and whether it is
/// `p2p=off`.
#[derive(Clone)]
pub struct Peer {
    /// PCI slot.
    pub slot: u8,
    /// Its backend.
    pub backend: Arc<dyn VfioBackend>,
    /// `p2p=off`: peers may not reach it.
    pub p2p_off: bool,
}

/// Every passthrough device of the VM, shared by their DMA handlers.
pub type Peers = Arc<RwLock<Vec<Peer>>>;

/// The guest physical address space as passthrough DMA sees it.
#[derive(Clone)]
pub struct DmaContext {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The MMIO bus (other devices' BARs).
    pub mmio: Arc<Bus>,
    /// Where every BAR decodes now.
    pub windows: BarWindows,
    /// The PCI MMIO windows `(start, len)` mapped for peer-to-peer DMA.
    pub pci_windows: Vec<(u64, u64)>,
    /// Every passthrough device.
    pub peers: Peers,
}

/// One device's DMA space and the server of its trapped DMA.
pub struct PassthroughDma {
    id: String,
    slot: u8,
    p2p: bool,
    backend: Arc<dyn VfioBackend>,
    ctx: DmaContext,
    stats: Arc<VfioStats>,
    /// What the device's DMA space holds — identity or the guest's mappings, each one mapping of
    /// the backend — and the table its DMA dirty log is translated with: the one record of it.
    space: Arc<Mutex<DmaSpace>>,
}

fn rw() -> DmaProt {
    DmaProt {
        read: true,
        write: true,
    }
}

fn fault(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl PassthroughDma {
    /// The DMA space of device `id` in `slot`; `p2p` false for `p2p=off`; `space` says whether
    /// it sits behind the virtual IOMMU (it then starts empty and follows the guest) and is kept
    /// in step with what the device's space holds.
    pub fn new(
        id: &str,
        slot: u8,
        p2p: bool,
        backend: Arc<dyn VfioBackend>,
        ctx: DmaContext,
        stats: Arc<VfioStats>,
        space: Arc<Mutex<DmaSpace>>,
    ) -> Self {
        Self {
            id: id.to_string(),
            slot,
            p2p,
            backend,
            ctx,
            stats,
            space,
        }
    }

    /// The table, locked: never across a backend call (the device's migration locks it too,
    /// and a device may be waiting for a DMA served here, which locks it to translate).
    fn space(&self) -> std::sync::MutexGuard<'_, DmaSpace> {
        self.space.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity DMA space: each RAM region at its guest physical addresses and, unless
    /// `p2p=off`, each PCI window (mapped without memory).
    fn identity(&self) -> Vec<DmaMapping> {
        let ram = self.ctx.mem.iter().map(|r| (r.start_addr().0, r.len()));
        let windows = self.ctx.pci_windows.iter().filter(|_| self.p2p).copied();
        ram.chain(windows)
            .map(|(gpa, len)| DmaMapping {
                iova: gpa,
                len,
                gpa,
            })
            .collect()
    }

    /// Map the identity DMA space; on a failure, what it mapped is unmapped again.
    pub fn map_identity(&self) -> Result<(), VfioError> {
        let all = self.identity();
        for (i, m) in all.iter().enumerate() {
            if let Err(e) = self.dma_map(m) {
                if let Err(undo) = self.dma_unmap(&all[..i]) {
                    log::warn!(
                        "{}: cannot undo a partial identity DMA map: {undo}",
                        self.id
                    );
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// What the device's DMA space holds now, as [`DmaSpace`] records it: the identity map
    /// while bypassing, the guest's mappings otherwise.
    fn held(&self) -> Vec<DmaMapping> {
        let mappings = {
            let space = self.space();
            (!space.is_bypass()).then(|| space.mappings())
        };
        mappings.unwrap_or_else(|| self.identity())
    }

    /// Put `m` in the device's DMA space: guest RAM (within one region) with the memfd behind
    /// it, anything else without memory.
    fn dma_map(&self, m: &DmaMapping) -> Result<(), VfioError> {
        let Some(region) = self.ram_region(m.gpa, m.len) else {
            return self
                .backend
                .dma_map(m.iova, m.len, DmaBacking::Trapped, rw());
        };
        let within = m.gpa - region.start_addr().0;
        let file = region.file_offset().ok_or_else(|| VfioError::Invalid {
            what: "DMA map",
            reason: "guest RAM is not file-backed".into(),
        })?;
        self.backend.dma_map(
            m.iova,
            m.len,
            DmaBacking::Memory {
                fd: file.file().as_fd(),
                offset: file.start() + within,
                host_addr: region.as_ptr() as u64 + within,
            },
            rw(),
        )
    }

    /// Take `mappings` out of the device's DMA space, up to the first refusal.
    fn dma_unmap(&self, mappings: &[DmaMapping]) -> Result<(), VfioError> {
        mappings
            .iter()
            .try_for_each(|m| self.backend.dma_unmap(m.iova, m.len))
    }

    /// The RAM region holding all of `len` bytes at guest physical `gpa`.
    fn ram_region(&self, gpa: u64, len: u64) -> Option<&GuestRegionMmap> {
        let end = gpa.saturating_add(len);
        self.ctx.mem.iter().find(|r| {
            let s = r.start_addr().0;
            gpa >= s && end <= s + r.len()
        })
    }

    /// The guest physical address of `len` bytes at device address `addr`.
    fn to_gpa(&self, addr: u64, len: u64) -> io::Result<u64> {
        self.space()
            .gpa(addr, len)
            .ok_or_else(|| fault("IOVA range not mapped"))
    }

    /// Route an access of `len` bytes at guest physical `gpa`: RAM, a peer passthrough device's
    /// BAR (its backend, region offset), or the MMIO bus.
    fn route(&self, gpa: u64, len: u64) -> io::Result<Target> {
        if self.ram_region(gpa, len).is_some() {
            return Ok(Target::Ram);
        }
        let windows = self.ctx.windows.read().unwrap_or_else(|e| e.into_inner());
        let w = windows
            .iter()
            .find(|w| !w.io && gpa >= w.start && gpa.saturating_add(len) <= w.start + w.len)
            .copied()
            .ok_or_else(|| fault("no RAM or device BAR at the address"))?;
        drop(windows);
        if w.slot == self.slot {
            return Err(fault("a device cannot DMA into its own BAR"));
        }
        if !self.p2p {
            return Err(fault("p2p=off: this device may not reach peers"));
        }
        let peers = self.ctx.peers.read().unwrap_or_else(|e| e.into_inner());
        match peers.iter().find(|p| p.slot == w.slot) {
            Some(p) if p.p2p_off => Err(fault("the peer is p2p=off")),
            Some(p) => Ok(Target::Peer(
                p.backend.clone(),
                w.index as u32,
                gpa - w.start,
            )),
            None => Ok(Target::Mmio),
        }
    }

    fn count<T>(&self, r: io::Result<T>) -> io::Result<T> {
        self.stats
            .dma_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = &r {
            self.stats
                .dma_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log::debug!("{}: DMA refused: {e}", self.id);
        }
        r
    }
}

/// Where an access goes.
enum Target {
    Ram,
    Peer(Arc<dyn VfioBackend>, u32, u64),
    Mmio,
}

/// One DMA access the VMM serves.
enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl PassthroughDma {
    /// Serve `access` at device address `addr`: translate, route, and read or write RAM (through
    /// guest memory, so writes are dirty-tracked), a peer's region, or the MMIO bus.
    fn serve(&self, addr: u64, access: Access<'_>) -> io::Result<()> {
        let len = match &access {
            Access::Read(d) => d.len(),
            Access::Write(d) => d.len(),
        } as u64;
        let r = (|| {
            let gpa = self.to_gpa(addr, len)?;
            let target = self.route(gpa, len)?;
            match (target, access) {
                (Target::Ram, Access::Read(d)) => self
                    .ctx
                    .mem
                    .read_slice(d, GuestAddress(gpa))
                    .map_err(io::Error::other),
                (Target::Ram, Access::Write(d)) => self
                    .ctx
                    .mem
                    .write_slice(d, GuestAddress(gpa))
                    .map_err(io::Error::other),
                (Target::Peer(b, i, off), Access::Read(d)) => {
                    b.region_read(i, off, d).map_err(io::Error::other)
                }
                (Target::Peer(b, i, off), Access::Write(d)) => {
                    b.region_write(i, off, d).map_err(io::Error::other)
                }
                (Target::Mmio, Access::Read(d)) => {
                    self.ctx.mmio.read(gpa, d).map_err(io::Error::other)
                }
                (Target::Mmio, Access::Write(d)) => {
                    self.ctx.mmio.write(gpa, d).map_err(io::Error::other)
                }
            }
        })();
        self.count(r)
    }
}

impl DmaHandler for PassthroughDma {
    fn dma_read(&self, addr: u64, data: &mut [u8]) -> io::Result<()> {
        self.serve(addr, Access::Read(data))
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.serve(addr, Access::Write(data))
    }
}

impl ExternalMappingListener for PassthroughDma {
    fn map(&self, _endpoint: u32, iova: u64, size: u64, phys: u64, _flags: u32) -> io::Result<()> {
        // Recorded first: the device may write through it as soon as it is mapped.
        self.space().map(iova, size, phys);
        let m = DmaMapping {
            iova,
            len: size,
            gpa: phys,
        };
        self.dma_map(&m).map_err(|e| {
            // The device's space does not have it: neither does the table.
            self.space().unmap(iova, size);
            io::Error::other(e)
        })
    }

    fn unmap(&self, _endpoint: u32, iova: u64, size: u64) -> io::Result<()> {
        let gone = self.space().mappings_in(iova, size);
        let unmapped = self.dma_unmap(&gone);
        // Only now can the device no longer write through it (whatever the unmap's outcome:
        // the guest's view has lost the mapping).
        self.space().unmap(iova, size);
        unmapped.map_err(io::Error::other)
    }

    fn bypass(&self, _endpoint: u32, enabled: bool) -> io::Result<()> {
        let unmapped = self.dma_unmap(&self.held());
        // The old mappings are gone from the device's space (or the device is broken, and no
        // identity map is made): the table follows, before the identity map can be used.
        self.space().set_bypass(enabled && unmapped.is_ok());
        unmapped.map_err(io::Error::other)?;
        if enabled {
            if let Err(e) = self.map_identity() {
                // None of the identity map is left in the device's space.
                self.space().set_bypass(false);
                return Err(io::Error::other(e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::vfio::{DeviceInfo, IrqInfo, RegionInfo};
    use std::sync::atomic::Ordering;
    use vmm_sys_util::eventfd::EventFd;

    /// A device's DMA space that checks, at every unmap, that the [`DmaSpace`] still translates
    /// what is being unmapped (the table may only drop a mapping the device can no longer use).
    struct Recorder {
        space: Arc<Mutex<DmaSpace>>,
        events: Mutex<Vec<String>>,
        /// A map at this IOVA is refused.
        refuse: Mutex<Option<u64>>,
    }

    impl VfioBackend for Recorder {
        fn kind(&self) -> &'static str {
            "recorder"
        }
        fn device_info(&self) -> Result<DeviceInfo, VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn region_info(&self, _: u32) -> Result<RegionInfo, VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn irq_info(&self, _: u32) -> Result<IrqInfo, VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn region_read(&self, _: u32, _: u64, _: &mut [u8]) -> Result<(), VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn region_write(&self, _: u32, _: u64, _: &[u8]) -> Result<(), VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn set_irq_eventfds(
            &self,
            _: u32,
            _: u32,
            _: &[Option<&EventFd>],
        ) -> Result<(), VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn disable_irqs(&self, _: u32) -> Result<(), VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn set_intx_unmask_eventfd(&self, _: &EventFd) -> Result<(), VfioError> {
            unreachable!("not used by the DMA space")
        }
        fn dma_map(
            &self,
            iova: u64,
            size: u64,
            b: DmaBacking<'_>,
            _: DmaProt,
        ) -> Result<(), VfioError> {
            let kind = match b {
                DmaBacking::Memory { .. } => "ram",
                DmaBacking::Trapped => "trapped",
            };
            if *self.refuse.lock().unwrap() == Some(iova) {
                self.events
                    .lock()
                    .unwrap()
                    .push(format!("refused {iova:#x}"));
                return Err(VfioError::Invalid {
                    what: "DMA map",
                    reason: "refused".into(),
                });
            }
            self.events
                .lock()
                .unwrap()
                .push(format!("map {iova:#x}+{size:#x} {kind}"));
            Ok(())
        }
        fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), VfioError> {
            let mut still = 0;
            self.space
                .lock()
                .unwrap()
                .dirty(iova, size, |_, l| still += l);
            self.events
                .lock()
                .unwrap()
                .push(format!("unmap {iova:#x}+{size:#x} translated {still:#x}"));
            Ok(())
        }
        fn reset(&self) -> Result<(), VfioError> {
            Ok(())
        }
    }

    /// The PCI window the identity map maps without memory.
    const WINDOW: u64 = 0xc000_0000;

    fn dma() -> (PassthroughDma, Arc<Recorder>, Arc<Mutex<DmaSpace>>) {
        let (mem, _file) = crate::memory::create_guest_memory(16 << 20).unwrap();
        let space = Arc::new(Mutex::new(DmaSpace::translated(
            &[(0, 16 << 20)],
            (0, 1 << 48),
        )));
        let rec = Arc::new(Recorder {
            space: space.clone(),
            events: Mutex::new(Vec::new()),
            refuse: Mutex::new(None),
        });
        let ctx = DmaContext {
            mem,
            mmio: Arc::new(Bus::new()),
            windows: Default::default(),
            pci_windows: vec![(WINDOW, 0x1000_0000)],
            peers: Default::default(),
        };
        let d = PassthroughDma::new(
            "dev0",
            3,
            true,
            rec.clone(),
            ctx,
            Arc::new(VfioStats::default()),
            space.clone(),
        );
        (d, rec, space)
    }

    fn dirty(space: &Mutex<DmaSpace>, iova: u64, len: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        space
            .lock()
            .unwrap()
            .dirty(iova, len, |a, l| v.push((a, l)));
        v
    }

    #[test]
    fn the_dma_space_follows_map_unmap_and_bypass_in_a_safe_order() {
        let (d, rec, space) = dma();
        space.lock().unwrap().start_log(&[(0, 1 << 48)]);
        d.map(0x18, 0x10_0000_0000, 0x2000, 0x4000, 3).unwrap();
        d.map(0x18, 0x20_0000_0000, 0x1000, 0xc000_0000, 3).unwrap();
        assert_eq!(dirty(&space, 0x10_0000_1000, 0x1000), [(0x5000, 0x1000)]);
        assert!(dirty(&space, 0x20_0000_0000, 0x1000).is_empty(), "not RAM");
        d.unmap(0x18, 0x10_0000_0000, 0x2000).unwrap();
        assert!(dirty(&space, 0x10_0000_0000, 0x2000).is_empty());
        assert_eq!(space.lock().unwrap().take_pending(), [(0x4000, 0x2000)]);
        // Bypass: IOVA = GPA; leaving it leaves all RAM pending.
        d.bypass(0x18, true).unwrap();
        assert_eq!(dirty(&space, 0x7000, 0x1000), [(0x7000, 0x1000)]);
        d.bypass(0x18, false).unwrap();
        assert_eq!(space.lock().unwrap().take_pending(), [(0, 16 << 20)]);
        let events = rec.events.lock().unwrap().clone();
        assert_eq!(events[0], "map 0x1000000000+0x2000 ram");
        assert_eq!(events[1], "map 0x2000000000+0x1000 trapped");
        // The table still had the mapping while the device's space dropped it.
        assert_eq!(events[2], "unmap 0x1000000000+0x2000 translated 0x2000");
        assert!(
            events.iter().any(|e| e == "map 0x0+0x1000000 ram"),
            "{events:?}"
        );
    }

    fn events(rec: &Recorder) -> Vec<String> {
        std::mem::take(&mut *rec.events.lock().unwrap())
    }

    #[test]
    fn dma_served_here_is_translated_by_the_dma_space() {
        let (d, _rec, _space) = dma();
        let mut got = [0u8; 4];
        assert!(d.dma_read(0x5000, &mut got).is_err(), "nothing mapped yet");
        d.map(0x18, 0x10_0000_0000, 0x2000, 0x4000, 3).unwrap();
        d.dma_write(0x10_0000_1000, &[1, 2, 3, 4]).unwrap();
        d.ctx
            .mem
            .read_slice(&mut got, GuestAddress(0x5000))
            .unwrap();
        assert_eq!(got, [1, 2, 3, 4], "written at the GPA the IOVA maps to");
        assert!(
            d.dma_write(0x10_0000_1ffe, &[0; 4]).is_err(),
            "runs past its mapping"
        );
        assert!(d.dma_read(0x5000, &mut got).is_err(), "a GPA is no IOVA");
        d.unmap(0x18, 0x10_0000_0000, 0x2000).unwrap();
        assert!(d.dma_read(0x10_0000_1000, &mut got).is_err(), "unmapped");
        // Bypassing: IOVA = GPA.
        d.bypass(0x18, true).unwrap();
        got = [0; 4];
        d.dma_read(0x5000, &mut got).unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
        d.bypass(0x18, false).unwrap();
        assert!(d.dma_read(0x5000, &mut got).is_err());
        let requests = d.stats.dma_requests.load(Ordering::Relaxed);
        let errors = d.stats.dma_errors.load(Ordering::Relaxed);
        assert_eq!((requests, errors), (7, 5));
    }

    #[test]
    fn a_refused_map_is_in_neither_the_device_space_nor_the_table() {
        let (d, rec, space) = dma();
        *rec.refuse.lock().unwrap() = Some(0x10_0000_0000);
        assert!(d.map(0x18, 0x10_0000_0000, 0x1000, 0x4000, 3).is_err());
        assert!(space.lock().unwrap().mappings().is_empty());
        // The guest still unmaps it: nothing to undo.
        d.unmap(0x18, 0x10_0000_0000, 0x1000).unwrap();
        assert_eq!(events(&rec), ["refused 0x1000000000"]);
        // An identity map refused half-way is undone, and the table does not say bypass.
        *rec.refuse.lock().unwrap() = Some(WINDOW);
        assert!(d.bypass(0x18, true).is_err());
        assert!(!space.lock().unwrap().is_bypass());
        assert_eq!(
            events(&rec),
            [
                "map 0x0+0x1000000 ram",
                "refused 0xc0000000",
                "unmap 0x0+0x1000000 translated 0x1000000",
            ]
        );
        d.bypass(0x18, false).unwrap();
        assert!(events(&rec).is_empty(), "nothing left to undo");
        *rec.refuse.lock().unwrap() = None;
        d.bypass(0x18, true).unwrap();
        d.bypass(0x18, false).unwrap();
        assert_eq!(
            events(&rec),
            [
                "map 0x0+0x1000000 ram",
                "map 0xc0000000+0x10000000 trapped",
                "unmap 0x0+0x1000000 translated 0x1000000",
                "unmap 0xc0000000+0x10000000 translated 0x0",
            ]
        );
    }
}
