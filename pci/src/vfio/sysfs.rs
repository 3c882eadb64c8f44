//! Host PCI devices for kernel VFIO passthrough, seen through sysfs: is the path a PCI device,
//! which IOMMU group is it in, is that group viable (every other member bound to vfio-pci or a
//! harmless driver), and — with `managed=on` — binding the device (and with `group=take` its
//! group mates) to vfio-pci and giving the host drivers back when the VM ends.
//!
//! Every access goes through one [`SysfsRoot`] (`/sys` on a host, a fake tree in tests).
//!
//! Binding follows the kernel's documented sequence (Documentation/ABI/testing/sysfs-bus-pci):
//! write `vfio-pci` to the device's `driver_override`, write the address to the old driver's
//! `unbind`, then to `/sys/bus/pci/drivers_probe`. Restoring clears `driver_override`, unbinds
//! from vfio-pci and writes the address to the original driver's `bind`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::{info, warn};
use thiserror::Error;

/// The driver passthrough devices must be bound to.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// Errors of the sysfs checks and of managed binding.
#[derive(Debug, Error)]
pub enum SysfsError {
    /// The path names no PCI device.
    #[error("{path}: not a PCI device ({reason}); give a PCI address like 0000:01:00.0 or /sys/bus/pci/devices/0000:01:00.0")]
    NotPciDevice {
        /// The path given.
        path: String,
        /// What is missing.
        reason: String,
    },
    /// The device has no `iommu_group`: the host has no IOMMU, or it is off.
    #[error("{bdf}: no IOMMU group (no iommu_group link): the host has no IOMMU or it is disabled; enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) — kernel VFIO needs it")]
    NoIommuGroup {
        /// The device.
        bdf: String,
    },
    /// Other members of the group are bound to host drivers.
    #[error("{bdf}: IOMMU group {group} is not viable: {}; bind them to vfio-pci yourself (echo vfio-pci > /sys/bus/pci/devices/<dev>/driver_override, then unbind and drivers_probe), or let skiff take the whole group with group=take,managed=on", describe_blockers(.blockers))]
    GroupNotViable {
        /// The device asked for.
        bdf: String,
        /// Its group.
        group: u32,
        /// The members that block it: (address, driver).
        blockers: Vec<(String, String)>,
    },
    /// The device itself is not bound to vfio-pci and managed mode is off.
    #[error("{bdf}: bound to {}, not vfio-pci; bind it to vfio-pci yourself or pass managed=on", .driver.as_deref().unwrap_or("no driver"))]
    NotBoundToVfio {
        /// The device.
        bdf: String,
        /// Its current driver.
        driver: Option<String>,
    },
    /// `group=take` was asked without `managed=on`.
    #[error("group=take needs managed=on: skiff only rebinds group members it can give back")]
    TakeWithoutManaged,
    /// The vfio-pci driver is not there.
    #[error("the vfio-pci driver is not loaded ({path} missing): modprobe vfio-pci")]
    VfioPciMissing {
        /// The driver directory looked for.
        path: PathBuf,
    },
    /// A sysfs read or write failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel accepted the writes but the device ended on another driver.
    #[error("{bdf}: expected driver {expected} after {step}, found {}", .found.as_deref().unwrap_or("no driver"))]
    WrongDriver {
        /// The device.
        bdf: String,
        /// The step done.
        step: &'static str,
        /// The driver expected.
        expected: String,
        /// The driver found.
        found: Option<String>,
    },
    /// Giving one or more devices back to their drivers failed.
    #[error("restoring host drivers failed for {count} device(s); first: {first}")]
    RestoreFailed {
        /// How many devices could not be restored.
        count: usize,
        /// The first failure.
        #[source]
        first: Box<SysfsError>,
    },
}

