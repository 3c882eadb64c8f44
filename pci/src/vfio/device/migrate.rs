//! Migration of a passthrough function: the VFIO v2 state machine driven through
//! [`Pausable`]/[`Snapshottable`]/[`Migratable`], so the registry's ordering — every device
//! quiesced (RUNNING_P2P) before any is stopped, and the mirror on resume — applies to it like to
//! every other component.
//!
//! Source: `start_dirty_log` starts the device's DMA logging and PRE_COPY; `precopy_read` streams
//! its pre-copy data; `quiesce` → RUNNING_P2P / PRE_COPY_P2P; `pause` → STOP (or STOP_COPY from a
//! pre-copy state, so the data session goes on); `snapshot` → STOP_COPY, drains the data, → STOP.
//! Target: `precopy_write` / `restore` → RESUMING, write the data, → STOP; `resume_quiesced` →
//! RUNNING_P2P; `resume` → RUNNING. Every move is a walk of single direct arcs
//! ([`migration::device_fsm::device_arcs`]). A failed resume falls back to a device reset.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use migration::device_fsm::{device_arcs, DeviceMigState, MigrationCaps, PassthroughMigInfo};
use migration::{DirtyBitmap, Migratable, Pausable, Snapshottable, StateError, StateSection};

use devices::legacy::{StateReader, StateWriter};

use super::VfioPciDevice;
use crate::vfio::dma_space::{DmaSpace, MAX_REPORT_RANGES, MAX_START_RANGES};
use crate::vfio::mig_backend::{DmaDirtyReport, IommuDirtyLog, MigrationBackend};
use crate::vfio::VfioError;

/// Version of a passthrough function's state section.
const VFIO_STATE_VERSION: u16 = 1;
/// Largest read of migration data at a time.
const READ_CHUNK: usize = 1 << 20;
/// Largest device data accepted in one section (the stream's own limit is lower).
const MAX_DEVICE_DATA: usize = 1 << 31;
/// Page size asked for DMA logging.
const LOG_PAGE: u64 = 4096;

/// Per-device migration options from the VM configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VfioMigrationOptions {
    /// `p2p=off`: the device's DMA space holds guest RAM only (no peer BARs).
    pub p2p_off: bool,
    /// `pre_copy=off`: never use the device's PRE_COPY, go straight to STOP_COPY.
    pub pre_copy_off: bool,
}

/// How the pages the device writes by DMA are found during a migration.
#[derive(Debug, Clone)]
enum DmaLog {
    /// Not migrating.
    Off,
    /// The device's DMA logging, at this page size.
    Device(u64),
    /// The IOMMU's dirty tracking (a device without DMA logging, opened with it), at
    /// [`LOG_PAGE`].
    Iommu(Arc<dyn IommuDirtyLog>),
    /// No logging: every page the device can reach is dirty once it is stopped.
    Everything,
}

impl DmaLog {
    /// The source of dirty pages, for logs and tests.
    fn source(&self) -> &'static str {
        match self {
            DmaLog::Off => "off",
            DmaLog::Device(_) => "the device's DMA log",
            DmaLog::Iommu(_) => "the IOMMU's dirty tracking",
            DmaLog::Everything => "none (everything it reaches)",
        }
    }
}

/// The migration side of a passthrough function.
#[derive(Debug)]
pub(super) struct DeviceMigration {
    caps: MigrationCaps,
    state: DeviceMigState,
    options: VfioMigrationOptions,
    /// What the device's DMA addresses reach (shared with the VMM's mapping listener behind
    /// the vIOMMU); `None` when nobody said.
    dma: Option<Arc<Mutex<DmaSpace>>>,
    log: DmaLog,
    /// The last pre-copy read was full: there may be more.
    precopy_more: bool,
    /// The STOP_COPY data was read out through `stop_copy_read` (the snapshot carries none).
    drained: bool,
}

impl DeviceMigration {
    /// Ask the backend what the device supports (a device that cannot say cannot migrate).
    pub(super) fn probe(id: &str, backend: Option<&dyn MigrationBackend>) -> Self {
        let caps = match backend.map(|m| m.migration_flags()) {
            Some(Ok(Some(bits))) => MigrationCaps::from_bits(bits),
            Some(Err(e)) => {
                warn!("{id}: cannot read the device's migration support: {e}");
                MigrationCaps::NONE
            }
            _ => MigrationCaps::NONE,
        };
        let state = match backend.filter(|_| caps.migratable()).map(|m| m.mig_state()) {
            Some(Ok(s)) => DeviceMigState::from_u32(s).unwrap_or(DeviceMigState::Error),
            _ => DeviceMigState::Running,
        };
        if caps.migratable() {
            info!("{id}: migration {caps}, state {state}");
        }
        DeviceMigration {
            caps,
            state,
            options: VfioMigrationOptions::default(),
            dma: None,
            log: DmaLog::Off,
            precopy_more: false,
            drained: false,
        }
    }

