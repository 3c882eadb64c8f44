//! The JSON bodies of the API: what requests carry and what responses return. The OpenAPI spec
//! (`api_server/openapi/skiff.yaml`) describes the same shapes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
pub use crate::migration::{
    DeviceOverride, MigrationPhase, MigrationProgress, MigrationUrl, ReceiveMigrationRequest,
    SendMigrationRequest,
};

/// The lifecycle state of the VM. "No VM" (before `vm.create`, after `vm.delete`) is not a state:
/// errors then carry no `state` and `vm.info` answers 409.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Configured by `vm.create` (or restored without `resume`) but not running.
    Created,
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped by `vm.pause` (or a restore without `resume`).
    Paused,
    /// The VM was shut down (`vm.shutdown` or the guest powered off); `vm.boot` starts it again.
    Shutdown,
    /// A live migration is under way: on the source from `vm.send-migration` until it ends (the
    /// guest keeps running during pre-copy), on the target from the moment the VM's
    /// configuration arrives until it resumes. Lifecycle actions get 409; a failed or cancelled
    /// migration puts the source back in the state it had and leaves the target without a VM.
    Migrating,
    /// The source after a completed migration: the guest runs on the target. Only `vm.info`,
    /// `vm.migration-progress`, `vm.delete` and `vmm.shutdown` remain.
    Migrated,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
            VmState::Migrating => "Migrating",
            VmState::Migrated => "Migrated",
        };
        f.write_str(s)
    }
}

/// One device of the VM as `vm.info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// Device id (`disk0`, `net0`, `console0`, `rng0`, or the id given in the config).
    pub id: String,
    /// Device kind: `virtio-blk`, `virtio-net`, `virtio-console`, `virtio-rng`, `virtio-iommu`,
    /// `vfio`, ...
    pub kind: String,
    /// PCI address `segment:bus:device.function`, e.g. `0000:00:01.0`.
    pub pci_address: String,
    /// Passthrough devices: `backend` (`vfio-user`, `vfio-group`, `vfio-iommufd`), `socket`, or
    /// `host_device` and `iommu_group`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub details: std::collections::BTreeMap<String, String>,
}

/// The `vm.info` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// The configuration the VM was created with.
    pub config: VmConfig,
    /// Its lifecycle state.
    pub state: VmState,
    /// Its devices with their PCI addresses.
    pub devices: Vec<DeviceInfo>,
    /// Guest RAM actually allocated, in bytes.
    pub memory_actual_size: u64,
}

/// The `vm.counters` response: device id → counter name → value (e.g.
/// `{"disk0": {"read_ops": 12, "read_bytes": 49152}}`).
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// The `vm.snapshot` request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where to write the snapshot: `file:///absolute/directory`.
    pub destination_url: String,
}

/// The `vm.restore` request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Where to read the snapshot from: `file:///absolute/directory`.
    pub source_url: String,
    /// Resume the VM once restored (otherwise it stays paused).
    #[serde(default)]
    pub resume: bool,
}

/// The `vmm.ping` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingResponse {
    /// skiff's version.
    pub version: String,
    /// The skiff process id.
    pub pid: u32,
    /// Optional features built in (e.g. `vfio`, `migration`).
    pub features: Vec<String>,
}

impl PingResponse {
    /// This process's answer: the workspace version, its pid, no optional features (every
    /// feature is always built in).
    pub fn current() -> Self {
        PingResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            features: Vec::new(),
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// The VM's state, on a 409 (absent when no VM exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
}

/// Turn a `file:///absolute/path` URL (as used by `vm.snapshot` and `vm.restore`) into a path.
/// Percent-escapes are not decoded; the path must be absolute and non-empty.
pub fn file_url_path(url: &str) -> Result<PathBuf, String> {
    let rest = url.strip_prefix("file://").ok_or_else(|| {
        format!("{url:?}: only file:// URLs are supported (e.g. file:///var/lib/skiff/snap)")
    })?;
    if !rest.starts_with('/') || rest.len() < 2 {
        return Err(format!(
            "{url:?}: expected file:///absolute/path (three slashes)"
        ));
    }
    Ok(PathBuf::from(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names() {
        assert_eq!(
            serde_json::to_string(&VmState::Paused).unwrap(),
            "\"Paused\""
        );
        assert_eq!(VmState::Shutdown.to_string(), "Shutdown");
        for s in [VmState::Migrating, VmState::Migrated] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.to_string())
            );
        }
        assert!(serde_json::from_str::<VmState>("\"paused\"").is_err());
    }

    #[test]
    fn bodies() {
        let r: RestoreRequest = serde_json::from_str(r#"{"source_url": "file:///x"}"#).unwrap();
        assert!(!r.resume);
        assert!(serde_json::from_str::<RestoreRequest>(r#"{"source_url": "a", "x": 1}"#).is_err());
        let e = ApiErrorBody {
            error: "no".into(),
            state: None,
        };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"error":"no"}"#);
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("file:///tmp/snap").unwrap(),
            PathBuf::from("/tmp/snap")
        );
        assert!(file_url_path("/tmp/snap").is_err());
        assert!(file_url_path("file://tmp/snap").is_err());
        assert!(file_url_path("file:///").is_err());
        assert!(file_url_path("http://x/y").is_err());
    }
}
