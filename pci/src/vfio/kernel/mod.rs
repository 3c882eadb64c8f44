//! Kernel VFIO backends: a host PCI device bound to vfio-pci, reached through the legacy
//! container/group interface ([`VfioGroupSet`], `/dev/vfio/vfio` + `/dev/vfio/N`, type1v2
//! IOMMU) or through iommufd ([`IommufdSet`], `/dev/iommu` + `/dev/vfio/devices/vfioN`). Both
//! give a [`KernelVfioDevice`], a thin [`VfioBackend`] over the device fd; everything PCI is
//! done above it by the passthrough function.
//!
//! # Preparing a host device (operator's guide)
//!
//! 1. **Turn the IOMMU on.** Enable VT-d (Intel) or AMD-Vi in the firmware and boot the host
//!    with `intel_iommu=on` (AMD: on by default, or `amd_iommu=on`). Check: the device has an
//!    `iommu_group` link (`ls -l /sys/bus/pci/devices/0000:01:00.0/iommu_group`) and
//!    `/sys/kernel/iommu_groups/` is not empty. Without it skiff says "no IOMMU group".
//! 2. **Load vfio-pci**: `modprobe vfio-pci` (for iommufd also `CONFIG_IOMMUFD` and
//!    `CONFIG_VFIO_DEVICE_CDEV`, giving `/dev/iommu` and `/dev/vfio/devices/vfioN`).
//! 3. **Look at the group.** Every device in `/sys/kernel/iommu_groups/N/devices/` other than
//!    yours must be bound to `vfio-pci` or `pci-stub`, be a PCI bridge on `pcieport`, or have no
//!    driver — otherwise the host would share an IOMMU domain with the guest. skiff checks this
//!    and names each device in the way with its driver.
//! 4. **Bind the device to vfio-pci**, either yourself:
//!    `echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override`,
//!    `echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind`,
//!    `echo 0000:01:00.0 > /sys/bus/pci/drivers_probe` — or pass `managed=on` and skiff does
//!    exactly this at start and gives the device back to its host driver when the VM ends.
//!    With `group=take,managed=on` skiff does the same for the group mates that are on host
//!    drivers (never for bridges); `group=take` without `managed=on` is refused.
//! 5. **One owner.** A group (or device) can be used by one process at a time; if another VMM
//!    holds it, skiff says which group is busy.
//! 6. **Locked memory.** The kernel pins all DMA-mapped guest RAM: raise `ulimit -l` (or run
//!    with `CAP_IPC_LOCK`) to at least the guest's RAM size per IOMMU group.

mod group;
mod iommufd;
mod iommufd_dirty;
mod migration;

pub use group::VfioGroupSet;
pub use iommufd::{DirtyOpenError, IommufdSet};
pub use iommufd_dirty::IommuDirtyTracking;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fs::File;
use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_region_info, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr};
use vmm_sys_util::ioctl_io_nr;

use super::backend::{
    DeviceInfo, DmaBacking, DmaProt, IrqInfo, RegionInfo, SparseArea, VfioBackend, VfioError,
    VFIO_PCI_INTX_IRQ_INDEX,
};
use super::mig_backend::{IommuDirtyLog, MigrationBackend};
use super::sysfs::{ManagedBinding, SysfsError};
use iommufd_dirty::DirtyHwpt;
use migration::MigSession;

