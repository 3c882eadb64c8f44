//! The VM configuration and the parsing of Cloud Hypervisor-style option strings (`boot=2`,
//! `size=512M`, `file=/path`). The CLI and, later, the API's `vm.create` body share this model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// Number of vCPUs started at boot.
    pub boot_vcpus: u32,
}

/// Guest RAM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// RAM size in bytes.
    pub size: u64,
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// Kernel image (ELF vmlinux or bzImage); `None` boots the built-in demo guest.
    pub kernel: Option<PathBuf>,
    /// Initramfs image.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; `None` uses the default for the kernel kind.
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

/// The whole VM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub cpu_template: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig {
                boot_vcpus: DEFAULT_VCPUS,
            },
            memory: MemoryConfig {
                size: DEFAULT_MEMORY_SIZE,
            },
            payload: PayloadConfig::default(),
            serial: SerialConfig::Stdout,
            cpu_template: None,
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
    fn config_json_round_trip() {
        let c = VmConfig {
            serial: SerialConfig::File("/tmp/s".into()),
            ..Default::default()
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus":{"boot_vcpus":1,"x":1}}"#).is_err());
    }
}
