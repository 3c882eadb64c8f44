//! The component registry: every part of a VM that has state — vCPUs, the KVM irqchip, PIT and
//! clock, the legacy devices, the PCI host bridge and every PCI function — registered once with
//! a stable id (and, for PCI functions, its PCI address). Pause, resume, snapshot, restore and
//! migration iterate it; nothing lists components by hand.
//!
//! Order: components are registered in the order their state must be restored (vCPUs, then the
//! VM-level KVM state, the legacy devices, the host bridge, then PCI functions in slot order, so
//! the virtio-iommu comes before the devices that translate through it). Pause goes in that
//! order; resume goes in reverse, so a device is running again before anything that feeds it.
//!
//! A snapshot carries a manifest (section [`MANIFEST_SECTION`]): every component's id, kind, PCI
//! address and section id. Restore matches state to components by id and checks kind and
//! address against the manifest, never by order: a state saved from a VM with other devices, or
//! with a device at another address, is refused with a message naming the device.

use std::sync::{Arc, Mutex, MutexGuard};

use migration::codec::{StateReader, StateWriter};
use migration::device_fsm::PassthroughMigInfo;
use migration::{Migratable, Pausable, StateError, StateSection};
use thiserror::Error;

use crate::config::PciAddress;

/// Section id of the registry's manifest.
pub const MANIFEST_SECTION: &str = "components";
/// Layout version of the manifest.
pub const MANIFEST_VERSION: u16 = 1;
/// Most components a manifest may list (a VM has a few hundred at most).
const MAX_MANIFEST_ENTRIES: usize = 4096;

/// A component's state, shared with whoever drives it (bus, vCPU thread, API).
pub type SharedComponent = Arc<Mutex<dyn Migratable + Send>>;

/// Errors of the registry.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// Two components with one id.
    #[error("component id {0:?} is registered twice")]
    DuplicateId(String),
    /// A component refused to pause, resume, save or restore.
    #[error("{id}: {source}")]
    State {
        /// Component id.
        id: String,
        /// The component's error.
        #[source]
        source: StateError,
    },
    /// The saved state does not describe this VM's components.
    #[error("the state does not match this VM: {0}")]
    Mismatch(String),
    /// The manifest section is malformed.
    #[error("component manifest: {0}")]
    Manifest(#[source] StateError),
    /// Data was addressed to a component this VM does not have.
    #[error("no component {0:?} in this VM")]
    UnknownComponent(String),
}

/// One registered component.
#[derive(Clone)]
pub struct Component {
    /// Stable id (`cpu0`, `irqchip`, `serial0`, `disk0`, ...).
    pub id: String,
    /// What it is (`vcpu`, `virtio-blk`, ...), for the manifest and `vm.info`.
    pub kind: String,
    /// Where it sits on the PCI bus, for PCI functions.
    pub pci_address: Option<PciAddress>,
    /// Its state.
    pub state: SharedComponent,
}

impl Component {
    fn lock(&self) -> MutexGuard<'_, dyn Migratable + Send + 'static> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self) -> impl FnOnce(StateError) -> RegistryError + '_ {
        move |source| RegistryError::State {
            id: self.id.clone(),
            source,
        }
    }
}

/// One line of the manifest: what the saved VM had.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ManifestEntry {
    id: String,
    kind: String,
    pci_address: Option<PciAddress>,
    section: String,
}

/// Every component of a VM, in restore order.
#[derive(Default, Clone)]
pub struct Registry {
    components: Vec<Component>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `state` as `id`; ids are unique.
    pub fn register(
        &mut self,
        id: impl Into<String>,
        kind: impl Into<String>,
        pci_address: Option<PciAddress>,
        state: SharedComponent,
    ) -> Result<(), RegistryError> {
        let id = id.into();
        if self.components.iter().any(|c| c.id == id) {
            return Err(RegistryError::DuplicateId(id));
        }
        self.components.push(Component {
            id,
            kind: kind.into(),
            pci_address,
            state,
        });
        Ok(())
    }

