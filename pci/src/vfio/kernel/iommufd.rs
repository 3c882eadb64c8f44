//! The iommufd backend: `/dev/iommu` (one per VM), one IOAS per IOMMU group, devices opened as
//! `/dev/vfio/devices/vfioN` and bound (VFIO_DEVICE_BIND_IOMMUFD) and attached
//! (VFIO_DEVICE_ATTACH_IOMMUFD_PT) to their group's IOAS — all through vfio-ioctls' `vfio_cdev`
//! feature and iommufd-ioctls.
//!
//! IOMMU dirty tracking (for migrating devices that have no DMA logging of their own):
//! [`IommufdSet::open_dirty_tracking`] opens a device attached to a page table allocated with
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` instead of the IOAS's automatic one, and
//! [`IommufdSet::dirty_tracking`] gives its [`IommuDirtyTracking`] (see `iommufd_dirty.rs`).

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::IommuFd;
use log::info;
use vfio_ioctls::{VfioDevice, VfioDeviceFd, VfioIommufd, VfioOps};

use super::iommufd_dirty::{DirtyHwpt, DirtyHwptError, IommuDirtyTracking};
use super::{device_open_error, to_io, DmaSpace, KernelVfioDevice, KernelVfioError, SharedDma};
use crate::vfio::backend::{DmaProt, VfioError};
use crate::vfio::sysfs::PreparedDevice;

/// `iommu_ioas_map.flags` for these access rights (always at the given IOVA).
pub(crate) fn ioas_map_flags(prot: DmaProt) -> u32 {
    let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    if prot.read {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if prot.write {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

/// An IOAS as a DMA space.
pub(crate) struct IoasSpace {
    vfio: Arc<VfioIommufd>,
}

impl DmaSpace for IoasSpace {
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> io::Result<()> {
        // vfio-ioctls' VfioIommufd::vfio_dma_map always maps read+write: the map is built here
        // with the access rights and issued through iommufd-ioctls.
        let map = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>() as u32,
            flags: ioas_map_flags(prot),
            ioas_id: self.vfio.ioas().id(),
            __reserved: 0,
            user_va: host_addr,
            length: size,
            iova,
        };
        self.vfio
            .iommufd()
            .map_iommu_ioas(&map)
            .map_err(|e| match super::errno_of(&e) {
                Some(n) => io::Error::from_raw_os_error(n),
                None => io::Error::other(e),
            })
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        self.vfio.vfio_dma_unmap(iova, size).map_err(to_io)
    }
}

/// The VM's iommufd: opens devices through their VFIO cdev, one IOAS per IOMMU group.
pub struct IommufdSet {
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
    dev_iommu: PathBuf,
    iommufd: Mutex<Option<Arc<IommuFd>>>,
    /// Each group's IOAS mappings, alive while a device uses them.
    groups: Mutex<HashMap<u32, Weak<SharedDma<IoasSpace>>>>,
}

impl IommufdSet {
    /// A set whose devices are announced to `kvm_vfio` (the VM's KVM VFIO device) when given.
    /// `/dev/iommu` is opened with the first device.
    pub fn new(kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Self {
        IommufdSet {
            kvm_vfio,
            dev_iommu: PathBuf::from("/dev/iommu"),
            iommufd: Mutex::new(None),
            groups: Mutex::new(HashMap::new()),
        }
    }

    fn iommufd(&self, bdf: &str) -> Result<Arc<IommuFd>, KernelVfioError> {
        let mut fd = self.iommufd.lock().unwrap();
        if let Some(fd) = fd.as_ref() {
            return Ok(fd.clone());
        }
        let opened = Arc::new(IommuFd::new().map_err(|e| KernelVfioError::NoIommufd {
            bdf: bdf.to_string(),
            what: format!("{} ({e})", self.dev_iommu.display()),
        })?);
        *fd = Some(opened.clone());
        Ok(opened)
    }

    /// Opens a prepared device (see [`crate::vfio::sysfs::SysfsRoot::prepare`]). On error the
    /// managed binding is given back.
    pub fn open(&self, prepared: PreparedDevice) -> Result<Arc<KernelVfioDevice>, KernelVfioError> {
        self.open_with(prepared, false).map_err(|e| e.error)
    }

    /// Opens a prepared device like [`Self::open`], attached to a page table of its own
    /// allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` over its group's IOAS (same mappings),
    /// so that the IOMMU can record its DMA writes: see [`Self::dirty_tracking`]. Fails with
    /// [`KernelVfioError::NoDirtyTracking`] when the IOMMU has no dirty tracking (Intel VT-d
    /// without scalable-mode second-stage dirty bits, AMD-Vi without HDSup, ...) or refuses
    /// the page table; the prepared device then comes back in the error, closed again, to be
    /// opened with [`Self::open`].
    pub fn open_dirty_tracking(
        &self,
        prepared: PreparedDevice,
    ) -> Result<Arc<KernelVfioDevice>, DirtyOpenError> {
        self.open_with(prepared, true)
    }

    /// The IOMMU dirty tracking of `dev`, opened with [`Self::open_dirty_tracking`]; an
    /// `Invalid` error for a device opened otherwise. Tracking starts off: turn it on with
    /// [`IommuDirtyTracking::set_enabled`], read it with [`IommuDirtyTracking::read_and_clear`].
    pub fn dirty_tracking(&self, dev: &KernelVfioDevice) -> Result<IommuDirtyTracking, VfioError> {
        dev.dirty_hwpt()
            .map(IommuDirtyTracking::new)
            .ok_or_else(|| VfioError::Invalid {
                what: "dirty_tracking",
                reason: format!(
                    "{}: not opened with IOMMU dirty tracking (IommufdSet::open_dirty_tracking)",
                    dev.bdf()
                ),
            })
    }

    fn open_with(
        &self,
        prepared: PreparedDevice,
        dirty: bool,
    ) -> Result<Arc<KernelVfioDevice>, DirtyOpenError> {
        let failed = |error, prepared| DirtyOpenError { error, prepared };
        let (device, ctx) = self.bind(&prepared, dirty).map_err(|e| failed(e, None))?;
        let hwpt = if dirty {
            match attach_dirty_hwpt(&prepared.device.bdf, &device, &ctx.space().vfio) {
                Ok(h) => Some(h),
                Err(e) => {
                    // Closed (unbound from iommufd) before the caller opens it again.
                    drop((device, ctx));
                    return Err(failed(e, Some(Box::new(prepared))));
                }
            }
        } else {
            None
        };
        let mut dev = KernelVfioDevice::new(
            "vfio-iommufd",
            (prepared.device.bdf, prepared.group.id),
            device,
            ctx,
            prepared.binding,
        )
        .map_err(|e| failed(e, None))?;
        if let Some(hwpt) = hwpt {
            dev.set_dirty_hwpt(hwpt);
        }
        Ok(Arc::new(dev))
    }

    /// Binds the device to iommufd in its group's IOAS; attached to the IOAS too unless it is
    /// to get a `dirty`-tracking page table of its own.
    fn bind(
        &self,
        prepared: &PreparedDevice,
        dirty: bool,
    ) -> Result<(VfioDevice, Arc<SharedDma<IoasSpace>>), KernelVfioError> {
        let bdf = prepared.device.bdf.clone();
        let group = prepared.group.id;
        check_cdev(&bdf, &prepared.device.path)?;
        let iommufd = self.iommufd(&bdf)?;
        let ctx = {
            let mut groups = self.groups.lock().unwrap();
            match groups.get(&group).and_then(Weak::upgrade) {
                Some(ctx) => ctx,
                None => {
                    let vfio = VfioIommufd::new(iommufd, None, self.kvm_vfio.clone())
                        .map_err(|e| device_open_error(&bdf, "allocating an IOAS", e))?;
                    let ctx = Arc::new(SharedDma::new(IoasSpace {
                        vfio: Arc::new(vfio),
                    }));
                    groups.insert(group, Arc::downgrade(&ctx));
                    info!("{bdf}: IOMMU group {group} in a new IOAS");
                    ctx
                }
            }
        };
        let ops: Arc<dyn VfioOps> = ctx.space().vfio.clone();
        // With dirty tracking the device is bound only, then attached to its own HWPT.
        let device = VfioDevice::new(&prepared.device.path, ops, !dirty)
            .map_err(|e| device_open_error(&bdf, "binding the device to iommufd", e))?;
        Ok((device, ctx))
    }
}

