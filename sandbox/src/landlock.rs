//! Optional filesystem confinement (`--landlock`): after [`restrict`], the process can open only
//! the paths its rules name (and what lies beneath them), with the access each rule grants.
//! Landlock applies to the calling thread and the threads it starts later, so the binary calls
//! this on its main thread before it starts any other.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

use crate::SandboxError;

/// The Landlock ABI whose filesystem rights skiff handles: v5 adds ioctls on device files, so
/// /dev/kvm, /dev/net/tun and VFIO need a rule too.
const HANDLED_ABI: ABI = ABI::V5;

/// What a rule lets the process do with a path and what lies beneath it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathAccess {
    /// Read files and list directories (kernels, read-only disks, snapshots to restore).
    Read,
    /// Everything: read, write, create, remove, truncate, device ioctls (writable disks, output
    /// files, snapshot directories, device nodes).
    ReadWrite,
    /// Create and remove Unix sockets in a directory, and list it (the API socket's directory).
    SocketDir,
}

/// One path the process may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    /// The path (a file or a directory; it must exist).
    pub path: PathBuf,
    /// What may be done with it.
    pub access: PathAccess,
}

impl PathRule {
    /// A rule for `path` with `access`.
    pub fn new(path: impl Into<PathBuf>, access: PathAccess) -> Self {
        Self {
            path: path.into(),
            access,
        }
    }
}

impl FromStr for PathAccess {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "r" => Ok(PathAccess::Read),
            "rw" => Ok(PathAccess::ReadWrite),
            _ => Err(SandboxError::LandlockAccess(s.to_string())),
        }
    }
}

fn rights(access: PathAccess) -> BitFlags<AccessFs> {
    match access {
        PathAccess::Read => AccessFs::from_read(HANDLED_ABI),
        PathAccess::ReadWrite => AccessFs::from_all(HANDLED_ABI),
        PathAccess::SocketDir => AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ReadDir,
    }
}

fn rule(r: &PathRule) -> Result<PathBeneath<PathFd>, SandboxError> {
    let bad = |why: String| SandboxError::LandlockPath {
        path: r.path.clone(),
        why,
    };
    let fd = PathFd::new(&r.path).map_err(|e| bad(e.to_string()))?;
    let mut access = rights(r.access);
    if !is_dir(&r.path) {
        // Directory rights (list, create, remove) mean nothing on a file, and Landlock refuses
        // a rule that asks for them there.
        access &= AccessFs::from_file(HANDLED_ABI);
        if access.is_empty() {
            return Err(bad("not a directory".into()));
        }
    }
    Ok(PathBeneath::new(fd, access))
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

/// Confine the calling thread (and every thread it starts afterwards) to `rules`. Fails, and
/// changes nothing, if a path does not exist; fails if the kernel does not enforce Landlock.
pub fn restrict(rules: &[PathRule]) -> Result<(), SandboxError> {
    let landlock = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let beneath = rules.iter().map(rule).collect::<Result<Vec<_>, _>>()?;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED_ABI))
        .map_err(landlock)?
        .create()
        .map_err(landlock)?
        .add_rules(beneath.into_iter().map(Ok::<_, landlock::RulesetError>))
        .map_err(landlock)?
        .restrict_self()
        .map_err(landlock)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced => log::warn!(
            "--landlock: this kernel enforces only part of the filesystem rules (an older Landlock ABI)"
        ),
        RulesetStatus::NotEnforced => return Err(SandboxError::LandlockUnsupported),
    }
    for r in rules {
        log::debug!("landlock: {:?} {}", r.access, r.path.display());
    }
    log::info!("landlock: confined to {} path(s)", rules.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` on a new thread (Landlock confines only the calling thread and its children, so
    /// the test harness stays free).
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-landlock-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_the_named_paths_can_be_opened() {
        let inside = temp("inside");
        let outside = temp("outside");
        std::fs::write(inside.join("a"), b"in").unwrap();
        std::fs::write(outside.join("b"), b"out").unwrap();
        let readable = outside.join("readable");
        std::fs::write(&readable, b"r").unwrap();
        let (i, o, r, w) = (
            inside.clone(),
            outside.clone(),
            readable.clone(),
            readable.clone(),
        );
        let got = on_own_thread(move || {
            restrict(&[
                PathRule::new(&i, PathAccess::ReadWrite),
                PathRule::new(&r, PathAccess::Read),
            ])
            .unwrap();
            (
                std::fs::read(i.join("a")).map_err(|e| e.kind()),
                std::fs::write(i.join("new"), b"x").map_err(|e| e.kind()),
                std::fs::read(o.join("b")).map_err(|e| e.kind()),
                std::fs::read(&r).map_err(|e| e.kind()),
                std::fs::write(&w, b"w").map_err(|e| e.kind()),
            )
        });
        assert_eq!(got.0, Ok(b"in".to_vec()));
        assert_eq!(got.1, Ok(()));
        assert_eq!(got.2, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(got.3, Ok(b"r".to_vec()));
        assert_eq!(got.4, Err(std::io::ErrorKind::PermissionDenied));
        // This thread was never confined.
        assert_eq!(std::fs::read(outside.join("b")).unwrap(), b"out");
        let _ = std::fs::remove_dir_all(inside);
        let _ = std::fs::remove_dir_all(outside);
    }

    #[test]
    fn a_missing_path_is_refused_before_anything_is_confined() {
        let missing = std::env::temp_dir().join("skiff-landlock-no-such-path");
        let (m, e) = on_own_thread(move || {
            let e = restrict(&[PathRule::new(&missing, PathAccess::Read)])
                .unwrap_err()
                .to_string();
            // Still unconfined: anything can be read.
            (std::fs::metadata("/proc/self/status").is_ok(), e)
        });
        assert!(m);
        assert!(e.contains("skiff-landlock-no-such-path"), "{e}");
    }

    #[test]
    fn access_words_parse() {
        assert_eq!("r".parse::<PathAccess>().unwrap(), PathAccess::Read);
        assert_eq!("rw".parse::<PathAccess>().unwrap(), PathAccess::ReadWrite);
        assert!("x".parse::<PathAccess>().is_err());
    }
}
