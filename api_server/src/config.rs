//! The VM configuration and the parsing of Cloud Hypervisor-style option strings (`boot=2`,
//! `size=512M`, `file=/path`). The CLI and the API's `vm.create` body share this model.
//!
//! JSON model (the `vm.create` body, also what `vm.info` reports): every top-level part may be
//! omitted and takes the CLI's default (1 vCPU, 512 MiB, serial on stdout, no devices, the
//! built-in demo guest); unknown fields are rejected. Enumerations with a payload are externally
//! tagged: `"serial": "off" | "stdout" | {"file": "/path"}`, `"tap": {"name": "tap0"} | {"fd": 3}`.
//! MAC addresses are strings (`"52:54:00:12:34:56"`). The OpenAPI spec
//! (`api_server/openapi/skiff.yaml`) documents the same model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::pci_address::PciAddress;

/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest RAM size.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Smallest guest RAM skiff accepts.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;
/// Most vCPUs skiff supports (xAPIC IDs in the MADT are 8 bits; 255 is the broadcast ID).
pub const MAX_VCPUS: u32 = 254;
/// Command line given to the built-in demo guest.
pub const DEMO_CMDLINE: &str = "scenario=demo";
/// Command line given to a user kernel when `--cmdline` is absent.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0";

/// Errors in a VM configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option string could not be parsed.
    #[error("--{option}: {reason}")]
    Parse {
        /// The option (e.g. `cpus`).
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A value is out of range or the combination is impossible.
    #[error("{0}")]
    Invalid(String),
}

/// vCPU configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpusConfig {
    /// Number of vCPUs started at boot.
    pub boot_vcpus: u32,
}

/// Guest RAM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// RAM size in bytes.
    pub size: u64,
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PayloadConfig {
    /// Kernel image (ELF vmlinux or bzImage); `None` boots the built-in demo guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initramfs image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; `None` uses the default for the kernel kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Where the 16550 serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// No serial port.
    Off,
    /// The skiff process's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

/// Id of the virtio-iommu device skiff adds when any device has `iommu=on`.
pub const IOMMU_DEVICE_ID: &str = "iommu0";
/// PCI slot of the virtio-iommu (the first after the host bridge).
pub const IOMMU_PCI_SLOT: u8 = 1;

/// The whole VM configuration. Every part may be omitted from JSON and takes its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: CpusConfig,
    /// RAM.
    pub memory: MemoryConfig,
    /// Kernel, initramfs and command line.
    pub payload: PayloadConfig,
    /// Serial port output.
    pub serial: SerialConfig,
    /// CPU template (JSON file of CPUID masks) applied on top of KVM's supported CPUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<PathBuf>,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices.
    pub nets: Vec<NetConfig>,
    /// virtio-console.
    pub console: ConsoleConfig,
    /// Put the virtio-console behind the virtual IOMMU.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub console_iommu: bool,
    /// Where the virtio-console sits on the PCI bus (filled in by the VM, like a device's
    /// `pci_address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_pci_address: Option<PciAddress>,
    /// virtio-rng, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// Devices emulated by vfio-user servers, passed through.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_devices: Vec<UserDeviceConfig>,
    /// Host PCI devices passed through with kernel VFIO (`devices` in JSON, as in Cloud
    /// Hypervisor).
    #[serde(rename = "devices", skip_serializing_if = "Vec::is_empty")]
    pub host_devices: Vec<HostDeviceConfig>,
}

/// A virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Device id (default `diskN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Serial number reported by GET_ID (default: the id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Put the device behind the virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Where the device sits on the PCI bus (`"0000:00:05.0"`); filled in by the VM when it
    /// places the device, so a restored or migrated VM puts it back at the same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<PciAddress>,
}

/// Where a virtio-net device's TAP comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TapConfig {
    /// A TAP interface by name (created when absent).
    Name(String),
    /// An already open TAP file descriptor inherited from the parent.
    Fd(i32),
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP backend.
    pub tap: TapConfig,
    /// MAC address (`aa:bb:cc:dd:ee:ff`, a string in JSON); random locally administered when
    /// absent.
    #[serde(default, with = "mac_string", skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
    /// Device id (default `netN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Put the device behind the virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Where the device sits on the PCI bus (`"0000:00:05.0"`); filled in by the VM when it
    /// places the device, so a restored or migrated VM puts it back at the same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<PciAddress>,
}

/// Where the virtio-console's output goes (and input comes from).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// No virtio-console device (the default).
    #[default]
    Off,
    /// skiff's stdout (and stdin, when it is a terminal).
    Stdout,
    /// A file (created or truncated); no input.
    File(PathBuf),
    /// A new pseudo-terminal; its path is logged.
    Pty,
}

