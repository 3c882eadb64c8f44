//! The VM: KVM VM and irqchip, guest RAM, the kernel, ACPI tables, legacy devices and the PCI host
//! bridge, and the vCPU threads. The control thread owns it.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::SharedBusDevice;
use devices::legacy::{AcpiGed, AcpiPm, Cmos, EventFdTrigger, Serial, I8042};
use devices::virtio::{AccessPlatform, VirtioDevice};
use devices::{Bus, VmExitEvent};
use iommu::{EndpointAccess, IommuConfig, VirtioIommu};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use pci::{PciBus, PciConfigIo, PciConfigMmio};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::acpi::{create_acpi_tables, AcpiConfig, ViotConfig};
use crate::boot::EntryPoint;
use crate::boot::{self, BootError, LoadedKernel};
use crate::config::{SerialConfig, VmConfig};
use crate::cpu_template::CpuTemplate;
use crate::cpuid::{apply_host_quirks, vcpu_cpuid};
use crate::layout::*;
use crate::memory::{create_guest_memory, GuestMemoryMmap, MemoryError};
use crate::pci_devices::PciDevices;
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuError};
use crate::vcpu_state::{restore_vcpu, save_vcpu};
use crate::virtio_devices::{create_virtio_devices, endpoint_id, PciPlan, IOMMU_DEVICE_ID};
use crate::vm_state::{restore_vm, save_vm};
use kvm_ioctls::VcpuFd;
use migration::memory_file::{restore_memory_file, write_memory_file};
use migration::snapshot::{require_section, require_sections, write_snapshot, SnapshotReader};
use migration::{Snapshottable, StateSection};

/// Put the virtio devices on the PCI bus where `plan` says, the virtio-iommu first when the plan
/// has one; the devices behind it get their endpoint's DMA view.
fn plug_virtio_devices(
    pci_devices: &mut PciDevices,
    plan: &PciPlan,
    virtio: Vec<Box<dyn VirtioDevice>>,
    mem: &GuestMemoryMmap,
) -> Result<()> {
    let mut plug = |dev: Box<dyn VirtioDevice>,
                    slot: u8,
                    access: Option<Arc<dyn AccessPlatform>>|
     -> Result<()> {
        let id = dev.id().to_string();
        let err = |reason: String| VmError::Device {
            id: id.clone(),
            reason,
        };
        let info = pci_devices
            .add_virtio(dev, mem.clone(), access)
            .map_err(|e| err(e.to_string()))?;
        if info.slot != slot {
            return Err(err(format!(
                "plugged into PCI slot {} instead of the planned {slot}",
                info.slot
            )));
        }
        Ok(())
    };
    // The virtio-iommu's translator and fault reporter, shared by the devices behind it.
    let mut iommu = None;
    if let Some(slot) = plan.iommu_slot {
        let endpoints: Vec<u32> = plan.endpoint_slots().into_iter().map(endpoint_id).collect();
        let dev = VirtioIommu::new(IOMMU_DEVICE_ID.into(), IommuConfig::default(), &endpoints)
            .map_err(|e| VmError::Device {
                id: IOMMU_DEVICE_ID.into(),
                reason: e.to_string(),
            })?;
        iommu = Some((dev.translator(), dev.fault_reporter()));
        plug(Box::new(dev), slot, None)?;
        log::info!(
            "{IOMMU_DEVICE_ID}: virtio-iommu at 00:{slot:02x}.0 for endpoint(s) {endpoints:x?}"
        );
    }
    for (dev, &(slot, behind)) in virtio.into_iter().zip(&plan.devices) {
        let access = match (&iommu, behind) {
            (Some((translator, faults)), true) => Some(Arc::new(EndpointAccess::new(
                endpoint_id(slot),
                translator.clone(),
                faults.clone(),
            )) as Arc<dyn AccessPlatform>),
            _ => None,
        };
        plug(dev, slot, access)?;
    }
    Ok(())
}

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
    CpuTemplate(String),
    /// Computing CPUID failed.
    #[error("CPUID set-up: {0}")]
    Cpuid(String),
    /// Building ACPI tables failed.
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// Wiring a device failed.
    #[error("device {id}: {reason}")]
    Device {
        /// Device id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// Writing or reading a snapshot failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Pausing or resuming a device failed.
    #[error("device state: {0}")]
    State(String),
    /// vCPU set-up or control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

type Result<T> = std::result::Result<T, VmError>;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
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

/// Start of the 64-bit PCI MMIO window: after RAM, aligned.
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    let ram_end = boot::ram_ranges(mem_size)
        .last()
        .map(|(a, s)| a + s)
        .unwrap_or(0)
        .max(RAM_64BIT_START);
    ram_end.next_multiple_of(PCI_MMIO64_ALIGN)
}

