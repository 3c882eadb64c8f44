//! Link the guest at 1 MiB with our own linker script.
//!
//! Everything is passed as link arguments from here (not from `.cargo/config.toml`) so that the
//! build works no matter which directory cargo is started from, e.g.
//! `cargo build --release --target x86_64-unknown-none --manifest-path tests/guest/Cargo.toml`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");

    // Only meaningful for the bare-metal target; a host `cargo check` must not get lld flags.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        // x86_64-unknown-none links a static PIE by default; the guest runs at its link address and
        // the 32-bit boot code needs absolute addresses, so link a plain static executable.
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
        println!("cargo:rustc-link-arg-bins=--build-id=none");
    }
}