impl ConsoleConfig {
    /// The default: no console device.
    pub fn off() -> Self {
        Self::Off
    }
}

/// A virtio-rng device fed from the host's getrandom.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RngConfig {
    /// Device id (default `rng0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Put the device behind the virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Where the device sits on the PCI bus (`"0000:00:05.0"`); filled in by the VM when it
    /// places the device, so a restored or migrated VM puts it back at the same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<PciAddress>,
}

/// A PCI device emulated by a vfio-user server process, passed through to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    /// The server's Unix socket.
    pub socket: PathBuf,
    /// Device id (default `userdevN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Put the device behind the virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Peer-to-peer DMA with other passthrough devices (`p2p=off`: a DMA space with guest RAM
    /// only; peers cannot reach it either).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub p2p: bool,
    /// Use the device's PRE_COPY during live migration (`pre_copy=off`: its state is read
    /// only after it stops, in STOP_COPY — for a device whose pre-copy stream misbehaves).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub pre_copy: bool,
    /// Where the device sits on the PCI bus (filled in by the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<PciAddress>,
}

/// How a host PCI device's IOMMU group is treated when some members are not bound to vfio-pci.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// Refuse, naming the devices in the way (the default).
    #[default]
    Own,
    /// With `managed=on`: bind every member not already safe to vfio-pci too (restored on exit).
    Take,
}

/// Which kernel VFIO interface a host device is opened through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VfioKernelBackend {
    /// The legacy container/group interface (`/dev/vfio/vfio` + `/dev/vfio/N`).
    #[default]
    Group,
    /// iommufd (`/dev/iommu` + `/dev/vfio/devices/vfioN`).
    Iommufd,
}

/// A host PCI device passed through with kernel VFIO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDeviceConfig {
    /// The device in sysfs (`/sys/bus/pci/devices/0000:01:00.0`) or its address.
    pub path: PathBuf,
    /// Device id (default `hostdevN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Put the device behind the virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Peer-to-peer DMA with other passthrough devices (see [`UserDeviceConfig::p2p`]).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub p2p: bool,
    /// Use the device's PRE_COPY during live migration (see [`UserDeviceConfig::pre_copy`]).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub pre_copy: bool,
    /// skiff binds the device to vfio-pci itself and gives it back to its driver on exit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub managed: bool,
    /// What to do with group members that are not bound to vfio-pci.
    #[serde(default, skip_serializing_if = "is_default")]
    pub group: GroupPolicy,
    /// Kernel interface.
    #[serde(default, skip_serializing_if = "is_default")]
    pub backend: VfioKernelBackend,
    /// Where the device sits on the PCI bus (filled in by the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<PciAddress>,
}

fn yes() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: DEFAULT_VCPUS,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY_SIZE,
        }
    }
}

/// `Option<[u8; 6]>` as an optional `"aa:bb:cc:dd:ee:ff"` string.
mod mac_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &Option<[u8; 6]>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            None => s.serialize_none(),
            Some(m) => s.serialize_str(&super::format_mac(m)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_mac("net", &s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: PayloadConfig::default(),
            serial: SerialConfig::Stdout,
            cpu_template: None,
            disks: Vec::new(),
            nets: Vec::new(),
            console: ConsoleConfig::Off,
            console_iommu: false,
            console_pci_address: None,
            rng: None,
            user_devices: Vec::new(),
            host_devices: Vec::new(),
        }
    }
}

impl VmConfig {
    /// The command line the guest gets.
    pub fn effective_cmdline(&self) -> &str {
        match (&self.payload.cmdline, &self.payload.kernel) {
            (Some(c), _) => c,
            (None, None) => DEMO_CMDLINE,
            (None, Some(_)) => DEFAULT_KERNEL_CMDLINE,
        }
    }