/// One legacy device and where it lives.
struct LegacyDevice {
    id: &'static str,
    port: u16,
    len: u64,
    device: SharedBusDevice,
}

/// A built VM, ready to start.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    _memfd: File,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExitEvent>,
    control: Arc<VcpuControl>,
    pending_vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    serial: Option<Arc<Mutex<Serial>>>,
    ged: Arc<Mutex<AcpiGed>>,
    pci_devices: PciDevices,
    legacy_state: Vec<Arc<Mutex<dyn Snapshottable + Send>>>,
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    paused_at_start: bool,
    _triggers: Vec<EventFdTrigger>,
}

/// Where a VM's initial state comes from.
enum Source<'a> {
    /// Load the kernel and boot.
    Boot,
    /// A snapshot: its state sections and its memory file (the VM comes up paused).
    Snapshot {
        sections: &'a [StateSection],
        memory: &'a mut File,
    },
}

/// File names inside a snapshot directory.
pub mod snapshot_files {
    /// The VM configuration (JSON).
    pub const CONFIG: &str = "config.json";
    /// The versioned state sections.
    pub const STATE: &str = "state.bin";
    /// Guest RAM, sparse.
    pub const MEMORY: &str = "memory.bin";
}

impl Vm {
    /// Build the VM from a validated configuration: KVM, memory, kernel, ACPI, devices, vCPUs.
    pub fn new(config: VmConfig) -> Result<Self> {
        Self::build(config, Source::Boot)
    }

