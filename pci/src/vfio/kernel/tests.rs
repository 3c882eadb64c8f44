use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Mutex;

use vfio_bindings::bindings::vfio::{vfio_irq_set, VFIO_DEVICE_FLAGS_PCI};
use vmm_sys_util::errno::Error as SysError;
use vmm_sys_util::tempfile::TempFile;

use super::group::type1_map_flags;
use super::iommufd::ioas_map_flags;
use super::*;
use crate::vfio::backend::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use crate::vfio::sysfs::{BindOptions, SysfsRoot};

const RW: DmaProt = DmaProt {
    read: true,
    write: true,
};

#[test]
fn irq_set_encoding_matches_struct_vfio_irq_set() {
    assert_eq!(size_of::<vfio_irq_set>(), 20, "header of five u32");
    let w = irq_set_words(
        2,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        3,
        &[7, -1, 9],
    );
    assert_eq!(w, vec![32, 0x24, 2, 3, 3, 7, u32::MAX, 9]);
    // Disable: DATA_NONE | ACTION_TRIGGER, count 0, no data.
    let w = irq_set_words(
        1,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        &[],
    );
    assert_eq!(w, vec![20, 0x21, 1, 0, 0]);
    // INTx unmask on an eventfd.
    let w = irq_set_words(
        0,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
        0,
        &[5],
    );
    assert_eq!(w, vec![24, 0x14, 0, 0, 1, 5]);
}

#[test]
fn dma_flags_follow_access_rights() {
    let ro = DmaProt {
        read: true,
        write: false,
    };
    let wo = DmaProt {
        read: false,
        write: true,
    };
    assert_eq!(type1_map_flags(RW), 3);
    assert_eq!(type1_map_flags(ro), 1);
    assert_eq!(type1_map_flags(wo), 2);
    // FIXED_IOVA 1, WRITEABLE 2, READABLE 4 (linux/iommufd.h).
    assert_eq!(ioas_map_flags(RW), 7);
    assert_eq!(ioas_map_flags(ro), 5);
    assert_eq!(ioas_map_flags(wo), 3);
}

#[test]
fn trapped_dma_is_refused_with_the_reason() {
    let err = memory_host_addr(&DmaBacking::Trapped, RW).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VfioError::Invalid { .. }));
    assert!(
        msg.contains("kernel VFIO cannot map a trapped range"),
        "{msg}"
    );
    assert!(msg.contains("vfio-user"), "{msg}");

    let f = TempFile::new().unwrap();
    let mem = DmaBacking::Memory {
        fd: f.as_file().as_fd(),
        offset: 0,
        host_addr: 0x7f00_0000_0000,
    };
    assert_eq!(memory_host_addr(&mem, RW).unwrap(), 0x7f00_0000_0000);
    let none = DmaProt {
        read: false,
        write: false,
    };
    assert!(memory_host_addr(&mem, none).is_err());
}

#[test]
fn errors_keep_their_errno() {
    let e = vfio_ioctls::VfioError::IommuDmaMap(SysError::new(libc::EFAULT));
    assert_eq!(errno_of(&e), Some(libc::EFAULT));
    assert_eq!(to_io(e).raw_os_error(), Some(libc::EFAULT));
    let e = vfio_ioctls::VfioError::InvalidDmaUnmapSize;
    assert_eq!(errno_of(&e), None);
    assert!(to_io(e).to_string().contains("invalid dma unmap size"));
}

#[test]
fn busy_group_is_named_not_a_bare_ebusy() {
    let path = Path::new("/dev/vfio/12");
    let err = group_open_error(12, path, io::Error::from_raw_os_error(libc::EBUSY));
    assert!(matches!(err, KernelVfioError::GroupBusy { group: 12, .. }));
    let msg = err.to_string();
    assert!(msg.contains("IOMMU group 12"), "{msg}");
    assert!(msg.contains("already in use by another process"), "{msg}");
    assert!(StdError::source(&err).is_some());

    let err = group_open_error(12, path, io::Error::from_raw_os_error(libc::ENOENT));
    assert!(matches!(err, KernelVfioError::GroupOpen { .. }));
    assert!(err.to_string().contains("bound to vfio-pci"), "{err}");

    let e = vfio_ioctls::VfioError::VfioDeviceBindIommufd(SysError::new(libc::EBUSY));
    let err = device_open_error("0000:01:00.0", "binding", e);
    assert!(matches!(err, KernelVfioError::DeviceBusy { .. }), "{err:?}");
    let e = vfio_ioctls::VfioError::VfioDeviceBindIommufd(SysError::new(libc::EPERM));
    let err = device_open_error("0000:01:00.0", "binding", e);
    assert!(matches!(err, KernelVfioError::Vfio { .. }), "{err:?}");
}