    /// Checks that do not need KVM or the host: counts and sizes in range, files present.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.cpus.boot_vcpus;
        if n == 0 {
            return Err(ConfigError::Invalid(
                "--cpus: boot=0: a VM needs at least one vCPU".into(),
            ));
        }
        if n > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "--cpus: boot={n}: skiff supports at most {MAX_VCPUS} vCPUs"
            )));
        }
        if self.memory.size < MIN_MEMORY_SIZE {
            return Err(ConfigError::Invalid(format!(
                "--memory: size={}: a VM needs at least {} MiB",
                self.memory.size,
                MIN_MEMORY_SIZE >> 20
            )));
        }
        if self.payload.initramfs.is_some() && self.payload.kernel.is_none() {
            return Err(ConfigError::Invalid(
                "--initramfs needs --kernel (the built-in demo guest takes no initramfs)".into(),
            ));
        }
        for d in &self.disks {
            check_readable_file("--disk path=", &d.path)?;
        }
        if self.has_iommu() && self.device_ids().iter().any(|id| id == IOMMU_DEVICE_ID) {
            return Err(ConfigError::Invalid(format!(
                "device id {IOMMU_DEVICE_ID} is taken by the virtio-iommu added for iommu=on devices"
            )));
        }
        if self.console_iommu && self.console == ConsoleConfig::Off {
            return Err(ConfigError::Invalid(
                "console_iommu needs a console device (console is off)".into(),
            ));
        }
        if self.serial == SerialConfig::Stdout && self.console == ConsoleConfig::Stdout {
            return Err(ConfigError::Invalid(
                "--serial stdout and --console stdout cannot both use stdout; send one to a file or turn it off"
                    .into(),
            ));
        }
        self.validate_pci_addresses()?;
        self.validate_passthrough()?;
        let mut seen = std::collections::BTreeSet::new();
        for id in self.device_ids() {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::Invalid(format!(
                    "device id {id:?}: use letters, digits, '-' and '_'"
                )));
            }
            if !seen.insert(id.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "device id {id:?} is used twice"
                )));
            }
        }
        for (what, path) in [
            ("--kernel", &self.payload.kernel),
            ("--initramfs", &self.payload.initramfs),
            ("--cpu-template", &self.cpu_template),
        ] {
            if let Some(p) = path {
                check_readable_file(what, p)?;
            }
        }
        Ok(())
    }
}

/// The kinds of configurable device; each has one field in [`VmConfig`] and one builder in
/// the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `disks[index]`: virtio-blk.
    Disk,
    /// `nets[index]`: virtio-net.
    Net,
    /// `console`: virtio-console.
    Console,
    /// `rng`: virtio-rng.
    Rng,
    /// `user_devices[index]`: a vfio-user device.
    UserDevice,
    /// `devices[index]`: a host device through kernel VFIO.
    HostDevice,
}

/// One configured device as the VMM builds it: kind, index in its field, id (defaults filled
/// in), whether it sits behind the virtual IOMMU, and its recorded PCI address if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredDevice {
    /// Which configuration field it comes from.
    pub kind: DeviceKind,
    /// Its index in that field (0 for the single-device fields).
    pub index: usize,
    /// Stable id.
    pub id: String,
    /// Behind the virtual IOMMU.
    pub iommu: bool,
    /// Recorded PCI address.
    pub pci_address: Option<PciAddress>,
}

impl VmConfig {
    /// Whether any device sits behind the virtual IOMMU (skiff then adds a virtio-iommu).
    pub fn has_iommu(&self) -> bool {
        self.devices().iter().any(|d| d.iommu)
    }

    /// The id of every configurable device, defaults filled in, in creation order (the
    /// virtio-iommu not included).
    pub fn device_ids(&self) -> Vec<String> {
        self.devices().into_iter().map(|d| d.id).collect()
    }