    /// Build a VM from a snapshot directory (written by [`Vm::snapshot`]); it comes up paused.
    /// Any inconsistency (other version, truncated or corrupt file, config that does not match the
    /// state) is an error and nothing is started.
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
        let config: VmConfig = serde_json::from_reader(std::io::BufReader::new(open(CONFIG)?))
            .map_err(|e| VmError::Snapshot(format!("{}: {e}", dir.join(CONFIG).display())))?;
        config.validate().map_err(|e| {
            VmError::Snapshot(format!("the saved configuration is not usable here: {e}"))
        })?;
        let sections = SnapshotReader::read_all(std::io::BufReader::new(open(STATE)?))
            .map_err(|e| VmError::Snapshot(format!("{}: {e}", dir.join(STATE).display())))?;
        let mut required = vec![
            "irqchip".to_string(),
            "pit".to_string(),
            "clock".to_string(),
        ];
        required.extend((0..config.cpus.boot_vcpus).map(crate::vcpu_state::section_id));
        let required: Vec<&str> = required.iter().map(String::as_str).collect();
        require_sections(&sections, &required).map_err(|e| {
            VmError::Snapshot(format!("the state does not match the configuration: {e}"))
        })?;
        let mut memory = open(MEMORY)?;
        Self::build(
            config,
            Source::Snapshot {
                sections: &sections,
                memory: &mut memory,
            },
        )
    }

    fn build(config: VmConfig, mut source: Source<'_>) -> Result<Self> {
        let kvm_sys = open_kvm()?;
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
            if !kvm_sys.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let num_cpus = config.cpus.boot_vcpus;
        let max = kvm_sys.get_max_vcpus();
        if num_cpus as usize > max {
            return Err(VmError::TooManyVcpus {
                requested: num_cpus,
                max,
            });
        }
        let plan = PciPlan::new(&config).map_err(|e| VmError::Device {
            id: e.id.clone(),
            reason: e.to_string(),
        })?;
        let mem_size = config.memory.size;
        crate::memory::check_host_can_back(mem_size)?;
        let mmio64_start = pci_mmio64_start(mem_size);
        let bits = host_phys_bits();
        if mmio64_start
            .checked_add(PCI_MMIO64_SIZE)
            .is_none_or(|end| end > 1u64 << bits)
        {
            return Err(VmError::AddressSpace {
                size: mem_size,
                bits,
            });
        }
        let template = match &config.cpu_template {
            Some(p) => {
                Some(CpuTemplate::from_file(p).map_err(|e| VmError::CpuTemplate(e.to_string()))?)
            }
            None => None,
        };

        let vm_fd = Arc::new(kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

        let (mem, memfd) = create_guest_memory(mem_size)?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps for as long
            // as the KVM VM exists; the slot numbers are distinct and the ranges do not overlap.
            unsafe { vm_fd.set_user_memory_region(r) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let entry = match &mut source {
            Source::Boot => Some(Self::load_and_configure(
                &config,
                &mem,
                num_cpus,
                mmio64_start,
                &plan,
            )?),
            Source::Snapshot { memory, .. } => {
                restore_memory_file(&mem, *memory, true)
                    .map_err(|e| VmError::Snapshot(format!("memory: {e}")))?;
                None
            }
        };

        let exit = Arc::new(VmExitEvent::new().map_err(|e| VmError::Device {
            id: "exit-event".into(),
            reason: e.to_string(),
        })?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut triggers = Vec::new();
        let mut irq = |gsi: u32, id: &str| -> Result<EventFdTrigger> {
            let t = EventFdTrigger::new().map_err(|e| VmError::Device {
                id: id.into(),
                reason: e.to_string(),
            })?;
            vm_fd
                .register_irqfd(t.eventfd(), gsi)
                .map_err(kvm("KVM_IRQFD"))?;
            let keep = t.try_clone().map_err(|e| VmError::Device {
                id: id.into(),
                reason: e.to_string(),
            })?;
            triggers.push(keep);
            Ok(t)
        };

        let serial = match &config.serial {
            SerialConfig::Off => None,
            SerialConfig::Stdout => Some(Box::new(StdoutWriter) as Box<dyn std::io::Write + Send>),
            SerialConfig::File(p) => {
                // A restored VM continues the output of the one it was saved from.
                let restoring = matches!(source, Source::Snapshot { .. });
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(restoring)
                    .truncate(!restoring)
                    .open(p)
                    .map_err(|source| VmError::Open {
                        what: "--serial file=",
                        path: p.display().to_string(),
                        source,
                    })?;
                Some(Box::new(file) as Box<dyn std::io::Write + Send>)
            }
        }
        .map(|out| -> Result<_> {
            let line = irq(SERIAL_IRQ, "serial0")?;
            Ok(Arc::new(Mutex::new(
                Serial::new(Arc::new(line), out).with_id("serial0"),
            )))
        })
        .transpose()?;
        let ged = Arc::new(Mutex::new(AcpiGed::new(Arc::new(irq(
            ACPI_GED_IRQ,
            "acpi-ged",
        )?))));
        let (below_4g, above_4g) = match boot::ram_ranges(mem_size).as_slice() {
            [(_, low), (_, high)] => (*low, *high),
            [(_, low)] => (*low, 0),
            _ => (0, 0),
        };
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        let cmos = Arc::new(Mutex::new(Cmos::new(below_4g, above_4g)));
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
            exit.clone(),
            ACPI_S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
        )));
        let mut legacy_state: Vec<Arc<Mutex<dyn Snapshottable + Send>>> =
            vec![i8042.clone(), cmos.clone(), acpi_pm.clone(), ged.clone()];
        if let Some(s) = &serial {
            legacy_state.push(s.clone());
        }
        let mut legacy = vec![
            LegacyDevice {
                id: "i8042",
                port: I8042_PORT,
                len: 5,
                device: i8042,
            },
            LegacyDevice {
                id: "cmos",
                port: CMOS_PORT,
                len: 2,
                device: cmos,
            },
            LegacyDevice {
                id: "acpi-pm",
                port: ACPI_PM_PORT,
                len: ACPI_PM_SIZE,
                device: acpi_pm,
            },
            LegacyDevice {
                id: "acpi-ged",
                port: ACPI_GED_PORT,
                len: ACPI_GED_SIZE,
                device: ged.clone(),
            },
        ];
        if let Some(s) = &serial {
            legacy.push(LegacyDevice {
                id: "serial0",
                port: SERIAL_PORT,
                len: 8,
                device: s.clone(),
            });
        }
        let pci_bus = Arc::new(Mutex::new(PciBus::new()));
        legacy.push(LegacyDevice {
            id: "pci-config-io",
            port: PCI_CONFIG_IO_PORT,
            len: PCI_CONFIG_IO_SIZE,
            device: Arc::new(Mutex::new(PciConfigIo::new(pci_bus.clone()))),
        });
        for d in legacy {
            pio.insert(d.device, u64::from(d.port), d.len)
                .map_err(|e| VmError::Device {
                    id: d.id.into(),
                    reason: e.to_string(),
                })?;
        }
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(
                pci_bus.clone(),
                PCI_LAST_BUS,
            ))),
            PCI_ECAM_START,
            boot::ecam_size(),
        )
        .map_err(|e| VmError::Device {
            id: "pci-ecam".into(),
            reason: e.to_string(),
        })?;

        let mut pci_devices = PciDevices::new(
            vm_fd.clone(),
            pci_bus.clone(),
            mmio.clone(),
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (mmio64_start, PCI_MMIO64_SIZE),
        )
        .map_err(|e| VmError::Device {
            id: "pci".into(),
            reason: e.to_string(),
        })?;
        let restoring = matches!(source, Source::Snapshot { .. });
        let virtio = create_virtio_devices(&config, restoring).map_err(|e| VmError::Device {
            id: e.id.clone(),
            reason: e.to_string(),
        })?;
        plug_virtio_devices(&mut pci_devices, &plan, virtio, &mem)?;

        vcpu::install_kick_handler()?;
        let mut supported = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let pvm_host = std::path::Path::new("/sys/module/kvm_pvm").exists();
        for quirk in apply_host_quirks(&mut supported, pvm_host) {
            log::info!("CPUID: {quirk}");
        }
        let control = Arc::new(VcpuControl::default());
        if matches!(source, Source::Snapshot { .. }) {
            // A restored VM comes up paused: its vCPU threads park before their first KVM_RUN.
            control.start_paused();
        }
        let mut pending_vcpus = Vec::new();
        let mut vcpu_fds = Vec::new();
        for index in 0..num_cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            let cpuid = vcpu_cpuid(&supported, index, num_cpus, template.as_ref())
                .map_err(|e| VmError::Cpuid(e.to_string()))?;
            vcpu::configure_common(&fd, index, &cpuid)?;
            match (&source, entry) {
                (Source::Boot, Some(entry)) if index == 0 => {
                    vcpu::configure_boot_vcpu(&fd, index, &mem, entry)?
                }
                (Source::Snapshot { sections, .. }, _) => {
                    let section = require_section(sections, &crate::vcpu_state::section_id(index))
                        .map_err(|e| VmError::Snapshot(e.to_string()))?;
                    restore_vcpu(&fd, index, &kvm_sys, section)
                        .map_err(|e| VmError::Snapshot(e.to_string()))?;
                }
                _ => {}
            }
            let fd = Arc::new(Mutex::new(fd));
            vcpu_fds.push(fd.clone());
            pending_vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                control: control.clone(),
            });
        }
        if let Source::Snapshot { sections, .. } = &source {
            restore_vm(&vm_fd, sections).map_err(|e| VmError::Snapshot(e.to_string()))?;
            for dev in &legacy_state {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                let id = d.id();
                let section =
                    require_section(sections, &id).map_err(|e| VmError::Snapshot(e.to_string()))?;
                d.restore(section)
                    .map_err(|e| VmError::Snapshot(e.to_string()))?;
            }
            pci_devices
                .restore(sections)
                .map_err(|e| VmError::Snapshot(e.to_string()))?;
        }
        log::info!(
            "VM ready: {num_cpus} vCPU(s), {} MiB RAM{}",
            mem_size >> 20,
            if entry.is_none() {
                ", restored from a snapshot (paused)"
            } else {
                ""
            }
        );
        Ok(Self {
            config,
            kvm: kvm_sys,
            vm_fd,
            mem,
            _memfd: memfd,
            pio,
            mmio,
            exit,
            control,
            pending_vcpus,
            threads: Vec::new(),
            serial,
            ged,
            pci_devices,
            legacy_state,
            vcpu_fds,
            paused_at_start: entry.is_none(),
            _triggers: triggers,
        })
    }

    /// Load the kernel (and initramfs), write the ACPI tables and the boot structures.
    fn load_and_configure(
        config: &VmConfig,
        mem: &GuestMemoryMmap,
        num_cpus: u32,
        mmio64_start: u64,
        plan: &PciPlan,
    ) -> Result<EntryPoint> {
        let mem_size = config.memory.size;
        let kernel = load_payload(config, mem)?;
        let rsdp = create_acpi_tables(
            mem,
            &AcpiConfig {
                num_cpus,
                pci_mmio64_start: mmio64_start,
                pci_mmio64_size: PCI_MMIO64_SIZE,
                viot: plan.iommu_slot.map(|iommu_slot| ViotConfig {
                    iommu_slot,
                    endpoint_slots: plan.endpoint_slots(),
                }),
            },
        )
        .map_err(|e| VmError::Acpi(e.to_string()))?;
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
        log::info!(
            "kernel: {:?} entry at {:#x}, cmdline {:?}",
            kernel.entry.protocol,
            kernel.entry.addr.0,
            config.effective_cmdline()
        );
        Ok(kernel.entry)
    }

    /// Start every vCPU thread.
    pub fn start(&mut self) -> Result<()> {
        for v in self.pending_vcpus.drain(..) {
            self.threads.push(v.spawn()?);
        }
        Ok(())
    }

    /// Stop every vCPU; when this returns no vCPU is executing guest code.
    pub fn pause(&self) -> Result<()> {
        self.control.pause(&self.threads, PAUSE_TIMEOUT)?;
        if let Err(e) = self.pci_devices.pause() {
            // Leave the VM as it was: running.
            let _ = self.pci_devices.resume();
            self.control.resume();
            return Err(VmError::State(e.to_string()));
        }
        Ok(())
    }

    /// Let the devices and then the vCPUs continue.
    pub fn resume(&self) -> Result<()> {
        self.pci_devices
            .resume()
            .map_err(|e| VmError::State(e.to_string()))?;
        self.control.resume();
        Ok(())
    }

    /// Stop and join every vCPU thread.
    pub fn shutdown(&mut self) {
        self.control.stop(&self.threads);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The exit event the control loop waits on.
    pub fn exit_event(&self) -> Arc<VmExitEvent> {
        self.exit.clone()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
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

    /// The PCI devices (virtio) and their interrupt routing.
    pub fn pci_devices(&self) -> &PciDevices {
        &self.pci_devices
    }

    /// Whether the VM was restored from a snapshot and starts paused.
    pub fn starts_paused(&self) -> bool {
        self.paused_at_start
    }

    /// Write a snapshot of this PAUSED VM into `dir` (created if missing): the configuration, the
    /// state of every vCPU, the irqchip/PIT/clock and every device as versioned sections, and
    /// guest RAM as a sparse file.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<()> {
        use snapshot_files::*;
        let fail =
            |what: &str, e: &dyn std::fmt::Display| VmError::Snapshot(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), &e))?;
        let mut sections = save_vm(&self.vm_fd).map_err(|e| fail("VM state", &e))?;
        for (i, fd) in self.vcpu_fds.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            sections.push(save_vcpu(&fd, i as u32, &self.kvm).map_err(|e| fail("vCPU state", &e))?);
        }
        for dev in &self.legacy_state {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            sections.push(d.snapshot().map_err(|e| fail("device state", &e))?);
        }
        sections.extend(
            self.pci_devices
                .snapshot()
                .map_err(|e| fail("PCI device state", &e))?,
        );
        let create = |name: &str| {
            let p = dir.join(name);
            File::create(&p).map_err(|e| fail(&p.display().to_string(), &e))
        };
        let config = serde_json::to_vec_pretty(&self.config).map_err(|e| fail("config", &e))?;
        std::io::Write::write_all(&mut create(CONFIG)?, &config).map_err(|e| fail(CONFIG, &e))?;
        let mut state = write_snapshot(std::io::BufWriter::new(create(STATE)?), &sections)
            .map_err(|e| fail(STATE, &e))?;
        std::io::Write::flush(&mut state).map_err(|e| fail(STATE, &e))?;
        let mut memory = create(MEMORY)?;
        let stats = write_memory_file(&self.mem, &mut memory).map_err(|e| fail(MEMORY, &e))?;
        log::info!(
            "snapshot written to {}: {} sections, {} MiB RAM of which {} MiB data",
            dir.display(),
            sections.len(),
            stats.ram_bytes >> 20,
            stats.data_bytes >> 20
        );
        Ok(())
    }

    /// Number of vCPUs currently parked.
    pub fn parked_vcpus(&self) -> usize {
        self.control.parked()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
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

/// Unbuffered writer to standard output, so guest output appears as it is produced.
struct StdoutWriter;

impl std::io::Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}
