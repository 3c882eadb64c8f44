//! Helpers shared by tests that need the host's KVM.
//!
//! A test that needs `/dev/kvm` fails when it is missing, so a CI machine without KVM cannot pass
//! silently; setting `SKIFF_SKIP_KVM=1` turns that into a printed skip for hosts that are known
//! to lack it.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use crate::config::VmConfig;

/// The environment variable that lets KVM tests skip when `/dev/kvm` is unavailable.
pub const SKIP_KVM_VAR: &str = "SKIFF_SKIP_KVM";

/// What a test prints when it skips for lack of KVM.
pub const SKIP_MESSAGE: &str = "skipped: /dev/kvm is not available (SKIFF_SKIP_KVM is set)";

/// A one-vCPU test-guest configuration running `cmdline`, its serial going to `serial.log` in
/// a fresh temporary directory named after `name` and this process; `extra`, given that
/// directory, adds top-level fields (e.g. `disks`). Built from JSON so fields added to the
/// config types later keep their defaults. Returns the configuration, the directory and the
/// serial file.
pub fn guest_config(
    name: &str,
    cmdline: &str,
    extra: impl FnOnce(&Path) -> serde_json::Value,
) -> (VmConfig, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("skiff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let serial = dir.join("serial.log");
    let mut json = serde_json::json!({
        "cpus": { "boot_vcpus": 1 },
        "serial": { "file": serial },
        "payload": { "cmdline": cmdline },
    });
    if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), extra(&dir)) {
        all.extend(more);
    }
    let config = serde_json::from_value(json).expect("test guest config");
    (config, dir, serial)
}

/// `/dev/kvm` opened, or `None` (after printing [`SKIP_MESSAGE`]) when it cannot be opened and
/// `SKIFF_SKIP_KVM=1` is set.
///
/// # Panics
///
/// When `/dev/kvm` cannot be opened and `SKIFF_SKIP_KVM` is not `1`: the calling test fails.
pub fn require_kvm() -> Option<Kvm> {
    let skip = std::env::var(SKIP_KVM_VAR).ok();
    match kvm_or_skip(Kvm::new(), skip.as_deref()) {
        Ok(kvm) => {
            if kvm.is_none() {
                eprintln!("{SKIP_MESSAGE}");
            }
            kvm
        }
        Err(msg) => panic!("{msg}"),
    }
}

/// The decision behind [`require_kvm`]: the opened value, `None` to skip (when `skip` is `"1"`),
/// or the failure message.
fn kvm_or_skip<T, E: Display>(
    opened: Result<T, E>,
    skip: Option<&str>,
) -> Result<Option<T>, String> {
    match opened {
        Ok(v) => Ok(Some(v)),
        Err(_) if skip == Some("1") => Ok(None),
        Err(e) => Err(format!(
            "this test needs /dev/kvm, which cannot be opened ({e}); \
             set {SKIP_KVM_VAR}=1 to skip KVM tests on a host without it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_only_when_asked() {
        assert_eq!(kvm_or_skip::<u8, &str>(Ok(7), None), Ok(Some(7)));
        assert_eq!(kvm_or_skip::<u8, &str>(Ok(7), Some("1")), Ok(Some(7)));
        assert_eq!(kvm_or_skip::<u8, &str>(Err("ENOENT"), Some("1")), Ok(None));
        for skip in [None, Some("0"), Some(""), Some("yes")] {
            let msg = kvm_or_skip::<u8, &str>(Err("ENOENT"), skip).unwrap_err();
            assert!(
                msg.contains("ENOENT") && msg.contains("SKIFF_SKIP_KVM=1"),
                "{msg}"
            );
        }
    }
}