/// A failed [`IommufdSet::open_dirty_tracking`].
#[derive(Debug)]
pub struct DirtyOpenError {
    /// Why.
    pub error: KernelVfioError,
    /// The prepared device, given back when only the dirty tracking failed
    /// ([`KernelVfioError::NoDirtyTracking`]): open it with [`IommufdSet::open`].
    pub prepared: Option<Box<PreparedDevice>>,
}

/// Allocates a dirty-tracking HWPT for the bound (not attached) `device` and attaches it.
fn attach_dirty_hwpt(
    bdf: &str,
    device: &VfioDevice,
    vfio: &Arc<VfioIommufd>,
) -> Result<Arc<DirtyHwpt>, KernelVfioError> {
    let no = |reason: String| KernelVfioError::NoDirtyTracking {
        bdf: bdf.to_string(),
        reason,
    };
    let dev_id = device
        .iommufd_dev_id()
        .ok_or_else(|| no("the device has no iommufd device id".into()))?;
    let hwpt = DirtyHwpt::alloc(vfio.clone(), dev_id).map_err(|e| match e {
        DirtyHwptError::NoCapability(caps) => no(format!(
            "IOMMU_GET_HW_INFO capabilities {caps:#x} lack IOMMU_HW_CAP_DIRTY_TRACKING"
        )),
        DirtyHwptError::Refused(step, err) => no(format!("{step}: {err}")),
    })?;
    device.attach_hwpt(hwpt.id()).map_err(|e| {
        no(format!(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT to HWPT {}: {}",
            hwpt.id(),
            to_io(e)
        ))
    })?;
    info!("{bdf}: attached to dirty-tracking HWPT {}", hwpt.id());
    Ok(Arc::new(hwpt))
}

/// The device must have exactly one VFIO cdev (`<dev>/vfio-dev/vfioN`).
fn check_cdev(bdf: &str, path: &Path) -> Result<(), KernelVfioError> {
    let dir = path.join("vfio-dev");
    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    if n != 1 {
        return Err(KernelVfioError::NoIommufd {
            bdf: bdf.to_string(),
            what: format!(
                "a VFIO device cdev ({} has {n} entries; is the device bound to vfio-pci?)",
                dir.display()
            ),
        });
    }
    Ok(())
}