    /// The components, in restore order.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The component `id`.
    pub fn get(&self, id: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.id == id)
    }

    /// Pause every component: first quiesce all of them (the P2P grace step), then pause all
    /// of them, each pass in registry order. On a failure every component touched so far is
    /// resumed, so the VM is left as it was, and the error names the component.
    pub fn pause_all(&self) -> Result<(), RegistryError> {
        let n = self.components.len();
        let grace = !crate::test_knobs::skip_p2p_grace();
        for (i, c) in self.components.iter().enumerate().filter(|_| grace) {
            // The guard must be gone before `undo` locks the components again.
            let quiesced = c.lock().quiesce();
            if let Err(e) = quiesced.map_err(c.err()) {
                self.undo(i);
                return Err(e);
            }
        }
        for c in &self.components {
            if !grace && c.lock().passthrough_migration().is_some() {
                // The test knob: what a VMM without the grace step does — each passthrough
                // device is stopped only when its state is read, one after the other.
                continue;
            }
            let paused = c.lock().pause();
            if let Err(e) = paused.map_err(c.err()) {
                self.undo(n);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Resume the first `n` components, in reverse order, after a failed pause.
    fn undo(&self, n: usize) {
        for done in self.components[..n].iter().rev() {
            if let Err(r) = done.lock().resume() {
                log::error!("{}: cannot resume after a failed pause: {r}", done.id);
            }
        }
    }

    /// Resume every component, mirroring [`Registry::pause_all`]: all to the quiesced state,
    /// then all fully, each pass in reverse order. Every component is tried; the first error is
    /// returned.
    pub fn resume_all(&self) -> Result<(), RegistryError> {
        let mut first = None;
        for c in self.components.iter().rev() {
            if let Err(e) = c.lock().resume_quiesced().map_err(c.err()) {
                log::error!("{e}");
                first.get_or_insert(e);
            }
        }
        for c in self.components.iter().rev() {
            if let Err(e) = c.lock().resume().map_err(c.err()) {
                log::error!("{e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Quiesce, then pause, only the passthrough devices (a migration target before their data
    /// arrives: every fresh device leaves RUNNING through the P2P grace state first).
    pub fn pause_passthrough(&self) -> Result<(), RegistryError> {
        let passthrough: Vec<&Component> = self
            .components
            .iter()
            .filter(|c| c.lock().passthrough_migration().is_some())
            .collect();
        for step in [Pausable::quiesce, Pausable::pause] {
            for c in &passthrough {
                let done = step(&mut *c.lock());
                done.map_err(c.err())?;
            }
        }
        Ok(())
    }

    /// What the device migration plan needs of every passthrough device, in registry order.
    pub fn passthrough_migration(&self) -> Vec<PassthroughMigInfo> {
        self.components
            .iter()
            .filter_map(|c| c.lock().passthrough_migration())
            .collect()
    }

    /// Read every component's pre-copy state until each has nothing more for now, handing
    /// each chunk (at most `max` bytes) to `send` with the component's id.
    pub fn precopy_drain<E: From<RegistryError>>(
        &self,
        max: usize,
        send: impl FnMut(&str, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.drain_with(max, send, |m, max| m.precopy_read(max))
    }

    /// On a PAUSED VM, before [`Registry::snapshot_all`]: read the state components produce
    /// once stopped in chunks (a passthrough device's STOP_COPY data), handing each to `send`
    /// with the component's id, so no section has to hold it whole.
    pub fn stop_copy_drain<E: From<RegistryError>>(
        &self,
        max: usize,
        send: impl FnMut(&str, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.drain_with(max, send, |m, max| m.stop_copy_read(max))
    }

    fn drain_with<E: From<RegistryError>>(
        &self,
        max: usize,
        mut send: impl FnMut(&str, Vec<u8>) -> Result<(), E>,
        read: impl Fn(&mut (dyn Migratable + Send), usize) -> Result<Option<Vec<u8>>, StateError>,
    ) -> Result<(), E> {
        for c in &self.components {
            loop {
                let chunk = read(&mut *c.lock(), max);
                match chunk.map_err(c.err())? {
                    Some(data) => send(&c.id, data)?,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Bytes of pre-copy state the components have pending, and the bytes of state they will
    /// produce once stopped (both count in the downtime estimate).
    pub fn device_state_sizes(&self) -> (u64, u64) {
        self.components.iter().fold((0, 0), |(pending, stop), c| {
            let g = c.lock();
            (
                pending.saturating_add(g.precopy_pending()),
                stop.saturating_add(g.stop_state_size()),
            )
        })
    }

    /// Target side: hand component `id` a chunk of its source's pre-copy state.
    pub fn precopy_write(&self, id: &str, data: &[u8]) -> Result<(), RegistryError> {
        let c = self
            .get(id)
            .ok_or_else(|| RegistryError::UnknownComponent(id.to_string()))?;
        let written = c.lock().precopy_write(data);
        written.map_err(c.err())
    }

    /// Start dirty logging in every component that writes guest memory by itself.
    pub fn start_dirty_log(&self) -> Result<(), RegistryError> {
        for c in &self.components {
            c.lock().start_dirty_log().map_err(c.err())?;
        }
        Ok(())
    }

    /// Stop dirty logging everywhere (errors are logged: stopping is best effort).
    pub fn stop_dirty_log(&self) {
        for c in &self.components {
            if let Err(e) = c.lock().stop_dirty_log() {
                log::warn!("{}: cannot stop dirty logging: {e}", c.id);
            }
        }
    }

    /// The manifest and every component's section, for a PAUSED VM.
    pub fn snapshot_all(&self) -> Result<Vec<StateSection>, RegistryError> {
        let mut sections = Vec::with_capacity(self.components.len() + 1);
        let mut manifest = Vec::with_capacity(self.components.len());
        for c in &self.components {
            let section = c.lock().snapshot().map_err(c.err())?;
            manifest.push(ManifestEntry {
                id: c.id.clone(),
                kind: c.kind.clone(),
                pci_address: c.pci_address,
                section: section.id.clone(),
            });
            sections.push(section);
        }
        sections.insert(0, encode_manifest(&manifest));
        Ok(sections)
    }

    /// Restore every component from `sections`, matched by id. With a manifest (every snapshot
    /// since the registry exists) the saved components must be exactly this VM's, each of the
    /// same kind at the same PCI address, and every component must find its section. Without
    /// one (an older snapshot) a component without a section is left as built, with a warning.
    /// Components are restored in registry order; any error stops the restore (the VM must not
    /// be started).
    pub fn restore_all(&self, sections: &[StateSection]) -> Result<(), RegistryError> {
        let manifest = match sections.iter().find(|s| s.id == MANIFEST_SECTION) {
            Some(s) => Some(decode_manifest(s).map_err(RegistryError::Manifest)?),
            None => None,
        };
        if let Some(m) = &manifest {
            self.check_manifest(m)?;
        }
        let mut claimed = vec![false; sections.len()];
        for c in &self.components {
            let mut state = c.lock();
            let sid = state.id();
            match sections.iter().position(|s| s.id == sid) {
                Some(i) => {
                    claimed[i] = true;
                    state.restore(&sections[i]).map_err(c.err())?;
                }
                None if manifest.is_some() => {
                    return Err(RegistryError::Mismatch(format!(
                        "no saved state for {} (section {sid})",
                        c.id
                    )))
                }
                None => log::warn!(
                    "{}: the snapshot has no section {sid}; the component keeps its initial state",
                    c.id
                ),
            }
        }
        let unclaimed: Vec<&str> = sections
            .iter()
            .zip(&claimed)
            .filter(|(s, done)| !**done && s.id != MANIFEST_SECTION)
            .map(|(s, _)| s.id.as_str())
            .collect();
        if !unclaimed.is_empty() {
            return Err(RegistryError::Mismatch(format!(
                "the state has sections no component of this VM takes: {}",
                unclaimed.join(", ")
            )));
        }
        Ok(())
    }

    fn check_manifest(&self, manifest: &[ManifestEntry]) -> Result<(), RegistryError> {
        let show = |a: Option<PciAddress>| a.map_or("no PCI address".into(), |a| a.to_string());
        for saved in manifest {
            let Some(c) = self.get(&saved.id) else {
                return Err(RegistryError::Mismatch(format!(
                    "the saved VM has {} ({}), this configuration does not",
                    saved.id, saved.kind
                )));
            };
            if c.kind != saved.kind {
                return Err(RegistryError::Mismatch(format!(
                    "{} was a {} and is a {} in this configuration",
                    saved.id, saved.kind, c.kind
                )));
            }
            if c.pci_address != saved.pci_address {
                return Err(RegistryError::Mismatch(format!(
                    "{} was saved at {} and this configuration puts it at {}",
                    saved.id,
                    show(saved.pci_address),
                    show(c.pci_address)
                )));
            }
        }
        if let Some(extra) = self
            .components
            .iter()
            .find(|c| !manifest.iter().any(|m| m.id == c.id))
        {
            return Err(RegistryError::Mismatch(format!(
                "this configuration has {} ({}), the saved VM did not",
                extra.id, extra.kind
            )));
        }
        Ok(())
    }
}

fn encode_manifest(entries: &[ManifestEntry]) -> StateSection {
    let mut w = StateWriter::new();
    w.u32(entries.len() as u32);
    for e in entries {
        w.bytes(e.id.as_bytes())
            .bytes(e.kind.as_bytes())
            .u8(e.pci_address.map_or(0, |a| a.slot()))
            .bytes(e.section.as_bytes());
    }
    w.into_section(MANIFEST_SECTION, MANIFEST_VERSION)
}

fn decode_manifest(section: &StateSection) -> Result<Vec<ManifestEntry>, StateError> {
    let mut r = StateReader::open(section, MANIFEST_SECTION, MANIFEST_VERSION)?;
    let n = r.u32()? as usize;
    if n > MAX_MANIFEST_ENTRIES {
        return Err(r.malformed(format!("{n} components")));
    }
    let mut out = Vec::with_capacity(n);
    let max = migration::snapshot::MAX_ID_LEN;
    for _ in 0..n {
        let text = |r: &mut StateReader<'_>, what: &str| -> Result<String, StateError> {
            let b = r.bytes(max)?;
            String::from_utf8(b.to_vec()).map_err(|_| r.malformed(format!("{what} is not UTF-8")))
        };
        let id = text(&mut r, "id")?;
        let kind = text(&mut r, "kind")?;
        let pci_address = match r.u8()? {
            0 => None,
            s => Some(PciAddress::new(s).map_err(|e| r.malformed(format!("component {id}: {e}")))?),
        };
        let section = text(&mut r, "section id")?;
        out.push(ManifestEntry {
            id,
            kind,
            pci_address,
            section,
        });
    }
    r.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::{Pausable, Snapshottable};

    /// A component that records what happened to it and can be told to fail.
    #[derive(Default)]
    struct Fake {
        section: String,
        value: u32,
        paused: bool,
        fail_pause: bool,
        fail_quiesce: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        fn note(&self, what: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{what} {}", self.section));
        }
    }

    impl Pausable for Fake {
        fn quiesce(&mut self) -> Result<(), StateError> {
            if self.fail_quiesce {
                return Err(StateError::Pause {
                    id: self.section.clone(),
                    reason: "told to fail".into(),
                });
            }
            self.note("quiesce");
            Ok(())
        }
        fn resume_quiesced(&mut self) -> Result<(), StateError> {
            self.note("unstop");
            Ok(())
        }
        fn pause(&mut self) -> Result<(), StateError> {
            if self.fail_pause {
                return Err(StateError::Pause {
                    id: self.section.clone(),
                    reason: "told to fail".into(),
                });
            }
            self.paused = true;
            self.log
                .lock()
                .unwrap()
                .push(format!("pause {}", self.section));
            Ok(())
        }
        fn resume(&mut self) -> Result<(), StateError> {
            self.paused = false;
            self.log
                .lock()
                .unwrap()
                .push(format!("resume {}", self.section));
            Ok(())
        }
    }

    impl Snapshottable for Fake {
        fn id(&self) -> String {
            self.section.clone()
        }
        fn snapshot(&mut self) -> Result<StateSection, StateError> {
            let mut w = StateWriter::new();
            w.u32(self.value);
            Ok(w.into_section(&self.section, 1))
        }
        fn restore(&mut self, s: &StateSection) -> Result<(), StateError> {
            let mut r = StateReader::open(s, &self.section, 1)?;
            self.value = r.u32()?;
            r.finish()
        }
    }

    impl Migratable for Fake {}

    fn fake(section: &str, value: u32, log: &Arc<Mutex<Vec<String>>>) -> Arc<Mutex<Fake>> {
        Arc::new(Mutex::new(Fake {
            section: section.into(),
            value,
            log: log.clone(),
            ..Default::default()
        }))
    }

    fn addr(slot: u8) -> Option<PciAddress> {
        Some(PciAddress::new(slot).unwrap())
    }

    /// cpu0, disk0 at 00:02.0, disk1 at 00:03.0 with the given values.
    fn vm(values: [u32; 3], log: &Arc<Mutex<Vec<String>>>) -> (Registry, Vec<Arc<Mutex<Fake>>>) {
        let parts = vec![
            fake("cpu0", values[0], log),
            fake("virtio-pci/disk0", values[1], log),
            fake("virtio-pci/disk1", values[2], log),
        ];
        let mut r = Registry::new();
        r.register("cpu0", "vcpu", None, parts[0].clone()).unwrap();
        r.register("disk0", "virtio-blk", addr(2), parts[1].clone())
            .unwrap();
        r.register("disk1", "virtio-blk", addr(3), parts[2].clone())
            .unwrap();
        (r, parts)
    }

    #[test]
    fn quiesce_all_then_pause_all_resume_mirrors_and_a_failure_is_undone() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (mut r, parts) = vm([1, 2, 3], &log);
        assert!(matches!(
            r.register("disk0", "virtio-net", None, parts[0].clone()),
            Err(RegistryError::DuplicateId(_))
        ));
        r.pause_all().unwrap();
        assert!(parts.iter().all(|p| p.lock().unwrap().paused));
        r.resume_all().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                // Every component quiesced before any is paused (the P2P grace step)...
                "quiesce cpu0",
                "quiesce virtio-pci/disk0",
                "quiesce virtio-pci/disk1",
                "pause cpu0",
                "pause virtio-pci/disk0",
                "pause virtio-pci/disk1",
                // ... and the mirror on the way back.
                "unstop virtio-pci/disk1",
                "unstop virtio-pci/disk0",
                "unstop cpu0",
                "resume virtio-pci/disk1",
                "resume virtio-pci/disk0",
                "resume cpu0"
            ]
        );

        // A failed pause: everything (all quiesced, two paused) is resumed.
        log.lock().unwrap().clear();
        parts[2].lock().unwrap().fail_pause = true;
        let e = r.pause_all().unwrap_err().to_string();
        assert!(e.starts_with("disk1: "), "{e}");
        assert!(parts.iter().all(|p| !p.lock().unwrap().paused));
        assert_eq!(
            log.lock().unwrap()[3..],
            [
                "pause cpu0",
                "pause virtio-pci/disk0",
                "resume virtio-pci/disk1",
                "resume virtio-pci/disk0",
                "resume cpu0"
            ]
        );

        // A failed quiesce: nothing is paused; the ones quiesced are resumed.
        log.lock().unwrap().clear();
        parts[2].lock().unwrap().fail_pause = false;
        parts[1].lock().unwrap().fail_quiesce = true;
        let e = r.pause_all().unwrap_err().to_string();
        assert!(e.starts_with("disk0: "), "{e}");
        assert_eq!(*log.lock().unwrap(), ["quiesce cpu0", "resume cpu0"]);
    }

    #[test]
    fn restore_matches_by_id_in_any_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (saved, _) = vm([10, 20, 30], &log);
        let mut sections = saved.snapshot_all().unwrap();
        assert_eq!(sections[0].id, MANIFEST_SECTION);
        sections.reverse();
        let (target, parts) = vm([0, 0, 0], &log);
        target.restore_all(&sections).unwrap();
        let values: Vec<u32> = parts.iter().map(|p| p.lock().unwrap().value).collect();
        assert_eq!(values, [10, 20, 30]);

        // The same devices registered in another order, at the same addresses: mapped by id.
        let swapped = [
            fake("virtio-pci/disk1", 0, &log),
            fake("virtio-pci/disk0", 0, &log),
        ];
        let mut r = Registry::new();
        r.register("cpu0", "vcpu", None, fake("cpu0", 0, &log))
            .unwrap();
        r.register("disk1", "virtio-blk", addr(3), swapped[0].clone())
            .unwrap();
        r.register("disk0", "virtio-blk", addr(2), swapped[1].clone())
            .unwrap();
        r.restore_all(&sections).unwrap();
        assert_eq!(swapped[0].lock().unwrap().value, 30);
        assert_eq!(swapped[1].lock().unwrap().value, 20);
    }

    #[test]
    fn restore_refuses_other_devices_addresses_or_kinds() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (saved, _) = vm([10, 20, 30], &log);
        let sections = saved.snapshot_all().unwrap();
        let build = |disk1: Option<(&str, Option<PciAddress>)>| {
            let mut r = Registry::new();
            r.register("cpu0", "vcpu", None, fake("cpu0", 0, &log))
                .unwrap();
            r.register(
                "disk0",
                "virtio-blk",
                addr(2),
                fake("virtio-pci/disk0", 0, &log),
            )
            .unwrap();
            if let Some((kind, at)) = disk1 {
                r.register("disk1", kind, at, fake("virtio-pci/disk1", 0, &log))
                    .unwrap();
            }
            r
        };
        let moved = build(Some(("virtio-blk", addr(0x1f))))
            .restore_all(&sections)
            .unwrap_err()
            .to_string();
        assert!(
            moved.contains("disk1")
                && moved.contains("0000:00:03.0")
                && moved.contains("0000:00:1f.0"),
            "{moved}"
        );
        let missing = build(None).restore_all(&sections).unwrap_err().to_string();
        assert!(missing.contains("disk1"), "{missing}");
        let kind = build(Some(("virtio-net", addr(3))))
            .restore_all(&sections)
            .unwrap_err()
            .to_string();
        assert!(
            kind.contains("virtio-blk") && kind.contains("virtio-net"),
            "{kind}"
        );
        let (mut extra, _) = vm([0, 0, 0], &log);
        extra
            .register(
                "rng0",
                "virtio-rng",
                addr(4),
                fake("virtio-pci/rng0", 0, &log),
            )
            .unwrap();
        let e = extra.restore_all(&sections).unwrap_err().to_string();
        assert!(e.contains("rng0"), "{e}");

        // A section nobody takes, and a corrupt manifest, are refused too.
        let mut more = sections.clone();
        more.push(StateSection {
            id: "virtio-pci/ghost".into(),
            version: 1,
            data: vec![],
        });
        let (r, _) = vm([0, 0, 0], &log);
        assert!(r
            .restore_all(&more)
            .unwrap_err()
            .to_string()
            .contains("ghost"));
        let mut bad = sections.clone();
        bad[0].data.truncate(5);
        assert!(matches!(
            r.restore_all(&bad),
            Err(RegistryError::Manifest(_))
        ));
    }

    #[test]
    fn snapshots_without_a_manifest_restore_what_they_have() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (saved, _) = vm([10, 20, 30], &log);
        let sections: Vec<StateSection> = saved
            .snapshot_all()
            .unwrap()
            .into_iter()
            .filter(|s| s.id != MANIFEST_SECTION && s.id != "virtio-pci/disk1")
            .collect();
        let (r, parts) = vm([1, 2, 3], &log);
        r.restore_all(&sections).unwrap();
        let values: Vec<u32> = parts.iter().map(|p| p.lock().unwrap().value).collect();
        assert_eq!(values, [10, 20, 3]);
    }
}
