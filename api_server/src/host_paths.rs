//! The host paths a VM configuration uses, with the access each needs: what `--landlock`
//! confines the process to. One place, so a new device with a host path adds it here.

use std::path::PathBuf;

use sandbox::landlock::{PathAccess, PathRule};

use crate::config::{ConsoleConfig, SerialConfig, TapConfig, VmConfig};

/// One host path of a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPath {
    /// The path and its access.
    pub rule: PathRule,
    /// An output file skiff creates when it is missing (serial or console log).
    pub output: bool,
}

fn input(path: impl Into<PathBuf>, access: PathAccess) -> HostPath {
    HostPath {
        rule: PathRule::new(path, access),
        output: false,
    }
}

fn output(path: impl Into<PathBuf>) -> HostPath {
    HostPath {
        rule: PathRule::new(path, PathAccess::ReadWrite),
        output: true,
    }
}

impl VmConfig {
    /// Every host path this VM opens, with the access it needs.
    pub fn host_paths(&self) -> Vec<HostPath> {
        let mut paths = Vec::new();
        let payload = [
            &self.payload.kernel,
            &self.payload.initramfs,
            &self.cpu_template,
        ];
        paths.extend(
            payload
                .into_iter()
                .flatten()
                .map(|p| input(p, PathAccess::Read)),
        );
        for d in &self.disks {
            let access = if d.readonly {
                PathAccess::Read
            } else {
                PathAccess::ReadWrite
            };
            paths.push(input(&d.path, access));
        }
        if let SerialConfig::File(p) = &self.serial {
            paths.push(output(p));
        }
        match &self.console {
            ConsoleConfig::File(p) => paths.push(output(p)),
            ConsoleConfig::Pty => {
                paths.push(input("/dev/ptmx", PathAccess::ReadWrite));
                paths.push(input("/dev/pts", PathAccess::ReadWrite));
            }
            ConsoleConfig::Off | ConsoleConfig::Stdout => {}
        }
        if self
            .nets
            .iter()
            .any(|n| matches!(n.tap, TapConfig::Name(_)))
        {
            paths.push(input("/dev/net/tun", PathAccess::ReadWrite));
        }
        // vfio-user sockets need no rule: Landlock does not mediate connect(2).
        for d in &self.host_devices {
            paths.push(input(&d.path, PathAccess::ReadWrite));
        }
        if !self.host_devices.is_empty() {
            // Group and iommufd device nodes, driver binding (managed=on), IOMMU groups.
            for p in ["/dev/vfio", "/dev/iommu", "/sys/bus/pci"] {
                paths.push(input(p, PathAccess::ReadWrite));
            }
            paths.push(input("/sys/kernel/iommu_groups", PathAccess::Read));
        }
        paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, HostDeviceConfig};

    fn disk(path: &str, readonly: bool) -> DiskConfig {
        serde_json::from_value(serde_json::json!({"path": path, "readonly": readonly})).unwrap()
    }

    #[test]
    fn every_configured_path_is_named_with_its_access() {
        let mut c = VmConfig::default();
        c.payload.kernel = Some("/k/vmlinux".into());
        c.disks = vec![disk("/d/root.img", false), disk("/d/ro.img", true)];
        c.serial = SerialConfig::File("/log/serial".into());
        c.console = ConsoleConfig::Pty;
        let host: HostDeviceConfig = serde_json::from_value(
            serde_json::json!({"path": "/sys/bus/pci/devices/0000:01:00.0"}),
        )
        .unwrap();
        c.host_devices = vec![host];
        let got: Vec<(String, PathAccess, bool)> = c
            .host_paths()
            .into_iter()
            .map(|h| (h.rule.path.display().to_string(), h.rule.access, h.output))
            .collect();
        let want = |p: &str, a, o| (p.to_string(), a, o);
        for w in [
            want("/k/vmlinux", PathAccess::Read, false),
            want("/d/root.img", PathAccess::ReadWrite, false),
            want("/d/ro.img", PathAccess::Read, false),
            want("/log/serial", PathAccess::ReadWrite, true),
            want("/dev/ptmx", PathAccess::ReadWrite, false),
            want(
                "/sys/bus/pci/devices/0000:01:00.0",
                PathAccess::ReadWrite,
                false,
            ),
            want("/dev/vfio", PathAccess::ReadWrite, false),
        ] {
            assert!(got.contains(&w), "{w:?} missing from {got:?}");
        }
        assert!(!got.iter().any(|g| g.0 == "/dev/net/tun"), "{got:?}");
    }
}