/// A DMA space that records the kernel calls.
#[derive(Default)]
struct FakeSpace {
    calls: Mutex<Vec<String>>,
    fail_map: bool,
}

impl DmaSpace for FakeSpace {
    fn map(&self, iova: u64, size: u64, host_addr: u64, prot: DmaProt) -> io::Result<()> {
        if self.fail_map {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let p = (prot.read as u8) | (prot.write as u8) << 1;
        self.calls
            .lock()
            .unwrap()
            .push(format!("map {iova:#x}+{size:#x}@{host_addr:#x}/{p}"));
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unmap {iova:#x}+{size:#x}"));
        Ok(())
    }
}

#[test]
fn devices_of_one_group_share_mappings() {
    let dma = SharedDma::new(FakeSpace::default());
    dma.map(0x1000, 0x2000, 0xa000, RW).unwrap();
    // The second device of the group maps the same range: no second kernel call.
    dma.map(0x1000, 0x2000, 0xa000, RW).unwrap();
    // The same IOVA to other memory is a conflict.
    let err = dma.map(0x1000, 0x2000, 0xb000, RW).unwrap_err();
    assert!(err.to_string().contains("same IOMMU group"), "{err}");
    dma.unmap(0x1000, 0x2000).unwrap();
    assert_eq!(dma.space().calls.lock().unwrap().len(), 1, "still used");
    dma.unmap(0x1000, 0x2000).unwrap();
    // One unmap covering two mappings forgets both.
    dma.map(0x10_0000, 0x1000, 0xc000, RW).unwrap();
    dma.map(0x10_1000, 0x1000, 0xd000, RW).unwrap();
    dma.unmap(0x10_0000, 0x2000).unwrap();
    assert!(dma.maps.lock().unwrap().is_empty());
    assert_eq!(
        *dma.space().calls.lock().unwrap(),
        vec![
            "map 0x1000+0x2000@0xa000/3",
            "unmap 0x1000+0x2000",
            "map 0x100000+0x1000@0xc000/3",
            "map 0x101000+0x1000@0xd000/3",
            "unmap 0x100000+0x2000",
        ]
    );
    assert!(dma.map(0, 0, 0xa000, RW).is_err(), "empty range");
    assert!(dma.map(u64::MAX, 2, 0xa000, RW).is_err(), "wrapping range");
}

#[test]
fn kernel_refusal_keeps_the_errno() {
    let dma = SharedDma::new(FakeSpace {
        fail_map: true,
        ..Default::default()
    });
    match dma.map(0x1000, 0x1000, 0xa000, RW) {
        Err(VfioError::Refused { what, source }) => {
            assert_eq!(what, "dma_map");
            assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        dma.maps.lock().unwrap().is_empty(),
        "a failed map is not recorded"
    );
}

const SKIP: &str = "skipped: no VFIO on this host (set SKIFF_TEST_VFIO_DEVICE=/sys/bus/pci/devices/... on a host with an IOMMU and a device bound to vfio-pci)";

/// Runs the backend calls the passthrough function makes against a real device.
fn exercise(dev: &KernelVfioDevice, vendor: u16) {
    let info = dev.device_info().unwrap();
    assert_ne!(info.flags & VFIO_DEVICE_FLAGS_PCI, 0, "{info:?}");
    assert!(info.num_regions > VFIO_PCI_CONFIG_REGION_INDEX, "{info:?}");
    let cfg = dev.region_info(VFIO_PCI_CONFIG_REGION_INDEX).unwrap();
    assert!(cfg.size >= 256, "{cfg:?}");
    let mut id = [0u8; 2];
    dev.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(
        u16::from_le_bytes(id),
        vendor,
        "vendor ID via the config region"
    );
    assert!(dev
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, cfg.size, &mut id)
        .is_err());
    for index in [VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX] {
        let irq = dev.irq_info(index).unwrap();
        if irq.count > 0 {
            let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            dev.set_irq_eventfds(index, 0, &[Some(&efd)]).unwrap();
            dev.disable_irqs(index).unwrap();
            break;
        }
    }
    // DMA: 2 MiB of shared memory, mapped twice (shared), unmapped twice.
    let size = 2 << 20;
    let file = TempFile::new().unwrap();
    file.as_file().set_len(size).unwrap();
    // SAFETY: a fresh shared mapping of a file we own, unmapped below; no Rust reference to
    // it is ever made.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_file().as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let backing = DmaBacking::Memory {
        fd: file.as_file().as_fd(),
        offset: 0,
        host_addr: addr as u64,
    };
    let iova = 0x4000_0000;
    dev.dma_map(iova, size, backing, RW).unwrap();
    dev.dma_map(iova, size, backing, RW).unwrap();
    assert!(dev.dma_map(iova, size, DmaBacking::Trapped, RW).is_err());
    dev.dma_unmap(iova, size).unwrap();
    dev.dma_unmap(iova, size).unwrap();
    // SAFETY: the mapping made above, no longer DMA-mapped.
    unsafe { libc::munmap(addr, size as usize) };
    if info.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
        dev.reset().unwrap();
    }
}

