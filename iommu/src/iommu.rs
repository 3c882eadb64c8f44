//! The virtio-iommu state machine: endpoints, domains and the requests that change them.
//!
//! [`IommuState`] knows no queues: the device feeds it parsed [`Request`]s and writes back the
//! [`Response`]. [`Translator`] shares the state between the request worker and every device
//! that performs DMA through the IOMMU. [`ExternalMappingListener`]s (VFIO) follow the mappings
//! of the domain their endpoint is attached to.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::error;
use migration::codec::{StateReader, StateWriter};
use migration::{StateError, StateSection};

use crate::domain::{Access, Domain, Fault, FaultReason};
use crate::protocol::{
    overlaps_msi_window, probe_properties, FaultEvent, IommuConfig, IommuStatus, Request,
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
    VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_F_BYPASS_CONFIG,
    VIRTIO_IOMMU_F_DOMAIN_RANGE, VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP,
    VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_F_PROBE, VIRTIO_IOMMU_MAP_F_MMIO,
};

/// Section id of the saved state.
pub const STATE_ID: &str = "iommu";
/// Version of the saved state layout.
pub const STATE_VERSION: u16 = 1;

/// Feature bits (virtio-iommu specific, without the transport bits) this device offers.
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
    | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
    | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
    | (1 << VIRTIO_IOMMU_F_PROBE)
    | (1 << VIRTIO_IOMMU_F_MMIO)
    | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);

/// Follows the guest's mappings for one endpoint; implemented by VFIO to program the host IOMMU.
///
/// Called with the IOMMU state locked, in the order the guest's requests take effect. An error
/// makes the request complete with `DEVERR`; the guest-visible state keeps the change.
pub trait ExternalMappingListener: Send + Sync {
    /// `[iova, iova + size)` of `endpoint` now maps to guest-physical `phys` with
    /// `VIRTIO_IOMMU_MAP_F_*` `flags`.
    fn map(&self, endpoint: u32, iova: u64, size: u64, phys: u64, flags: u32) -> io::Result<()>;
    /// `[iova, iova + size)` of `endpoint` is no longer mapped.
    fn unmap(&self, endpoint: u32, iova: u64, size: u64) -> io::Result<()>;
    /// `endpoint` now bypasses the IOMMU (identity-maps all guest memory) or stops doing so.
    fn bypass(&self, _endpoint: u32, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
}

/// The device's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status for the request's tail.
    pub status: IommuStatus,
    /// Extra device-writable payload before the tail (PROBE properties); empty otherwise.
    pub payload: Vec<u8>,
}

impl Response {
    fn status(status: IommuStatus) -> Self {
        Self {
            status,
            payload: Vec::new(),
        }
    }
}

impl From<Result<(), IommuStatus>> for Response {
    fn from(r: Result<(), IommuStatus>) -> Self {
        Response::status(r.err().unwrap_or(IommuStatus::Ok))
    }
}

#[derive(Debug, Clone, Default)]
struct DomainEntry {
    domain: Domain,
    endpoints: BTreeSet<u32>,
}

/// Endpoints, domains and configuration of one virtio-iommu.
pub struct IommuState {
    config: IommuConfig,
    acked_features: u64,
    known_endpoints: BTreeSet<u32>,
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, DomainEntry>,
    listeners: BTreeMap<u32, Arc<dyn ExternalMappingListener>>,
}

