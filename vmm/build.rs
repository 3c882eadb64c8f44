//! Builds the test guest and embeds it in `skiff` as the built-in demo guest.

fn main() {
    let elf = guest_build::build();
    println!("cargo:rustc-env=SKIFF_DEMO_GUEST={}", elf.display());
}
