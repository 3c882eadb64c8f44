//! Live migration in the API: the migration URLs (`tcp:HOST:PORT`, `unix:/PATH`, parsed here and
//! nowhere else), the `vm.send-migration` and `vm.receive-migration` request bodies with their
//! checks, the per-device overrides a target applies to the VM configuration it receives, and the
//! `vm.migration-progress` report.
//!
//! Names follow Cloud Hypervisor where it has them (`vm.send-migration` with `destination_url`,
//! `vm.receive-migration` with `receiver_url`, `local`); the tuning fields (`downtime_limit_ms`,
//! `connections`, `bandwidth_limit_mbps`, `max_iterations`) are skiff's own. Cloud Hypervisor's
//! `migration_timeout` is not accepted: `downtime_limit_ms` and `max_iterations` bound a migration.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::{DeviceKind, TapConfig, VmConfig};

/// Default `downtime_limit_ms`: the longest the guest may be stopped for the switchover.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Largest `downtime_limit_ms` accepted (one hour: effectively "stop and copy").
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 3_600_000;
/// Default `connections`.
pub const DEFAULT_CONNECTIONS: u32 = 1;
/// Largest `connections` accepted.
pub const MAX_CONNECTIONS: u32 = 16;
/// Largest `bandwidth_limit_mbps` accepted (10 Tbit/s).
pub const MAX_BANDWIDTH_LIMIT_MBPS: u64 = 10_000_000;
/// Largest `max_iterations` accepted.
pub const MAX_ITERATIONS: u32 = 10_000;
/// Longest Unix socket path (`sun_path` is 108 bytes with the terminating NUL).
pub const MAX_UNIX_PATH_LEN: usize = 107;
/// Longest TAP interface name (`IFNAMSIZ` - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// Where a migration goes to (`destination_url`) or is received on (`receiver_url`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MigrationUrl {
    /// `tcp:HOST:PORT`: a host name, an IPv4 address or a bracketed IPv6 address
    /// (`tcp:[::1]:6000`) and a port 1..=65535. `host` is kept without brackets, so
    /// `(host.as_str(), port)` works with `ToSocketAddrs`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port, never 0.
        port: u16,
    },
    /// `unix:/absolute/path` of a Unix stream socket (at most 107 bytes).
    Unix {
        /// The socket path.
        path: PathBuf,
    },
}

const URL_FORMS: &str = "expected tcp:HOST:PORT (tcp:[IPv6]:PORT) or unix:/absolute/path";

impl MigrationUrl {
    /// Parse `tcp:HOST:PORT` or `unix:/PATH`. The error quotes the URL and says what is wrong.
    pub fn parse(s: &str) -> Result<MigrationUrl, String> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            Self::parse_tcp(s, rest)
        } else if let Some(rest) = s.strip_prefix("unix:") {
            Self::parse_unix(s, rest)
        } else {
            Err(format!("{s:?}: {URL_FORMS}"))
        }
    }

    fn parse_tcp(s: &str, rest: &str) -> Result<MigrationUrl, String> {
        if rest.starts_with("//") {
            return Err(format!(
                "{s:?}: write tcp:HOST:PORT without \"//\" (e.g. tcp:192.0.2.1:6000)"
            ));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (addr, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']' after the IPv6 address"))?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| format!("{s:?}: {addr:?} is not an IPv6 address"))?;
            let port = after.strip_prefix(':').ok_or_else(|| {
                format!("{s:?}: expected :PORT after the IPv6 address (tcp:[{addr}]:6000)")
            })?;
            (addr, port)
        } else {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: missing :PORT (tcp:HOST:PORT)"))?;
            if host.contains(':') {
                return Err(format!(
                    "{s:?}: put an IPv6 address in brackets (tcp:[::1]:6000)"
                ));
            }
            check_host(s, host)?;
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) => return Err(format!("{s:?}: port 0 is not a port to migrate over")),
            Ok(p) if !port.starts_with('+') => p,
            _ => return Err(format!("{s:?}: port {port:?} is not a number 1..=65535")),
        };
        Ok(MigrationUrl::Tcp {
            host: host.to_string(),
            port,
        })
    }

    fn parse_unix(s: &str, rest: &str) -> Result<MigrationUrl, String> {
        if !rest.starts_with('/') {
            return Err(format!(
                "{s:?}: the socket path must be absolute (unix:/run/skiff-migration.sock)"
            ));
        }
        if rest.len() < 2 {
            return Err(format!("{s:?}: the socket path is empty"));
        }
        if rest.contains('\0') {
            return Err(format!("{s:?}: the socket path contains a NUL byte"));
        }
        if rest.len() > MAX_UNIX_PATH_LEN {
            return Err(format!(
                "{s:?}: the socket path is {} bytes long; Unix sockets take at most {MAX_UNIX_PATH_LEN}",
                rest.len()
            ));
        }
        Ok(MigrationUrl::Unix {
            path: PathBuf::from(rest),
        })
    }

    /// Whether this is a `unix:` URL.
    pub fn is_unix(&self) -> bool {
        matches!(self, MigrationUrl::Unix { .. })
    }

    /// `HOST:PORT` (IPv6 in brackets) for a `tcp:` URL, e.g. to hand to `TcpStream::connect`.
    pub fn tcp_address(&self) -> Option<String> {
        match self {
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                Some(format!("[{host}]:{port}"))
            }
            MigrationUrl::Tcp { host, port } => Some(format!("{host}:{port}")),
            MigrationUrl::Unix { .. } => None,
        }
    }
}

