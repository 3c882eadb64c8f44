//! `--landlock`: the paths the process is confined to — those of the VM configuration given on
//! the command line, the snapshot to restore, the API socket's directory, what every VM needs
//! (/dev/kvm and the process's own /proc entries), and the user's `--landlock-rules` (snapshot
//! and migration directories, and the files of VMs created later through the API).

use std::path::Path;

use api_server::config::VmConfig;
use sandbox::landlock::{PathAccess, PathRule};

use crate::config::{parse_options, ConfigError};

/// What every VM uses, whatever its configuration.
const ALWAYS: &[(&str, PathAccess)] = &[
    ("/dev/kvm", PathAccess::ReadWrite),
    // Memory accounting and the memory-overhead log read these.
    ("/proc/self", PathAccess::Read),
    ("/proc/meminfo", PathAccess::Read),
];

/// Parse one `--landlock-rules path=PATH,access=r|rw`.
pub fn parse_landlock_rule(s: &str) -> Result<PathRule, ConfigError> {
    let o = parse_options("landlock-rules", s, &["path", "access"])?;
    let invalid = |msg: String| ConfigError::Invalid(format!("--landlock-rules: {msg}"));
    let path = o
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid("missing path=PATH".into()))?;
    let access = o
        .get("access")
        .ok_or_else(|| invalid("missing access=r|rw".into()))?
        .parse::<PathAccess>()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(PathRule::new(path, access))
}

/// The rules for `--landlock`: `config` is the VM booted from the command line (if any),
/// `restore_dir` the snapshot restored at start, `api_socket` the API socket (its directory
/// gets socket rights so the socket can be created and removed), `extra` the user's rules.
/// Output files of `config` (serial, console) are created here when missing, so they can be
/// named.
pub fn landlock_rules(
    config: Option<&VmConfig>,
    restore_dir: Option<&Path>,
    api_socket: Option<&Path>,
    extra: &[PathRule],
) -> std::io::Result<Vec<PathRule>> {
    let mut rules: Vec<PathRule> = ALWAYS.iter().map(|(p, a)| PathRule::new(*p, *a)).collect();
    for h in config.map(VmConfig::host_paths).unwrap_or_default() {
        if h.output && !h.rule.path.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&h.rule.path)?;
        }
        rules.push(h.rule);
    }
    if let Some(dir) = restore_dir {
        rules.push(PathRule::new(dir, PathAccess::Read));
    }
    if let Some(socket) = api_socket {
        let dir = match socket.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::env::current_dir()?,
        };
        rules.push(PathRule::new(dir, PathAccess::SocketDir));
    }
    rules.extend(extra.iter().cloned());
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_rules_parse_and_bad_ones_are_refused() {
        let r = parse_landlock_rule("path=/srv/snap,access=rw").unwrap();
        assert_eq!(r, PathRule::new("/srv/snap", PathAccess::ReadWrite));
        for bad in [
            "path=/x",
            "access=r",
            "path=/x,access=x",
            "path=/x,access=r,mode=1",
        ] {
            assert!(parse_landlock_rule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_api_socket_directory_gets_socket_rights() {
        let rules =
            landlock_rules(None, None, Some(Path::new("/run/skiff/api.sock")), &[]).unwrap();
        assert!(rules.contains(&PathRule::new("/run/skiff", PathAccess::SocketDir)));
        assert!(rules.contains(&PathRule::new("/dev/kvm", PathAccess::ReadWrite)));
    }
}