fn describe_blockers(blockers: &[(String, String)]) -> String {
    blockers
        .iter()
        .map(|(bdf, driver)| format!("{bdf} is bound to host driver {driver}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Test hook: called after each sysfs write with (path, value), it plays the kernel's part.
#[cfg(test)]
type WriteHook = std::sync::Arc<dyn Fn(&Path, &str) -> io::Result<()> + Send + Sync>;

/// The root all sysfs paths are taken from (`/sys` on a host).
#[derive(Clone)]
pub struct SysfsRoot {
    root: PathBuf,
    #[cfg(test)]
    hook: Option<WriteHook>,
}

impl std::fmt::Debug for SysfsRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SysfsRoot")
            .field("root", &self.root)
            .finish()
    }
}

/// A PCI device found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address (`0000:01:00.0`).
    pub bdf: String,
    /// Its directory under the sysfs root (`<root>/bus/pci/devices/<bdf>`).
    pub path: PathBuf,
}

/// What a group member is bound to, as far as group viability goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberDriver {
    /// vfio-pci.
    Vfio,
    /// pci-stub (held away from host drivers).
    Stub,
    /// pcieport (a bridge: never touched).
    Bridge,
    /// No driver.
    Unbound,
    /// A host driver: blocks the group.
    Host(String),
}

impl MemberDriver {
    fn from_driver(driver: Option<&str>) -> Self {
        match driver {
            None => MemberDriver::Unbound,
            Some(VFIO_PCI_DRIVER) => MemberDriver::Vfio,
            Some("pci-stub") => MemberDriver::Stub,
            Some("pcieport") => MemberDriver::Bridge,
            Some(other) => MemberDriver::Host(other.to_string()),
        }
    }
}

/// A member of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Its address.
    pub bdf: String,
    /// Its driver.
    pub driver: MemberDriver,
}

/// An IOMMU group (`/sys/kernel/iommu_groups/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuGroup {
    /// The group number (`/dev/vfio/N`).
    pub id: u32,
    /// Its members, sorted by address.
    pub members: Vec<GroupMember>,
}

/// How a device is made ready for kernel VFIO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// `managed=on`: bind the device to vfio-pci and restore its driver when the VM ends.
    pub managed: bool,
    /// `group=take`: also bind the group mates that have host drivers (needs `managed`).
    pub take_group: bool,
}

/// A device ready for kernel VFIO: bound to vfio-pci, its group viable.
#[derive(Debug)]
pub struct PreparedDevice {
    /// The device.
    pub device: PciDevice,
    /// Its IOMMU group as it was found (before any rebinding).
    pub group: IommuGroup,
    /// The devices skiff rebound, given back when this is dropped or restored; keep it until
    /// the device's VFIO files are closed.
    pub binding: ManagedBinding,
}