    /// Every configurable device in creation order — disks, nets, console, rng — with its id
    /// (defaults filled in). The one place that list is written down: adding a device type is
    /// a field in [`VmConfig`], a line here and a builder in the VMM.
    pub fn devices(&self) -> Vec<ConfiguredDevice> {
        let mut out = Vec::new();
        let mut push = |kind, index, id: String, iommu, pci_address| {
            out.push(ConfiguredDevice {
                kind,
                index,
                id,
                iommu,
                pci_address,
            })
        };
        for (i, d) in self.disks.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
            push(DeviceKind::Disk, i, id, d.iommu, d.pci_address);
        }
        for (i, n) in self.nets.iter().enumerate() {
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            push(DeviceKind::Net, i, id, n.iommu, n.pci_address);
        }
        if self.console != ConsoleConfig::Off {
            let id = "console0".to_string();
            push(
                DeviceKind::Console,
                0,
                id,
                self.console_iommu,
                self.console_pci_address,
            );
        }
        if let Some(r) = &self.rng {
            let id = r.id.clone().unwrap_or_else(|| "rng0".into());
            push(DeviceKind::Rng, 0, id, r.iommu, r.pci_address);
        }
        for (i, u) in self.user_devices.iter().enumerate() {
            let id = u.id.clone().unwrap_or_else(|| format!("userdev{i}"));
            push(DeviceKind::UserDevice, i, id, u.iommu, u.pci_address);
        }
        for (i, h) in self.host_devices.iter().enumerate() {
            let id = h.id.clone().unwrap_or_else(|| format!("hostdev{i}"));
            push(DeviceKind::HostDevice, i, id, h.iommu, h.pci_address);
        }
        out
    }

    /// Record where device `kind`/`index` was placed on the PCI bus.
    pub fn set_pci_address(&mut self, kind: DeviceKind, index: usize, addr: PciAddress) {
        let slot = match kind {
            DeviceKind::Disk => self.disks.get_mut(index).map(|d| &mut d.pci_address),
            DeviceKind::Net => self.nets.get_mut(index).map(|n| &mut n.pci_address),
            DeviceKind::Console => Some(&mut self.console_pci_address),
            DeviceKind::Rng => self.rng.as_mut().map(|r| &mut r.pci_address),
            DeviceKind::UserDevice => self.user_devices.get_mut(index).map(|u| &mut u.pci_address),
            DeviceKind::HostDevice => self.host_devices.get_mut(index).map(|h| &mut h.pci_address),
        };
        if let Some(slot) = slot {
            *slot = Some(addr);
        }
    }

    /// Checks on passthrough devices: each socket and host device used once, `group=take` only
    /// with `managed=on`.
    fn validate_passthrough(&self) -> Result<(), ConfigError> {
        let mut sockets = std::collections::BTreeSet::new();
        for u in &self.user_devices {
            if u.socket.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(
                    "--user-device: socket= is empty".into(),
                ));
            }
            if !sockets.insert(&u.socket) {
                return Err(ConfigError::Invalid(format!(
                    "--user-device: socket {} is given twice (one server serves one device)",
                    u.socket.display()
                )));
            }
        }
        let mut paths = std::collections::BTreeSet::new();
        for h in &self.host_devices {
            let name = h
                .path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "--device path={}: not a PCI device path",
                    h.path.display()
                )));
            }
            if !paths.insert(name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "--device: {name} is given twice"
                )));
            }
            if h.group == GroupPolicy::Take && !h.managed {
                return Err(ConfigError::Invalid(format!(
                    "--device {name}: group=take needs managed=on (skiff can only take over the group's devices when it binds them itself)"
                )));
            }
        }
        Ok(())
    }

    /// Checks on the recorded PCI addresses: each used once, and not the virtio-iommu's.
    fn validate_pci_addresses(&self) -> Result<(), ConfigError> {
        let mut seen: BTreeMap<PciAddress, String> = BTreeMap::new();
        let iommu = self.has_iommu();
        for d in self.devices() {
            let Some(addr) = d.pci_address else { continue };
            if iommu && addr.slot() == IOMMU_PCI_SLOT {
                return Err(ConfigError::Invalid(format!(
                    "device {}: PCI address {addr} is taken by the virtio-iommu added for iommu=on devices",
                    d.id
                )));
            }
            if let Some(other) = seen.insert(addr, d.id.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "devices {other} and {} are both at PCI address {addr}",
                    d.id
                )));
            }
        }
        Ok(())
    }
}

fn check_readable_file(what: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Err(e) => Err(ConfigError::Invalid(format!("{what} {}: {e}", p.display()))),
        Ok(m) if !m.is_file() => Err(ConfigError::Invalid(format!(
            "{what} {}: not a regular file",
            p.display()
        ))),
        Ok(_) => std::fs::File::open(p)
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid(format!("{what} {}: {e}", p.display()))),
    }
}

/// Split `key=value,key=value` into a map, rejecting unknown and repeated keys.
pub fn parse_options(
    option: &'static str,
    s: &str,
    known: &[&str],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let err = |reason: String| ConfigError::Parse { option, reason };
    let mut out = BTreeMap::new();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| err(format!("expected key=value, got {part:?}")))?;
        if !known.contains(&k) {
            return Err(err(format!(
                "unknown key {k:?} (known: {})",
                known.join(", ")
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(err(format!("key {k:?} given twice")));
        }
    }
    Ok(out)
}

/// Parse a size such as `512M`, `2G`, `65536K` or `1048576` into bytes.
pub fn parse_size(option: &'static str, s: &str) -> Result<u64, ConfigError> {
    let err = |reason: String| ConfigError::Parse { option, reason };
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(err(format!(
            "size {s:?} is not a number with an optional K/M/G/T unit"
        )));
    }
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(err(format!(
                "size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            )))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| err(format!("size {s:?} is too large")))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err(format!("size {s:?} is too large")))
}

/// Parse `--cpus boot=N`.
pub fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    let opts = parse_options("cpus", s, &["boot"])?;
    let boot = opts.get("boot").ok_or(ConfigError::Parse {
        option: "cpus",
        reason: "missing boot=N".into(),
    })?;
    let boot_vcpus = boot.parse().map_err(|_| ConfigError::Parse {
        option: "cpus",
        reason: format!("boot={boot:?} is not a number"),
    })?;
    Ok(CpusConfig { boot_vcpus })
}

/// Parse `--memory size=SIZE`.
pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    let opts = parse_options("memory", s, &["size"])?;
    let size = opts.get("size").ok_or(ConfigError::Parse {
        option: "memory",
        reason: "missing size=SIZE".into(),
    })?;
    Ok(MemoryConfig {
        size: parse_size("memory", size)?,
    })
}

/// Parse `--serial off|stdout|file=PATH`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "off" => Ok(SerialConfig::Off),
        "stdout" => Ok(SerialConfig::Stdout),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::Parse {
                option: "serial",
                reason: format!("{s:?}: expected off, stdout or file=PATH"),
            }),
        },
    }
}