fn check_host(s: &str, host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err(format!("{s:?}: the host is empty (tcp:HOST:PORT)"));
    }
    if host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        || host.starts_with(['.', '-'])
    {
        return Err(format!(
            "{s:?}: {host:?} is not a host name or an IPv4 address"
        ));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') && host.parse::<Ipv4Addr>().is_err() {
        return Err(format!("{s:?}: {host:?} is not an IPv4 address"));
    }
    Ok(())
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Tcp { .. } => {
                write!(f, "tcp:{}", self.tcp_address().unwrap_or_default())
            }
            MigrationUrl::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for MigrationUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MigrationUrl::parse(s)
    }
}

impl Serialize for MigrationUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MigrationUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MigrationUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A URL field whose parse error names the field (serde_json's errors do not).
fn url_field<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<MigrationUrl, D::Error> {
    let s = String::deserialize(d)?;
    MigrationUrl::parse(&s).map_err(|e| serde::de::Error::custom(format!("{field}: {e}")))
}

fn de_destination_url<'de, D: Deserializer<'de>>(d: D) -> Result<MigrationUrl, D::Error> {
    url_field(d, "destination_url")
}

fn de_receiver_url<'de, D: Deserializer<'de>>(d: D) -> Result<MigrationUrl, D::Error> {
    url_field(d, "receiver_url")
}

fn default_downtime_limit_ms() -> u64 {
    DEFAULT_DOWNTIME_LIMIT_MS
}

fn default_connections() -> u32 {
    DEFAULT_CONNECTIONS
}

/// The `vm.send-migration` request body (on the source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    /// Where the target listens (its `receiver_url`).
    #[serde(deserialize_with = "de_destination_url")]
    pub destination_url: MigrationUrl,
    /// Longest the guest may stay stopped for the switchover, in ms (default 300, 1..=3600000).
    /// Pre-copy iterates until the expected downtime fits (or `max_iterations` is reached).
    #[serde(default = "default_downtime_limit_ms")]
    pub downtime_limit_ms: u64,
    /// Parallel connections carrying guest RAM (1..=16, default 1).
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// Same-host migration: guest RAM is handed over as memory file descriptors instead of being
    /// copied. Only with a `unix:` destination.
    #[serde(default)]
    pub local: bool,
    /// Bandwidth cap in Mbit/s (10^6 bits per second, 1..=10000000); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_mbps: Option<u64>,
    /// Most pre-copy passes (the first copies all of RAM; 1..=10000) before switching over
    /// whatever the expected downtime; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    /// Mutually authenticated TLS on every connection (`tcp:` only); plain when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrationTls>,
}

