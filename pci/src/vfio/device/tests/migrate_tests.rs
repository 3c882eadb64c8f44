//! The passthrough function's migration driver against a fake device that takes only direct
//! arcs of the kernel's FSM (it refuses anything else, so a multi-step request would fail), and
//! records every arc.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use migration::device_fsm::{is_direct_arc, DeviceMigState as S, MigrationCaps};
use migration::{DirtyBitmap, Migratable, Pausable, Snapshottable};

use super::*;
use crate::vfio::dma_space::DmaSpace;
use crate::vfio::mig_backend::{DmaDirtyReport, IommuDirtyLog, MigrationBackend};

/// A device's migration side: its state, caps, data, and faults to inject.
#[derive(Default)]
pub(super) struct FakeMigration {
    caps: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    state: u32,
    arcs: Vec<(S, S)>,
    /// Data STOP_COPY produces, and what is left of it.
    saved: Vec<u8>,
    left: Vec<u8>,
    /// Pre-copy data and what is left of it.
    precopy_left: Vec<u8>,
    written: Vec<u8>,
    fail_arc: Option<(S, S)>,
    logging: bool,
    dirty: Vec<u64>,
    /// The ranges of every DMA_LOGGING_START that succeeded.
    log_ranges: Vec<Vec<(u64, u64)>>,
    /// A START with a range longer than this is refused (EINVAL); `None`: no DMA logging.
    log_max: Option<u64>,
    /// Hostile answers: START picks this page size, REPORT sets every bit of an oversized bitmap.
    hostile: Option<u64>,
}

impl FakeMigration {
    fn new(caps: u64, saved: &[u8], precopy: &[u8]) -> Self {
        FakeMigration {
            caps,
            inner: Mutex::new(Inner {
                state: S::Running.as_u32(),
                saved: saved.to_vec(),
                precopy_left: precopy.to_vec(),
                log_max: Some(u64::MAX),
                ..Default::default()
            }),
        }
    }

    pub(super) fn reset(&self) {
        self.inner.lock().unwrap().state = S::Running.as_u32();
    }

    fn arcs(&self) -> Vec<(S, S)> {
        std::mem::take(&mut self.inner.lock().unwrap().arcs)
    }

    fn state(&self) -> S {
        S::from_u32(self.inner.lock().unwrap().state).unwrap()
    }
}