/// Whether `s` is a PCI address `DDDD:BB:DD.F` (hex).
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl SysfsRoot {
    /// A root at `root` (`/sys` on a host).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysfsRoot {
            root: root.into(),
            #[cfg(test)]
            hook: None,
        }
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    #[cfg(test)]
    fn with_hook(mut self, hook: WriteHook) -> Self {
        self.hook = Some(hook);
        self
    }

    fn pci_devices(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    fn pci_drivers(&self) -> PathBuf {
        self.root.join("bus/pci/drivers")
    }

    /// Finds the PCI device named by `spec`: a sysfs path (`/sys/bus/pci/devices/0000:01:00.0`,
    /// taken relative to this root) or a bare address (`0000:01:00.0`).
    pub fn device(&self, spec: &str) -> Result<PciDevice, SysfsError> {
        let not_pci = |reason: String| SysfsError::NotPciDevice {
            path: spec.to_string(),
            reason,
        };
        let given = if is_pci_address(spec) {
            self.pci_devices().join(spec)
        } else if let Ok(rel) = Path::new(spec).strip_prefix("/sys") {
            self.root.join(rel)
        } else if Path::new(spec).is_absolute() {
            PathBuf::from(spec)
        } else {
            return Err(not_pci(
                "neither a PCI address nor an absolute sysfs path".into(),
            ));
        };
        let bdf = given
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_pci_address(n))
            .ok_or_else(|| not_pci("its name is not a PCI address".into()))?
            .to_string();
        if !given.is_dir() {
            return Err(not_pci(format!("{} does not exist", given.display())));
        }
        for attr in ["vendor", "device"] {
            if !given.join(attr).is_file() {
                return Err(not_pci(format!("no `{attr}` attribute")));
            }
        }
        let path = self.pci_devices().join(&bdf);
        if !path.is_dir() {
            return Err(not_pci(format!(
                "not listed in {}",
                self.pci_devices().display()
            )));
        }
        if fs::symlink_metadata(path.join("iommu_group")).is_err() {
            return Err(SysfsError::NoIommuGroup { bdf });
        }
        Ok(PciDevice { bdf, path })
    }

    /// The driver `bdf` is bound to, if any.
    pub fn driver(&self, bdf: &str) -> Result<Option<String>, SysfsError> {
        let link = self.pci_devices().join(bdf).join("driver");
        match fs::read_link(&link) {
            Ok(target) => Ok(target
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Io {
                what: "reading the driver link",
                path: link,
                source,
            }),
        }
    }

    /// The IOMMU group of `device` and what each member is bound to.
    pub fn iommu_group(&self, device: &PciDevice) -> Result<IommuGroup, SysfsError> {
        let link = device.path.join("iommu_group");
        let target = fs::read_link(&link).map_err(|source| SysfsError::Io {
            what: "reading the iommu_group link",
            path: link.clone(),
            source,
        })?;
        let id = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| SysfsError::Io {
                what: "parsing the iommu_group link",
                path: link,
                source: io::Error::new(io::ErrorKind::InvalidData, target.display().to_string()),
            })?;
        let dir = self.root.join(format!("kernel/iommu_groups/{id}/devices"));
        let entries = fs::read_dir(&dir).map_err(|source| SysfsError::Io {
            what: "listing the group's devices",
            path: dir.clone(),
            source,
        })?;
        let mut members = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SysfsError::Io {
                what: "listing the group's devices",
                path: dir.clone(),
                source,
            })?;
            let Some(bdf) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let driver = MemberDriver::from_driver(self.driver(&bdf)?.as_deref());
            members.push(GroupMember { bdf, driver });
        }
        members.sort_by(|a, b| a.bdf.cmp(&b.bdf));
        Ok(IommuGroup { id, members })
    }

    /// Makes the device named by `spec` ready for kernel VFIO: checks it and its group, and
    /// with `managed` binds what must be bound. On any error, what was rebound is given back.
    pub fn prepare(&self, spec: &str, opts: BindOptions) -> Result<PreparedDevice, SysfsError> {
        if opts.take_group && !opts.managed {
            return Err(SysfsError::TakeWithoutManaged);
        }
        let device = self.device(spec)?;
        let group = self.iommu_group(&device)?;
        let blockers: Vec<(String, String)> = group
            .members
            .iter()
            .filter(|m| m.bdf != device.bdf)
            .filter_map(|m| match &m.driver {
                MemberDriver::Host(d) => Some((m.bdf.clone(), d.clone())),
                _ => None,
            })
            .collect();
        if !blockers.is_empty() && !opts.take_group {
            return Err(SysfsError::GroupNotViable {
                bdf: device.bdf.clone(),
                group: group.id,
                blockers,
            });
        }
        let current = self.driver(&device.bdf)?;
        let mut binding = ManagedBinding {
            root: self.clone(),
            rebound: Vec::new(),
        };
        if current.as_deref() != Some(VFIO_PCI_DRIVER) {
            if !opts.managed {
                return Err(SysfsError::NotBoundToVfio {
                    bdf: device.bdf,
                    driver: current,
                });
            }
            binding.bind_to_vfio(&device.bdf, current)?;
        }
        for (bdf, driver) in blockers {
            // On error `binding` is dropped here and gives back what it already took.
            binding.bind_to_vfio(&bdf, Some(driver))?;
        }
        Ok(PreparedDevice {
            device,
            group,
            binding,
        })
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), SysfsError> {
        let io_err = |source| SysfsError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source,
        };
        // sysfs attributes exist already: never create a file (a missing driver is an error).
        let mut file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
        file.write_all(value.as_bytes()).map_err(io_err)?;
        #[cfg(test)]
        if let Some(hook) = &self.hook {
            hook(path, value).map_err(io_err)?;
        }
        Ok(())
    }
}