impl std::fmt::Debug for IommuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuState")
            .field("config", &self.config)
            .field("acked_features", &self.acked_features)
            .field("known_endpoints", &self.known_endpoints)
            .field("attached", &self.attached)
            .field("domains", &self.domains.len())
            .field("listeners", &self.listeners.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl IommuState {
    /// A device with `config`, no endpoints and all [`OFFERED_FEATURES`] acknowledged.
    pub fn new(config: IommuConfig) -> Self {
        Self {
            config,
            acked_features: OFFERED_FEATURES,
            known_endpoints: BTreeSet::new(),
            attached: BTreeMap::new(),
            domains: BTreeMap::new(),
            listeners: BTreeMap::new(),
        }
    }

    /// The configuration space.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// Record the features the driver acknowledged (gates the MMIO map flag and bypass domains).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & OFFERED_FEATURES;
    }

    /// Declare `endpoint` (a PCI requester id) as sitting behind this IOMMU.
    pub fn add_endpoint(&mut self, endpoint: u32) {
        self.known_endpoints.insert(endpoint);
    }

    /// Register the listener that follows `endpoint`'s mappings, and replay the endpoint's current
    /// mappings (or bypass state) to it.
    pub fn register_listener(
        &mut self,
        endpoint: u32,
        listener: Arc<dyn ExternalMappingListener>,
    ) -> io::Result<()> {
        self.listeners.insert(endpoint, listener.clone());
        if self.effective_bypass(endpoint) {
            listener.bypass(endpoint, true)?;
        }
        if let Some(entry) = self
            .attached
            .get(&endpoint)
            .and_then(|d| self.domains.get(d))
        {
            for (start, m) in entry.domain.mappings() {
                listener.map(endpoint, start, size(start, m.iova_end), m.phys, m.flags)?;
            }
        }
        Ok(())
    }

    /// Forget `endpoint`'s listener (without notifying it).
    pub fn unregister_listener(&mut self, endpoint: u32) {
        self.listeners.remove(&endpoint);
    }

    /// The domain `endpoint` is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.attached.get(&endpoint).copied()
    }

    /// The domain with id `id`.
    pub fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.get(&id).map(|e| &e.domain)
    }

    /// Number of existing domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Set the config-space `bypass` field (the driver writes it when `BYPASS_CONFIG` is acked).
    pub fn set_bypass(&mut self, bypass: bool) -> IommuStatus {
        let unattached: Vec<u32> = self
            .known_endpoints
            .iter()
            .filter(|e| !self.attached.contains_key(e))
            .copied()
            .collect();
        let changed = self.config.bypass != bypass;
        self.config.bypass = bypass;
        let mut status = IommuStatus::Ok;
        if changed {
            for ep in unattached {
                status = worst(status, self.notify_bypass(ep, bypass));
            }
        }
        status
    }

    /// Translate `len` bytes at `iova` for a DMA `access` by `endpoint`.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64)>, Fault> {
        match self.endpoint_view(endpoint, iova, access)? {
            Some(domain) => domain.translate(iova, len, access),
            None => Domain::new_bypass().translate(iova, len, access),
        }
    }

    /// Like [`IommuState::translate`] without allocating (see [`Domain::translate_each`]).
    pub fn translate_each(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        segment: impl FnMut(u64, u64),
    ) -> Result<(), Fault> {
        match self.endpoint_view(endpoint, iova, access)? {
            Some(domain) => domain.translate_each(iova, len, access, segment),
            None => Domain::new_bypass().translate_each(iova, len, access, segment),
        }
    }

    /// The domain `endpoint`'s DMA goes through: `Some(domain)` when attached, `None` when it
    /// bypasses the IOMMU, a fault when it is blocked.
    fn endpoint_view(
        &self,
        endpoint: u32,
        iova: u64,
        access: Access,
    ) -> Result<Option<&Domain>, Fault> {
        match self
            .attached
            .get(&endpoint)
            .and_then(|d| self.domains.get(d))
        {
            Some(entry) => Ok(Some(&entry.domain)),
            None if self.config.bypass && self.known_endpoints.contains(&endpoint) => Ok(None),
            None => Err(Fault {
                iova,
                access,
                reason: FaultReason::NoDomain,
            }),
        }
    }

    /// Execute one request.
    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Attach {
                domain,
                endpoint,
                bypass,
            } => self.attach(domain, endpoint, bypass).into(),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint).into(),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self
                .map(domain, virt_start, virt_end, phys_start, flags)
                .into(),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end).into(),
            Request::Probe { endpoint } => {
                if !self.known_endpoints.contains(&endpoint) {
                    return Response::status(IommuStatus::NoEnt);
                }
                match probe_properties(self.config.probe_size as usize) {
                    Some(payload) => Response {
                        status: IommuStatus::Ok,
                        payload,
                    },
                    None => Response::status(IommuStatus::DevErr),
                }
            }
        }
    }

    /// Whether feature `bit` (`VIRTIO_IOMMU_F_*`) was negotiated.
    pub fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    fn effective_bypass(&self, endpoint: u32) -> bool {
        match self
            .attached
            .get(&endpoint)
            .and_then(|d| self.domains.get(d))
        {
            Some(e) => e.domain.is_bypass(),
            None => self.config.bypass,
        }
    }

    fn notify_bypass(&self, endpoint: u32, enabled: bool) -> IommuStatus {
        match self.listeners.get(&endpoint) {
            Some(l) => check(l.bypass(endpoint, enabled), endpoint, "bypass"),
            None => IommuStatus::Ok,
        }
    }

    /// Tell `endpoint`'s listener about every mapping of `domain` (`add`) or their removal.
    fn notify_domain(&self, endpoint: u32, domain: u32, add: bool) -> IommuStatus {
        let (Some(l), Some(entry)) = (self.listeners.get(&endpoint), self.domains.get(&domain))
        else {
            return IommuStatus::Ok;
        };
        let mut status = IommuStatus::Ok;
        for (start, m) in entry.domain.mappings() {
            let r = if add {
                l.map(endpoint, start, size(start, m.iova_end), m.phys, m.flags)
            } else {
                l.unmap(endpoint, start, size(start, m.iova_end))
            };
            status = worst(
                status,
                check(r, endpoint, if add { "map" } else { "unmap" }),
            );
        }
        status
    }

    /// Remove `endpoint` from its domain (destroying the domain when it was the last endpoint),
    /// notifying its listener of the removed mappings.
    fn remove_from_domain(&mut self, endpoint: u32) -> IommuStatus {
        let Some(old) = self.attached.get(&endpoint).copied() else {
            return IommuStatus::Ok;
        };
        let was_bypass = self.effective_bypass(endpoint);
        let mut status = self.notify_domain(endpoint, old, false);
        self.attached.remove(&endpoint);
        if let Some(entry) = self.domains.get_mut(&old) {
            entry.endpoints.remove(&endpoint);
            if entry.endpoints.is_empty() {
                self.domains.remove(&old);
            }
        }
        let now_bypass = self.effective_bypass(endpoint);
        if was_bypass != now_bypass {
            status = worst(status, self.notify_bypass(endpoint, now_bypass));
        }
        status
    }

    fn attach(&mut self, domain: u32, endpoint: u32, bypass: bool) -> Result<(), IommuStatus> {
        if !self.known_endpoints.contains(&endpoint) {
            return Err(IommuStatus::NoEnt);
        }
        if domain < self.config.domain_start || domain > self.config.domain_end {
            return Err(IommuStatus::Range);
        }
        if bypass && !self.acked(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            return Err(IommuStatus::Inval);
        }
        if let Some(entry) = self.domains.get(&domain) {
            if entry.domain.is_bypass() != bypass {
                return Err(IommuStatus::Inval);
            }
        }
        if self.attached.get(&endpoint) == Some(&domain) {
            return Ok(());
        }
        let was_bypass = self.effective_bypass(endpoint);
        // Leave the old domain without announcing an intermediate bypass state.
        let mut status = match self.attached.get(&endpoint).copied() {
            Some(old) => {
                let s = self.notify_domain(endpoint, old, false);
                self.attached.remove(&endpoint);
                if let Some(entry) = self.domains.get_mut(&old) {
                    entry.endpoints.remove(&endpoint);
                    if entry.endpoints.is_empty() {
                        self.domains.remove(&old);
                    }
                }
                s
            }
            None => IommuStatus::Ok,
        };
        let entry = self.domains.entry(domain).or_insert_with(|| DomainEntry {
            domain: if bypass {
                Domain::new_bypass()
            } else {
                Domain::new()
            },
            endpoints: BTreeSet::new(),
        });
        entry.endpoints.insert(endpoint);
        self.attached.insert(endpoint, domain);
        if was_bypass != bypass {
            status = worst(status, self.notify_bypass(endpoint, bypass));
        }
        status = worst(status, self.notify_domain(endpoint, domain, true));
        to_result(status)
    }

    fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), IommuStatus> {
        // NOENT is for an unknown endpoint only, so the driver can tell it from a wrong domain.
        if !self.known_endpoints.contains(&endpoint) {
            return Err(IommuStatus::NoEnt);
        }
        if self.attached.get(&endpoint) != Some(&domain) {
            return Err(IommuStatus::Inval);
        }
        to_result(self.remove_from_domain(endpoint))
    }

    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys: u64,
        flags: u32,
    ) -> Result<(), IommuStatus> {
        if virt_start > virt_end {
            return Err(IommuStatus::Inval);
        }
        if flags & VIRTIO_IOMMU_MAP_F_MMIO != 0 && !self.acked(VIRTIO_IOMMU_F_MMIO) {
            return Err(IommuStatus::Inval);
        }
        let entry = self.domains.get_mut(&domain).ok_or(IommuStatus::NoEnt)?;
        let granule = self.config.granule();
        let end_plus_one = virt_end.checked_add(1).ok_or(IommuStatus::Range)?;
        if !virt_start.is_multiple_of(granule)
            || !end_plus_one.is_multiple_of(granule)
            || !phys.is_multiple_of(granule)
        {
            return Err(IommuStatus::Range);
        }
        if virt_start < self.config.input_start || virt_end > self.config.input_end {
            return Err(IommuStatus::Range);
        }
        // PROBE reports the MSI window as reserved for every endpoint: mapping over it is refused
        // (virtio 1.x 5.13.6.8.1.2).
        if overlaps_msi_window(virt_start, virt_end) {
            return Err(IommuStatus::Inval);
        }
        entry.domain.map(virt_start, virt_end, phys, flags)?;
        let mut status = IommuStatus::Ok;
        for ep in &entry.endpoints {
            if let Some(l) = self.listeners.get(ep) {
                let r = l.map(*ep, virt_start, end_plus_one - virt_start, phys, flags);
                status = worst(status, check(r, *ep, "map"));
            }
        }
        to_result(status)
    }

    fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), IommuStatus> {
        let entry = self.domains.get_mut(&domain).ok_or(IommuStatus::NoEnt)?;
        if entry.domain.is_bypass() {
            return Err(IommuStatus::Inval);
        }
        let removed = entry.domain.unmap(virt_start, virt_end)?;
        let mut status = IommuStatus::Ok;
        for ep in &entry.endpoints {
            if let Some(l) = self.listeners.get(ep) {
                for (start, m) in &removed {
                    let r = l.unmap(*ep, *start, size(*start, m.iova_end));
                    status = worst(status, check(r, *ep, "unmap"));
                }
            }
        }
        to_result(status)
    }

    /// Save domains, mappings, attachments, the `bypass` field and the acked features.
    pub fn save(&self) -> StateSection {
        let mut w = StateWriter::new();
        w.bool(self.config.bypass).u64(self.acked_features);
        w.u32(self.domains.len() as u32);
        for (id, entry) in &self.domains {
            w.u32(*id)
                .bool(entry.domain.is_bypass())
                .u32(entry.domain.len() as u32);
            for (start, m) in entry.domain.mappings() {
                w.u64(start).u64(m.iova_end).u64(m.phys).u32(m.flags);
            }
        }
        w.u32(self.attached.len() as u32);
        for (ep, d) in &self.attached {
            w.u32(*ep).u32(*d);
        }
        w.into_section(STATE_ID, STATE_VERSION)
    }

    /// Restore state written by [`IommuState::save`]. Endpoints must have been added (and
    /// listeners registered) first; listeners are told to drop the old mappings and given the
    /// restored ones. On error the current state is left unchanged.
    pub fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, STATE_ID, STATE_VERSION)?;
        let bypass = r.bool()?;
        let acked = r.u64()?;
        let n_domains = r.u32()?;
        let mut domains: BTreeMap<u32, DomainEntry> = BTreeMap::new();
        for _ in 0..n_domains {
            let id = r.u32()?;
            let is_bypass = r.bool()?;
            let mut domain = if is_bypass {
                Domain::new_bypass()
            } else {
                Domain::new()
            };
            let n = r.u32()?;
            for _ in 0..n {
                let (start, end, phys, flags) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
                domain.map(start, end, phys, flags).map_err(|s| {
                    r.malformed(format!("domain {id}: bad mapping {start:#x}: {s:?}"))
                })?;
            }
            let entry = DomainEntry {
                domain,
                endpoints: BTreeSet::new(),
            };
            if domains.insert(id, entry).is_some() {
                return Err(r.malformed(format!("domain {id} appears twice")));
            }
        }
        let n_attached = r.u32()?;
        let mut attached = BTreeMap::new();
        for _ in 0..n_attached {
            let (ep, d) = (r.u32()?, r.u32()?);
            if !self.known_endpoints.contains(&ep) {
                return Err(r.malformed(format!("unknown endpoint {ep}")));
            }
            let entry = domains.get_mut(&d).ok_or_else(|| {
                r.malformed(format!("endpoint {ep} attached to missing domain {d}"))
            })?;
            entry.endpoints.insert(ep);
            if attached.insert(ep, d).is_some() {
                return Err(r.malformed(format!("endpoint {ep} attached twice")));
            }
        }
        if let Some(id) = domains
            .iter()
            .find(|(_, e)| e.endpoints.is_empty())
            .map(|(id, _)| *id)
        {
            return Err(r.malformed(format!("domain {id} has no endpoint")));
        }
        r.finish()?;

        // Drop the old state from the listeners, install the new one, and replay it.
        let eps: Vec<u32> = self.listeners.keys().copied().collect();
        for ep in &eps {
            if let Some(d) = self.attached.get(ep).copied() {
                self.notify_domain(*ep, d, false);
            }
        }
        let old_bypass: Vec<bool> = eps.iter().map(|e| self.effective_bypass(*e)).collect();
        self.config.bypass = bypass;
        self.acked_features = acked & OFFERED_FEATURES;
        self.domains = domains;
        self.attached = attached;
        for (ep, was) in eps.iter().zip(old_bypass) {
            let now = self.effective_bypass(*ep);
            if now != was {
                self.notify_bypass(*ep, now);
            }
            if let Some(d) = self.attached.get(ep).copied() {
                self.notify_domain(*ep, d, true);
            }
        }
        Ok(())
    }
}

