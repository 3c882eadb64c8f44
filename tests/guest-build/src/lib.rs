//! Builds the no_std test guest (`tests/guest`) for `x86_64-unknown-none` from a build script.
//!
//! Both the `skiff` binary (which embeds the guest as its built-in demo) and the integration tests
//! (which boot it with `--kernel`) call [`build`]. They share one target directory, so the guest is
//! compiled once and the second call is a no-op.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Target triple the guest is built for (soft-float, no SSE: friendly to KVM's instruction emulator).
pub const GUEST_TARGET: &str = "x86_64-unknown-none";

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest")
}

fn target_dir() -> PathBuf {
    let base = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    base.join("test-guest")
}

fn cargo_build(manifest: &Path, target_dir: &Path) -> std::io::Result<std::process::Output> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--target",
        GUEST_TARGET,
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(target_dir);
    // Flags meant for the host build (or clippy's wrapper) must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    cmd.output()
}

/// Build the test guest and return the path of its ELF image (`SKIFF_PREBUILT_GUEST` names a
/// ready-made one instead).
///
/// Prints `cargo:rerun-if-changed` lines for the guest's sources. Panics (failing the calling
/// build script with the message) when the guest cannot be built; if the target is missing and
/// `rustup` is available, it is installed first.
pub fn build() -> PathBuf {
    println!("cargo:rerun-if-env-changed=SKIFF_PREBUILT_GUEST");
    if let Some(p) = env::var_os("SKIFF_PREBUILT_GUEST") {
        // A guest ELF built elsewhere (e.g. while the guest sources are being edited).
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "SKIFF_PREBUILT_GUEST={} does not exist",
            p.display()
        );
        return p;
    }
    let dir = guest_dir();
    for f in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "linker.ld"] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = dir.join("Cargo.toml");
    let tdir = target_dir();
    let mut out = cargo_build(&manifest, &tdir).unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("target may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            println!("cargo:warning=installing the {GUEST_TARGET} target with rustup");
            let ok = Command::new("rustup")
                .args(["target", "add", GUEST_TARGET])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                out = cargo_build(&manifest, &tdir)
                    .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
            }
        }
    }
    if !out.status.success() {
        panic!(
            "building the test guest failed (needs `rustup target add {GUEST_TARGET}`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let elf = tdir
        .join(GUEST_TARGET)
        .join("release")
        .join("skiff-test-guest");
    assert!(
        elf.exists(),
        "test guest built but {} is missing",
        elf.display()
    );
    elf
}
