//! The KVM-side components of a VM as registry entries: each vCPU (`cpuN`), and the VM-level
//! irqchip, PIT and kvmclock.
//!
//! vCPUs are paused as a group by [`crate::vcpu::VcpuControl`] (a barrier across every vCPU
//! thread) before any component is asked to pause, so their [`Pausable`] methods have nothing
//! left to do. The same holds for the in-kernel irqchip, PIT and clock: they only change while
//! vCPUs run.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration::{Migratable, Pausable, Snapshottable, StateError, StateSection};

use crate::vcpu_state::{restore_vcpu, save_vcpu, section_id};
use crate::vm_state::{
    restore_vm_with, save_vm, ClockMode, CLOCK_SECTION, IRQCHIP_SECTION, PIT_SECTION,
};

/// The state of one vCPU (registers, MSRs, LAPIC, events, ...), section `cpuN`.
pub struct VcpuComponent {
    index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    kvm: Arc<Kvm>,
}

impl VcpuComponent {
    /// vCPU `index` owning `fd`.
    pub fn new(index: u32, fd: Arc<Mutex<VcpuFd>>, kvm: Arc<Kvm>) -> Self {
        Self { index, fd, kvm }
    }
}

impl Pausable for VcpuComponent {}

impl Snapshottable for VcpuComponent {
    fn id(&self) -> String {
        section_id(self.index)
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        save_vcpu(&fd, self.index, &self.kvm).map_err(|e| StateError::component(self.id(), e))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        restore_vcpu(&fd, self.index, &self.kvm, section).map_err(|e| match e {
            crate::vcpu_state::VcpuStateError::State(s) => s,
            other => StateError::component(self.id(), other),
        })
    }
}

impl Migratable for VcpuComponent {}

/// One part of the VM-level KVM state: `irqchip` (PICs and IOAPIC), `pit` or `clock`.
pub struct KvmVmPart {
    section: &'static str,
    vm: Arc<VmFd>,
    clock: Arc<Mutex<ClockMode>>,
}

impl KvmVmPart {
    /// The three parts of `vm`, in restore order (irqchip, PIT, clock); the clock is restored
    /// as `clock` says when the restore happens.
    pub fn all(vm: &Arc<VmFd>, clock: &Arc<Mutex<ClockMode>>) -> [Self; 3] {
        [IRQCHIP_SECTION, PIT_SECTION, CLOCK_SECTION].map(|section| Self {
            section,
            vm: vm.clone(),
            clock: clock.clone(),
        })
    }

    /// The registry id (also the section id).
    pub fn section(&self) -> &'static str {
        self.section
    }
}

impl Pausable for KvmVmPart {}

impl Snapshottable for KvmVmPart {
    fn id(&self) -> String {
        self.section.to_string()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let all = save_vm(&self.vm).map_err(|e| StateError::component(self.section, e))?;
        all.into_iter()
            .find(|s| s.id == self.section)
            .ok_or_else(|| StateError::Malformed {
                id: self.section.into(),
                reason: "the KVM state has no such part".into(),
            })
    }

    /// Restore this part. The VM-level state is read and written as a whole by `vm_state`
    /// (every part decoded and checked before the first ioctl), so the other two parts are
    /// written back with the values KVM holds now: a no-op for them.
    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut all = save_vm(&self.vm).map_err(|e| StateError::component(self.section, e))?;
        for s in &mut all {
            if s.id == self.section {
                *s = section.clone();
            }
        }
        // Only the clock part sets the clock: setting it again from the value just read would
        // advance it (or, without KVM_CLOCK_REALTIME, set it back) by the time in between.
        let mode = if self.section == CLOCK_SECTION {
            *self.clock.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            ClockMode::Keep
        };
        restore_vm_with(&self.vm, &all, mode).map_err(|e| match e {
            crate::vm_state::VmStateError::State(s) => s,
            other => StateError::component(self.section, other),
        })
    }
}

impl Migratable for KvmVmPart {}