#[test]
fn kernel_vfio_device_end_to_end() {
    let spec = std::env::var("SKIFF_TEST_VFIO_DEVICE").ok();
    let Some(spec) = spec else {
        let _ = writeln!(io::stderr(), "{SKIP}");
        return;
    };
    assert!(
        Path::new("/dev/vfio").exists(),
        "SKIFF_TEST_VFIO_DEVICE={spec} is set but /dev/vfio does not exist: no VFIO on this host"
    );
    let managed = std::env::var("SKIFF_TEST_VFIO_MANAGED").is_ok_and(|v| v == "1");
    let sysfs = SysfsRoot::new("/sys");
    let opts = BindOptions {
        managed,
        take_group: false,
    };
    let device = sysfs.device(&spec).unwrap();
    let vendor = std::fs::read_to_string(device.path.join("vendor")).unwrap();
    let vendor = u16::from_str_radix(vendor.trim().trim_start_matches("0x"), 16).unwrap();

    let prepared = sysfs
        .prepare(&spec, opts)
        .unwrap_or_else(|e| panic!("SKIFF_TEST_VFIO_DEVICE={spec}: {e}"));
    let groups = VfioGroupSet::new(None);
    let dev = groups
        .open(prepared)
        .unwrap_or_else(|e| panic!("SKIFF_TEST_VFIO_DEVICE={spec}: cannot open it: {e}"));
    assert_eq!(dev.kind(), "vfio-group");
    exercise(&dev, vendor);
    KernelVfioDevice::close(dev).unwrap();

    if !Path::new("/dev/iommu").exists() || !device.path.join("vfio-dev").is_dir() {
        let _ = writeln!(
            io::stderr(),
            "iommufd part skipped: no /dev/iommu or no VFIO device cdev for {spec}"
        );
        return;
    }
    let prepared = sysfs.prepare(&spec, opts).unwrap();
    let set = IommufdSet::new(None);
    let dev = set
        .open(prepared)
        .unwrap_or_else(|e| panic!("SKIFF_TEST_VFIO_DEVICE={spec}: iommufd: {e}"));
    assert_eq!(dev.kind(), "vfio-iommufd");
    exercise(&dev, vendor);
    KernelVfioDevice::close(dev).unwrap();
}

#[test]
fn this_hosts_devices_without_an_iommu_are_refused_clearly() {
    let sys = Path::new("/sys");
    let first = std::fs::read_dir(sys.join("bus/pci/devices"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let groups = std::fs::read_dir(sys.join("kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    let Some(bdf) = first.filter(|_| groups == 0) else {
        let _ = writeln!(
            io::stderr(),
            "skipped: this host has IOMMU groups or no PCI devices; the fake-tree tests in sysfs cover the no-IOMMU error"
        );
        return;
    };
    let err = SysfsRoot::new(sys)
        .prepare(&bdf, BindOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, crate::vfio::sysfs::SysfsError::NoIommuGroup { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no IOMMU"), "{err}");
}