    fn migratable(&self) -> bool {
        self.caps.migratable()
    }

    fn in_precopy(&self) -> bool {
        matches!(
            self.state,
            DeviceMigState::PreCopy | DeviceMigState::PreCopyP2p
        )
    }
}

impl VfioPciDevice {
    /// Set the device's migration options (from its configuration).
    pub fn set_migration_options(&mut self, options: VfioMigrationOptions) {
        self.mig.options = options;
    }

    /// The guest RAM ranges the device reaches at identical IOVAs (no vIOMMU): where its DMA
    /// logging looks.
    pub fn set_dma_ranges(&mut self, ranges: Vec<(u64, u64)>) {
        self.set_dma_space(Arc::new(Mutex::new(DmaSpace::identity(&ranges))));
    }

    /// The device's DMA space as the VMM keeps it (behind the vIOMMU: the guest's mappings,
    /// updated by the VMM's listener): how its DMA log's IOVAs translate to guest RAM.
    pub fn set_dma_space(&mut self, space: Arc<Mutex<DmaSpace>>) {
        self.mig.dma = Some(space);
    }

    /// The device's current migration state.
    pub fn migration_state(&self) -> DeviceMigState {
        self.mig.state
    }

    fn mig_backend(&self) -> Result<&dyn MigrationBackend, StateError> {
        self.backend
            .migration()
            .filter(|_| self.mig.migratable())
            .ok_or_else(|| StateError::Unsupported {
                id: self.id.clone(),
                what: "migration: this passthrough device does not offer VFIO_DEVICE_FEATURE_MIGRATION, so its state cannot be saved".into(),
            })
    }

    /// Walk the device from its state to `to`, one direct arc at a time.
    fn mig_go(&mut self, to: DeviceMigState) -> Result<(), StateError> {
        let arcs = device_arcs(0, self.mig.caps, self.mig.state, to)
            .map_err(|e| StateError::component(self.id.clone(), e))?;
        for arc in arcs {
            let m = self.mig_backend()?;
            if let Err(e) = m.set_mig_state(arc.to.as_u32()) {
                // The device may have ended somewhere else (ERROR): learn where.
                self.mig.state = m
                    .mig_state()
                    .ok()
                    .and_then(DeviceMigState::from_u32)
                    .unwrap_or(DeviceMigState::Error);
                return Err(StateError::Component {
                    id: self.id.clone(),
                    source: format!("{} -> {}: {e}", arc.from, arc.to).into(),
                });
            }
            log::debug!("{}: {} -> {}", self.id, arc.from, arc.to);
            self.mig.state = arc.to;
        }
        Ok(())
    }