fn on_off(option: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::Parse {
            option,
            reason: format!("{key}={v:?}: expected on or off"),
        }),
    }
}

/// Parse `--disk path=IMG[,readonly=on][,id=NAME][,serial=S][,iommu=on][,pci_address=ADDR]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let o = parse_options(
        "disk",
        s,
        &["path", "readonly", "id", "serial", "iommu", "pci_address"],
    )?;
    let path = o
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or(ConfigError::Parse {
            option: "disk",
            reason: "missing path=IMAGE".into(),
        })?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: o
            .get("readonly")
            .map(|v| on_off("disk", "readonly", v))
            .transpose()?
            .unwrap_or(false),
        id: o.get("id").cloned(),
        serial: o.get("serial").cloned(),
        iommu: o
            .get("iommu")
            .map(|v| on_off("disk", "iommu", v))
            .transpose()?
            .unwrap_or(false),
        pci_address: pci_address_option("disk", &o)?,
    })
}

/// Parse a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(option: &'static str, s: &str) -> Result<[u8; 6], ConfigError> {
    let err = || ConfigError::Parse {
        option,
        reason: format!("mac={s:?}: expected six hex bytes like 52:54:00:12:34:56"),
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(err());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(err());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::Parse {
            option,
            reason: format!("mac={s}: a multicast address cannot be a NIC address"),
        });
    }
    Ok(mac)
}

/// Parse `--net tap=NAME|fd=N[,mac=MAC][,id=NAME][,iommu=on][,pci_address=ADDR]`.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let o = parse_options(
        "net",
        s,
        &["tap", "fd", "mac", "id", "iommu", "pci_address"],
    )?;
    let tap = match (o.get("tap"), o.get("fd")) {
        (Some(t), None) if !t.is_empty() && t.len() < 16 => TapConfig::Name(t.clone()),
        (Some(t), None) => {
            return Err(ConfigError::Parse {
                option: "net",
                reason: format!("tap={t:?}: interface names have 1 to 15 characters"),
            })
        }
        (None, Some(fd)) => TapConfig::Fd(fd.parse().ok().filter(|n: &i32| *n >= 0).ok_or(
            ConfigError::Parse {
                option: "net",
                reason: format!("fd={fd:?} is not a file descriptor number"),
            },
        )?),
        (Some(_), Some(_)) => {
            return Err(ConfigError::Parse {
                option: "net",
                reason: "give either tap=NAME or fd=N, not both".into(),
            })
        }
        (None, None) => {
            return Err(ConfigError::Parse {
                option: "net",
                reason: "missing tap=NAME or fd=N".into(),
            })
        }
    };
    Ok(NetConfig {
        tap,
        mac: o.get("mac").map(|m| parse_mac("net", m)).transpose()?,
        id: o.get("id").cloned(),
        iommu: o
            .get("iommu")
            .map(|v| on_off("net", "iommu", v))
            .transpose()?
            .unwrap_or(false),
        pci_address: pci_address_option("net", &o)?,
    })
}

/// Parse `--console off|stdout|file=PATH|pty`.
/// Parse `--console off|stdout|file=PATH|pty[,iommu=on]`: the output and whether the device sits
/// behind the virtual IOMMU.
pub fn parse_console_option(s: &str) -> Result<(ConsoleConfig, bool), ConfigError> {
    let (mode, iommu) = match s.rsplit_once(',') {
        Some((mode, opt)) if opt.starts_with("iommu=") => {
            (mode, on_off("console", "iommu", &opt["iommu=".len()..])?)
        }
        _ => (s, false),
    };
    let console = parse_console(mode)?;
    if iommu && console == ConsoleConfig::Off {
        return Err(ConfigError::Parse {
            option: "console",
            reason: "iommu=on needs a console device (not off)".into(),
        });
    }
    Ok((console, iommu))
}