impl SendMigrationRequest {
    /// A request to `destination_url` with every default.
    pub fn new(destination_url: MigrationUrl) -> Self {
        Self {
            destination_url,
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            connections: DEFAULT_CONNECTIONS,
            local: false,
            bandwidth_limit_mbps: None,
            max_iterations: None,
            tls: None,
        }
    }

    /// Check every value; the error starts with the field's name.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_DOWNTIME_LIMIT_MS).contains(&self.downtime_limit_ms) {
            return Err(format!(
                "downtime_limit_ms: {} is out of range (1 to {MAX_DOWNTIME_LIMIT_MS} ms)",
                self.downtime_limit_ms
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!(
                "connections: {} is out of range (1 to {MAX_CONNECTIONS})",
                self.connections
            ));
        }
        if self.local && !self.destination_url.is_unix() {
            return Err(format!(
                "local: a local migration needs a unix: destination_url, not {}",
                self.destination_url
            ));
        }
        if let Some(b) = self.bandwidth_limit_mbps {
            if !(1..=MAX_BANDWIDTH_LIMIT_MBPS).contains(&b) {
                return Err(format!(
                    "bandwidth_limit_mbps: {b} is out of range (1 to {MAX_BANDWIDTH_LIMIT_MBPS} Mbit/s; leave it out for no limit)"
                ));
            }
        }
        if let Some(n) = self.max_iterations {
            if !(1..=MAX_ITERATIONS).contains(&n) {
                return Err(format!(
                    "max_iterations: {n} is out of range (1 to {MAX_ITERATIONS}; leave it out for no limit)"
                ));
            }
        }
        if let Some(t) = &self.tls {
            t.validate(&self.destination_url)?;
        }
        Ok(())
    }

    /// The bandwidth cap in bytes per second, if any.
    pub fn bandwidth_limit_bytes_per_s(&self) -> Option<u64> {
        self.bandwidth_limit_mbps.map(|m| m * 125_000)
    }
}

/// Host-local resources of one device that differ on the target (at most one field is given:
/// the one the device has).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    /// Disk image (disks) or host PCI device sysfs path (kernel VFIO devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// TAP interface name (nets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// vfio-user server socket (user devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl DeviceOverride {
    /// The names of the fields given.
    pub fn fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.path.is_some() {
            out.push("path");
        }
        if self.tap.is_some() {
            out.push("tap");
        }
        if self.socket.is_some() {
            out.push("socket");
        }
        out
    }
}

/// The `vm.receive-migration` request body (on a target started without a VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationRequest {
    /// Where to listen for the source.
    #[serde(deserialize_with = "de_receiver_url")]
    pub receiver_url: MigrationUrl,
    /// Device id → the host-local resources that differ on this host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, DeviceOverride>,
    /// Mutually authenticated TLS: sources without a certificate from the CA are refused
    /// before any state is read (`tcp:` only); plain when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrationTls>,
}

/// Mutually authenticated TLS for a migration (`tls` in both requests): this side's certificate
/// chain and key, and the CA a peer's certificate must chain to (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationTls {
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM).
    pub key: PathBuf,
    /// The CA certificates (PEM) a peer's certificate must chain to.
    pub ca: PathBuf,
}