    /// Back to RUNNING by legal arcs, or by a reset when there is no way (ERROR, a failed arc).
    fn mig_recover(&mut self) -> Result<(), StateError> {
        match self.mig_go(DeviceMigState::Running) {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!("{}: {e}; resetting the device", self.id);
                self.backend
                    .reset()
                    .map_err(|r| StateError::component(self.id.clone(), r))?;
                self.mig.state = DeviceMigState::Running;
                Ok(())
            }
        }
    }

    /// Read migration data until the device has no more (STOP_COPY: the end).
    fn mig_drain(&mut self) -> Result<Vec<u8>, StateError> {
        let m = self.mig_backend()?;
        let mut out = Vec::new();
        loop {
            let chunk = m
                .mig_data_read(READ_CHUNK)
                .map_err(|e| StateError::component(self.id.clone(), e))?;
            out.extend_from_slice(&chunk);
            if chunk.len() < READ_CHUNK {
                return Ok(out);
            }
            if out.len() > MAX_DEVICE_DATA {
                return Err(StateError::Malformed {
                    id: self.id.clone(),
                    reason: format!("the device gives more than {MAX_DEVICE_DATA} bytes of state"),
                });
            }
        }
    }

    /// The VMM-side state: configuration space and MSI-X table.
    fn save_emulated(&self, w: &mut StateWriter) {
        self.config.save(w);
        w.bool(self.msix.is_some());
        if let Some(m) = &self.msix {
            m.config.save(w);
        }
    }

    fn restore_emulated(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        self.config.restore(r)?;
        let has_msix = r.bool()?;
        match (&mut self.msix, has_msix) {
            (Some(m), true) => m.config.restore(r)?,
            (None, false) => {}
            (_, saved) => {
                return Err(r.malformed(format!(
                    "MSI-X {} in the state but the device {} it",
                    if saved { "present" } else { "absent" },
                    if saved { "lacks" } else { "has" }
                )))
            }
        }
        Ok(())
    }

    /// Program the device's interrupts and command register from the restored emulation.
    fn reapply_emulated(&mut self) {
        self.forward_command();
        self.sync_msi();
        self.sync_msix();
    }

    /// RESUMING, the device's data, STOP (the device checks the data on that arc).
    fn load_device_data(&mut self, data: &[u8]) -> Result<(), StateError> {
        if self.mig.state != DeviceMigState::Resuming {
            self.mig_go(DeviceMigState::Resuming)?;
        }
        self.mig_backend()?
            .mig_data_write(data)
            .map_err(|e| StateError::component(self.id.clone(), e))?;
        self.mig_go(DeviceMigState::Stop)
    }

    fn stop_dma_log(&mut self) {
        let stopped = match std::mem::replace(&mut self.mig.log, DmaLog::Off) {
            DmaLog::Device(_) => self.backend.migration().map(|m| m.dma_logging_stop()),
            DmaLog::Iommu(log) => Some(log.set_enabled(false)),
            DmaLog::Off | DmaLog::Everything => return,
        };
        if let Some(Err(e)) = stopped {
            warn!("{}: cannot stop DMA dirty logging: {e}", self.id);
        }
        if let Some(space) = &self.mig.dma {
            lock(space).stop_log();
        }
    }

    /// Start the IOMMU's dirty tracking of the device when its backend has one: over every
    /// IOVA (the IOMMU records all of them, so mappings made later are covered too).
    fn start_iommu_log(&mut self) -> Option<Arc<dyn IommuDirtyLog>> {
        let log = self.backend.iommu_dirty_log()?;
        let space = self.mig.dma.clone()?;
        // On before the IOMMU records: a mapping removed from then on counts as dirty.
        let all = lock(&space).log_request();
        lock(&space).start_log(&all);
        match log.set_enabled(true) {
            Ok(()) => {
                info!(
                    "{}: DMA dirty pages from the IOMMU's dirty tracking (IOMMU_HWPT_SET_DIRTY_TRACKING), {LOG_PAGE}-byte pages",
                    self.id
                );
                Some(log)
            }
            Err(e) => {
                lock(&space).stop_log();
                warn!("{}: cannot start the IOMMU's dirty tracking: {e}", self.id);
                None
            }
        }
    }

    /// No log at all: say what that costs.
    fn warn_everything(&self) {
        let (translated, reach) = match &self.mig.dma {
            Some(space) => {
                let s = lock(space);
                (s.is_translated(), s.unlogged().iter().map(|r| r.1).sum())
            }
            None => (false, 0u64),
        };
        warn!(
            "{}: no DMA dirty logging for this device{} (neither its own nor the IOMMU's): every page it can write ({}) is sent again after it stops, which adds to the downtime",
            self.id,
            if translated { " behind the vIOMMU" } else { "" },
            if translated || reach == 0 { "all guest RAM".to_string() } else { format!("{} MiB", reach >> 20) }
        );
    }

    /// The source of the device's dirty pages now (`off` when not migrating).
    pub fn dirty_log_source(&self) -> &'static str {
        self.mig.log.source()
    }

    /// Start the device's DMA log: over [`DmaSpace::log_request`] first (behind the vIOMMU its
    /// whole input range, as one range, so that mappings the guest makes during the migration
    /// are covered too; guest RAM otherwise), and when the device refuses that, over the ranges
    /// mapped now (at most [`MAX_START_RANGES`]; what is mapped later outside them is then
    /// marked dirty wholesale once the device is stopped, see [`DmaSpace::unlogged`]).
    ///
    /// What the texts allow: linux/vfio.h takes one START until a STOP ("another start is not
    /// allowed in the meantime"), guarantees as many ranges as fit in a kernel page and lets a
    /// device refuse more or larger ranges ("as of some driver limitations"); the kernel refuses
    /// `num_ranges` 0 (EINVAL) and too many (E2BIG). The vfio-user spec puts no limit on the
    /// ranges and reads `num_ranges` 0 as "log every write", which the kernel does not: hence
    /// one explicit range, the input range, which both accept and which no guest mapping can
    /// leave. A STOP and restart on new mappings would lose what the device logged in between,
    /// so there is none. The device's page size, or `None` when it logs nothing.
    fn start_dma_log(&mut self) -> Result<Option<u64>, StateError> {
        let (Some(m), Some(space)) = (self.backend.migration(), self.mig.dma.clone()) else {
            return Ok(None);
        };
        let (first, mapped, translated) = {
            let s = lock(&space);
            (
                s.log_request(),
                s.mapped_ranges(MAX_START_RANGES),
                s.is_translated(),
            )
        };
        let mut tries = vec![first];
        if translated && tries[0] != mapped {
            tries.push(mapped);
        }
        let mut failed = None;
        for ranges in tries.into_iter().filter(|r| !r.is_empty()) {
            // On before the device logs: a mapping removed from then on counts as dirty.
            lock(&space).start_log(&ranges);
            let started = m.dma_logging_start(LOG_PAGE, &ranges);
            if !matches!(started, Ok(Some(_))) {
                lock(&space).stop_log();
            }
            match started {
                Ok(Some(page)) => {
                    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                    info!(
                        "{}: DMA dirty logging on {} range(s) of {} MiB of {}, {page}-byte pages",
                        self.id,
                        ranges.len(),
                        bytes >> 20,
                        if translated {
                            "IOVA space, translated through the vIOMMU's mappings"
                        } else {
                            "guest RAM"
                        }
                    );
                    return Ok(Some(page));
                }
                // No DMA logging, or (EINVAL) not over these ranges.
                Ok(None) => {}
                Err(e) => {
                    info!(
                        "{}: DMA_LOGGING_START over {} range(s) refused: {e}",
                        self.id,
                        ranges.len()
                    );
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => Err(StateError::component(self.id.clone(), e)),
            None => Ok(None),
        }
    }

    fn mig_stopped(&self) -> bool {
        matches!(
            self.mig.state,
            DeviceMigState::Stop | DeviceMigState::StopCopy
        )
    }

    /// Read the log (the device's or the IOMMU's) over what the device can reach now and mark
    /// the guest RAM it wrote.
    fn sync_log(&mut self, into: &mut DirtyBitmap) -> Result<(), StateError> {
        let Some(space) = self.mig.dma.clone() else {
            return Ok(());
        };
        let reports = match &self.mig.log {
            DmaLog::Device(page) => {
                let ranges = lock(&space).report_ranges(MAX_REPORT_RANGES);
                let m = self.mig_backend()?;
                ranges
                    .into_iter()
                    .map(|(iova, len)| m.dma_logging_report(iova, len, *page))
                    .collect::<Result<Vec<_>, _>>()
            }
            DmaLog::Iommu(log) => read_iommu_log(log.as_ref(), &space),
            DmaLog::Off | DmaLog::Everything => return Ok(()),
        }
        .map_err(|e| StateError::component(self.id.clone(), e))?;
        let stopped = self.mig_stopped();
        let (bytes, result) = mark_dirty(&mut lock(&space), &reports, stopped, into);
        if let Err(e) = result {
            warn!("{}: DMA log: {e}", self.id);
        }
        if stopped {
            info!(
                "{}: {} after the stop: {} KiB of guest RAM dirty ({} dirty IOVA page(s) reported)",
                self.id,
                self.mig.log.source(),
                bytes >> 10,
                reports
                    .iter()
                    .map(|r| r.dirty_iovas().count())
                    .sum::<usize>()
            );
        }
        Ok(())
    }
}

impl Pausable for VfioPciDevice {
    fn quiesce(&mut self) -> Result<(), StateError> {
        if !self.mig.migratable() || !self.mig.caps.p2p() {
            return Ok(());
        }
        match self.mig.state {
            DeviceMigState::Running => self.mig_go(DeviceMigState::RunningP2p),
            DeviceMigState::PreCopy => self.mig_go(DeviceMigState::PreCopyP2p),
            _ => Ok(()),
        }
    }

    fn pause(&mut self) -> Result<(), StateError> {
        if !self.mig.migratable() {
            return Ok(());
        }
        match self.mig.state {
            // Keep the pre-copy data session: its data is only good with the rest.
            DeviceMigState::PreCopy | DeviceMigState::PreCopyP2p => {
                self.mig_go(DeviceMigState::StopCopy)
            }
            DeviceMigState::Stop | DeviceMigState::StopCopy | DeviceMigState::Resuming => Ok(()),
            _ => self.mig_go(DeviceMigState::Stop),
        }
    }

    fn resume_quiesced(&mut self) -> Result<(), StateError> {
        self.mig.drained = false;
        if !self.mig.migratable() || !self.mig.caps.p2p() {
            return Ok(());
        }
        match self.mig.state {
            DeviceMigState::Stop | DeviceMigState::StopCopy => {
                self.mig_go(DeviceMigState::RunningP2p)
            }
            _ => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), StateError> {
        // A failed migration: whatever was read out is void.
        self.mig.drained = false;
        if !self.mig.migratable() || self.mig.state == DeviceMigState::Running {
            return Ok(());
        }
        self.mig_recover()
    }
}

impl Snapshottable for VfioPciDevice {
    fn id(&self) -> String {
        format!("vfio/{}", self.id)
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        self.mig_backend()?;
        let data = if std::mem::take(&mut self.mig.drained) {
            Vec::new()
        } else {
            self.mig_go(DeviceMigState::StopCopy)?;
            self.mig_drain()?
        };
        self.mig_go(DeviceMigState::Stop)?;
        let mut w = StateWriter::new();
        self.save_emulated(&mut w);
        w.bytes(&data);
        Ok(w.into_section(&Snapshottable::id(self), VFIO_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        self.mig_backend()?;
        let sid = Snapshottable::id(self);
        let mut r = StateReader::open(section, &sid, VFIO_STATE_VERSION)?;
        // The emulated part is put back as it was when anything fails.
        let mut backup = StateWriter::new();
        self.save_emulated(&mut backup);
        let backup = backup.into_bytes();
        let result = self.restore_emulated(&mut r).and_then(|()| {
            let data = r.bytes(MAX_DEVICE_DATA)?;
            r.finish()?;
            self.load_device_data(data)
        });
        if let Err(e) = result {
            let mut b = StateReader::from_bytes(&sid, &backup);
            if let Err(r) = self.restore_emulated(&mut b) {
                log::error!("{sid}: cannot put the emulated state back: {r}");
            }
            return Err(e);
        }
        self.reapply_emulated();
        Ok(())
    }
}

impl Migratable for VfioPciDevice {
    fn start_dirty_log(&mut self) -> Result<(), StateError> {
        if !self.mig.migratable() {
            return Ok(());
        }
        // The device's own log first; without it (or refused), the IOMMU's; else everything.
        self.mig.log = match self.start_dma_log() {
            Ok(Some(page)) => DmaLog::Device(page.max(LOG_PAGE)),
            device => match self.start_iommu_log() {
                Some(log) => {
                    if let Err(e) = device {
                        info!("{}: the device's DMA logging failed ({e}); using the IOMMU's dirty tracking", self.id);
                    }
                    DmaLog::Iommu(log)
                }
                None => {
                    device?;
                    self.warn_everything();
                    DmaLog::Everything
                }
            },
        };
        if self.mig.caps.pre_copy() && !self.mig.options.pre_copy_off {
            self.mig_go(DeviceMigState::PreCopy)?;
            self.mig.precopy_more = true;
        }
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), StateError> {
        self.stop_dma_log();
        if self.mig.in_precopy() {
            self.mig_go(DeviceMigState::Running)?;
        }
        Ok(())
    }

    fn sync_dirty_log(&mut self, into: &mut DirtyBitmap) -> Result<(), StateError> {
        match self.mig.log {
            DmaLog::Off => Ok(()),
            DmaLog::Device(_) | DmaLog::Iommu(_) => self.sync_log(into),
            DmaLog::Everything => {
                if self.mig_stopped() {
                    into.set_all();
                }
                Ok(())
            }
        }
    }

    fn precopy_pending(&self) -> u64 {
        if self.mig.in_precopy() && self.mig.precopy_more {
            READ_CHUNK as u64
        } else {
            0
        }
    }

    fn precopy_read(&mut self, max: usize) -> Result<Option<Vec<u8>>, StateError> {
        if !self.mig.in_precopy() {
            return Ok(None);
        }
        let max = max.clamp(1, READ_CHUNK);
        let data = self
            .mig_backend()?
            .mig_data_read(max)
            .map_err(|e| StateError::component(self.id.clone(), e))?;
        self.mig.precopy_more = data.len() == max;
        Ok((!data.is_empty()).then_some(data))
    }

    fn precopy_write(&mut self, data: &[u8]) -> Result<(), StateError> {
        self.mig_backend()?;
        if self.mig.state != DeviceMigState::Resuming {
            self.mig_go(DeviceMigState::Resuming)?;
        }
        self.mig_backend()?
            .mig_data_write(data)
            .map_err(|e| StateError::component(self.id.clone(), e))
    }

    fn stop_copy_read(&mut self, max: usize) -> Result<Option<Vec<u8>>, StateError> {
        if !self.mig.migratable() || self.mig.drained {
            return Ok(None);
        }
        if self.mig.state != DeviceMigState::StopCopy {
            self.mig_go(DeviceMigState::StopCopy)?;
        }
        let max = max.clamp(1, READ_CHUNK);
        let data = self
            .mig_backend()?
            .mig_data_read(max)
            .map_err(|e| StateError::component(self.id.clone(), e))?;
        // A short read is the end of the data (STOP_COPY).
        self.mig.drained = data.len() < max;
        Ok((!data.is_empty()).then_some(data))
    }

    fn stop_state_size(&self) -> u64 {
        self.backend
            .migration()
            .filter(|_| self.mig.migratable())
            .and_then(|m| m.mig_data_size().ok().flatten())
            .unwrap_or(0)
    }

    fn passthrough_migration(&self) -> Option<PassthroughMigInfo> {
        // No I/O here: the registry asks this to find the passthrough devices. The STOP_COPY
        // size counts through `stop_state_size`, asked at each pre-copy iteration.
        Some(PassthroughMigInfo {
            id: self.id.clone(),
            caps: self.mig.caps,
            p2p_off: self.mig.options.p2p_off,
            pre_copy_off: self.mig.options.pre_copy_off,
        })
    }
}

fn lock(space: &Mutex<DmaSpace>) -> MutexGuard<'_, DmaSpace> {
    space.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read and clear the IOMMU's dirty bits over each IOVA range the device reaches now, one
/// range at a time and never joined: iommufd refuses a range with a hole in its mappings. The
/// ranges are widened to whole [`LOG_PAGE`]s (mappings are page-aligned). A range unmapped
/// since it was listed is skipped (its guest RAM is pending in `space`, see
/// [`DmaSpace::take_pending`]); any other failure is returned.
fn read_iommu_log(
    log: &dyn IommuDirtyLog,
    space: &Mutex<DmaSpace>,
) -> Result<Vec<DmaDirtyReport>, VfioError> {
    let ranges = lock(space).report_ranges(usize::MAX);
    let mut reports = Vec::with_capacity(ranges.len());
    for (iova, len) in ranges {
        let start = iova - iova % LOG_PAGE;
        let end = iova
            .saturating_add(len)
            .div_ceil(LOG_PAGE)
            .saturating_mul(LOG_PAGE);
        match log.read_and_clear(start, end - start, LOG_PAGE) {
            Ok(report) => reports.push(report),
            Err(e)
                if !lock(space).report_ranges(usize::MAX).iter().any(|&(a, l)| {
                    a <= iova && iova.saturating_add(len) <= a.saturating_add(l)
                }) =>
            {
                log::debug!("IOMMU dirty bitmap of {iova:#x}+{len:#x}, unmapped meanwhile: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(reports)
}

/// Mark in `into` the guest RAM that the dirty IOVAs of `reports` reach through `space` now,
/// what mappings removed since the last sync reached, and, once the device is `stopped`, what
/// it reaches outside its log. IOVAs that reach no RAM are skipped. Every piece is marked even
/// when one fails. The bytes marked (pieces may overlap) and the first failure.
fn mark_dirty(
    space: &mut DmaSpace,
    reports: &[DmaDirtyReport],
    stopped: bool,
    into: &mut DirtyBitmap,
) -> (u64, Result<(), migration::dirty::DirtyError>) {
    let mut result = Ok(());
    let mut bytes = 0u64;
    let mut mark = |gpa: u64, len: u64| {
        bytes = bytes.saturating_add(len);
        if let Err(e) = into.mark(gpa, len) {
            if result.is_ok() {
                result = Err(e);
            }
        }
    };
    for report in reports {
        for at in report.dirty_iovas() {
            space.dirty(at, report.page_size, &mut mark);
        }
    }
    for (gpa, len) in space.take_pending() {
        mark(gpa, len);
    }
    if stopped {
        for (gpa, len) in space.unlogged() {
            mark(gpa, len);
        }
    }
    (bytes, result)
}