/// Parse `--rng [id=NAME][,iommu=on][,pci_address=ADDR]` (an empty string: defaults).
pub fn parse_rng(s: &str) -> Result<RngConfig, ConfigError> {
    if s.is_empty() {
        return Ok(RngConfig::default());
    }
    let o = parse_options("rng", s, &["id", "iommu", "pci_address"])?;
    Ok(RngConfig {
        id: o.get("id").cloned(),
        iommu: o
            .get("iommu")
            .map(|v| on_off("rng", "iommu", v))
            .transpose()?
            .unwrap_or(false),
        pci_address: pci_address_option("rng", &o)?,
    })
}

/// Parse `--user-device socket=PATH[,id=NAME][,iommu=on][,p2p=off][,pre_copy=off][,pci_address=ADDR]`.
pub fn parse_user_device(s: &str) -> Result<UserDeviceConfig, ConfigError> {
    let o = parse_options(
        "user-device",
        s,
        &["socket", "id", "iommu", "p2p", "pre_copy", "pci_address"],
    )?;
    let socket = o
        .get("socket")
        .filter(|p| !p.is_empty())
        .ok_or(ConfigError::Parse {
            option: "user-device",
            reason: "missing socket=PATH".into(),
        })?;
    let flag = |key: &str, default: bool| -> Result<bool, ConfigError> {
        o.get(key)
            .map(|v| on_off("user-device", key, v))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    Ok(UserDeviceConfig {
        socket: PathBuf::from(socket),
        id: o.get("id").cloned(),
        iommu: flag("iommu", false)?,
        p2p: flag("p2p", true)?,
        pre_copy: flag("pre_copy", true)?,
        pci_address: pci_address_option("user-device", &o)?,
    })
}

/// Parse `--device path=SYSFS_PATH[,id=NAME][,iommu=on][,p2p=off][,pre_copy=off][,managed=on][,group=take]
/// [,backend=group|iommufd][,pci_address=ADDR]`.
pub fn parse_host_device(s: &str) -> Result<HostDeviceConfig, ConfigError> {
    let o = parse_options(
        "device",
        s,
        &[
            "path",
            "id",
            "iommu",
            "p2p",
            "pre_copy",
            "managed",
            "group",
            "backend",
            "pci_address",
        ],
    )?;
    let err = |reason: String| ConfigError::Parse {
        option: "device",
        reason,
    };
    let path = o
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| err("missing path=/sys/bus/pci/devices/DDDD:BB:SS.F".into()))?;
    let flag = |key: &str, default: bool| -> Result<bool, ConfigError> {
        o.get(key)
            .map(|v| on_off("device", key, v))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let group = match o.get("group").map(String::as_str) {
        None | Some("own") => GroupPolicy::Own,
        Some("take") => GroupPolicy::Take,
        Some(v) => return Err(err(format!("group={v:?}: expected take"))),
    };
    let backend = match o.get("backend").map(String::as_str) {
        None | Some("group") => VfioKernelBackend::Group,
        Some("iommufd") => VfioKernelBackend::Iommufd,
        Some(v) => return Err(err(format!("backend={v:?}: expected group or iommufd"))),
    };
    Ok(HostDeviceConfig {
        path: PathBuf::from(path),
        id: o.get("id").cloned(),
        iommu: flag("iommu", false)?,
        p2p: flag("p2p", true)?,
        pre_copy: flag("pre_copy", true)?,
        managed: flag("managed", false)?,
        group,
        backend,
        pci_address: pci_address_option("device", &o)?,
    })
}

/// The optional `pci_address=0000:00:DD.0` of a device option.
fn pci_address_option(
    option: &'static str,
    o: &BTreeMap<String, String>,
) -> Result<Option<PciAddress>, ConfigError> {
    o.get("pci_address")
        .map(|v| {
            v.parse()
                .map_err(|reason| ConfigError::Parse { option, reason })
        })
        .transpose()
}

/// Parse the output part of `--console`.
pub fn parse_console(s: &str) -> Result<ConsoleConfig, ConfigError> {
    match s {
        "off" => Ok(ConsoleConfig::Off),
        "stdout" => Ok(ConsoleConfig::Stdout),
        "pty" => Ok(ConsoleConfig::Pty),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::Parse {
                option: "console",
                reason: format!("{s:?}: expected off, stdout, file=PATH or pty"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("memory", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("memory", "2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("memory", "4096").unwrap(), 4096);
        assert!(parse_size("memory", "").is_err());
        assert!(parse_size("memory", "12Q").is_err());
        assert!(parse_size("memory", "lots").is_err());
        assert!(parse_size("memory", "99999999999T").is_err());
    }

    #[test]
    fn option_strings() {
        assert_eq!(parse_cpus("boot=4").unwrap().boot_vcpus, 4);
        assert!(parse_cpus("4").is_err());
        assert!(parse_cpus("boot=x").is_err());
        assert!(parse_cpus("boot=1,boot=2").is_err());
        assert!(parse_cpus("max=2").is_err());
        assert_eq!(parse_memory("size=1G").unwrap().size, 1 << 30);
        assert!(parse_memory("size=").is_err());
        assert_eq!(parse_serial("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("tty").is_err());
        assert!(parse_serial("file=").is_err());
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.effective_cmdline(), DEMO_CMDLINE);
        c.cpus.boot_vcpus = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least one vCPU"));
        c.cpus.boot_vcpus = 255;
        assert!(c.validate().is_err());
        c.cpus.boot_vcpus = 1;
        c.memory.size = 0;
        assert!(c.validate().is_err());
        c.memory.size = DEFAULT_MEMORY_SIZE;
        c.payload.kernel = Some("/nonexistent/vmlinux".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
        c.payload.kernel = Some("/".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }

    #[test]
    fn device_options() {
        let d = parse_disk("path=/tmp/a.img,readonly=on,id=root").unwrap();
        assert_eq!((d.readonly, d.id.as_deref()), (true, Some("root")));
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=/x,readonly=maybe").is_err());
        assert!(parse_disk("path=/x,colour=red").is_err());
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap, TapConfig::Name("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_net("fd=3").unwrap().tap, TapConfig::Fd(3));
        assert!(parse_net("tap=a,fd=3").is_err());
        assert!(parse_net("fd=-1").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("tap=t,mac=zz:00:00:00:00:00").is_err());
        assert_eq!(parse_console("pty").unwrap(), ConsoleConfig::Pty);
        assert!(parse_console("tty").is_err());
    }

    #[test]
    fn ids_must_be_unique_and_consoles_not_both_stdout() {
        let img = std::env::temp_dir().join(format!("skiff-cfg-{}.img", std::process::id()));
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let disk = |id: Option<&str>| DiskConfig {
            path: img.clone(),
            readonly: false,
            id: id.map(String::from),
            serial: None,
            iommu: false,
            pci_address: None,
        };
        let mut c = VmConfig {
            disks: vec![disk(None), disk(None)],
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        assert_eq!(c.device_ids(), vec!["disk0", "disk1"]);
        // Recorded PCI addresses: each used once, slot 1 is the virtio-iommu's when there is one.
        let at = |slot| Some(PciAddress::new(slot).unwrap());
        c.disks[0].pci_address = at(3);
        c.disks[1].pci_address = at(3);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("disk0") && e.contains("disk1") && e.contains("0000:00:03.0"),
            "{e}"
        );
        c.disks[1].pci_address = at(1);
        assert!(c.validate().is_ok());
        c.disks[0].iommu = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("disk1") && e.contains("virtio-iommu"), "{e}");
        c.set_pci_address(DeviceKind::Disk, 1, PciAddress::new(4).unwrap());
        assert!(c.validate().is_ok());
        assert_eq!(c.devices()[1].pci_address, at(4));
        c.disks[0].iommu = false;
        c.disks[0].pci_address = None;
        c.disks[1].pci_address = None;
        assert!(
            parse_disk("path=x,pci_address=0000:00:07.0")
                .unwrap()
                .pci_address
                == at(7)
        );
        assert!(parse_disk("path=x,pci_address=0000:00:00.0").is_err());
        assert!(parse_rng("pci_address=00:1f.0").unwrap().pci_address == at(31));
        // Passthrough devices: defaults, ids, one server per socket, group=take needs managed.
        let u = parse_user_device("socket=/run/a.sock,iommu=on").unwrap();
        assert!(u.p2p && u.iommu && u.id.is_none());
        assert!(!parse_user_device("socket=/run/a.sock,p2p=off").unwrap().p2p);
        assert!(parse_user_device("id=x").is_err());
        assert!(parse_user_device("socket=/run/a.sock,bogus=1").is_err());
        c.user_devices = vec![u.clone(), parse_user_device("socket=/run/b.sock").unwrap()];
        assert!(c.validate().is_ok());
        assert_eq!(c.device_ids()[2..], ["userdev0", "userdev1"]);
        c.user_devices[1].socket = "/run/a.sock".into();
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.user_devices.clear();
        let h = parse_host_device(
            "path=/sys/bus/pci/devices/0000:01:00.0,managed=on,group=take,backend=iommufd",
        )
        .unwrap();
        assert_eq!(
            (h.managed, h.group, h.backend),
            (true, GroupPolicy::Take, VfioKernelBackend::Iommufd)
        );
        assert!(parse_host_device("path=/x,group=all").is_err());
        assert!(parse_host_device("path=/x,backend=legacy").is_err());
        c.host_devices =
            vec![parse_host_device("path=/sys/bus/pci/devices/0000:01:00.0,group=take").unwrap()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("group=take needs managed=on"), "{e}");
        c.host_devices = vec![h.clone(), h];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.host_devices.clear();
        // JSON: host devices are `devices`, p2p defaults to on and is left out when on.
        let json: VmConfig = serde_json::from_str(
            r#"{"devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0", "p2p": false}],
                "user_devices": [{"socket": "/run/a.sock"}]}"#,
        )
        .unwrap();
        assert!(!json.host_devices[0].p2p && json.user_devices[0].p2p);
        let back = serde_json::to_string(&json).unwrap();
        assert!(
            back.contains("\"p2p\":false") && !back.contains("\"p2p\":true"),
            "{back}"
        );
        c.disks = vec![disk(Some("a")), disk(Some("a"))];
        assert!(c.validate().unwrap_err().to_string().contains("used twice"));
        c.disks = vec![disk(Some("disk1")), disk(None)];
        assert!(
            c.validate().is_err(),
            "a given id may not clash with a default one"
        );
        c.disks = vec![disk(Some("bad id"))];
        assert!(c.validate().is_err());
        c.disks.clear();
        c.console = ConsoleConfig::Stdout;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("both use stdout"));
        c.serial = SerialConfig::Off;
        assert!(c.validate().is_ok());
        let _ = std::fs::remove_file(&img);
    }

    #[test]
    fn config_json_round_trip() {
        let c = VmConfig {
            serial: SerialConfig::File("/tmp/s".into()),
            ..Default::default()
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus":{"boot_vcpus":1,"x":1}}"#).is_err());
    }

    #[test]
    fn json_defaults_and_strictness() {
        let c: VmConfig = serde_json::from_str(r#"{"payload": {"kernel": "/k"}}"#).unwrap();
        assert_eq!(
            c.payload.kernel.as_deref(),
            Some(std::path::Path::new("/k"))
        );
        assert_eq!(c.cpus.boot_vcpus, DEFAULT_VCPUS);
        assert_eq!(c.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert_eq!(c.console, ConsoleConfig::Off);
        assert_eq!(
            serde_json::from_str::<VmConfig>("{}").unwrap(),
            VmConfig::default()
        );
        let c: VmConfig = serde_json::from_str(
            r#"{"cpus": {}, "serial": {"file": "/s"}, "console": "pty", "rng": {},
                "disks": [{"path": "/d", "readonly": true}],
                "nets": [{"tap": {"name": "tap0"}, "mac": "52:54:00:12:34:56"}, {"tap": {"fd": 3}}]}"#,
        )
        .unwrap();
        assert_eq!(c.cpus.boot_vcpus, DEFAULT_VCPUS);
        assert_eq!(c.serial, SerialConfig::File("/s".into()));
        assert_eq!(c.rng, Some(RngConfig::default()));
        assert!(c.disks[0].readonly);
        assert_eq!(c.nets[0].mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.nets[1].tap, TapConfig::Fd(3));
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["nets"][0]["mac"], "52:54:00:12:34:56");
        assert_eq!(serde_json::from_value::<VmConfig>(j).unwrap(), c);
        for bad in [
            r#"{"cpu": {}}"#,
            r#"{"cpus": {"boot_vcpus": "two"}}"#,
            r#"{"memory": {"size": -1}}"#,
            r#"{"serial": "tty"}"#,
            r#"{"disks": [{"readonly": true}]}"#,
            r#"{"nets": [{"tap": {"name": "t"}, "mac": "01:00:00:00:00:00"}]}"#,
            r#"{"nets": [{"tap": {"name": "t"}, "mac": [82, 84, 0, 18, 52, 86]}]}"#,
        ] {
            assert!(serde_json::from_str::<VmConfig>(bad).is_err(), "{bad}");
        }
    }
}