/// One device skiff moved to vfio-pci, and the driver to give it back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebound {
    /// The device.
    pub bdf: String,
    /// Its driver before (`None`: it had none and is left unbound).
    pub original: Option<String>,
}

/// The devices skiff bound to vfio-pci; dropping it (or [`ManagedBinding::restore`]) gives
/// them back to their drivers, last bound first.
#[derive(Debug)]
pub struct ManagedBinding {
    root: SysfsRoot,
    rebound: Vec<Rebound>,
}

impl ManagedBinding {
    /// The devices rebound so far, in binding order.
    pub fn rebound(&self) -> &[Rebound] {
        &self.rebound
    }

    fn bind_to_vfio(&mut self, bdf: &str, original: Option<String>) -> Result<(), SysfsError> {
        let root = &self.root;
        let vfio_dir = root.pci_drivers().join(VFIO_PCI_DRIVER);
        if !vfio_dir.is_dir() {
            return Err(SysfsError::VfioPciMissing { path: vfio_dir });
        }
        let dev = root.pci_devices().join(bdf);
        info!(
            "binding {bdf} to vfio-pci (was {})",
            original.as_deref().unwrap_or("unbound")
        );
        root.write(&dev.join("driver_override"), VFIO_PCI_DRIVER)?;
        // From here on the device is ours to give back, whatever fails next.
        self.rebound.push(Rebound {
            bdf: bdf.to_string(),
            original: original.clone(),
        });
        if let Some(old) = &original {
            root.write(&root.pci_drivers().join(old).join("unbind"), bdf)?;
        }
        root.write(&root.root.join("bus/pci/drivers_probe"), bdf)?;
        let found = root.driver(bdf)?;
        if found.as_deref() != Some(VFIO_PCI_DRIVER) {
            return Err(SysfsError::WrongDriver {
                bdf: bdf.to_string(),
                step: "drivers_probe",
                expected: VFIO_PCI_DRIVER.to_string(),
                found,
            });
        }
        Ok(())
    }

    fn restore_one(root: &SysfsRoot, r: &Rebound) -> Result<(), SysfsError> {
        let dev = root.pci_devices().join(&r.bdf);
        root.write(&dev.join("driver_override"), "\n")?;
        if root.driver(&r.bdf)?.as_deref() == Some(VFIO_PCI_DRIVER) {
            root.write(
                &root.pci_drivers().join(VFIO_PCI_DRIVER).join("unbind"),
                &r.bdf,
            )?;
        }
        if let Some(orig) = &r.original {
            if root.driver(&r.bdf)?.as_deref() != Some(orig.as_str()) {
                root.write(&root.pci_drivers().join(orig).join("bind"), &r.bdf)?;
            }
            let found = root.driver(&r.bdf)?;
            if found.as_deref() != Some(orig.as_str()) {
                return Err(SysfsError::WrongDriver {
                    bdf: r.bdf.clone(),
                    step: "bind",
                    expected: orig.clone(),
                    found,
                });
            }
        }
        info!(
            "gave {} back to {}",
            r.bdf,
            r.original.as_deref().unwrap_or("no driver")
        );
        Ok(())
    }

