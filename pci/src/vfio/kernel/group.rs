//! The legacy container/group backend (type1v2): one container per IOMMU group, shared by the
//! devices of that group in one VM.
//!
//! One container per group (not one per VM) keeps each group's DMA space its own, which is what
//! a guest IOMMU needs (devices of different groups may be in different guest domains); the
//! devices of one group cannot be separated by the IOMMU, so they share theirs.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use log::info;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use super::{
    device_open_error, group_open_error, to_io, DmaSpace, KernelVfioDevice, KernelVfioError,
    SharedDma,
};
use crate::vfio::backend::DmaProt;
use crate::vfio::sysfs::PreparedDevice;

// vfio-ioctls' VfioContainer::vfio_dma_map always maps read+write; the backend trait carries
// the access rights, so the map ioctl (linux/vfio.h VFIO_IOMMU_MAP_DMA) is issued here.
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);

/// `vfio_iommu_type1_dma_map.flags` for these access rights.
pub(crate) fn type1_map_flags(prot: DmaProt) -> u32 {
    let mut flags = 0;
    if prot.read {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if prot.write {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    flags
}

/// A type1v2 container as a DMA space.
pub(crate) struct Type1Space {
    container: Arc<VfioContainer>,
}

impl DmaSpace for Type1Space {
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> io::Result<()> {
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: type1_map_flags(prot),
            vaddr: host_addr,
            iova,
            size,
        };
        // SAFETY: `map` is a valid `struct vfio_iommu_type1_dma_map` the kernel only reads. The
        // memory at `host_addr` is guest RAM the caller keeps mapped until it unmaps this range
        // (the `DmaBacking::Memory` contract); the kernel pins it and checks the range.
        let ret = unsafe { ioctl_with_ref(self.container.as_ref(), VFIO_IOMMU_MAP_DMA(), &map) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        self.container.vfio_dma_unmap(iova, size).map_err(to_io)
    }
}

/// The VM's kernel VFIO groups: opens devices through the legacy container/group interface,
/// one container per IOMMU group, shared by the devices of that group.
pub struct VfioGroupSet {
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
    dev_vfio: PathBuf,
    /// Each group's DMA space (and through it its container), alive while a device uses it.
    groups: Mutex<HashMap<u32, Weak<SharedDma<Type1Space>>>>,
}

impl VfioGroupSet {
    /// A set whose groups are announced to `kvm_vfio` (the VM's KVM VFIO device, which KVM
    /// needs for coherent DMA and interrupt bypass) when given.
    pub fn new(kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Self {
        VfioGroupSet {
            kvm_vfio,
            dev_vfio: PathBuf::from("/dev/vfio"),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a prepared device (see [`crate::vfio::sysfs::SysfsRoot::prepare`]). On error the
    /// managed binding is given back.
    pub fn open(&self, prepared: PreparedDevice) -> Result<Arc<KernelVfioDevice>, KernelVfioError> {
        let bdf = prepared.device.bdf.clone();
        let group = prepared.group.id;
        let ctx = {
            let mut groups = self.groups.lock().unwrap();
            match groups.get(&group).and_then(Weak::upgrade) {
                Some(ctx) => ctx,
                None => {
                    // Opening the group file first tells "owned by another process" (EBUSY)
                    // from other failures before vfio-ioctls folds them into one error.
                    let path = self.dev_vfio.join(group.to_string());
                    drop(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&path)
                            .map_err(|e| group_open_error(group, &path, e))?,
                    );
                    let container =
                        Arc::new(VfioContainer::new(self.kvm_vfio.clone()).map_err(|source| {
                            KernelVfioError::Vfio {
                                bdf: bdf.clone(),
                                what: "opening /dev/vfio/vfio",
                                source,
                            }
                        })?);
                    let ctx = Arc::new(SharedDma::new(Type1Space { container }));
                    groups.insert(group, Arc::downgrade(&ctx));
                    info!("{bdf}: IOMMU group {group} in a new type1v2 container");
                    ctx
                }
            }
        };
        let ops: Arc<dyn VfioOps> = ctx.space().container.clone();
        let device = VfioDevice::new(&prepared.device.path, ops, false).map_err(|e| match e {
            vfio_ioctls::VfioError::OpenGroup(source, _) => {
                group_open_error(group, &self.dev_vfio.join(group.to_string()), source)
            }
            e => device_open_error(&bdf, "opening the device in its group", e),
        })?;
        let dev = KernelVfioDevice::new(
            "vfio-group",
            (bdf, prepared.group.id),
            device,
            ctx,
            prepared.binding,
        )?;
        Ok(Arc::new(dev))
    }
}