fn refused(what: &'static str) -> VfioError {
    VfioError::Refused {
        what,
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

impl MigrationBackend for FakeMigration {
    fn migration_flags(&self) -> Result<Option<u64>, VfioError> {
        Ok(Some(self.caps))
    }
    fn set_mig_state(&self, state: u32) -> Result<(), VfioError> {
        let mut g = self.inner.lock().unwrap();
        let from = S::from_u32(g.state).unwrap();
        let to = S::from_u32(state).ok_or_else(|| refused("state"))?;
        if !is_direct_arc(MigrationCaps::from_bits(self.caps), from, to) {
            return Err(refused("not a direct arc"));
        }
        if g.fail_arc == Some((from, to)) {
            return Err(refused("injected"));
        }
        if to == S::StopCopy {
            g.left = g.saved.clone();
        }
        g.state = state;
        g.arcs.push((from, to));
        Ok(())
    }
    fn mig_state(&self) -> Result<u32, VfioError> {
        Ok(self.inner.lock().unwrap().state)
    }
    fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, VfioError> {
        let mut g = self.inner.lock().unwrap();
        let from = match S::from_u32(g.state) {
            Some(S::StopCopy) => &mut g.left,
            Some(S::PreCopy | S::PreCopyP2p) => &mut g.precopy_left,
            _ => return Err(refused("not saving")),
        };
        let n = max.min(from.len());
        Ok(from.drain(..n).collect())
    }
    fn mig_data_write(&self, data: &[u8]) -> Result<(), VfioError> {
        let mut g = self.inner.lock().unwrap();
        if g.state != S::Resuming.as_u32() {
            return Err(refused("not resuming"));
        }
        g.written.extend_from_slice(data);
        Ok(())
    }
    fn mig_data_size(&self) -> Result<Option<u64>, VfioError> {
        Ok(Some(self.inner.lock().unwrap().saved.len() as u64))
    }
    fn dma_logging_start(
        &self,
        page: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Option<u64>, VfioError> {
        let mut g = self.inner.lock().unwrap();
        match g.log_max {
            None => return Ok(None),
            Some(max) if ranges.iter().any(|r| r.1 > max) => return Err(refused("too long")),
            Some(_) => {}
        }
        g.logging = true;
        g.log_ranges.push(ranges.to_vec());
        Ok(Some(g.hostile.unwrap_or(page)))
    }
    fn dma_logging_stop(&self) -> Result<(), VfioError> {
        self.inner.lock().unwrap().logging = false;
        Ok(())
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        let mut g = self.inner.lock().unwrap();
        let words = length.div_ceil(page).div_ceil(64) as usize;
        if g.hostile.is_some() {
            return Ok(DmaDirtyReport {
                iova,
                length,
                page_size: page,
                bitmap: vec![u64::MAX; words + 100],
            });
        }
        Ok(take_report(&mut g.dirty, iova, length, page))
    }
}

/// The report of `dirty` (IOVAs) over `length` bytes at `iova`, clearing what it reports,
/// only that.
fn take_report(dirty: &mut Vec<u64>, iova: u64, length: u64, page: u64) -> DmaDirtyReport {
    let mut bitmap = vec![0u64; length.div_ceil(page).div_ceil(64) as usize];
    dirty.retain(|&a| {
        let inside = a >= iova && a < iova + length;
        if inside {
            let n = (a - iova) / page;
            bitmap[(n / 64) as usize] |= 1 << (n % 64);
        }
        !inside
    });
    DmaDirtyReport {
        iova,
        length,
        page_size: page,
        bitmap,
    }
}

/// The IOMMU's dirty tracking of a device: records enable calls and reads, reports `dirty`.
#[derive(Debug, Default)]
pub(super) struct FakeIommuLog {
    inner: Mutex<IommuInner>,
}

#[derive(Debug, Default)]
struct IommuInner {
    enables: Vec<bool>,
    dirty: Vec<u64>,
    reads: Vec<(u64, u64, u64)>,
    /// Every read fails (EIO).
    fail_read: bool,
    /// Enabling fails (EOPNOTSUPP).
    fail_enable: bool,
    /// The first read of this IOVA unmaps it from the space first, then fails (ENOENT): an
    /// unmap racing the sync.
    unmap_on_read: Option<(Arc<Mutex<DmaSpace>>, u64, u64)>,
}

impl IommuDirtyLog for FakeIommuLog {
    fn set_enabled(&self, on: bool) -> Result<(), VfioError> {
        let mut g = self.inner.lock().unwrap();
        g.enables.push(on);
        if on && g.fail_enable {
            return Err(VfioError::Refused {
                what: "IOMMU_HWPT_SET_DIRTY_TRACKING",
                source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        Ok(())
    }
    fn read_and_clear(
        &self,
        iova: u64,
        length: u64,
        page: u64,
    ) -> Result<DmaDirtyReport, VfioError> {
        let mut g = self.inner.lock().unwrap();
        g.reads.push((iova, length, page));
        if g.fail_read {
            return Err(VfioError::Refused {
                what: "IOMMU_HWPT_GET_DIRTY_BITMAP",
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if let Some((space, at, len)) = g.unmap_on_read.take_if(|u| u.1 == iova) {
            space.lock().unwrap().unmap(at, len);
            return Err(VfioError::Refused {
                what: "IOMMU_HWPT_GET_DIRTY_BITMAP",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        Ok(take_report(&mut g.dirty, iova, length, page))
    }
}

const ALL: u64 = 7;
const NO_PRECOPY: u64 = 3;

fn mig_device(caps: u64, saved: &[u8], precopy: &[u8]) -> (Arc<FakeBackend>, VfioPciDevice) {
    let backend = Arc::new(FakeBackend {
        mig: Some(FakeMigration::new(caps, saved, precopy)),
        ..FakeBackend::new()
    });
    let im = Arc::new(FakeInterruptManager::default());
    let dev = VfioPciDevice::new("dev0", backend.clone(), im, Some((1, 17))).unwrap();
    (backend, dev)
}

fn fake(b: &FakeBackend) -> &FakeMigration {
    b.mig.as_ref().unwrap()
}

#[test]
fn source_switchover_takes_the_grace_state_then_stop_copy_and_resumes_by_legal_arcs() {
    let saved: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    let (b, mut dev) = mig_device(NO_PRECOPY, &saved, &[]);
    dev.set_dma_ranges(RAM.to_vec());
    dev.start_dirty_log().unwrap();
    assert!(
        fake(&b).arcs().is_empty(),
        "no PRE_COPY without the capability"
    );
    dev.quiesce().unwrap();
    assert_eq!(fake(&b).arcs(), [(S::Running, S::RunningP2p)]);
    dev.pause().unwrap();
    assert_eq!(fake(&b).arcs(), [(S::RunningP2p, S::Stop)]);
    let section = dev.snapshot().unwrap();
    assert_eq!(
        fake(&b).arcs(),
        [(S::Stop, S::StopCopy), (S::StopCopy, S::Stop)]
    );
    // A failed migration: back to RUNNING through the grace state.
    dev.resume_quiesced().unwrap();
    dev.resume().unwrap();
    assert_eq!(
        fake(&b).arcs(),
        [(S::Stop, S::RunningP2p), (S::RunningP2p, S::Running)]
    );
    dev.stop_dirty_log().unwrap();

    // The target: a fresh device takes the whole data through RESUMING.
    let (tb, mut target) = mig_device(NO_PRECOPY, &[], &[]);
    target.quiesce().unwrap();
    target.pause().unwrap();
    target.restore(&section).unwrap();
    target.resume_quiesced().unwrap();
    target.resume().unwrap();
    assert_eq!(
        fake(&tb).arcs(),
        [
            (S::Running, S::RunningP2p),
            (S::RunningP2p, S::Stop),
            (S::Stop, S::Resuming),
            (S::Resuming, S::Stop),
            (S::Stop, S::RunningP2p),
            (S::RunningP2p, S::Running)
        ]
    );
    assert!(
        fake(&tb).inner.lock().unwrap().written == saved,
        "the data arrived whole"
    );
}

#[test]
fn precopy_streams_while_running_and_the_pause_keeps_the_data_session() {
    let precopy: Vec<u8> = vec![7; (1 << 20) + 10];
    let (b, mut dev) = mig_device(ALL, b"rest", &precopy);
    dev.set_dma_ranges(RAM.to_vec());
    dev.start_dirty_log().unwrap();
    assert_eq!(fake(&b).arcs(), [(S::Running, S::PreCopy)]);
    assert!(dev.precopy_pending() > 0);
    let mut got = Vec::new();
    while let Some(c) = dev.precopy_read(1 << 20).unwrap() {
        got.extend(c);
    }
    assert_eq!(got, precopy);
    assert_eq!(
        dev.precopy_pending(),
        0,
        "a short read: nothing more for now"
    );
    // DMA logging: the device's writes are merged at their addresses.
    fake(&b).inner.lock().unwrap().dirty = vec![0x3000, 0x5000];
    assert_eq!(synced(&mut dev), [0x3000, 0x5000]);
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    assert_eq!(
        fake(&b).arcs(),
        [(S::PreCopy, S::PreCopyP2p), (S::PreCopyP2p, S::StopCopy)],
        "PRE_COPY_P2P goes straight on to STOP_COPY"
    );
    dev.snapshot().unwrap();
    assert_eq!(fake(&b).arcs(), [(S::StopCopy, S::Stop)]);
    // pre_copy=off: no PRE_COPY even though the device has it.
    let (b, mut dev) = mig_device(ALL, b"rest", &precopy);
    dev.set_migration_options(VfioMigrationOptions {
        p2p_off: false,
        pre_copy_off: true,
    });
    dev.start_dirty_log().unwrap();
    assert!(fake(&b).arcs().is_empty());
    assert_eq!(dev.precopy_read(1 << 20).unwrap(), None);
}

#[test]
fn a_refused_arc_fails_and_resume_recovers_by_arcs_or_a_reset() {
    let (b, mut dev) = mig_device(NO_PRECOPY, b"state", &[]);
    fake(&b).inner.lock().unwrap().fail_arc = Some((S::RunningP2p, S::Stop));
    dev.quiesce().unwrap();
    let e = dev.pause().unwrap_err().to_string();
    assert!(e.contains("RUNNING_P2P -> STOP"), "{e}");
    assert_eq!(
        dev.migration_state(),
        S::RunningP2p,
        "the device stayed where it was"
    );
    dev.resume().unwrap();
    assert_eq!(fake(&b).state(), S::Running);
    assert_eq!(b.resets.load(Ordering::SeqCst), 0, "legal arcs were enough");
    // A device that cannot go back by arcs is reset.
    fake(&b).inner.lock().unwrap().fail_arc = Some((S::RunningP2p, S::Running));
    dev.quiesce().unwrap();
    dev.resume().unwrap();
    assert_eq!(b.resets.load(Ordering::SeqCst), 1);
    assert_eq!(dev.migration_state(), S::Running);
}

#[test]
fn bad_sections_change_nothing() {
    let (_, mut dev) = mig_device(NO_PRECOPY, b"state", &[]);
    let good = {
        dev.pause().unwrap();
        let s = dev.snapshot().unwrap();
        dev.resume().unwrap();
        s
    };
    let (tb, mut target) = mig_device(NO_PRECOPY, &[], &[]);
    let mut bad = good.clone();
    bad.data.truncate(bad.data.len() - 3);
    assert!(target.restore(&bad).is_err());
    assert!(
        fake(&tb).arcs().is_empty(),
        "a truncated section never reached the device"
    );
    target.restore(&good).unwrap();
    // A device without migration refuses snapshots by name.
    let (_, _, mut plain) = super::device();
    let e = plain.snapshot().unwrap_err().to_string();
    assert!(e.contains("VFIO_DEVICE_FEATURE_MIGRATION"), "{e}");
    assert!(plain.passthrough_migration().unwrap().caps == MigrationCaps::NONE);
}

#[test]
fn stop_copy_data_read_in_pieces_leaves_the_section_small() {
    let saved: Vec<u8> = (0..=255u8).cycle().take((5 << 20) + 7).collect();
    let (b, mut dev) = mig_device(NO_PRECOPY, &saved, &[]);
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    let mut got = Vec::new();
    while let Some(c) = dev.stop_copy_read(1 << 20).unwrap() {
        assert!(c.len() <= 1 << 20);
        got.extend(c);
    }
    assert_eq!(got, saved);
    let section = dev.snapshot().unwrap();
    assert!(
        section.data.len() < 4096,
        "the data is not in the section again"
    );
    assert_eq!(
        fake(&b).arcs(),
        [
            (S::Running, S::RunningP2p),
            (S::RunningP2p, S::Stop),
            (S::Stop, S::StopCopy),
            (S::StopCopy, S::Stop)
        ]
    );
    // The target: the pieces through precopy_write, then the section.
    let (tb, mut target) = mig_device(NO_PRECOPY, &[], &[]);
    target.quiesce().unwrap();
    target.pause().unwrap();
    for piece in got.chunks(1 << 20) {
        target.precopy_write(piece).unwrap();
    }
    target.restore(&section).unwrap();
    assert!(fake(&tb).inner.lock().unwrap().written == saved);
    // A failed migration after the drain: the next snapshot reads the data again.
    dev.resume_quiesced().unwrap();
    dev.resume().unwrap();
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    assert!(dev.snapshot().unwrap().data.len() > saved.len());
}

/// The guest RAM of the dirty-log tests' VMs.
const RAM: [(u64, u64); 1] = [(0, 1 << 20)];
/// Two mappings behind the vIOMMU: IOVA 0x10_0000_0000 (two pages) → GPA 0x4000, IOVA
/// 0x20_0000_0000 (one page) → GPA 0x9000.
const MAPS: [(u64, u64, u64); 2] = [
    (0x10_0000_0000, 0x2000, 0x4000),
    (0x20_0000_0000, 0x1000, 0x9000),
];

/// `dev`'s DMA space: behind a vIOMMU over all IOVAs, with `maps` (`(iova, len, gpa)`)
/// mapped; shared with the test, which maps and unmaps as the VMM's listener would.
fn translated(dev: &mut VfioPciDevice, maps: &[(u64, u64, u64)]) -> Arc<Mutex<DmaSpace>> {
    let mut space = DmaSpace::translated(&RAM, (0, 1 << 48));
    for &(iova, len, gpa) in maps {
        space.map(iova, len, gpa);
    }
    let space = Arc::new(Mutex::new(space));
    dev.set_dma_space(space.clone());
    space
}

/// One sync of `dev`'s DMA log into a bitmap of [`RAM`]: the pages it marked.
fn synced(dev: &mut VfioPciDevice) -> Vec<u64> {
    let mut bitmap = DirtyBitmap::new(&RAM).unwrap();
    dev.sync_dirty_log(&mut bitmap).unwrap();
    bitmap.pages()
}

/// A device behind the vIOMMU: its DMA log covers the vIOMMU's input range, dirty IOVAs are
/// marked at the guest-physical pages their mappings reach, a mapping removed during the
/// migration leaves its pages dirty, and nothing is marked wholesale.
#[test]
fn behind_the_viommu_the_log_is_translated_through_the_mappings() {
    let (b, mut dev) = mig_device(NO_PRECOPY, b"s", &[]);
    let space = translated(&mut dev, &MAPS);
    dev.start_dirty_log().unwrap();
    assert_eq!(
        fake(&b).inner.lock().unwrap().log_ranges,
        [vec![(0, 1 << 48)]]
    );
    // A mapping added while logging is covered by the log.
    space.lock().unwrap().map(0x30_0000_0000, 0x1000, 0xa000);
    fake(&b).inner.lock().unwrap().dirty = vec![0x10_0000_1000, 0x30_0000_0000, 0x4000];
    // 0x4000 as an IOVA is mapped to nothing: a log read as guest-physical would mark it.
    assert_eq!(synced(&mut dev), [0x5000, 0xa000]);
    // Removed while logging: its page is dirty at the next sync, unreported.
    space.lock().unwrap().unmap(0x20_0000_0000, 0x1000);
    assert_eq!(synced(&mut dev), [0x9000]);
    // Stopped: only what the device wrote, never all of RAM.
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    fake(&b).inner.lock().unwrap().dirty = vec![0x10_0000_0000];
    assert_eq!(synced(&mut dev), [0x4000]);
    dev.stop_dirty_log().unwrap();
    assert!(!fake(&b).inner.lock().unwrap().logging);
}

/// A device that refuses to log the vIOMMU's input range logs the ranges mapped at the start;
/// what is mapped later is marked whole once the device is stopped. A device without DMA
/// logging has all RAM marked once stopped.
#[test]
fn a_partial_log_marks_later_mappings_whole_and_no_log_marks_everything() {
    let (b, mut dev) = mig_device(NO_PRECOPY, b"s", &[]);
    fake(&b).inner.lock().unwrap().log_max = Some(1 << 30);
    let space = translated(&mut dev, &MAPS[..1]);
    dev.start_dirty_log().unwrap();
    assert_eq!(
        fake(&b).inner.lock().unwrap().log_ranges,
        [vec![(0x10_0000_0000, 0x2000)]]
    );
    space.lock().unwrap().map(0x20_0000_0000, 0x3000, 0x10000);
    assert!(
        synced(&mut dev).is_empty(),
        "running: nothing marked wholesale yet"
    );
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    assert_eq!(synced(&mut dev), [0x10000, 0x11000, 0x12000]);
    dev.stop_dirty_log().unwrap();
    dev.resume_quiesced().unwrap();
    dev.resume().unwrap();

    let (b, mut dev) = mig_device(NO_PRECOPY, b"s", &[]);
    fake(&b).inner.lock().unwrap().log_max = None;
    translated(&mut dev, &[]);
    dev.start_dirty_log().unwrap();
    assert!(synced(&mut dev).is_empty());
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    assert_eq!(synced(&mut dev).len(), 256, "all RAM");
}

/// A device answering with an absurd page size and all-ones, oversized bitmaps has only the
/// guest RAM its mappings reach marked, and nothing panics.
#[test]
fn hostile_log_answers_mark_only_what_the_mappings_reach() {
    for page in [1u64 << 63, 1 << 12, 1 << 40] {
        let (b, mut dev) = mig_device(NO_PRECOPY, b"s", &[]);
        fake(&b).inner.lock().unwrap().hostile = Some(page);
        translated(&mut dev, &[MAPS[0], (0x20_0000_0000, 0x1000, 0xfee0_0000)]);
        dev.start_dirty_log().unwrap();
        assert_eq!(synced(&mut dev), [0x4000, 0x5000], "page size {page:#x}");
    }
}

/// The set-up of the IOMMU dirty-log tests: a device with the IOMMU's dirty tracking (when
/// `iommu`) and DMA logging of its own up to `log_max` bytes a range (`None`: none); its DMA
/// space is behind the vIOMMU with `maps` mapped, or identity over [`RAM`] for `None`.
fn iommu_device(
    iommu: bool,
    log_max: Option<u64>,
    maps: Option<&[(u64, u64, u64)]>,
) -> (
    Arc<FakeBackend>,
    Arc<FakeIommuLog>,
    VfioPciDevice,
    Arc<Mutex<DmaSpace>>,
) {
    let log = Arc::new(FakeIommuLog::default());
    let mig = FakeMigration::new(NO_PRECOPY, b"s", &[]);
    mig.inner.lock().unwrap().log_max = log_max;
    let backend = Arc::new(FakeBackend {
        mig: Some(mig),
        iommu: iommu.then(|| log.clone()),
        ..FakeBackend::new()
    });
    let im = Arc::new(FakeInterruptManager::default());
    let mut dev = VfioPciDevice::new("dev0", backend.clone(), im, Some((1, 17))).unwrap();
    let space = match maps {
        Some(maps) => translated(&mut dev, maps),
        None => {
            let space = Arc::new(Mutex::new(DmaSpace::identity(&RAM)));
            dev.set_dma_space(space.clone());
            space
        }
    };
    (backend, log, dev, space)
}

const IOMMU: &str = "the IOMMU's dirty tracking";
const NONE: &str = "none (everything it reaches)";

/// A device without DMA logging whose backend has the IOMMU's dirty tracking: it is enabled
/// at the start, read over each mapped range (never joined across holes) at 4 KiB, its pages
/// come out at the guest-physical pages the mappings reach, a mapping removed meanwhile is
/// dirty, nothing is marked wholesale after the stop, and it is disabled at the end.
#[test]
fn without_dma_logging_the_iommu_log_is_translated_through_the_mappings() {
    let (_b, log, mut dev, space) = iommu_device(true, None, Some(&MAPS));
    assert_eq!(dev.dirty_log_source(), "off");
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.dirty_log_source(), IOMMU);
    assert_eq!(log.inner.lock().unwrap().enables, [true]);
    // Mapped while logging: the IOMMU covers every IOVA.
    space.lock().unwrap().map(0x30_0000_0000, 0x1000, 0xa000);
    log.inner.lock().unwrap().dirty = vec![0x10_0000_1000, 0x30_0000_0000, 0x4000];
    assert_eq!(synced(&mut dev), [0x5000, 0xa000]);
    assert_eq!(
        std::mem::take(&mut log.inner.lock().unwrap().reads),
        [
            (0x10_0000_0000, 0x2000, 4096),
            (0x20_0000_0000, 0x1000, 4096),
            (0x30_0000_0000, 0x1000, 4096)
        ]
    );
    space.lock().unwrap().unmap(0x20_0000_0000, 0x1000);
    assert_eq!(synced(&mut dev), [0x9000]);
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    log.inner.lock().unwrap().dirty = vec![0x10_0000_0000];
    assert_eq!(synced(&mut dev), [0x4000], "only what the IOMMU saw");
    dev.stop_dirty_log().unwrap();
    assert_eq!(log.inner.lock().unwrap().enables, [true, false]);
    assert_eq!(dev.dirty_log_source(), "off");
}

/// The device's own DMA log comes first; a device that refuses it has the IOMMU's; only a
/// device with neither gets everything marked (and the warning).
#[test]
fn the_source_of_dirty_pages_is_the_device_then_the_iommu_then_everything() {
    let cases = [
        (true, Some(u64::MAX), "the device's DMA log"),
        (true, Some(0x1000), IOMMU),
        (true, None, IOMMU),
        (false, None, NONE),
    ];
    for (iommu, log_max, source) in cases {
        let (b, log, mut dev, _) = iommu_device(iommu, log_max, None);
        dev.start_dirty_log().unwrap();
        assert_eq!(dev.dirty_log_source(), source, "{iommu} {log_max:?}");
        let iommu_on = source == IOMMU;
        assert_eq!(
            log.inner.lock().unwrap().enables,
            [iommu_on][..usize::from(iommu_on)]
        );
        dev.quiesce().unwrap();
        dev.pause().unwrap();
        log.inner.lock().unwrap().dirty = vec![0x3000];
        fake(&b).inner.lock().unwrap().dirty = vec![0x3000];
        let expect: Vec<u64> = if source == NONE {
            (0..256).map(|p| p << 12).collect()
        } else {
            vec![0x3000]
        };
        assert_eq!(synced(&mut dev), expect, "{source}");
        dev.stop_dirty_log().unwrap();
    }
    // A device refusing its log with no IOMMU log fails the start, as before.
    let (_b, _log, mut dev, _) = iommu_device(false, Some(0x1000), None);
    assert!(dev.start_dirty_log().is_err());
}

/// A failing IOMMU read fails the sync with the device named; a range unmapped between the
/// listing and its read is skipped (its pages are pending dirty from the unmap).
#[test]
fn a_failed_iommu_read_fails_the_sync_unless_the_range_went_away() {
    let (_b, log, mut dev, space) = iommu_device(true, None, Some(&MAPS));
    dev.start_dirty_log().unwrap();
    log.inner.lock().unwrap().unmap_on_read = Some((space.clone(), 0x20_0000_0000, 0x1000));
    log.inner.lock().unwrap().dirty = vec![0x10_0000_0000];
    assert_eq!(synced(&mut dev), [0x4000, 0x9000]);
    log.inner.lock().unwrap().fail_read = true;
    let mut bitmap = DirtyBitmap::new(&RAM).unwrap();
    let e = dev.sync_dirty_log(&mut bitmap).unwrap_err().to_string();
    assert!(
        e.contains("dev0") && e.contains("IOMMU_HWPT_GET_DIRTY_BITMAP"),
        "{e}"
    );
    dev.stop_dirty_log().unwrap();
    assert_eq!(log.inner.lock().unwrap().enables, [true, false]);
}

/// An IOMMU that refuses to start tracking leaves the device with everything marked once it
/// is stopped (never a failed migration, never pages missed); nothing is disabled at the end.
#[test]
fn an_iommu_log_that_cannot_start_falls_back_to_everything() {
    let (_b, log, mut dev, _) = iommu_device(true, None, None);
    log.inner.lock().unwrap().fail_enable = true;
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.dirty_log_source(), NONE);
    dev.quiesce().unwrap();
    dev.pause().unwrap();
    assert_eq!(synced(&mut dev).len(), 256, "all RAM");
    assert!(log.inner.lock().unwrap().reads.is_empty());
    dev.stop_dirty_log().unwrap();
    assert_eq!(log.inner.lock().unwrap().enables, [true]);
}
