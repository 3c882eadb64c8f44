//! The VM: KVM VM and irqchip, guest RAM, the platform devices, the PCI bus with its functions,
//! the vCPU threads, and the component registry every piece of state is reached through.
//!
//! Building a VM is a sequence of steps that boot, restore and (next) an incoming migration
//! compose: [`Vm::create`] builds the machine — KVM VM, memory, vCPUs, devices, each registered
//! once — then either [`Vm::load_kernel`] writes the kernel, ACPI tables and boot registers, or
//! [`Vm::restore_state`] loads RAM and every component's state; then [`Vm::start`] runs the vCPUs.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{AcpiGed, EventFdTrigger, Serial};
use devices::virtio::AccessPlatform;
use devices::{Bus, VmExitEvent};
use iommu::{EndpointAccess, IommuConfig, VirtioIommu};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use migration::dirty::DirtyError;
use migration::ram::{restore_memory_image, write_memory_image, RamStreamError};
use migration::snapshot::{write_snapshot, SnapshotError, SnapshotReader};
use migration::{DirtyBitmap, StateSection};
use pci::{PciBus, PciFunction};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::acpi::{create_acpi_tables, AcpiConfig, AcpiError, ViotConfig};
use crate::boot::{self, BootError, LoadedKernel};
use crate::config::{ConfigError, PciAddress, VmConfig};
use crate::cpu_template::{CpuTemplate, CpuTemplateError};
use crate::cpuid::{apply_host_quirks, vcpu_cpuid, CpuidError};
use crate::device_builders::{self, BuildContext, DeviceCreateError, PciPlan, IOMMU_DEVICE_ID};
use crate::dirty_log::{self, DirtyLog, DirtyLogError, DirtyLogMode, LogSlot};
use crate::kvm_components::{KvmVmPart, VcpuComponent};
use crate::layout::*;
use crate::legacy_devices::create_legacy_devices;
use crate::memory::{create_guest_memory, guest_memory_from, GuestMemoryMmap, MemoryError};
use crate::passthrough::DmaContext;
use crate::pci_devices::{PciDevices, PciDevicesError};
use crate::registry::{Registry, RegistryError};
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuError};
use crate::vm_state::ClockMode;

