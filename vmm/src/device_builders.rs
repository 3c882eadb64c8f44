//! The devices a [`VmConfig`] asks for: where each goes on PCI bus 0 ([`PciPlan`]) and the
//! table of builders, one per configuration kind ([`BUILDERS`]), that turn a configured device
//! into a [`PciFunction`].
//!
//! Adding a device type: a field in `VmConfig` (and its line in `VmConfig::devices`), a
//! [`DeviceKind`], and one entry here. Nothing else lists devices.

use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::console::{Console, ConsoleConfig as DevConsoleConfig, ConsoleOutput};
use devices::virtio::net::{MacAddr, Net, NetConfig as DevNetConfig, TapSource};
use devices::virtio::rng::{Rng, RngConfig as DevRngConfig};
use devices::virtio::{AccessPlatform, VirtioDevice};
use pci::{PciFunction, VirtioPciDevice};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{
    ConfiguredDevice, ConsoleConfig, DeviceKind, GroupPolicy, PciAddress, TapConfig,
    VfioKernelBackend, VmConfig, IOMMU_PCI_SLOT,
};
use crate::interrupts::KvmInterruptManager;
use crate::memory::GuestMemoryMmap;
use crate::passthrough::{DmaContext, PassthroughDma, Peer};
use crate::pci_devices::intx_gsi;
use iommu::Translator;
use pci::vfio::kernel::{
    DirtyOpenError, IommufdSet, KernelVfioDevice, KernelVfioError, VfioGroupSet,
};
use pci::vfio::sysfs::{BindOptions, PreparedDevice, SysfsRoot};
use pci::vfio::{DmaSpace, VfioBackend, VfioMigrationOptions as PassthroughOptions, VfioPciDevice};

pub use crate::config::IOMMU_DEVICE_ID;

/// Errors creating a device from the configuration (before the guest starts).
#[derive(Debug, Error)]
#[error("{what} {id}: {source}")]
pub struct DeviceCreateError {
    /// The option that configured it.
    pub what: &'static str,
    /// Device id.
    pub id: String,
    /// Why it cannot be created.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DeviceCreateError {
    fn new(
        what: &'static str,
        id: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what,
            id: id.to_string(),
            source: source.into(),
        }
    }
}

/// Where every device of a configuration goes on PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPlan {
    /// Address of the virtio-iommu, when any device sits behind it (always the first slot
    /// after the host bridge).
    pub iommu: Option<PciAddress>,
    /// Every configured device with its address (the recorded one, or the lowest free slot in
    /// configuration order), in configuration order.
    pub devices: Vec<(ConfiguredDevice, PciAddress)>,
}

impl PciPlan {
    /// The plan for `config` (already validated: recorded addresses are distinct and not the
    /// IOMMU's). Fails when the devices do not fit on one bus.
    pub fn new(config: &VmConfig) -> Result<Self, DeviceCreateError> {
        let configured = config.devices();
        let iommu = config
            .has_iommu()
            .then(|| PciAddress::new(IOMMU_PCI_SLOT).expect("slot 1 is valid"));
        let mut taken: Vec<u8> = configured
            .iter()
            .filter_map(|d| d.pci_address.map(PciAddress::slot))
            .chain(iommu.map(PciAddress::slot))
            .collect();
        let mut devices = Vec::with_capacity(configured.len());
        for d in configured {
            let addr = match d.pci_address {
                Some(a) => a,
                None => {
                    let slot = (1..pci::bus::NUM_SLOTS)
                        .find(|s| !taken.contains(s))
                        .ok_or_else(|| {
                            DeviceCreateError::new(
                                "PCI",
                                &d.id,
                                format!(
                                    "no free slot on bus 0 ({} devices do not fit in the 31 slots)",
                                    config.devices().len() + usize::from(iommu.is_some())
                                ),
                            )
                        })?;
                    taken.push(slot);
                    PciAddress::new(slot).expect("slot in range")
                }
            };
            devices.push((d, addr));
        }
        Ok(Self { iommu, devices })
    }

    /// Slots of the devices behind the IOMMU.
    pub fn endpoint_slots(&self) -> Vec<u8> {
        self.devices
            .iter()
            .filter(|(d, _)| d.iommu)
            .map(|(_, a)| a.slot())
            .collect()
    }
}

/// The VM's kernel VFIO state, created when the first host device is opened: devices of one
/// IOMMU group share one container (or IOAS), and every group is announced to the VM's KVM VFIO
/// device.
pub struct KernelVfio {
    vm_fd: Arc<kvm_ioctls::VmFd>,
    kvm_vfio: std::sync::OnceLock<Option<Arc<vfio_ioctls::VfioDeviceFd>>>,
    groups: std::sync::OnceLock<VfioGroupSet>,
    iommufd: std::sync::OnceLock<IommufdSet>,
}