/// Size of `[start, end]`; a range covering all 2^64 addresses saturates to `u64::MAX`.
fn size(start: u64, end: u64) -> u64 {
    (end - start).saturating_add(1)
}

fn check(r: io::Result<()>, endpoint: u32, what: &str) -> IommuStatus {
    match r {
        Ok(()) => IommuStatus::Ok,
        Err(e) => {
            error!("virtio-iommu: external {what} for endpoint {endpoint} failed: {e}");
            IommuStatus::DevErr
        }
    }
}

fn worst(a: IommuStatus, b: IommuStatus) -> IommuStatus {
    if a == IommuStatus::Ok {
        b
    } else {
        a
    }
}

fn to_result(s: IommuStatus) -> Result<(), IommuStatus> {
    if s == IommuStatus::Ok {
        Ok(())
    } else {
        Err(s)
    }
}

/// The fault event to report on the event queue for `fault` by `endpoint`.
pub fn fault_event(endpoint: u32, fault: &Fault) -> FaultEvent {
    let reason = match fault.reason {
        FaultReason::NoDomain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
        _ => VIRTIO_IOMMU_FAULT_R_MAPPING,
    };
    let access = match fault.access {
        Access::Read => VIRTIO_IOMMU_FAULT_F_READ,
        Access::Write => VIRTIO_IOMMU_FAULT_F_WRITE,
    };
    FaultEvent {
        reason,
        flags: access | VIRTIO_IOMMU_FAULT_F_ADDRESS,
        endpoint,
        address: fault.iova,
    }
}