// The device ioctls whose errors vfio-ioctls 0.10 does not return (its region_read/write and
// reset only log) or whose arguments it cannot express (per-vector eventfds from `start`,
// read-only DMA): done here on the fd it opened. Numbers from linux/vfio.h.
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// Errors of opening a kernel VFIO device.
#[derive(Debug, Error)]
pub enum KernelVfioError {
    /// The sysfs checks or the managed binding failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// Another process (another VMM) holds the IOMMU group.
    #[error("IOMMU group {group} ({path}) is already in use by another process (another VMM?); stop it or pick another device")]
    GroupBusy {
        /// The group.
        group: u32,
        /// Its file.
        path: PathBuf,
        /// EBUSY.
        #[source]
        source: io::Error,
    },
    /// The group's file cannot be opened.
    #[error("IOMMU group {group}: cannot open {path} (is VFIO loaded and the device bound to vfio-pci?)")]
    GroupOpen {
        /// The group.
        group: u32,
        /// Its file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// iommufd is not available for this device.
    #[error("{bdf}: iommufd needs {what}; use the group backend or a kernel with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV")]
    NoIommufd {
        /// The device.
        bdf: String,
        /// What is missing.
        what: String,
    },
    /// The device is in use by another process.
    #[error("{bdf}: the device is already in use by another process (another VMM?)")]
    DeviceBusy {
        /// The device.
        bdf: String,
        /// The failure.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// vfio-ioctls failed (container, group, iommufd or device).
    #[error("{bdf}: {what}")]
    Vfio {
        /// The device.
        bdf: String,
        /// The step.
        what: &'static str,
        /// The failure.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// IOMMU dirty tracking was asked for and the IOMMU cannot do it.
    #[error("{bdf}: the IOMMU cannot track the device's DMA writes ({reason}); migrate without IOMMU dirty tracking (the device's own DMA logging, if it has one) or open it without asking for it")]
    NoDirtyTracking {
        /// The device.
        bdf: String,
        /// What the IOMMU answered.
        reason: String,
    },
    /// The device answered something unusable.
    #[error("{bdf}: {what}: {source}")]
    Device {
        /// The device.
        bdf: String,
        /// The step.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// The errno somewhere in `err`'s source chain (vmm-sys-util's or an io::Error).
pub(crate) fn errno_of(err: &(dyn StdError + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(s) = e.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(s.errno());
        }
        if let Some(n) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        cur = e.source();
    }
    None
}

/// A vfio-ioctls error as an io::Error, keeping its errno when it has one.
pub(crate) fn to_io(err: vfio_ioctls::VfioError) -> io::Error {
    match errno_of(&err) {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(err),
    }
}

/// Maps the failure to open `/dev/vfio/N`: EBUSY means another process owns the group.
pub(crate) fn group_open_error(group: u32, path: &Path, source: io::Error) -> KernelVfioError {
    if source.raw_os_error() == Some(libc::EBUSY) {
        KernelVfioError::GroupBusy {
            group,
            path: path.to_path_buf(),
            source,
        }
    } else {
        KernelVfioError::GroupOpen {
            group,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Maps a vfio-ioctls failure to open a device, telling EBUSY (owned elsewhere) apart.
pub(crate) fn device_open_error(
    bdf: &str,
    what: &'static str,
    source: vfio_ioctls::VfioError,
) -> KernelVfioError {
    if errno_of(&source) == Some(libc::EBUSY) {
        KernelVfioError::DeviceBusy {
            bdf: bdf.to_string(),
            source,
        }
    } else {
        KernelVfioError::Vfio {
            bdf: bdf.to_string(),
            what,
            source,
        }
    }
}

/// The host address of a DMA mapping: kernel VFIO maps host memory only.
pub(crate) fn memory_host_addr(backing: &DmaBacking<'_>, prot: DmaProt) -> Result<u64, VfioError> {
    if !prot.read && !prot.write {
        return Err(VfioError::Invalid {
            what: "dma_map",
            reason: "a mapping must allow reads or writes".into(),
        });
    }
    match backing {
        DmaBacking::Memory { host_addr, .. } => Ok(*host_addr),
        DmaBacking::Trapped => Err(VfioError::Invalid {
            what: "dma_map",
            reason: "kernel VFIO cannot map a trapped range (no host memory behind it, e.g. a \
                     peer's emulated BAR): the IOMMU maps host memory only and cannot forward \
                     the device's DMA to the VMM; use vfio-user for that"
                .into(),
        }),
    }
}

/// One IOMMU address space (a type1 container or an iommufd IOAS).
pub(crate) trait DmaSpace: Send + Sync {
    /// Map `size` bytes of this process at `host_addr` to `iova`.
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> io::Result<()>;
    /// Unmap `size` bytes at `iova`.
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// A recorded mapping: host address, access rights, number of devices using it.
type Mapping = (u64, DmaProt, usize);

/// Mappings of an address space shared by the devices of one IOMMU group: the same range
/// mapped by two devices is mapped once and unmapped when the last one unmaps it.
pub(crate) struct SharedDma<S> {
    space: S,
    /// (iova, size) -> mapping
    maps: Mutex<HashMap<(u64, u64), Mapping>>,
}

impl<S: DmaSpace> SharedDma<S> {
    pub(crate) fn new(space: S) -> Self {
        SharedDma {
            space,
            maps: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn space(&self) -> &S {
        &self.space
    }

    pub(crate) fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: DmaProt,
    ) -> Result<(), VfioError> {
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(VfioError::Invalid {
                what: "dma_map",
                reason: format!("bad range {iova:#x}+{size:#x}"),
            });
        }
        let mut maps = self.maps.lock().unwrap();
        if let Some((addr, p, users)) = maps.get_mut(&(iova, size)) {
            if *addr == host_addr && *p == prot {
                *users += 1;
                return Ok(());
            }
            return Err(VfioError::Invalid {
                what: "dma_map",
                reason: format!(
                    "{iova:#x}+{size:#x} is already mapped to other memory by a device of the same IOMMU group"
                ),
            });
        }
        self.space
            .map(iova, size, host_addr, prot)
            .map_err(|source| VfioError::Refused {
                what: "dma_map",
                source,
            })?;
        maps.insert((iova, size), (host_addr, prot, 1));
        Ok(())
    }

    pub(crate) fn unmap(&self, iova: u64, size: u64) -> Result<(), VfioError> {
        let mut maps = self.maps.lock().unwrap();
        if let Some((_, _, users)) = maps.get_mut(&(iova, size)) {
            *users -= 1;
            if *users > 0 {
                return Ok(());
            }
        }
        self.space
            .unmap(iova, size)
            .map_err(|source| VfioError::Refused {
                what: "dma_unmap",
                source,
            })?;
        // An unmap may cover several mappings (type1v2 and iommufd allow it).
        let end = iova.saturating_add(size);
        maps.retain(|(i, s), _| !(*i >= iova && i.saturating_add(*s) <= end));
        Ok(())
    }
}

/// The `VFIO_DEVICE_SET_IRQS` argument: `struct vfio_irq_set` followed by one fd per vector
/// (-1: leave that vector unsignalled), as u32 words.
pub(crate) fn irq_set_words(index: u32, flags: u32, start: u32, fds: &[i32]) -> Vec<u32> {
    let argsz = (5 + fds.len()) * size_of::<u32>();
    let mut w = vec![argsz as u32, flags, index, start, fds.len() as u32];
    w.extend(fds.iter().map(|&fd| fd as u32));
    w
}

/// What a region is, read once at open.
#[derive(Debug, Clone, Copy)]
struct Region {
    flags: u32,
    size: u64,
    offset: u64,
}

/// A host device opened through kernel VFIO; implements [`VfioBackend`].
pub struct KernelVfioDevice {
    kind: &'static str,
    bdf: String,
    group: u32,
    info: DeviceInfo,
    regions: Vec<Option<Region>>,
    dma: Arc<dyn DmaMapper>,
    /// The device (and through it the container or iommufd); also the fd regions map from.
    /// Dropped by hand, before the managed binding is restored.
    device: ManuallyDrop<Arc<VfioDevice>>,
    /// Restored after `device` is closed (see the `Drop` impl and [`KernelVfioDevice::close`]).
    binding: Option<ManagedBinding>,
    /// The migration state last set and the data fd of its session (see `migration.rs`).
    mig: Mutex<MigSession>,
    /// The dirty-tracking HWPT the device is attached to (iommufd only, when asked for);
    /// destroyed after `device` is closed.
    dirty_hwpt: Option<Arc<DirtyHwpt>>,
}

/// The DMA side of a [`KernelVfioDevice`] (its group's [`SharedDma`]).
pub(crate) trait DmaMapper: Send + Sync {
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> Result<(), VfioError>;
    fn unmap(&self, iova: u64, size: u64) -> Result<(), VfioError>;
}

impl<S: DmaSpace> DmaMapper for SharedDma<S> {
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> Result<(), VfioError> {
        SharedDma::map(self, iova, size, host_addr, prot)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), VfioError> {
        SharedDma::unmap(self, iova, size)
    }
}

fn last_errno(what: &'static str) -> VfioError {
    VfioError::Refused {
        what,
        source: io::Error::last_os_error(),
    }
}

impl KernelVfioDevice {
    /// Wraps a device vfio-ioctls opened: reads its info and regions.
    pub(crate) fn new(
        kind: &'static str,
        (bdf, group): (String, u32),
        device: VfioDevice,
        dma: Arc<dyn DmaMapper>,
        binding: ManagedBinding,
    ) -> Result<Self, KernelVfioError> {
        let dev_err = |what, e: VfioError| KernelVfioError::Device {
            bdf: bdf.clone(),
            what,
            source: match e {
                VfioError::Refused { source, .. } | VfioError::Transport { source, .. } => source,
                other => io::Error::other(other.to_string()),
            },
        };
        let info = get_device_info(&device).map_err(|e| dev_err("VFIO_DEVICE_GET_INFO", e))?;
        let mut regions = Vec::new();
        for index in 0..info.num_regions {
            // Absent regions (VGA on most devices) answer EINVAL.
            regions.push(get_region_info(&device, index).ok());
        }
        debug!("{bdf}: {kind}: {info:?}, regions {regions:?}");
        Ok(KernelVfioDevice {
            kind,
            bdf,
            group,
            info,
            regions,
            dma,
            device: ManuallyDrop::new(Arc::new(device)),
            binding: Some(binding),
            mig: Mutex::new(MigSession::default()),
            dirty_hwpt: None,
        })
    }

    /// Closes the device and gives the devices `managed=on` rebound back to their host
    /// drivers, reporting failures (dropping does the same, logging them). Every
    /// [`RegionInfo`] and BAR mapping of the device must be gone: the kernel cannot unbind a
    /// device from vfio-pci while it is open.
    pub fn close(this: Arc<Self>) -> Result<(), KernelVfioError> {
        let mut dev = Arc::try_unwrap(this).map_err(|this| KernelVfioError::Device {
            bdf: this.bdf.clone(),
            what: "close",
            source: io::Error::new(io::ErrorKind::ResourceBusy, "the device is still shared"),
        })?;
        let binding = dev.binding.take();
        drop(dev);
        match binding {
            Some(b) => Ok(b.restore()?),
            None => Ok(()),
        }
    }

    /// Records the dirty-tracking HWPT the device was attached to at open.
    pub(crate) fn set_dirty_hwpt(&mut self, hwpt: Arc<DirtyHwpt>) {
        self.dirty_hwpt = Some(hwpt);
    }

    /// The dirty-tracking HWPT the device is attached to, if any.
    pub(crate) fn dirty_hwpt(&self) -> Option<Arc<DirtyHwpt>> {
        self.dirty_hwpt.clone()
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn region(&self, index: u32) -> Result<Region, VfioError> {
        self.regions
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or_else(|| VfioError::Invalid {
                what: "region",
                reason: format!("{}: no region {index}", self.bdf),
            })
    }

    fn checked_offset(
        &self,
        what: &'static str,
        index: u32,
        offset: u64,
        len: usize,
        need: u32,
    ) -> Result<u64, VfioError> {
        let r = self.region(index)?;
        if r.flags & need == 0 {
            return Err(VfioError::Invalid {
                what,
                reason: format!("region {index} does not allow it (flags {:#x})", r.flags),
            });
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= r.size => Ok(r.offset + offset),
            _ => Err(VfioError::Invalid {
                what,
                reason: format!(
                    "{offset:#x}+{len} is outside region {index} (size {:#x})",
                    r.size
                ),
            }),
        }
    }

    /// The device fd as a File for pread/pwrite, never closed by this handle.
    fn file(&self) -> ManuallyDrop<File> {
        // SAFETY: the fd belongs to `self.device`, which outlives the returned handle's use
        // (it is only used within `&self` methods); ManuallyDrop keeps it from being closed.
        ManuallyDrop::new(unsafe { File::from_raw_fd(self.device.as_raw_fd()) })
    }

    fn set_irqs(
        &self,
        what: &'static str,
        index: u32,
        flags: u32,
        start: u32,
        fds: &[i32],
    ) -> Result<(), VfioError> {
        let words = irq_set_words(index, flags, start, fds);
        // SAFETY: `words` is a valid `struct vfio_irq_set` with `argsz` covering the fds that
        // follow it; the kernel only reads it.
        let ret = unsafe { ioctl_with_ptr(&**self.device, VFIO_DEVICE_SET_IRQS(), words.as_ptr()) };
        if ret < 0 {
            return Err(last_errno(what));
        }
        Ok(())
    }
}

impl Drop for KernelVfioDevice {
    fn drop(&mut self) {
        let mut binding = self.binding.take();
        if Arc::strong_count(&self.device) > 1 {
            if let Some(b) = binding.as_mut() {
                // A RegionInfo still holds the device open: unbinding it from vfio-pci would
                // block until that is closed, so the host drivers are not restored.
                warn!("{}: device still open when dropped", self.bdf);
                b.forget();
            }
        }
        // SAFETY: `self.device` is dropped exactly once, here, and not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.device) };
        // The device detached from its dirty-tracking HWPT when it closed: it can go now,
        // before the IOAS it was allocated from.
        drop(self.dirty_hwpt.take());
        // Now that the device is closed, the host drivers can have it back.
        drop(binding);
    }
}

fn get_device_info(device: &VfioDevice) -> Result<DeviceInfo, VfioError> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a properly sized `struct vfio_device_info` the kernel fills.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if ret < 0 {
        return Err(last_errno("device_info"));
    }
    Ok(DeviceInfo {
        flags: info.flags,
        num_regions: info.num_regions,
        num_irqs: info.num_irqs,
    })
}

fn get_region_info(device: &VfioDevice, index: u32) -> Result<Region, VfioError> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a properly sized `struct vfio_region_info`; with this argsz the kernel
    // writes no capability chain past it.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) };
    if ret < 0 {
        return Err(last_errno("region_info"));
    }
    Ok(Region {
        flags: info.flags,
        size: info.size,
        offset: info.offset,
    })
}

impl VfioBackend for KernelVfioDevice {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("host_device", self.bdf.clone()),
            ("iommu_group", self.group.to_string()),
        ]
    }

    fn device_info(&self) -> Result<DeviceInfo, VfioError> {
        Ok(self.info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError> {
        let Some(r) = self.regions.get(index as usize).copied().flatten() else {
            return Ok(RegionInfo {
                index,
                flags: 0,
                size: 0,
                offset: 0,
                mmap_fd: None,
                sparse: Vec::new(),
            });
        };
        // vfio-ioctls parsed the capability chain at open; its list is by position, so use it
        // only when it describes the same region.
        let mut sparse = Vec::new();
        if self.device.get_region_offset(index) == r.offset
            && self.device.get_region_size(index) == r.size
        {
            for cap in self.device.get_region_caps(index) {
                if let VfioRegionInfoCap::SparseMmap(s) = cap {
                    sparse.extend(s.areas.iter().map(|a| SparseArea {
                        offset: a.offset,
                        size: a.size,
                    }));
                }
            }
        }
        let mmap_fd: Option<Arc<dyn AsRawFd + Send + Sync>> =
            if r.flags & super::backend::VFIO_REGION_INFO_FLAG_MMAP != 0 {
                Some(Arc::clone(&*self.device) as Arc<dyn AsRawFd + Send + Sync>)
            } else {
                None
            };
        Ok(RegionInfo {
            index,
            flags: r.flags,
            size: r.size,
            offset: r.offset,
            mmap_fd,
            sparse,
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioError> {
        match self.device.get_irq_info(index) {
            Some(i) => Ok(IrqInfo {
                index,
                flags: i.flags,
                count: i.count,
            }),
            None if index < self.info.num_irqs => Ok(IrqInfo {
                index,
                flags: 0,
                count: 0,
            }),
            None => Err(VfioError::Invalid {
                what: "irq_info",
                reason: format!("{}: no interrupt index {index}", self.bdf),
            }),
        }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError> {
        let at = self.checked_offset(
            "region_read",
            index,
            offset,
            data.len(),
            super::backend::VFIO_REGION_INFO_FLAG_READ,
        )?;
        self.file()
            .read_exact_at(data, at)
            .map_err(|source| VfioError::Refused {
                what: "region_read",
                source,
            })
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        let at = self.checked_offset(
            "region_write",
            index,
            offset,
            data.len(),
            super::backend::VFIO_REGION_INFO_FLAG_WRITE,
        )?;
        self.file()
            .write_all_at(data, at)
            .map_err(|source| VfioError::Refused {
                what: "region_write",
                source,
            })
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), VfioError> {
        let raw: Vec<i32> = fds
            .iter()
            .map(|f| f.map_or(-1, |e| e.as_raw_fd()))
            .collect();
        self.set_irqs(
            "set_irq_eventfds",
            index,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            start,
            &raw,
        )
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioError> {
        self.set_irqs(
            "disable_irqs",
            index,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &[],
        )
    }

    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<(), VfioError> {
        self.set_irqs(
            "set_intx_unmask_eventfd",
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            0,
            &[fd.as_raw_fd()],
        )
    }

    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        backing: DmaBacking<'_>,
        prot: DmaProt,
    ) -> Result<(), VfioError> {
        let host_addr = memory_host_addr(&backing, prot)?;
        self.dma.map(iova, size, host_addr, prot)
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), VfioError> {
        self.dma.unmap(iova, size)
    }

    fn migration(&self) -> Option<&dyn MigrationBackend> {
        Some(self)
    }

    fn iommu_dirty_log(&self) -> Option<Arc<dyn IommuDirtyLog>> {
        self.dirty_hwpt
            .clone()
            .map(|hwpt| Arc::new(IommuDirtyTracking::new(hwpt)) as Arc<dyn IommuDirtyLog>)
    }

    fn reset(&self) -> Result<(), VfioError> {
        if self.info.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(VfioError::Invalid {
                what: "reset",
                reason: format!("{}: the device offers no reset", self.bdf),
            });
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&**self.device, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(last_errno("reset"));
        }
        // A reset puts the device back in RUNNING and ends any migration data session.
        self.mig.lock().unwrap().apply(
            vfio_bindings::bindings::vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
            None,
        );
        Ok(())
    }
}

#[cfg(test)]
mod mig_tests;
#[cfg(test)]
mod tests;