impl MigrationTls {
    /// Check the paths are absolute and the URL is TCP (TLS runs over TCP only).
    pub fn validate(&self, url: &MigrationUrl) -> Result<(), String> {
        if !matches!(url, MigrationUrl::Tcp { .. }) {
            return Err("tls: only with a tcp: URL".into());
        }
        for (name, p) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
            if !p.is_absolute() {
                return Err(format!(
                    "tls.{name}: {} is not an absolute path",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

fn is_device_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ReceiveMigrationRequest {
    /// A request to listen on `receiver_url`, without overrides.
    pub fn new(receiver_url: MigrationUrl) -> Self {
        Self {
            receiver_url,
            overrides: BTreeMap::new(),
            tls: None,
        }
    }

    /// Check every override; the error starts with `overrides.ID[.FIELD]`. Whether the ids
    /// exist is only known once the VM's configuration arrives: see
    /// [`ReceiveMigrationRequest::apply_overrides`].
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.tls {
            t.validate(&self.receiver_url)?;
        }
        for (id, o) in &self.overrides {
            if !is_device_id(id) {
                return Err(format!(
                    "overrides: {id:?} is not a device id (letters, digits, '-' and '_')"
                ));
            }
            let fields = o.fields();
            if fields.len() != 1 {
                return Err(format!(
                    "overrides.{id}: give exactly one of path, tap, socket (got {})",
                    if fields.is_empty() {
                        "none".to_string()
                    } else {
                        fields.join(", ")
                    }
                ));
            }
            for (field, p) in [("path", &o.path), ("socket", &o.socket)] {
                if let Some(p) = p {
                    let s = p.to_string_lossy();
                    if !s.starts_with('/') {
                        return Err(format!(
                            "overrides.{id}.{field}: {s:?} must be an absolute path"
                        ));
                    }
                    if s.contains('\0') {
                        return Err(format!(
                            "overrides.{id}.{field}: the path contains a NUL byte"
                        ));
                    }
                }
            }
            if let Some(s) = &o.socket {
                if s.as_os_str().len() > MAX_UNIX_PATH_LEN {
                    return Err(format!(
                        "overrides.{id}.socket: the path is longer than {MAX_UNIX_PATH_LEN} bytes"
                    ));
                }
            }
            if let Some(t) = &o.tap {
                if t.is_empty()
                    || t.len() > MAX_TAP_NAME_LEN
                    || t == "."
                    || t == ".."
                    || t.chars()
                        .any(|c| c == '/' || c.is_whitespace() || c == '\0')
                {
                    return Err(format!(
                        "overrides.{id}.tap: {t:?} is not an interface name (1 to {MAX_TAP_NAME_LEN} characters, no '/' or spaces)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Apply the overrides to the configuration received from the source: disks and kernel
    /// VFIO devices take `path`, nets `tap` (a TAP by name), vfio-user devices `socket`. An id
    /// the configuration lacks, or a field the device does not have, is an error naming it (the
    /// configuration is then left unchanged).
    pub fn apply_overrides(&self, config: &mut VmConfig) -> Result<(), String> {
        let devices = config.devices();
        let mut out = config.clone();
        for (id, o) in &self.overrides {
            let Some(d) = devices.iter().find(|d| d.id == *id) else {
                let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
                return Err(format!(
                    "overrides.{id}: the migrated VM has no device {id:?} (its devices: {})",
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                ));
            };
            let i = d.index;
            let applied = match (d.kind, o) {
                (
                    DeviceKind::Disk,
                    DeviceOverride {
                        path: Some(p),
                        tap: None,
                        socket: None,
                    },
                ) => {
                    out.disks[i].path = p.clone();
                    true
                }
                (
                    DeviceKind::HostDevice,
                    DeviceOverride {
                        path: Some(p),
                        tap: None,
                        socket: None,
                    },
                ) => {
                    out.host_devices[i].path = p.clone();
                    true
                }
                (
                    DeviceKind::Net,
                    DeviceOverride {
                        path: None,
                        tap: Some(t),
                        socket: None,
                    },
                ) => {
                    out.nets[i].tap = TapConfig::Name(t.clone());
                    true
                }
                (
                    DeviceKind::UserDevice,
                    DeviceOverride {
                        path: None,
                        tap: None,
                        socket: Some(s),
                    },
                ) => {
                    out.user_devices[i].socket = s.clone();
                    true
                }
                _ => false,
            };
            if !applied {
                let (kind, takes) = match d.kind {
                    DeviceKind::Disk => ("a disk", "path"),
                    DeviceKind::HostDevice => ("a host PCI device", "path"),
                    DeviceKind::Net => ("a net device", "tap"),
                    DeviceKind::UserDevice => ("a vfio-user device", "socket"),
                    DeviceKind::Console => ("the console", "no override"),
                    DeviceKind::Rng => ("an entropy device", "no override"),
                };
                return Err(format!(
                    "overrides.{id}: {id} is {kind}, which takes {takes}, not {}",
                    o.fields().join(", ")
                ));
            }
        }
        *config = out;
        Ok(())
    }
}

/// Where a migration stands. `completed`, `failed` and `cancelled` are final; `none` means no
/// migration has run on this skiff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationPhase {
    /// No migration has run.
    #[default]
    None,
    /// Connecting, exchanging the configuration, checking the target can take the VM.
    Setup,
    /// The guest runs; guest RAM is copied, then what it dirtied, pass after pass.
    Precopy,
    /// The guest is stopped; the last dirty pages and the device state are sent.
    Switchover,
    /// The target resumes the guest; the source releases its resources.
    Completing,
    /// Done: the guest runs on the target (the source VM is `Migrated`).
    Completed,
    /// It failed (`error` says why); the source VM goes on as before.
    Failed,
    /// `vm.migration-cancel` stopped it; the source VM goes on as before.
    Cancelled,
}

impl MigrationPhase {
    /// Every phase, in the order a migration goes through them (then the final ones).
    pub const ALL: [MigrationPhase; 8] = [
        MigrationPhase::None,
        MigrationPhase::Setup,
        MigrationPhase::Precopy,
        MigrationPhase::Switchover,
        MigrationPhase::Completing,
        MigrationPhase::Completed,
        MigrationPhase::Failed,
        MigrationPhase::Cancelled,
    ];

    /// Whether the migration has ended (`completed`, `failed`, `cancelled`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// The JSON name (`precopy`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::None => "none",
            MigrationPhase::Setup => "setup",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::Switchover => "switchover",
            MigrationPhase::Completing => "completing",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `vm.migration-progress` response (source or target), also the `properties` of the
/// `migration` events. Counters are of the current (or last) migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationProgress {
    /// Where it stands.
    pub phase: MigrationPhase,
    /// Pre-copy pass (1 = the full copy of RAM; 0 before pre-copy).
    pub iteration: u32,
    /// Guest RAM bytes sent (received, on the target) so far.
    pub bytes_sent: u64,
    /// Dirty bytes still to send in this pass.
    pub bytes_remaining: u64,
    /// Pages the guest dirties per second (last pass).
    pub dirty_rate_pages_per_s: u64,
    /// Transfer rate (last pass).
    pub bandwidth_bytes_per_s: u64,
    /// Switchover downtime expected if it happened now.
    pub expected_downtime_ms: u64,
    /// vCPU throttling applied to converge (0-99).
    pub throttle_percent: u8,
    /// Why it failed (phase `failed`), otherwise null.
    #[serde(default)]
    pub error: Option<String>,
    /// Time since the migration started.
    pub elapsed_ms: u64,
    /// The guest's actual downtime, once known (from `completing` on), otherwise null.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

impl MigrationProgress {
    /// Share of the work done: sent / (sent + remaining), 0.0..=1.0 (1.0 once completed).
    pub fn fraction(&self) -> f64 {
        if self.phase == MigrationPhase::Completed {
            return 1.0;
        }
        let total = self.bytes_sent as f64 + self.bytes_remaining as f64;
        if total == 0.0 {
            0.0
        } else {
            (self.bytes_sent as f64 / total).clamp(0.0, 1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tcp(host: &str, port: u16) -> MigrationUrl {
        MigrationUrl::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn urls_parse_and_round_trip() {
        for (s, want) in [
            ("tcp:192.0.2.7:6000", tcp("192.0.2.7", 6000)),
            ("tcp:dest-host.example:1", tcp("dest-host.example", 1)),
            ("tcp:localhost:65535", tcp("localhost", 65535)),
            ("tcp:[::1]:6000", tcp("::1", 6000)),
            ("tcp:[fe80::1:2]:7", tcp("fe80::1:2", 7)),
            (
                "unix:/run/skiff/mig.sock",
                MigrationUrl::Unix {
                    path: "/run/skiff/mig.sock".into(),
                },
            ),
        ] {
            let u = MigrationUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(u, want, "{s}");
            assert_eq!(u.to_string(), s);
            assert_eq!(s.parse::<MigrationUrl>().unwrap(), u);
            let j = serde_json::to_value(&u).unwrap();
            assert_eq!(j, json!(s));
            assert_eq!(serde_json::from_value::<MigrationUrl>(j).unwrap(), u);
        }
        assert_eq!(
            tcp("::1", 6000).tcp_address().as_deref(),
            Some("[::1]:6000")
        );
        assert_eq!(tcp("h", 1).tcp_address().as_deref(), Some("h:1"));
        assert!(MigrationUrl::parse("unix:/x").unwrap().is_unix());
        assert!(!tcp("h", 1).is_unix());
        assert_eq!(MigrationUrl::parse("unix:/x").unwrap().tcp_address(), None);
    }

    #[test]
    fn bad_urls_say_why() {
        let long = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH_LEN));
        for (s, why) in [
            ("", "expected tcp:HOST:PORT"),
            ("file:///x", "expected tcp:HOST:PORT"),
            ("TCP:h:1", "expected tcp:HOST:PORT"),
            ("http://h:1", "expected tcp:HOST:PORT"),
            ("tcp://h:6000", "without \"//\""),
            ("tcp:h", "missing :PORT"),
            ("tcp::6000", "host is empty"),
            ("tcp:h:", "not a number"),
            ("tcp:h:0", "port 0"),
            ("tcp:h:65536", "not a number"),
            ("tcp:h:+5", "not a number"),
            ("tcp:h:-5", "not a number"),
            ("tcp:h:6x", "not a number"),
            ("tcp:::1:6000", "brackets"),
            ("tcp:fe80::1:6000", "brackets"),
            ("tcp:[::1]6000", "expected :PORT"),
            ("tcp:[::1:6000", "missing ']'"),
            ("tcp:[nope]:6000", "not an IPv6 address"),
            ("tcp:[192.0.2.1]:6000", "not an IPv6 address"),
            ("tcp:300.1.1.1:6000", "not an IPv4 address"),
            ("tcp:1.2.3:6000", "not an IPv4 address"),
            ("tcp:a b:6000", "not a host name"),
            ("tcp:-h:6000", "not a host name"),
            ("tcp:h/x:6000", "not a host name"),
            ("unix:", "must be absolute"),
            ("unix:relative.sock", "must be absolute"),
            ("unix:/", "empty"),
            ("unix:/a\0b", "NUL"),
            (long.as_str(), "at most 107"),
        ] {
            let e = MigrationUrl::parse(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e:?} lacks {why:?}");
            assert!(e.starts_with(&format!("{s:?}")), "{e}");
        }
        // 107 bytes is still fine.
        let ok = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH_LEN - 1));
        MigrationUrl::parse(&ok).unwrap();
    }

    #[test]
    fn send_request_defaults_and_checks() {
        let r: SendMigrationRequest =
            serde_json::from_value(json!({"destination_url": "tcp:h:6000"})).unwrap();
        assert_eq!(r, SendMigrationRequest::new(tcp("h", 6000)));
        assert_eq!(r.downtime_limit_ms, 300);
        assert_eq!(r.connections, 1);
        assert!(!r.local);
        r.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"destination_url": "tcp:h:6000", "downtime_limit_ms": 300, "connections": 1, "local": false})
        );
        let mut full = SendMigrationRequest::new(MigrationUrl::parse("unix:/s").unwrap());
        full.local = true;
        full.connections = 16;
        full.bandwidth_limit_mbps = Some(8);
        full.max_iterations = Some(5);
        full.validate().unwrap();
        assert_eq!(full.bandwidth_limit_bytes_per_s(), Some(1_000_000));
        let v = serde_json::to_value(&full).unwrap();
        assert_eq!(
            serde_json::from_value::<SendMigrationRequest>(v).unwrap(),
            full
        );

        let base = || SendMigrationRequest::new(tcp("h", 1));
        let cases: Vec<(SendMigrationRequest, &str)> = vec![
            (
                SendMigrationRequest {
                    connections: 0,
                    ..base()
                },
                "connections: 0",
            ),
            (
                SendMigrationRequest {
                    connections: 17,
                    ..base()
                },
                "connections: 17",
            ),
            (
                SendMigrationRequest {
                    local: true,
                    ..base()
                },
                "local: a local migration needs a unix: destination_url, not tcp:h:1",
            ),
            (
                SendMigrationRequest {
                    downtime_limit_ms: 0,
                    ..base()
                },
                "downtime_limit_ms: 0",
            ),
            (
                SendMigrationRequest {
                    downtime_limit_ms: MAX_DOWNTIME_LIMIT_MS + 1,
                    ..base()
                },
                "downtime_limit_ms: 3600001",
            ),
            (
                SendMigrationRequest {
                    bandwidth_limit_mbps: Some(0),
                    ..base()
                },
                "bandwidth_limit_mbps: 0",
            ),
            (
                SendMigrationRequest {
                    bandwidth_limit_mbps: Some(MAX_BANDWIDTH_LIMIT_MBPS + 1),
                    ..base()
                },
                "bandwidth_limit_mbps: 10000001",
            ),
            (
                SendMigrationRequest {
                    max_iterations: Some(0),
                    ..base()
                },
                "max_iterations: 0",
            ),
            (
                SendMigrationRequest {
                    max_iterations: Some(MAX_ITERATIONS + 1),
                    ..base()
                },
                "max_iterations: 10001",
            ),
        ];
        for (r, want) in cases {
            let e = r.validate().unwrap_err();
            assert!(e.starts_with(want), "{e:?} vs {want:?}");
        }
        // Serde names the URL field; unknown fields (e.g. Cloud Hypervisor's) are refused.
        let e =
            serde_json::from_value::<SendMigrationRequest>(json!({"destination_url": "tcp://h:1"}))
                .unwrap_err();
        assert!(e.to_string().starts_with("destination_url: "), "{e}");
        assert!(serde_json::from_value::<SendMigrationRequest>(
            json!({"destination_url": "tcp:h:1", "migration_timeout": 5})
        )
        .is_err());
    }

    #[test]
    fn receive_request_checks() {
        let r: ReceiveMigrationRequest = serde_json::from_value(json!({
            "receiver_url": "tcp:[::]:6000",
            "overrides": {"disk0": {"path": "/new/img"}, "net0": {"tap": "tap1"},
                          "accel0": {"socket": "/run/x.sock"},
                          "hostdev0": {"path": "/sys/bus/pci/devices/0000:01:00.0"}}
        }))
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.overrides["net0"].tap.as_deref(), Some("tap1"));
        let plain: ReceiveMigrationRequest =
            serde_json::from_value(json!({"receiver_url": "unix:/r.sock"})).unwrap();
        assert_eq!(
            plain,
            ReceiveMigrationRequest::new(MigrationUrl::parse("unix:/r.sock").unwrap())
        );
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"receiver_url": "unix:/r.sock"})
        );
        let e = serde_json::from_value::<ReceiveMigrationRequest>(
            json!({"receiver_url": "tcp:h", "overrides": {}}),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("receiver_url: "), "{e}");
        assert!(serde_json::from_value::<ReceiveMigrationRequest>(
            json!({"receiver_url": "tcp:h:1", "overrides": {"d": {"path": "/x", "readonly": true}}})
        )
        .is_err());

        for (o, want) in [
            (json!({"bad id": {"path": "/x"}}), "overrides: \"bad id\""),
            (json!({"": {"path": "/x"}}), "overrides: \"\""),
            (
                json!({"d": {}}),
                "overrides.d: give exactly one of path, tap, socket (got none)",
            ),
            (
                json!({"d": {"path": "/x", "tap": "t"}}),
                "overrides.d: give exactly one of path, tap, socket (got path, tap)",
            ),
            (
                json!({"d": {"path": "rel/img"}}),
                "overrides.d.path: \"rel/img\" must be an absolute path",
            ),
            (json!({"d": {"socket": "x.sock"}}), "overrides.d.socket"),
            (
                json!({"d": {"socket": format!("/{}", "s".repeat(120))}}),
                "overrides.d.socket: the path is longer",
            ),
            (json!({"d": {"tap": ""}}), "overrides.d.tap"),
            (
                json!({"d": {"tap": "a-very-long-tap-name"}}),
                "overrides.d.tap",
            ),
            (json!({"d": {"tap": "a/b"}}), "overrides.d.tap"),
            (json!({"d": {"tap": "a b"}}), "overrides.d.tap"),
        ] {
            let r: ReceiveMigrationRequest =
                serde_json::from_value(json!({"receiver_url": "tcp:h:1", "overrides": o})).unwrap();
            let e = r.validate().unwrap_err();
            assert!(e.starts_with(want), "{e:?} vs {want:?}");
        }
    }

    #[test]
    fn overrides_apply_to_the_received_config() {
        let config: VmConfig = serde_json::from_value(json!({
            "disks": [{"path": "/old/root.img"}, {"path": "/old/data.img", "id": "data"}],
            "nets": [{"tap": {"name": "tap0"}}, {"tap": {"fd": 3}}],
            "user_devices": [{"socket": "/old/accel.sock", "id": "accel0"}],
            "devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0"}],
            "rng": {}
        }))
        .unwrap();
        let r: ReceiveMigrationRequest = serde_json::from_value(json!({
            "receiver_url": "tcp:h:1",
            "overrides": {"data": {"path": "/new/data.img"}, "net1": {"tap": "tap9"},
                          "accel0": {"socket": "/run/x.sock"},
                          "hostdev0": {"path": "/sys/bus/pci/devices/0000:02:00.0"}}
        }))
        .unwrap();
        let mut c = config.clone();
        r.apply_overrides(&mut c).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/old/root.img"));
        assert_eq!(c.disks[1].path, PathBuf::from("/new/data.img"));
        assert_eq!(c.nets[0].tap, TapConfig::Name("tap0".into()));
        assert_eq!(c.nets[1].tap, TapConfig::Name("tap9".into()));
        assert_eq!(c.user_devices[0].socket, PathBuf::from("/run/x.sock"));
        assert_eq!(
            c.host_devices[0].path,
            PathBuf::from("/sys/bus/pci/devices/0000:02:00.0")
        );

        for (o, want) in [
            (
                json!({"disk9": {"path": "/x"}}),
                "overrides.disk9: the migrated VM has no device \"disk9\" (its devices: disk0, data, net0, net1, rng0, accel0, hostdev0)",
            ),
            (
                json!({"disk0": {"tap": "t"}}),
                "overrides.disk0: disk0 is a disk, which takes path, not tap",
            ),
            (
                json!({"net0": {"path": "/x"}}),
                "overrides.net0: net0 is a net device, which takes tap, not path",
            ),
            (
                json!({"accel0": {"path": "/x"}}),
                "overrides.accel0: accel0 is a vfio-user device, which takes socket, not path",
            ),
            (
                json!({"rng0": {"path": "/x"}}),
                "overrides.rng0: rng0 is an entropy device, which takes no override, not path",
            ),
        ] {
            let r: ReceiveMigrationRequest =
                serde_json::from_value(json!({"receiver_url": "tcp:h:1", "overrides": o}))
                    .unwrap();
            let mut c = config.clone();
            assert_eq!(r.apply_overrides(&mut c).unwrap_err(), want);
            assert_eq!(c, config, "left unchanged");
        }
    }

    #[test]
    fn progress_shape() {
        let p = MigrationProgress::default();
        assert_eq!(p.phase, MigrationPhase::None);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"phase": "none", "iteration": 0, "bytes_sent": 0, "bytes_remaining": 0,
                   "dirty_rate_pages_per_s": 0, "bandwidth_bytes_per_s": 0,
                   "expected_downtime_ms": 0, "throttle_percent": 0, "error": null,
                   "elapsed_ms": 0, "downtime_ms": null})
        );
        for ph in MigrationPhase::ALL {
            let j = serde_json::to_value(ph).unwrap();
            assert_eq!(j, json!(ph.as_str()));
            assert_eq!(ph.to_string(), ph.as_str());
            assert_eq!(
                ph.is_final(),
                matches!(ph.as_str(), "completed" | "failed" | "cancelled")
            );
        }
        assert!(serde_json::from_value::<MigrationPhase>(json!("Precopy")).is_err());
        let p = MigrationProgress {
            phase: MigrationPhase::Precopy,
            bytes_sent: 1,
            bytes_remaining: 3,
            ..Default::default()
        };
        assert_eq!(p.fraction(), 0.25);
        assert_eq!(MigrationProgress::default().fraction(), 0.0);
        let done = MigrationProgress {
            phase: MigrationPhase::Completed,
            ..Default::default()
        };
        assert_eq!(done.fraction(), 1.0);
    }
}