impl KernelVfio {
    /// Kernel VFIO for the VM `vm_fd`.
    pub fn new(vm_fd: Arc<kvm_ioctls::VmFd>) -> Self {
        Self {
            vm_fd,
            kvm_vfio: Default::default(),
            groups: Default::default(),
            iommufd: Default::default(),
        }
    }

    /// The VM's KVM VFIO device (`KVM_DEV_TYPE_VFIO`), when KVM offers one.
    fn kvm_vfio(&self) -> Option<Arc<vfio_ioctls::VfioDeviceFd>> {
        self.kvm_vfio
            .get_or_init(|| {
                let mut dev = kvm_bindings::kvm_create_device {
                    type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
                    fd: 0,
                    flags: 0,
                };
                match self.vm_fd.create_device(&mut dev) {
                    Ok(fd) => Some(Arc::new(vfio_ioctls::VfioDeviceFd::new_from_kvm(fd))),
                    Err(e) => {
                        log::warn!("KVM VFIO device: {e}; continuing without it");
                        None
                    }
                }
            })
            .clone()
    }

    /// Open a prepared host device with `backend`. Any host device may be migrated (whether
    /// it can is known only once it is open), so iommufd opens it with IOMMU dirty tracking
    /// when the IOMMU has it: the source of its dirty pages if it has no DMA logging of its own
    /// (the tracking stays off until a migration starts). The legacy container (type1) has no
    /// IOMMU dirty tracking: its VFIO_IOMMU_DIRTY_PAGES reports every IOMMU-mapped page dirty
    /// for a device that does not pin pages, which is what the migration does without a log
    /// anyway; there it is the device's own DMA log or everything.
    fn open(
        &self,
        backend: VfioKernelBackend,
        prepared: PreparedDevice,
    ) -> Result<Arc<KernelVfioDevice>, KernelVfioError> {
        match backend {
            VfioKernelBackend::Group => self
                .groups
                .get_or_init(|| VfioGroupSet::new(self.kvm_vfio()))
                .open(prepared),
            VfioKernelBackend::Iommufd => {
                let set = self
                    .iommufd
                    .get_or_init(|| IommufdSet::new(self.kvm_vfio()));
                match set.open_dirty_tracking(prepared) {
                    Ok(dev) => Ok(dev),
                    Err(DirtyOpenError {
                        error: e @ KernelVfioError::NoDirtyTracking { .. },
                        prepared: Some(prepared),
                    }) => {
                        log::info!("{e}: opening it without IOMMU dirty tracking");
                        set.open(*prepared)
                    }
                    Err(e) => Err(e.error),
                }
            }
        }
    }
}

/// Where sysfs is: `/sys`, or the fake tree a test names in `SKIFF_SYSFS_ROOT`.
fn sysfs_root() -> SysfsRoot {
    SysfsRoot::new(std::env::var_os("SKIFF_SYSFS_ROOT").unwrap_or_else(|| "/sys".into()))
}

/// What a builder gets besides the configuration.
pub struct BuildContext<'a> {
    /// Kernel VFIO (host devices).
    pub kernel_vfio: &'a KernelVfio,
    /// The guest physical address space for passthrough DMA.
    pub dma: &'a DmaContext,
    /// The virtual IOMMU's state, when the VM has one (passthrough devices behind it follow its
    /// mappings).
    pub iommu: Option<Translator>,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// MSI-X vectors and INTx lines.
    pub interrupts: Arc<KvmInterruptManager>,
    /// Where the device goes.
    pub address: PciAddress,
    /// The device's DMA view when it sits behind the virtual IOMMU.
    pub access: Option<Arc<dyn AccessPlatform>>,
    /// The VM is being restored (outputs are appended to, not truncated).
    pub restoring: bool,
}