    fn restore_all(&mut self) -> Result<(), SysfsError> {
        let mut failures = Vec::new();
        while let Some(r) = self.rebound.pop() {
            if let Err(e) = Self::restore_one(&self.root, &r) {
                warn!("{}: could not restore its host driver: {e}", r.bdf);
                failures.push(e);
            }
        }
        let count = failures.len();
        match failures.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(SysfsError::RestoreFailed {
                count,
                first: Box::new(first),
            }),
        }
    }

    /// Gives up restoring (logged with each device): for when a device is still in use and
    /// unbinding it from vfio-pci would block until its VFIO files are closed.
    pub fn forget(&mut self) -> Vec<Rebound> {
        for r in &self.rebound {
            warn!(
                "{}: left on vfio-pci (was {}); give it back by hand",
                r.bdf,
                r.original.as_deref().unwrap_or("unbound")
            );
        }
        std::mem::take(&mut self.rebound)
    }

    /// Gives every rebound device back to its original driver now, reporting failures.
    pub fn restore(mut self) -> Result<(), SysfsError> {
        self.restore_all()
    }
}

impl Drop for ManagedBinding {
    fn drop(&mut self) {
        if let Err(e) = self.restore_all() {
            warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::tempdir::TempDir;

    /// A fake sysfs tree with a kernel that reacts to driver_override/unbind/bind/drivers_probe.
    struct Fake {
        dir: TempDir,
        writes: Arc<Mutex<Vec<(String, String)>>>,
        fail_on: Arc<Mutex<Option<String>>>,
    }

    impl Fake {
        fn new(drivers: &[&str]) -> Self {
            let dir = TempDir::new_with_prefix("/tmp/skiff-sysfs").unwrap();
            let root = dir.as_path();
            fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
            for d in drivers {
                let p = root.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&p).unwrap();
                fs::write(p.join("bind"), "").unwrap();
                fs::write(p.join("unbind"), "").unwrap();
            }
            Fake {
                dir,
                writes: Arc::new(Mutex::new(Vec::new())),
                fail_on: Arc::new(Mutex::new(None)),
            }
        }

        fn root_path(&self) -> &Path {
            self.dir.as_path()
        }

        fn add_device(&self, bdf: &str, group: Option<u32>, driver: Option<&str>) {
            let root = self.root_path();
            let dev = root.join("bus/pci/devices").join(bdf);
            fs::create_dir_all(&dev).unwrap();
            fs::write(dev.join("vendor"), "0x8086\n").unwrap();
            fs::write(dev.join("device"), "0x1234\n").unwrap();
            fs::write(dev.join("driver_override"), "(null)\n").unwrap();
            if let Some(g) = group {
                let gdir = root.join(format!("kernel/iommu_groups/{g}/devices"));
                fs::create_dir_all(&gdir).unwrap();
                symlink(
                    root.join(format!("kernel/iommu_groups/{g}")),
                    dev.join("iommu_group"),
                )
                .unwrap();
                symlink(&dev, gdir.join(bdf)).unwrap();
            }
            if let Some(d) = driver {
                set_driver(root, bdf, Some(d));
            }
        }

        fn sysfs(&self) -> SysfsRoot {
            let root = self.root_path().to_path_buf();
            let writes = self.writes.clone();
            let fail_on = self.fail_on.clone();
            SysfsRoot::new(root.clone()).with_hook(Arc::new(move |path, value| {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                if fail_on.lock().unwrap().as_deref() == Some(format!("{rel}={value}").as_str()) {
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                }
                writes
                    .lock()
                    .unwrap()
                    .push((rel.clone(), value.to_string()));
                fake_kernel(&root, &rel, value);
                Ok(())
            }))
        }

        fn driver(&self, bdf: &str) -> Option<String> {
            SysfsRoot::new(self.root_path()).driver(bdf).unwrap()
        }

        fn writes(&self) -> Vec<(String, String)> {
            self.writes.lock().unwrap().clone()
        }
    }

    fn set_driver(root: &Path, bdf: &str, driver: Option<&str>) {
        let link = root.join("bus/pci/devices").join(bdf).join("driver");
        let _ = fs::remove_file(&link);
        if let Some(d) = driver {
            symlink(root.join("bus/pci/drivers").join(d), link).unwrap();
        }
    }

    /// What the kernel does on each write, reduced to the driver link.
    fn fake_kernel(root: &Path, rel: &str, value: &str) {
        let parts: Vec<&str> = rel.split('/').collect();
        let dev = |bdf: &str| root.join("bus/pci/devices").join(bdf);
        match parts.as_slice() {
            ["bus", "pci", "drivers", d, "unbind"] => {
                let cur = SysfsRoot::new(root).driver(value).unwrap();
                assert_eq!(cur.as_deref(), Some(*d), "unbind from a driver not bound");
                set_driver(root, value, None);
            }
            ["bus", "pci", "drivers", d, "bind"] => {
                assert!(SysfsRoot::new(root).driver(value).unwrap().is_none());
                set_driver(root, value, Some(d));
            }
            ["bus", "pci", "drivers_probe"] => {
                let ov = fs::read_to_string(dev(value).join("driver_override")).unwrap();
                let ov = ov.trim();
                if !ov.is_empty()
                    && ov != "(null)"
                    && root.join("bus/pci/drivers").join(ov).is_dir()
                {
                    set_driver(root, value, Some(ov));
                }
            }
            _ => {}
        }
    }

    const DEV: &str = "0000:01:00.0";
    const MATE: &str = "0000:01:00.1";
    const BRIDGE: &str = "0000:00:01.0";
    const STUB: &str = "0000:01:00.2";
    const MANAGED: BindOptions = BindOptions {
        managed: true,
        take_group: false,
    };
    const TAKE: BindOptions = BindOptions {
        managed: true,
        take_group: true,
    };

    /// One device on nvme, alone in group 1.
    fn nvme_device() -> Fake {
        let f = Fake::new(&["vfio-pci", "nvme"]);
        f.add_device(DEV, Some(1), Some("nvme"));
        f
    }

    #[test]
    fn pci_address_syntax() {
        assert!(is_pci_address("0000:01:00.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("01:00.0"));
        assert!(!is_pci_address("0000:01:00:0"));
        assert!(!is_pci_address("eth0"));
    }

    #[test]
    fn single_device_group_bound_to_vfio_is_accepted_by_path_and_address() {
        let f = Fake::new(&["vfio-pci"]);
        f.add_device(DEV, Some(7), Some("vfio-pci"));
        let s = f.sysfs();
        for spec in [DEV.to_string(), format!("/sys/bus/pci/devices/{DEV}")] {
            let p = s.prepare(&spec, BindOptions::default()).unwrap();
            assert_eq!(p.device.bdf, DEV);
            assert_eq!(p.group.id, 7);
            assert_eq!(p.group.members.len(), 1);
            assert!(p.binding.rebound().is_empty());
        }
        assert!(f.writes().is_empty(), "nothing to bind, nothing written");
    }

    #[test]
    fn group_mate_on_host_driver_is_refused_and_named() {
        let f = Fake::new(&["vfio-pci", "e1000e"]);
        f.add_device(DEV, Some(3), Some("vfio-pci"));
        f.add_device(MATE, Some(3), Some("e1000e"));
        let err = f.sysfs().prepare(DEV, BindOptions::default()).unwrap_err();
        match &err {
            SysfsError::GroupNotViable {
                group, blockers, ..
            } => {
                assert_eq!(*group, 3);
                assert_eq!(blockers, &vec![(MATE.to_string(), "e1000e".to_string())]);
            }
            e => panic!("unexpected {e:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("0000:01:00.1 is bound to host driver e1000e"),
            "{msg}"
        );
        assert!(msg.contains("group=take,managed=on"), "{msg}");
        assert!(msg.contains("vfio-pci yourself"), "{msg}");
        // managed alone does not take the group either.
        assert!(matches!(
            f.sysfs().prepare(DEV, MANAGED),
            Err(SysfsError::GroupNotViable { .. })
        ));
        assert!(f.writes().is_empty());
    }

    #[test]
    fn bridge_stub_and_unbound_members_are_harmless() {
        let f = Fake::new(&["vfio-pci", "pcieport", "pci-stub"]);
        f.add_device(DEV, Some(1), Some("vfio-pci"));
        f.add_device(BRIDGE, Some(1), Some("pcieport"));
        f.add_device(STUB, Some(1), Some("pci-stub"));
        f.add_device("0000:01:00.3", Some(1), None);
        let p = f.sysfs().prepare(DEV, BindOptions::default()).unwrap();
        assert_eq!(p.group.members.len(), 4);
        assert_eq!(p.group.members[0].driver, MemberDriver::Bridge);
        assert!(f.writes().is_empty());
    }

    #[test]
    fn take_without_managed_is_refused() {
        let f = Fake::new(&["vfio-pci"]);
        f.add_device(DEV, Some(1), Some("vfio-pci"));
        let opts = BindOptions {
            managed: false,
            take_group: true,
        };
        assert!(matches!(
            f.sysfs().prepare(DEV, opts),
            Err(SysfsError::TakeWithoutManaged)
        ));
    }

    #[test]
    fn not_bound_without_managed_is_refused() {
        let f = nvme_device();
        let err = f.sysfs().prepare(DEV, BindOptions::default()).unwrap_err();
        assert!(err.to_string().contains("bound to nvme"), "{err}");
        assert!(err.to_string().contains("managed=on"), "{err}");
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"));
    }

    #[test]
    fn managed_binds_and_restore_gives_back() {
        let f = nvme_device();
        let p = f.sysfs().prepare(DEV, MANAGED).unwrap();
        assert_eq!(f.driver(DEV).as_deref(), Some("vfio-pci"));
        assert_eq!(
            p.binding.rebound(),
            &[Rebound {
                bdf: DEV.into(),
                original: Some("nvme".into())
            }]
        );
        let dev = format!("bus/pci/devices/{DEV}");
        assert_eq!(
            f.writes(),
            vec![
                (format!("{dev}/driver_override"), "vfio-pci".into()),
                ("bus/pci/drivers/nvme/unbind".into(), DEV.into()),
                ("bus/pci/drivers_probe".into(), DEV.into()),
            ]
        );
        p.binding.restore().unwrap();
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"));
        let w = f.writes();
        assert_eq!(
            &w[3..],
            &[
                (format!("{dev}/driver_override"), "\n".into()),
                ("bus/pci/drivers/vfio-pci/unbind".into(), DEV.into()),
                ("bus/pci/drivers/nvme/bind".into(), DEV.into()),
            ]
        );
    }

    #[test]
    fn dropping_the_guard_restores_after_a_later_failure() {
        let f = nvme_device();
        let open_vfio = |p: &PreparedDevice| -> Result<(), String> {
            assert_eq!(p.device.bdf, DEV);
            Err("VFIO_GROUP_GET_DEVICE_FD failed".into())
        };
        let result = f
            .sysfs()
            .prepare(DEV, MANAGED)
            .map_err(|e| e.to_string())
            .and_then(|p| open_vfio(&p));
        assert!(result.is_err());
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"), "drop gave it back");
    }

    #[test]
    fn take_group_binds_mates_spares_bridges_and_restores() {
        let f = Fake::new(&["vfio-pci", "nvme", "snd_hda_intel", "pcieport", "pci-stub"]);
        f.add_device(DEV, Some(4), Some("nvme"));
        f.add_device(MATE, Some(4), Some("snd_hda_intel"));
        f.add_device(BRIDGE, Some(4), Some("pcieport"));
        f.add_device(STUB, Some(4), Some("pci-stub"));
        let p = f.sysfs().prepare(DEV, TAKE).unwrap();
        assert_eq!(f.driver(DEV).as_deref(), Some("vfio-pci"));
        assert_eq!(f.driver(MATE).as_deref(), Some("vfio-pci"));
        assert_eq!(f.driver(BRIDGE).as_deref(), Some("pcieport"));
        assert_eq!(f.driver(STUB).as_deref(), Some("pci-stub"));
        assert!(f
            .writes()
            .iter()
            .all(|(p, v)| !p.contains(BRIDGE) && v != BRIDGE));
        drop(p);
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"));
        assert_eq!(f.driver(MATE).as_deref(), Some("snd_hda_intel"));
        assert_eq!(f.driver(BRIDGE).as_deref(), Some("pcieport"));
    }

    #[test]
    fn take_group_failing_midway_gives_back_what_it_took() {
        let f = Fake::new(&["vfio-pci", "nvme", "snd_hda_intel"]);
        f.add_device(DEV, Some(4), Some("nvme"));
        f.add_device(MATE, Some(4), Some("snd_hda_intel"));
        *f.fail_on.lock().unwrap() = Some(format!("bus/pci/drivers_probe={MATE}"));
        let err = f.sysfs().prepare(DEV, TAKE).unwrap_err();
        assert!(matches!(err, SysfsError::Io { .. }), "{err:?}");
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"));
        // The mate was unbound before the probe failed: it goes back to its driver.
        assert_eq!(f.driver(MATE).as_deref(), Some("snd_hda_intel"));
    }

    #[test]
    fn restore_reports_failures() {
        let f = nvme_device();
        let p = f.sysfs().prepare(DEV, MANAGED).unwrap();
        *f.fail_on.lock().unwrap() = Some(format!("bus/pci/drivers/nvme/bind={DEV}"));
        let err = p.binding.restore().unwrap_err();
        assert!(
            matches!(&err, SysfsError::RestoreFailed { count: 1, .. }),
            "{err:?}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn forget_leaves_the_device_on_vfio_pci() {
        let f = nvme_device();
        let mut p = f.sysfs().prepare(DEV, MANAGED).unwrap();
        let forgotten = p.binding.forget();
        assert_eq!(forgotten.len(), 1);
        assert_eq!(forgotten[0].original.as_deref(), Some("nvme"));
        drop(p);
        assert_eq!(f.driver(DEV).as_deref(), Some("vfio-pci"));
    }

    #[test]
    fn vfio_pci_not_loaded_is_named() {
        let f = Fake::new(&["nvme"]);
        f.add_device(DEV, Some(1), Some("nvme"));
        let err = f.sysfs().prepare(DEV, MANAGED).unwrap_err();
        assert!(err.to_string().contains("modprobe vfio-pci"), "{err}");
        assert_eq!(f.driver(DEV).as_deref(), Some("nvme"));
    }

    #[test]
    fn a_path_that_is_not_a_pci_device_is_refused() {
        let f = Fake::new(&["vfio-pci"]);
        let s = f.sysfs();
        let net = f.root_path().join("class/net/eth0");
        fs::create_dir_all(&net).unwrap();
        for spec in ["/sys/class/net/eth0", "eth0", "0000:09:00.0"] {
            let err = s.device(spec).unwrap_err();
            assert!(
                matches!(err, SysfsError::NotPciDevice { .. }),
                "{spec}: {err:?}"
            );
            assert!(err.to_string().contains("not a PCI device"), "{err}");
        }
        // A directory with a PCI-like name but no vendor/device attributes.
        fs::create_dir_all(f.root_path().join("bus/pci/devices").join(DEV)).unwrap();
        let err = s.device(DEV).unwrap_err();
        assert!(err.to_string().contains("no `vendor` attribute"), "{err}");
    }

    #[test]
    fn no_iommu_group_says_the_host_has_no_iommu() {
        let f = Fake::new(&["vfio-pci"]);
        f.add_device(DEV, None, Some("vfio-pci"));
        let err = f.sysfs().prepare(DEV, BindOptions::default()).unwrap_err();
        assert!(matches!(err, SysfsError::NoIommuGroup { .. }));
        let msg = err.to_string();
        assert!(msg.contains("no IOMMU group"), "{msg}");
        assert!(msg.contains("intel_iommu=on"), "{msg}");
    }
}