/// A cheap, thread-safe handle on an [`IommuState`], shared by the request worker and every
/// device that performs DMA through the IOMMU.
#[derive(Debug, Clone)]
pub struct Translator {
    inner: Arc<RwLock<IommuState>>,
}

impl Translator {
    /// Share `state`.
    pub fn new(state: IommuState) -> Self {
        Self {
            inner: Arc::new(RwLock::new(state)),
        }
    }

    /// Lock the state for reading. A poisoned lock is recovered: the state is updated in place
    /// only after validation, so it stays consistent.
    pub fn read(&self) -> RwLockReadGuard<'_, IommuState> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock the state for writing (see [`Translator::read`] about poisoning).
    pub fn write(&self) -> RwLockWriteGuard<'_, IommuState> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Translate `len` bytes at `iova` for a DMA `access` by `endpoint` into guest-physical
    /// segments `(phys, len)`.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64)>, Fault> {
        self.read().translate(endpoint, iova, len, access)
    }

    /// Execute one request.
    pub fn handle(&self, req: Request) -> Response {
        self.write().handle(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{VIRTIO_IOMMU_MAP_F_READ as R, VIRTIO_IOMMU_MAP_F_WRITE as W};
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Map(u32, u64, u64, u64, u32),
        Unmap(u32, u64, u64),
        Bypass(u32, bool),
    }

    #[derive(Default)]
    struct Rec {
        events: Mutex<Vec<Ev>>,
        fail: bool,
    }

    impl Rec {
        fn take(&self) -> Vec<Ev> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl ExternalMappingListener for Rec {
        fn map(&self, ep: u32, iova: u64, size: u64, phys: u64, flags: u32) -> io::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(Ev::Map(ep, iova, size, phys, flags));
            if self.fail {
                return Err(io::Error::other("no"));
            }
            Ok(())
        }
        fn unmap(&self, ep: u32, iova: u64, size: u64) -> io::Result<()> {
            self.events.lock().unwrap().push(Ev::Unmap(ep, iova, size));
            Ok(())
        }
        fn bypass(&self, ep: u32, enabled: bool) -> io::Result<()> {
            self.events.lock().unwrap().push(Ev::Bypass(ep, enabled));
            Ok(())
        }
    }

    fn state() -> IommuState {
        let mut s = IommuState::new(IommuConfig::default());
        s.add_endpoint(8);
        s.add_endpoint(16);
        s
    }

    fn attach(domain: u32, endpoint: u32) -> Request {
        Request::Attach {
            domain,
            endpoint,
            bypass: false,
        }
    }

    fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Request {
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        }
    }

    fn st(s: &mut IommuState, r: Request) -> IommuStatus {
        s.handle(r).status
    }

    #[test]
    fn attach_map_translate_unmap_fault() {
        let mut s = state();
        let f = s.translate(8, 0x1000, 4, Access::Read).unwrap_err();
        assert_eq!(f.reason, FaultReason::NoDomain);
        assert_eq!(fault_event(8, &f).reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);

        assert_eq!(st(&mut s, attach(1, 99)), IommuStatus::NoEnt);
        assert_eq!(st(&mut s, map(1, 0, 0xfff, 0, R)), IommuStatus::NoEnt);
        assert_eq!(st(&mut s, attach(1, 8)), IommuStatus::Ok);
        assert_eq!(st(&mut s, attach(1, 8)), IommuStatus::Ok);
        assert_eq!(
            st(&mut s, map(1, 0x1000, 0x2fff, 0x40000, R | W)),
            IommuStatus::Ok
        );
        // Alignment and input range.
        assert_eq!(st(&mut s, map(1, 0x3800, 0x3fff, 0, R)), IommuStatus::Range);
        assert_eq!(st(&mut s, map(1, 0x3000, 0x37ff, 0, R)), IommuStatus::Range);
        assert_eq!(
            st(&mut s, map(1, 0x3000, 0x3fff, 0x800, R)),
            IommuStatus::Range
        );
        assert_eq!(
            st(&mut s, map(1, 1 << 48, (1 << 48) + 0xfff, 0, R)),
            IommuStatus::Range
        );
        assert_eq!(st(&mut s, map(1, 0x1000, 0x1fff, 0, R)), IommuStatus::Inval);

        assert_eq!(
            s.translate(8, 0x1ff0, 0x20, Access::Write),
            Ok(vec![(0x40ff0, 0x20)])
        );
        let f = s.translate(8, 0x3000, 1, Access::Read).unwrap_err();
        let ev = fault_event(8, &f);
        assert_eq!(
            (ev.reason, ev.address),
            (VIRTIO_IOMMU_FAULT_R_MAPPING, 0x3000)
        );

        let unmap = |a, b| Request::Unmap {
            domain: 1,
            virt_start: a,
            virt_end: b,
        };
        assert_eq!(st(&mut s, unmap(0x1000, 0x1fff)), IommuStatus::Range);
        assert_eq!(st(&mut s, unmap(0, 0xffff)), IommuStatus::Ok);
        assert!(s.translate(8, 0x1000, 1, Access::Read).is_err());
        assert_eq!(
            st(
                &mut s,
                Request::Unmap {
                    domain: 7,
                    virt_start: 0,
                    virt_end: 1
                }
            ),
            IommuStatus::NoEnt
        );
    }

    #[test]
    fn moving_endpoints_and_domain_lifetime() {
        let mut s = state();
        assert_eq!(st(&mut s, attach(1, 8)), IommuStatus::Ok);
        assert_eq!(st(&mut s, attach(1, 16)), IommuStatus::Ok);
        assert_eq!(st(&mut s, map(1, 0, 0xfff, 0x9000, R)), IommuStatus::Ok);
        assert_eq!(s.translate(16, 0, 1, Access::Read), Ok(vec![(0x9000, 1)]));
        // Move 16 to domain 2: domain 1 keeps 8.
        assert_eq!(st(&mut s, attach(2, 16)), IommuStatus::Ok);
        assert_eq!(s.endpoint_domain(16), Some(2));
        assert!(s.translate(16, 0, 1, Access::Read).is_err());
        assert_eq!(s.domain_count(), 2);
        // Move 8 too: domain 1 loses its last endpoint and is destroyed.
        assert_eq!(st(&mut s, attach(2, 8)), IommuStatus::Ok);
        assert_eq!(s.domain_count(), 1);
        assert!(s.domain(1).is_none());
        // Detach rules.
        assert_eq!(
            st(
                &mut s,
                Request::Detach {
                    domain: 1,
                    endpoint: 8
                }
            ),
            IommuStatus::Inval,
            "the domain is gone: INVAL, NOENT is for unknown endpoints"
        );
        assert_eq!(st(&mut s, attach(3, 16)), IommuStatus::Ok);
        assert_eq!(
            st(
                &mut s,
                Request::Detach {
                    domain: 3,
                    endpoint: 8
                }
            ),
            IommuStatus::Inval
        );
        assert_eq!(
            st(
                &mut s,
                Request::Detach {
                    domain: 2,
                    endpoint: 8
                }
            ),
            IommuStatus::Ok
        );
        assert!(s.domain(2).is_none());
        assert_eq!(s.endpoint_domain(8), None);
    }

    #[test]
    fn bypass_domains_and_config() {
        let mut s = state();
        let b = |domain, endpoint| Request::Attach {
            domain,
            endpoint,
            bypass: true,
        };
        assert_eq!(st(&mut s, b(5, 8)), IommuStatus::Ok);
        assert_eq!(
            s.translate(8, 0x1234, 4, Access::Write),
            Ok(vec![(0x1234, 4)])
        );
        assert_eq!(st(&mut s, attach(5, 16)), IommuStatus::Inval);
        assert_eq!(st(&mut s, map(5, 0, 0xfff, 0, R)), IommuStatus::Inval);
        // Global bypass for unattached endpoints.
        assert!(s.translate(16, 0, 1, Access::Read).is_err());
        s.set_bypass(true);
        assert_eq!(s.translate(16, 0, 1, Access::Read), Ok(vec![(0, 1)]));
        assert!(s.translate(99, 0, 1, Access::Read).is_err());
        // Without BYPASS_CONFIG acked, bypass domains and MMIO mappings are refused.
        s.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        assert_eq!(st(&mut s, b(6, 16)), IommuStatus::Inval);
        assert_eq!(st(&mut s, attach(6, 16)), IommuStatus::Ok);
        assert_eq!(
            st(&mut s, map(6, 0, 0xfff, 0, R | VIRTIO_IOMMU_MAP_F_MMIO)),
            IommuStatus::Inval
        );
        // Domain range.
        let mut c = IommuConfig {
            domain_start: 1,
            domain_end: 4,
            ..Default::default()
        };
        c.probe_size = 8;
        let mut s = IommuState::new(c);
        s.add_endpoint(1);
        assert_eq!(st(&mut s, attach(0, 1)), IommuStatus::Range);
        assert_eq!(st(&mut s, attach(5, 1)), IommuStatus::Range);
        assert_eq!(st(&mut s, attach(4, 1)), IommuStatus::Ok);
        // probe_size too small for the MSI property.
        assert_eq!(
            st(&mut s, Request::Probe { endpoint: 1 }),
            IommuStatus::DevErr
        );
    }

    #[test]
    fn probe() {
        let mut s = state();
        let r = s.handle(Request::Probe { endpoint: 8 });
        assert_eq!(r.status, IommuStatus::Ok);
        assert_eq!(r.payload.len(), 512);
        assert_eq!(r.payload[4], crate::protocol::VIRTIO_IOMMU_RESV_MEM_T_MSI);
        assert_eq!(
            st(&mut s, Request::Probe { endpoint: 9 }),
            IommuStatus::NoEnt
        );
    }

    #[test]
    fn listener_notifications() {
        let mut s = state();
        let l8 = Arc::new(Rec::default());
        let l16 = Arc::new(Rec::default());
        s.register_listener(8, l8.clone()).unwrap();
        s.register_listener(16, l16.clone()).unwrap();
        assert!(l8.take().is_empty());

        st(&mut s, attach(1, 8));
        st(&mut s, map(1, 0x1000, 0x1fff, 0x5000, R));
        assert_eq!(l8.take(), vec![Ev::Map(8, 0x1000, 0x1000, 0x5000, R)]);
        // Attaching 16 to a populated domain replays its mappings.
        st(&mut s, attach(1, 16));
        assert_eq!(l16.take(), vec![Ev::Map(16, 0x1000, 0x1000, 0x5000, R)]);
        st(&mut s, map(1, 0x2000, 0x3fff, 0x8000, W));
        assert_eq!(l8.take(), vec![Ev::Map(8, 0x2000, 0x2000, 0x8000, W)]);
        assert_eq!(l16.take(), vec![Ev::Map(16, 0x2000, 0x2000, 0x8000, W)]);
        // Unmap notifies every endpoint of the domain, per removed mapping.
        st(
            &mut s,
            Request::Unmap {
                domain: 1,
                virt_start: 0x2000,
                virt_end: 0x3fff,
            },
        );
        assert_eq!(l8.take(), vec![Ev::Unmap(8, 0x2000, 0x2000)]);
        assert_eq!(l16.take(), vec![Ev::Unmap(16, 0x2000, 0x2000)]);
        // Moving 16 to a bypass domain: its mappings go, bypass comes.
        st(
            &mut s,
            Request::Attach {
                domain: 2,
                endpoint: 16,
                bypass: true,
            },
        );
        assert_eq!(
            l16.take(),
            vec![Ev::Unmap(16, 0x1000, 0x1000), Ev::Bypass(16, true)]
        );
        assert!(l8.take().is_empty());
        st(
            &mut s,
            Request::Detach {
                domain: 2,
                endpoint: 16,
            },
        );
        assert_eq!(l16.take(), vec![Ev::Bypass(16, false)]);
        st(
            &mut s,
            Request::Detach {
                domain: 1,
                endpoint: 8,
            },
        );
        assert_eq!(l8.take(), vec![Ev::Unmap(8, 0x1000, 0x1000)]);
        // Global bypass reaches unattached endpoints.
        s.set_bypass(true);
        assert_eq!(l8.take(), vec![Ev::Bypass(8, true)]);
        assert_eq!(l16.take(), vec![Ev::Bypass(16, true)]);
        // A late listener gets the current state.
        s.unregister_listener(8);
        st(&mut s, attach(3, 8));
        st(&mut s, map(3, 0, 0xfff, 0, R));
        let late = Arc::new(Rec::default());
        s.register_listener(8, late.clone()).unwrap();
        assert_eq!(late.take(), vec![Ev::Map(8, 0, 0x1000, 0, R)]);
    }

    #[test]
    fn listener_failure_is_deverr() {
        let mut s = state();
        let l = Arc::new(Rec {
            fail: true,
            ..Default::default()
        });
        s.register_listener(8, l).unwrap();
        st(&mut s, attach(1, 8));
        assert_eq!(st(&mut s, map(1, 0, 0xfff, 0, R)), IommuStatus::DevErr);
    }

    #[test]
    fn state_round_trip_and_rejections() {
        let mut s = state();
        st(&mut s, attach(1, 8));
        st(&mut s, map(1, 0x1000, 0x1fff, 0x5000, R));
        st(&mut s, map(1, 0x4000, 0x7fff, 0x9000, R | W));
        st(
            &mut s,
            Request::Attach {
                domain: 2,
                endpoint: 16,
                bypass: true,
            },
        );
        s.set_bypass(true);
        let sec = s.save();

        let mut t = state();
        let l = Arc::new(Rec::default());
        t.register_listener(8, l.clone()).unwrap();
        l.take();
        t.restore(&sec).unwrap();
        assert_eq!(t.save(), sec);
        assert_eq!(t.endpoint_domain(16), Some(2));
        assert_eq!(
            t.translate(8, 0x4010, 4, Access::Write),
            Ok(vec![(0x9010, 4)])
        );
        assert_eq!(
            l.take(),
            vec![
                Ev::Map(8, 0x1000, 0x1000, 0x5000, R),
                Ev::Map(8, 0x4000, 0x4000, 0x9000, R | W)
            ]
        );

        // Every truncation is rejected and leaves the state alone.
        for n in 0..sec.data.len() {
            let mut bad = sec.clone();
            bad.data.truncate(n);
            let mut u = state();
            assert!(u.restore(&bad).is_err(), "{n}");
            assert_eq!(u.domain_count(), 0);
        }
        let mut bad = sec.clone();
        bad.data.push(0);
        assert!(state().restore(&bad).is_err());
        let mut bad = sec.clone();
        bad.version = 2;
        assert!(matches!(
            state().restore(&bad),
            Err(StateError::Version { .. })
        ));
        // Unknown endpoint on the target.
        let mut u = IommuState::new(IommuConfig::default());
        u.add_endpoint(8);
        assert!(u.restore(&sec).is_err());
    }

    /// Random request streams (random bytes, and mutated well-formed requests) never panic, and
    /// afterwards every domain's mappings are disjoint and translate to what they were mapped to.
    #[test]
    fn random_request_streams_keep_the_state_consistent() {
        use crate::protocol::parse_request;

        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut s = state();
        s.set_acked_features(OFFERED_FEATURES);
        let mut succeeded = std::collections::BTreeSet::new();
        for i in 0..200_000u32 {
            let r = next();
            let mut bytes = match r % 6 {
                0 => (0..(next() % 80))
                    .map(|_| next() as u8)
                    .collect::<Vec<u8>>(),
                1 => attach((next() % 4) as u32, [8, 16, 24][(next() % 3) as usize]).encode(),
                2 => Request::Detach {
                    domain: (next() % 4) as u32,
                    endpoint: [8, 16][(next() % 2) as usize],
                }
                .encode(),
                3 | 4 => {
                    let start = (next() % 64) << 12;
                    let len = ((next() % 8) + 1) << 12;
                    map(
                        (next() % 4) as u32,
                        start,
                        start + len - 1,
                        (next() % 1024) << 12,
                        3,
                    )
                    .encode()
                }
                _ => {
                    let start = (next() % 64) << 12;
                    Request::Unmap {
                        domain: (next() % 4) as u32,
                        virt_start: start,
                        virt_end: start + (next() % 0x9000),
                    }
                    .encode()
                }
            };
            // Flip a byte now and then.
            if i % 7 == 0 && !bytes.is_empty() {
                let at = (next() as usize) % bytes.len();
                bytes[at] ^= next() as u8;
            }
            if let Ok(req) = parse_request(&bytes) {
                let kind = std::mem::discriminant(&req);
                if s.handle(req).status == IommuStatus::Ok {
                    succeeded.insert(format!("{kind:?}"));
                }
            }
            let _ = s.translate(8, next() % (80 << 12), next() % 0x3000, Access::Write);
        }
        assert_eq!(
            succeeded.len(),
            4,
            "attach, detach, map and unmap all succeeded at times"
        );
        assert!(s.domain_count() > 0);
        for d in 0..4 {
            let Some(dom) = s.domain(d) else { continue };
            let maps: Vec<(u64, crate::domain::Mapping)> =
                dom.mappings().map(|(k, m)| (k, *m)).collect();
            for w in maps.windows(2) {
                assert!(w[0].1.iova_end < w[1].0, "overlap in domain {d}: {w:x?}");
            }
            for (start, m) in &maps {
                let segs = dom
                    .translate(*start, m.iova_end - start + 1, Access::Read)
                    .unwrap();
                assert_eq!(segs, vec![(m.phys, m.iova_end - start + 1)]);
            }
        }
    }
}