/// The built-in demo guest (the no_std test guest), embedded at build time.
pub static DEMO_GUEST: &[u8] = include_bytes!(env!("SKIFF_DEMO_GUEST"));

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {source}. {hint}")]
    OpenKvm {
        /// The OS error.
        #[source]
        source: kvm_ioctls::Error,
        /// How to fix it.
        hint: &'static str,
    },
    /// KVM lacks something skiff needs.
    #[error("KVM on this host lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("--cpus: boot={requested}: KVM on this host allows at most {max} vCPUs")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Allowed.
        max: usize,
    },
    /// Guest RAM does not fit the host's physical address width.
    #[error(
        "--memory: size={size} does not fit the host's {bits}-bit guest physical address space"
    )]
    AddressSpace {
        /// Requested RAM.
        size: u64,
        /// Physical address bits.
        bits: u32,
    },
    /// Guest memory creation failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Opening a file named in the configuration failed.
    #[error("{what} {path}: {source}")]
    Open {
        /// Which option.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The CPU template is malformed or does not apply.
    #[error("--cpu-template: {0}")]
    CpuTemplate(#[from] CpuTemplateError),
    /// Computing CPUID failed.
    #[error("CPUID set-up: {0}")]
    Cpuid(#[from] CpuidError),
    /// Building ACPI tables failed.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    /// A configured device cannot be created.
    #[error(transparent)]
    DeviceCreate(#[from] DeviceCreateError),
    /// A PCI function cannot be wired.
    #[error(transparent)]
    Pci(#[from] PciDevicesError),
    /// A platform device cannot be put on its bus.
    #[error("{id}: {source}")]
    Bus {
        /// Device id.
        id: &'static str,
        /// The bus error.
        #[source]
        source: devices::BusError,
    },
    /// An eventfd for a device could not be created.
    #[error("{id}: eventfd: {source}")]
    EventFd {
        /// Device id.
        id: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Pausing, resuming, saving or restoring a component failed, or saved state does not
    /// match this VM.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A snapshot file cannot be written or read.
    #[error("snapshot {path}: {source}")]
    SnapshotIo {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's configuration cannot be read.
    #[error("snapshot {path}: {source}")]
    SnapshotConfig {
        /// The file.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A snapshot's configuration is not usable on this host.
    #[error("the saved configuration is not usable here: {0}")]
    SavedConfig(#[source] ConfigError),
    /// A snapshot's state file is malformed.
    #[error("snapshot {path}: {source}")]
    SnapshotState {
        /// The file.
        path: String,
        /// The format error.
        #[source]
        source: SnapshotError,
    },
    /// Guest RAM cannot be saved or restored.
    #[error("snapshot memory {path}: {source}")]
    SnapshotMemory {
        /// The file.
        path: String,
        /// The format error.
        #[source]
        source: RamStreamError,
    },
    /// The dirty page set cannot be built.
    #[error("dirty page log: {0}")]
    DirtyLog(#[from] DirtyError),
    /// KVM dirty page tracking failed.
    #[error("dirty page tracking: {0}")]
    DirtyTracking(#[from] DirtyLogError),
    /// vCPU set-up or control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A helper thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, VmError>;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Start of the 64-bit PCI MMIO window: after RAM, aligned.
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    let ram_end = boot::ram_ranges(mem_size)
        .last()
        .map(|(a, s)| a + s)
        .unwrap_or(0)
        .max(RAM_64BIT_START);
    ram_end.next_multiple_of(PCI_MMIO64_ALIGN)
}

/// Where a VM's initial state comes from.
#[derive(Debug)]
pub enum Origin {
    /// A fresh boot: the kernel is loaded next.
    Boot,
    /// State restored from a snapshot or received from a migration source: outputs are
    /// appended to, and the VM comes up paused.
    Restore,
    /// Like [`Origin::Restore`], with guest RAM already in this memfd (a local migration hands
    /// the source's RAM over instead of copying it).
    RestoreInto(File),
}

impl Origin {
    fn restoring(&self) -> bool {
        !matches!(self, Origin::Boot)
    }
}

/// One RAM region as a KVM memory slot.
#[derive(Debug, Clone, Copy)]
struct RamSlot {
    slot: u32,
    guest_addr: u64,
    len: u64,
    host_addr: u64,
}

/// File names inside a snapshot directory.
pub mod snapshot_files {
    /// The VM configuration (JSON).
    pub const CONFIG: &str = "config.json";
    /// The versioned state sections.
    pub const STATE: &str = "state.bin";
    /// Guest RAM (the streamable RAM image; the older sparse memory file is still read).
    pub const MEMORY: &str = "memory.bin";
}

/// What a VM shares with the threads that act on it while it runs (a live migration's worker):
/// guest memory and its KVM slots, the component registry, vCPU control. Everything behind
/// `&self`.
pub struct VmCore {
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    ram_slots: Vec<RamSlot>,
    dirty_logging: AtomicBool,
    /// KVM's side of dirty page tracking (mode chosen at creation).
    dirty_log: Arc<DirtyLog>,
    registry: Registry,
    control: Arc<VcpuControl>,
    /// The vCPU threads (set when they start), to kick them.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    /// Pages to report dirty again at the next [`VmCore::dirty_pages`].
    redirty: Mutex<Vec<(u64, u64)>>,
    /// The memfd guest RAM lives in (handed to a local migration target).
    memfd: File,
}

/// A built VM.
pub struct Vm {
    config: VmConfig,
    core: Arc<VmCore>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExitEvent>,
    pending_vcpus: Vec<Vcpu>,
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<()>>,
    serial: Option<Arc<Mutex<Serial>>>,
    ged: Arc<Mutex<AcpiGed>>,
    pci_devices: PciDevices,
    plan: PciPlan,
    paused_at_start: bool,
    clock_mode: Arc<Mutex<ClockMode>>,
    _triggers: Vec<EventFdTrigger>,
}

/// Check the host and the configuration against each other before anything is created.
fn check_host(kvm: &Kvm, config: &VmConfig) -> Result<()> {
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (
            Cap::ImmediateExit,
            "immediate exit (KVM_CAP_IMMEDIATE_EXIT)",
        ),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let num_cpus = config.cpus.boot_vcpus;
    let max = kvm.get_max_vcpus();
    if num_cpus as usize > max {
        return Err(VmError::TooManyVcpus {
            requested: num_cpus,
            max,
        });
    }
    let mem_size = config.memory.size;
    crate::memory::check_host_can_back(mem_size)?;
    let bits = host_phys_bits();
    if pci_mmio64_start(mem_size)
        .checked_add(PCI_MMIO64_SIZE)
        .is_none_or(|end| end > 1u64 << bits)
    {
        return Err(VmError::AddressSpace {
            size: mem_size,
            bits,
        });
    }
    Ok(())
}

/// A KVM VM with its in-kernel irqchip and PIT.
fn create_kvm_vm(kvm: &Kvm) -> Result<VmFd> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    kvm(what)
}

/// Register every RAM region as a KVM memory slot (slot = region index).
fn register_ram(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<RamSlot>> {
    let mut slots = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let s = RamSlot {
            slot: slot as u32,
            guest_addr: region.start_addr().0,
            len: region.len(),
            host_addr: region.as_ptr() as u64,
        };
        set_ram_slot(vm_fd, &s, 0)?;
        slots.push(s);
    }
    Ok(slots)
}

/// KVM dirty tracking of the RAM slots in `mode` (already enabled on the VM).
fn create_dirty_log(
    vm_fd: &Arc<VmFd>,
    mode: DirtyLogMode,
    ram_slots: &[RamSlot],
) -> Result<Arc<DirtyLog>> {
    let slots = ram_slots
        .iter()
        .map(|s| LogSlot {
            slot: s.slot,
            guest_addr: s.guest_addr,
            len: s.len,
        })
        .collect();
    log::info!("dirty log mode: {}", mode.name());
    Ok(Arc::new(DirtyLog::new(vm_fd.clone(), mode, slots)?))
}

fn set_ram_slot(vm_fd: &VmFd, s: &RamSlot, flags: u32) -> Result<()> {
    let r = kvm_userspace_memory_region {
        slot: s.slot,
        flags,
        guest_phys_addr: s.guest_addr,
        memory_size: s.len,
        userspace_addr: s.host_addr,
    };
    // SAFETY: the region is a live mapping owned by the VM's guest memory, which the Vm keeps for
    // as long as the KVM VM exists; the slot numbers are distinct and the ranges do not overlap.
    unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))
}

/// The vCPUs of a VM: created, CPUID set, registered as components; not running.
struct Vcpus {
    pending: Vec<Vcpu>,
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    control: Arc<VcpuControl>,
}

/// Create every vCPU with its CPUID and register each in `registry`.
fn create_vcpus(
    kvm_sys: &Arc<Kvm>,
    vm_fd: &VmFd,
    config: &VmConfig,
    (pio, mmio, exit): (&Arc<Bus>, &Arc<Bus>, &Arc<VmExitEvent>),
    dirty_log: &Arc<DirtyLog>,
    registry: &mut Registry,
) -> Result<Vcpus> {
    let template = config
        .cpu_template
        .as_ref()
        .map(|p| CpuTemplate::from_file(p))
        .transpose()?;
    vcpu::install_kick_handler()?;
    let mut supported = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let pvm_host = std::path::Path::new("/sys/module/kvm_pvm").exists();
    for quirk in apply_host_quirks(&mut supported, pvm_host) {
        log::info!("CPUID: {quirk}");
    }
    let num_cpus = config.cpus.boot_vcpus;
    let control = Arc::new(VcpuControl::default());
    let mut pending = Vec::new();
    let mut fds = Vec::new();
    for index in 0..num_cpus {
        let fd = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        dirty_log.add_vcpu(&fd, index)?;
        let cpuid = vcpu_cpuid(&supported, index, num_cpus, template.as_ref())?;
        vcpu::configure_common(&fd, index, &cpuid)?;
        let fd = Arc::new(Mutex::new(fd));
        let component = VcpuComponent::new(index, fd.clone(), kvm_sys.clone());
        registry.register(
            crate::vcpu_state::section_id(index),
            "vcpu",
            None,
            Arc::new(Mutex::new(component)),
        )?;
        fds.push(fd.clone());
        pending.push(Vcpu {
            index,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            control: control.clone(),
            dirty_log: dirty_log.clone(),
        });
    }
    Ok(Vcpus {
        pending,
        fds,
        control,
    })
}

/// Build the virtio-iommu (when the plan has one) and every configured device, plug each at its
/// planned address and register it. Returns the configuration with every device's PCI address
/// recorded.
fn plug_pci_functions(
    config: &VmConfig,
    plan: &PciPlan,
    pci_devices: &mut PciDevices,
    (mem, mmio): (&GuestMemoryMmap, &Arc<Bus>),
    restoring: bool,
    registry: &mut Registry,
) -> Result<VmConfig> {
    let interrupts = pci_devices.interrupt_manager();
    let kernel_vfio = device_builders::KernelVfio::new(pci_devices.vm_fd());
    let dma = DmaContext {
        mem: mem.clone(),
        mmio: mmio.clone(),
        windows: pci_devices.bar_windows(),
        pci_windows: vec![
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (pci_mmio64_start(config.memory.size), PCI_MMIO64_SIZE),
        ],
        peers: Default::default(),
    };
    let mut plug = |id: &str, addr: PciAddress, f: Arc<Mutex<dyn PciFunction>>| -> Result<()> {
        let kind = f.lock().unwrap_or_else(|e| e.into_inner()).kind();
        pci_devices.add(id, addr, f.clone())?;
        registry.register(id, kind, Some(addr), f)?;
        Ok(())
    };
    let ctx = |address, access, iommu| BuildContext {
        kernel_vfio: &kernel_vfio,
        dma: &dma,
        iommu,
        mem,
        interrupts: interrupts.clone(),
        address,
        access,
        restoring,
    };
    // The virtio-iommu's translator and fault reporter, shared by the devices behind it.
    let mut iommu = None;
    if let Some(addr) = plan.iommu {
        let endpoints: Vec<u32> = plan
            .devices
            .iter()
            .filter(|(d, _)| d.iommu)
            .map(|(_, a)| a.requester_id())
            .collect();
        let dev = VirtioIommu::new(IOMMU_DEVICE_ID.into(), IommuConfig::default(), &endpoints)
            .map_err(|source| VmError::EventFd {
                id: IOMMU_DEVICE_ID.into(),
                source,
            })?;
        iommu = Some((dev.translator(), dev.fault_reporter()));
        let f = device_builders::virtio_function("iommu", Box::new(dev), &ctx(addr, None, None))?;
        plug(IOMMU_DEVICE_ID, addr, f)?;
        log::info!("{IOMMU_DEVICE_ID}: virtio-iommu at {addr} for endpoint(s) {endpoints:x?}");
    }
    let mut resolved = config.clone();
    for (device, addr) in &plan.devices {
        let access = match (&iommu, device.iommu) {
            (Some((translator, faults)), true) => Some(Arc::new(EndpointAccess::new(
                addr.requester_id(),
                translator.clone(),
                faults.clone(),
            )) as Arc<dyn AccessPlatform>),
            _ => None,
        };
        let translator = iommu.as_ref().map(|(t, _)| t.clone());
        let f = device_builders::build(config, device, &ctx(*addr, access, translator))?;
        plug(&device.id, *addr, f)?;
        resolved.set_pci_address(device.kind, device.index, *addr);
    }
    Ok(resolved)
}

impl Vm {
    /// Build the VM from a validated configuration and load its kernel: ready to start.
    pub fn new(config: VmConfig) -> Result<Self> {
        let mut vm = Self::create(config, Origin::Boot)?;
        vm.load_kernel()?;
        Ok(vm)
    }

    /// Build a VM from a snapshot directory (written by [`Vm::snapshot`]); it comes up paused.
    /// Any inconsistency (other version, truncated or corrupt file, config that does not match
    /// the state) is an error and nothing is started.
    pub fn restore(dir: &std::path::Path) -> Result<Self> {
        use snapshot_files::*;
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|source| VmError::Open {
                what: "restore",
                path: path.display().to_string(),
                source,
            })
        };
        let path = |name: &str| dir.join(name).display().to_string();
        let config: VmConfig = serde_json::from_reader(std::io::BufReader::new(open(CONFIG)?))
            .map_err(|source| VmError::SnapshotConfig {
                path: path(CONFIG),
                source,
            })?;
        config.validate().map_err(VmError::SavedConfig)?;
        let sections =
            SnapshotReader::read_all(std::io::BufReader::new(open(STATE)?)).map_err(|source| {
                VmError::SnapshotState {
                    path: path(STATE),
                    source,
                }
            })?;
        let mut memory = open(MEMORY)?;
        let mut vm = Self::create(config, Origin::Restore)?;
        vm.restore_state(&sections, &mut memory, &path(MEMORY))?;
        Ok(vm)
    }

    /// Build the machine for `config`: KVM VM, guest RAM, vCPUs with their CPUID, platform
    /// devices, the PCI bus with every configured function, each registered once. Nothing runs
    /// yet and guest RAM is empty: follow with [`Vm::load_kernel`] or [`Vm::restore_state`].
    pub fn create(config: VmConfig, origin: Origin) -> Result<Self> {
        let kvm = Arc::new(open_kvm()?);
        check_host(&kvm, &config)?;
        let plan = PciPlan::new(&config)?;
        let vm_fd = Arc::new(create_kvm_vm(&kvm)?);
        // Before any vCPU exists (the dirty ring requires it).
        let dirty_mode = dirty_log::enable(&vm_fd, DirtyLogMode::requested())?;
        let restoring = origin.restoring();
        let (mem, memfd) = match origin {
            Origin::RestoreInto(file) => guest_memory_from(file, config.memory.size)?,
            _ => create_guest_memory(config.memory.size)?,
        };
        let ram_slots = register_ram(&vm_fd, &mem)?;
        let dirty_log = create_dirty_log(&vm_fd, dirty_mode, &ram_slots)?;
        let exit = Arc::new(VmExitEvent::new().map_err(|source| VmError::EventFd {
            id: "exit-event".into(),
            source,
        })?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut registry = Registry::new();
        let vcpus = create_vcpus(
            &kvm,
            &vm_fd,
            &config,
            (&pio, &mmio, &exit),
            &dirty_log,
            &mut registry,
        )?;
        let clock_mode = Arc::new(Mutex::new(ClockMode::default()));
        for part in KvmVmPart::all(&vm_fd, &clock_mode) {
            registry.register(part.section(), "kvm", None, Arc::new(Mutex::new(part)))?;
        }
        let pci_bus = Arc::new(Mutex::new(PciBus::new()));
        let legacy = create_legacy_devices(
            &vm_fd,
            (&pio, &mmio),
            &exit,
            &config,
            restoring,
            &pci_bus,
            &mut registry,
        )?;
        let host_bridge = pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .host_bridge();
        registry.register("pci-host-bridge", "pci-host-bridge", None, host_bridge)?;
        let mut pci_devices = PciDevices::new(
            vm_fd.clone(),
            pci_bus,
            (mmio.clone(), pio.clone()),
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (pci_mmio64_start(config.memory.size), PCI_MMIO64_SIZE),
            ram_slots.len() as u32,
        )?;
        let config = plug_pci_functions(
            &config,
            &plan,
            &mut pci_devices,
            (&mem, &mmio),
            restoring,
            &mut registry,
        )?;
        log::info!(
            "VM built: {} vCPU(s), {} MiB RAM, {} components",
            config.cpus.boot_vcpus,
            config.memory.size >> 20,
            registry.components().len()
        );
        Ok(Self {
            config,
            core: Arc::new(VmCore {
                vm_fd,
                mem,
                ram_slots,
                dirty_logging: AtomicBool::new(false),
                dirty_log,
                registry,
                control: vcpus.control,
                vcpu_threads: Mutex::new(Vec::new()),
                redirty: Mutex::new(Vec::new()),
                memfd,
            }),
            pio,
            mmio,
            exit,
            pending_vcpus: vcpus.pending,
            vcpu_fds: vcpus.fds,
            threads: Vec::new(),
            serial: legacy.serial,
            ged: legacy.ged,
            pci_devices,
            plan,
            paused_at_start: false,
            clock_mode,
            _triggers: legacy.triggers,
        })
    }

    /// Load the kernel (and initramfs), write the ACPI tables and the boot structures, and set
    /// the boot vCPU's registers.
    pub fn load_kernel(&mut self) -> Result<()> {
        let config = &self.config;
        let mem = &self.core.mem;
        let mem_size = config.memory.size;
        let kernel = load_payload(config, mem)?;
        let rsdp = create_acpi_tables(
            mem,
            &AcpiConfig {
                num_cpus: config.cpus.boot_vcpus,
                pci_mmio64_start: pci_mmio64_start(mem_size),
                pci_mmio64_size: PCI_MMIO64_SIZE,
                viot: self.plan.iommu.map(|iommu| ViotConfig {
                    iommu_slot: iommu.slot(),
                    endpoint_slots: self.plan.endpoint_slots(),
                }),
            },
        )?;
        let cmdline = boot::build_cmdline(&kernel, config.effective_cmdline())?;
        let initramfs = match &config.payload.initramfs {
            Some(p) => {
                let mut f = File::open(p).map_err(|source| VmError::Open {
                    what: "--initramfs",
                    path: p.display().to_string(),
                    source,
                })?;
                Some(boot::load_initramfs(mem, &kernel, mem_size, &mut f)?)
            }
            None => None,
        };
        boot::configure_system(mem, &kernel, &cmdline, initramfs, mem_size, rsdp)?;
        if let Some(fd) = self.vcpu_fds.first() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            vcpu::configure_boot_vcpu(&fd, 0, mem, kernel.entry)?;
        }
        log::info!(
            "kernel: {:?} entry at {:#x}, cmdline {:?}",
            kernel.entry.protocol,
            kernel.entry.addr.0,
            config.effective_cmdline()
        );
        Ok(())
    }

    /// Load guest RAM from `memory` (named `memory_name` in errors) and every component's state
    /// from `sections`, matched by id; the VM then comes up paused. Nothing may have run yet.
    pub fn restore_state(
        &mut self,
        sections: &[StateSection],
        memory: &mut File,
        memory_name: &str,
    ) -> Result<()> {
        restore_memory_image(&self.core.mem, memory, true).map_err(|source| {
            VmError::SnapshotMemory {
                path: memory_name.to_string(),
                source,
            }
        })?;
        self.restore_components(sections, ClockMode::Continue)
    }

    /// Load every component's state from `sections` (guest RAM already holds the saved
    /// contents); the clock continues as `clock` says. The VM then comes up paused. Nothing may
    /// have run yet.
    pub fn restore_components(
        &mut self,
        sections: &[StateSection],
        clock: ClockMode,
    ) -> Result<()> {
        *self.clock_mode.lock().unwrap_or_else(|e| e.into_inner()) = clock;
        self.core.registry.restore_all(sections)?;
        // Restored devices are paused (they must not touch guest memory before the vCPUs run).
        self.pci_devices.follow_restored_bars();
        self.core.control.start_paused();
        self.paused_at_start = true;
        log::info!(
            "VM state restored ({} sections); the VM is paused",
            sections.len()
        );
        Ok(())
    }

    /// Start every vCPU thread.
    pub fn start(&mut self) -> Result<()> {
        use std::os::unix::thread::JoinHandleExt;
        for v in self.pending_vcpus.drain(..) {
            self.threads.push(v.spawn()?);
        }
        *self.core.lock_threads() = self.threads.iter().map(|t| t.as_pthread_t()).collect();
        Ok(())
    }

    /// Stop every vCPU, then every component (devices, serial port, GED, ...); when this returns
    /// nothing touches guest memory or raises interrupts. On failure the VM keeps running.
    pub fn pause(&self) -> Result<()> {
        self.core.pause()
    }

    /// Let every component and then the vCPUs continue.
    pub fn resume(&self) -> Result<()> {
        self.core.resume()
    }

    /// Stop and join every vCPU thread.
    pub fn shutdown(&mut self) {
        let ids = std::mem::take(&mut *self.core.lock_threads());
        self.core.control.stop(&ids);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The exit event the control loop waits on.
    pub fn exit_event(&self) -> Arc<VmExitEvent> {
        self.exit.clone()
    }

    /// The configuration the VM was built from, with every device's PCI address filled in.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.core.mem
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.core.vm_fd
    }

    /// What a worker thread (live migration) shares with this VM.
    pub fn core(&self) -> Arc<VmCore> {
        self.core.clone()
    }

    /// The port I/O and MMIO buses.
    pub fn buses(&self) -> (&Arc<Bus>, &Arc<Bus>) {
        (&self.pio, &self.mmio)
    }

    /// The serial port, when configured.
    pub fn serial(&self) -> Option<&Arc<Mutex<Serial>>> {
        self.serial.as_ref()
    }

    /// The ACPI generic event device (power button).
    pub fn ged(&self) -> &Arc<Mutex<AcpiGed>> {
        &self.ged
    }

    /// The PCI functions and their interrupt routing.
    pub fn pci_devices(&self) -> &PciDevices {
        &self.pci_devices
    }

    /// Every component of the VM.
    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    /// Whether the VM was restored from a snapshot and starts paused.
    pub fn starts_paused(&self) -> bool {
        self.paused_at_start
    }

    /// Start throttling the vCPUs (auto-converge for a live migration); starts at 0 %.
    pub fn throttle(&self) -> Result<crate::throttle::Throttle> {
        self.core.throttle()
    }

    /// Number of vCPUs currently parked.
    pub fn parked_vcpus(&self) -> usize {
        self.core.control.parked()
    }

    /// Whether every vCPU is parked (paused) now.
    pub fn all_vcpus_parked(&self) -> bool {
        self.core.control.parked() == self.threads.len()
    }

    /// Write a snapshot of this PAUSED VM into `dir` (created if missing): the configuration
    /// (with every device's PCI address), the component manifest and every component's state as
    /// versioned sections, and guest RAM as a RAM image (zero pages left out).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<()> {
        use snapshot_files::*;
        let io = |name: &str| {
            let path = dir.join(name).display().to_string();
            move |source| VmError::SnapshotIo { path, source }
        };
        // Collect the state first: a component that cannot be saved (a passthrough device)
        // refuses before anything is written.
        let sections = self.core.registry.snapshot_all()?;
        std::fs::create_dir_all(dir).map_err(io(""))?;
        let config =
            serde_json::to_vec_pretty(&self.config).map_err(|source| VmError::SnapshotConfig {
                path: dir.join(CONFIG).display().to_string(),
                source,
            })?;
        std::fs::write(dir.join(CONFIG), config).map_err(io(CONFIG))?;
        let state = File::create(dir.join(STATE)).map_err(io(STATE))?;
        let mut state =
            write_snapshot(std::io::BufWriter::new(state), &sections).map_err(|source| {
                VmError::SnapshotState {
                    path: dir.join(STATE).display().to_string(),
                    source,
                }
            })?;
        std::io::Write::flush(&mut state).map_err(io(STATE))?;
        let memory = File::create(dir.join(MEMORY)).map_err(io(MEMORY))?;
        let mut memory = std::io::BufWriter::with_capacity(1 << 20, memory);
        let stats = write_memory_image(&self.core.mem, &mut memory).map_err(|source| {
            VmError::SnapshotMemory {
                path: dir.join(MEMORY).display().to_string(),
                source,
            }
        })?;
        std::io::Write::flush(&mut memory).map_err(io(MEMORY))?;
        log::info!(
            "snapshot written to {}: {} sections, {} MiB RAM image",
            dir.display(),
            sections.len(),
            stats.stream_bytes >> 20
        );
        Ok(())
    }

    /// The RAM layout `(guest address, length)` of every region, in address order.
    pub fn ram_layout(&self) -> Vec<(u64, u64)> {
        self.core.ram_layout()
    }

    /// Start dirty page logging (see [`VmCore::start_dirty_log`]).
    pub fn start_dirty_log(&self) -> Result<()> {
        self.core.start_dirty_log()
    }

    /// The pages written since the last call (see [`VmCore::dirty_pages`]).
    pub fn dirty_pages(&self) -> Result<DirtyBitmap> {
        self.core.dirty_pages()
    }

    /// Stop dirty page logging.
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.core.stop_dirty_log()
    }

    /// The KVM dirty log mode in effect (see [`crate::dirty_log`]).
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.core.dirty_log_mode()
    }
}

impl VmCore {
    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<libc::pthread_t>> {
        self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Every component of the VM.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The memfd guest RAM lives in.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Stop every vCPU, then every component; on failure the VM keeps running.
    pub fn pause(&self) -> Result<()> {
        let ids = self.lock_threads().clone();
        self.control.pause(&ids, PAUSE_TIMEOUT)?;
        if let Err(e) = self.registry.pause_all() {
            self.control.resume();
            return Err(e.into());
        }
        Ok(())
    }

    /// Let every component and then the vCPUs continue.
    pub fn resume(&self) -> Result<()> {
        self.registry.resume_all()?;
        self.control.resume();
        Ok(())
    }

    /// Report `ranges` dirty again at the next [`Self::dirty_pages`] (pages taken out of the log
    /// but not sent yet).
    pub fn mark_dirty(&self, ranges: &[(u64, u64)]) -> Result<()> {
        self.redirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(ranges);
        Ok(())
    }

    /// Start throttling the vCPUs; starts at 0 %.
    pub fn throttle(&self) -> Result<crate::throttle::Throttle> {
        let ids = self.lock_threads().clone();
        crate::throttle::Throttle::start(self.control.clone(), ids).map_err(|source| {
            VmError::Thread {
                what: "throttle",
                source,
            }
        })
    }

    /// The RAM layout `(guest address, length)` of every region, in address order.
    pub fn ram_layout(&self) -> Vec<(u64, u64)> {
        self.ram_slots
            .iter()
            .map(|s| (s.guest_addr, s.len))
            .collect()
    }

    /// Start dirty page logging: KVM logs every RAM slot, the VMM-side bitmap (device writes
    /// through guest memory) and every component's own log start empty.
    pub fn start_dirty_log(&self) -> Result<()> {
        for s in &self.ram_slots {
            set_ram_slot(&self.vm_fd, s, KVM_MEM_LOG_DIRTY_PAGES)?;
        }
        self.dirty_logging.store(true, Ordering::SeqCst);
        // Drop what was logged before: the set starts now. (With manual protection and
        // KVM_DIRTY_LOG_INITIALLY_SET every page starts dirty: this clears — write-protects —
        // them chunk by chunk.)
        self.dirty_pages()?;
        self.registry.start_dirty_log()?;
        Ok(())
    }

    /// The pages written since dirty logging started or since the previous call — by vCPUs
    /// (KVM's log, re-protected before this returns), by the VMM and its device workers (the
    /// guest memory bitmap) and by components that log their own DMA — merged into one set;
    /// every log is cleared.
    pub fn dirty_pages(&self) -> Result<DirtyBitmap> {
        let mut set = DirtyBitmap::new(&self.ram_layout())?;
        if self.dirty_logging.load(Ordering::SeqCst) {
            self.dirty_log.sync(&mut set)?;
        }
        set.merge_guest_memory_bitmap(&self.mem)?;
        for (gpa, len) in
            std::mem::take(&mut *self.redirty.lock().unwrap_or_else(|e| e.into_inner()))
        {
            set.mark(gpa, len)?;
        }
        for c in self.registry.components() {
            c.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sync_dirty_log(&mut set)
                .map_err(|source| RegistryError::State {
                    id: c.id.clone(),
                    source,
                })?;
        }
        Ok(set)
    }

    /// The KVM dirty log mode in effect.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.dirty_log.mode()
    }

    /// Stop dirty page logging.
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.registry.stop_dirty_log();
        for s in &self.ram_slots {
            set_ram_slot(&self.vm_fd, s, 0)?;
        }
        self.dirty_logging.store(false, Ordering::SeqCst);
        self.dirty_log.discard()?;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Open /dev/kvm with an actionable message on failure.
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => "KVM is not available: load the kvm module (modprobe kvm_intel or kvm_amd), enable virtualization in the firmware, or run skiff on a host with KVM",
            libc::EACCES | libc::EPERM => "Permission denied: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or give it access with `sudo setfacl -m u:$USER:rw /dev/kvm`",
            _ => "Check that KVM works on this host",
        };
        VmError::OpenKvm { source, hint }
    })
}

/// Guest physical address bits the host supports (CPUID 0x8000_0008).
fn host_phys_bits() -> u32 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

fn load_payload(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<LoadedKernel> {
    match &config.payload.kernel {
        None => Ok(boot::load_kernel(
            mem,
            &mut std::io::Cursor::new(DEMO_GUEST),
        )?),
        Some(p) => {
            let mut f = File::open(p).map_err(|source| VmError::Open {
                what: "--kernel",
                path: p.display().to_string(),
                source,
            })?;
            Ok(boot::load_kernel(mem, &mut f)?)
        }
    }
}