/// Builds the PCI function of one configured device.
pub type BuildFn = fn(
    &VmConfig,
    &ConfiguredDevice,
    &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError>;

/// One builder per configuration kind.
pub static BUILDERS: &[(DeviceKind, BuildFn)] = &[
    (DeviceKind::Disk, build_disk),
    (DeviceKind::Net, build_net),
    (DeviceKind::Console, build_console),
    (DeviceKind::Rng, build_rng),
    (DeviceKind::UserDevice, build_user_device),
    (DeviceKind::HostDevice, build_host_device),
];

/// Build the function of `device` with the builder of its kind.
pub fn build(
    config: &VmConfig,
    device: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let (_, build) = BUILDERS
        .iter()
        .find(|(kind, _)| *kind == device.kind)
        .ok_or_else(|| DeviceCreateError::new("device", &device.id, "no builder for this kind"))?;
    build(config, device, ctx)
}

/// Put a virtio device behind the virtio-pci transport: MSI-X, INTx pin A on its slot's GSI,
/// the IOMMU's DMA view when it has one, and `device-error` events.
pub fn virtio_function(
    what: &'static str,
    device: Box<dyn VirtioDevice>,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let id = device.id().to_string();
    let mut dev = VirtioPciDevice::new(
        device,
        ctx.mem.clone(),
        ctx.interrupts.clone(),
        Some((1, intx_gsi(ctx.address.slot(), 0))),
    )
    .map_err(|e| DeviceCreateError::new(what, &id, e))?;
    if let Some(access) = &ctx.access {
        dev.set_access_platform(access.clone());
    }
    dev.set_error_hook(device_error_hook());
    Ok(Arc::new(Mutex::new(dev)))
}

/// Turns a device's failure into a `device-error` event.
fn device_error_hook() -> devices::virtio::ErrorHook {
    Arc::new(|id: &str, reason: &str| {
        crate::events::emit(
            "device",
            "device-error",
            serde_json::json!({ "id": id, "reason": reason }),
        );
    })
}

fn build_disk(
    config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let disk = &config.disks[d.index];
    let blk = Block::new(BlockConfig {
        id: d.id.clone(),
        path: disk.path.clone(),
        readonly: disk.readonly,
        serial: disk.serial.clone(),
        iommu: disk.iommu,
    })
    .map_err(|e| DeviceCreateError::new("--disk", &d.id, e))?;
    virtio_function("--disk", Box::new(blk), ctx)
}

fn build_net(
    config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let n = &config.nets[d.index];
    let tap = match &n.tap {
        TapConfig::Name(name) => TapSource::Name(name.clone()),
        TapConfig::Fd(fd) => TapSource::Fd(*fd),
    };
    let net = Net::new(DevNetConfig {
        id: d.id.clone(),
        tap,
        mac: n.mac.map(MacAddr),
        iommu: n.iommu,
    })
    .map_err(|e| DeviceCreateError::new("--net", &d.id, e))?;
    virtio_function("--net", Box::new(net), ctx)
}

fn build_console(
    config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let output = match &config.console {
        ConsoleConfig::Off => {
            return Err(DeviceCreateError::new(
                "--console",
                &d.id,
                "the console is off",
            ))
        }
        ConsoleConfig::Stdout => ConsoleOutput::Stdout,
        // A restored VM continues the output of the one it was saved from.
        ConsoleConfig::File(p) if ctx.restoring => ConsoleOutput::AppendFile(p.clone()),
        ConsoleConfig::File(p) => ConsoleOutput::File(p.clone()),
        ConsoleConfig::Pty => ConsoleOutput::Pty,
    };
    let console = Console::new(DevConsoleConfig {
        id: d.id.clone(),
        output,
        iommu: config.console_iommu,
    })
    .map_err(|e| DeviceCreateError::new("--console", &d.id, e))?;
    virtio_function("--console", Box::new(console), ctx)
}

fn build_rng(
    _config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let rng = Rng::new(DevRngConfig {
        id: d.id.clone(),
        iommu: d.iommu,
    });
    virtio_function("--rng", Box::new(rng), ctx)
}

fn build_user_device(
    config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let u = &config.user_devices[d.index];
    let backend = pci::vfio::user::VfioUserBackend::connect(&u.socket, Default::default())
        .map_err(|e| DeviceCreateError::new("--user-device", &d.id, e))?;
    passthrough_function(
        "--user-device",
        Arc::new(backend),
        PassthroughOptions {
            p2p_off: !u.p2p,
            pre_copy_off: !u.pre_copy,
        },
        d,
        ctx,
    )
}

fn build_host_device(
    config: &VmConfig,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let h = &config.host_devices[d.index];
    let prepared = sysfs_root()
        .prepare(
            &h.path.to_string_lossy(),
            BindOptions {
                managed: h.managed,
                take_group: h.group == GroupPolicy::Take,
            },
        )
        .map_err(|e| DeviceCreateError::new("--device", &d.id, e))?;
    let device = ctx
        .kernel_vfio
        .open(h.backend, prepared)
        .map_err(|e| DeviceCreateError::new("--device", &d.id, e))?;
    passthrough_function(
        "--device",
        device,
        PassthroughOptions {
            p2p_off: !h.p2p,
            pre_copy_off: !h.pre_copy,
        },
        d,
        ctx,
    )
}

/// A passthrough function over `backend`: the PCI function, its DMA space (identity, or
/// following the virtual IOMMU) and its place among the VM's peers.
pub fn passthrough_function(
    what: &'static str,
    backend: Arc<dyn VfioBackend>,
    options: PassthroughOptions,
    d: &ConfiguredDevice,
    ctx: &BuildContext<'_>,
) -> Result<Arc<Mutex<dyn PciFunction>>, DeviceCreateError> {
    let slot = ctx.address.slot();
    let p2p = !options.p2p_off;
    let mut dev = VfioPciDevice::new(
        &d.id,
        backend.clone(),
        ctx.interrupts.clone(),
        Some((1, intx_gsi(slot, 0))),
    )
    .map_err(|e| DeviceCreateError::new(what, &d.id, e))?;
    dev.set_migration_options(options);
    // What the device's DMA addresses reach, for its DMA dirty log and the DMA served for it:
    // guest RAM at its addresses, or behind the vIOMMU the guest's mappings (kept by the DMA
    // space's listener).
    let ram: Vec<(u64, u64)> = ctx
        .mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    let translator = ctx.iommu.as_ref().filter(|_| d.iommu);
    let space = match translator {
        Some(translator) => {
            let c = *translator.read().config();
            let len = c.input_end.saturating_sub(c.input_start).saturating_add(1);
            DmaSpace::translated(&ram, (c.input_start, len))
        }
        None => DmaSpace::identity(&ram),
    };
    let space = Arc::new(std::sync::Mutex::new(space));
    dev.set_dma_space(space.clone());
    let dma = Arc::new(PassthroughDma::new(
        &d.id,
        slot,
        p2p,
        backend.clone(),
        ctx.dma.clone(),
        dev.stats(),
        space,
    ));
    dev.set_dma_handler(dma.clone());
    dev.set_error_hook(device_error_hook());
    match translator {
        Some(translator) => translator
            .write()
            .register_listener(ctx.address.requester_id(), dma)
            .map_err(|e| DeviceCreateError::new(what, &d.id, e))?,
        None => dma
            .map_identity()
            .map_err(|e| DeviceCreateError::new(what, &d.id, e))?,
    }
    ctx.dma
        .peers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push(Peer {
            slot,
            backend,
            p2p_off: !p2p,
        });
    Ok(Arc::new(Mutex::new(dev)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, RngConfig};

    fn disk(iommu: bool) -> DiskConfig {
        DiskConfig {
            path: "/dev/null".into(),
            readonly: false,
            id: None,
            serial: None,
            iommu,
            pci_address: None,
        }
    }

    fn slots(p: &PciPlan) -> Vec<(u8, bool)> {
        p.devices.iter().map(|(d, a)| (a.slot(), d.iommu)).collect()
    }

    #[test]
    fn plan_without_iommu_starts_at_slot_1() {
        let c = VmConfig {
            disks: vec![disk(false), disk(false)],
            rng: Some(RngConfig::default()),
            ..Default::default()
        };
        let p = PciPlan::new(&c).unwrap();
        assert_eq!(p.iommu, None);
        assert_eq!(slots(&p), [(1, false), (2, false), (3, false)]);
        assert!(p.endpoint_slots().is_empty());
    }

    #[test]
    fn plan_puts_the_iommu_first_and_lists_its_endpoints() {
        let c = VmConfig {
            disks: vec![disk(true), disk(false)],
            console: ConsoleConfig::Pty,
            console_iommu: true,
            rng: Some(RngConfig {
                id: None,
                iommu: true,
                pci_address: None,
            }),
            ..Default::default()
        };
        let p = PciPlan::new(&c).unwrap();
        assert_eq!(p.iommu.map(PciAddress::slot), Some(1));
        assert_eq!(slots(&p), [(2, true), (3, false), (4, true), (5, true)]);
        assert_eq!(p.endpoint_slots(), [2, 4, 5]);
    }

    #[test]
    fn recorded_addresses_are_kept_and_the_rest_fill_free_slots() {
        let mut c = VmConfig {
            disks: vec![disk(false), disk(false), disk(false)],
            ..Default::default()
        };
        c.disks[0].pci_address = Some(PciAddress::new(2).unwrap());
        c.disks[2].pci_address = Some(PciAddress::new(0x1f).unwrap());
        let p = PciPlan::new(&c).unwrap();
        assert_eq!(slots(&p), [(2, false), (1, false), (0x1f, false)]);
        let ids: Vec<&str> = p.devices.iter().map(|(d, _)| d.id.as_str()).collect();
        assert_eq!(ids, ["disk0", "disk1", "disk2"]);
    }

    #[test]
    fn plan_refuses_more_devices_than_slots() {
        let mut c = VmConfig {
            disks: (0..31).map(|_| disk(false)).collect(),
            ..Default::default()
        };
        assert!(PciPlan::new(&c).is_ok());
        c.disks[0].iommu = true;
        let e = PciPlan::new(&c).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn every_kind_has_a_builder() {
        for kind in [
            DeviceKind::Disk,
            DeviceKind::Net,
            DeviceKind::Console,
            DeviceKind::Rng,
        ] {
            assert_eq!(
                BUILDERS.iter().filter(|(k, _)| *k == kind).count(),
                1,
                "{kind:?}"
            );
        }
    }
}
