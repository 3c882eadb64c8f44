//! Builds the test guest so the integration tests can boot it with `--kernel`.

fn main() {
    let elf = guest_build::build();
    println!("cargo:rustc-env=SKIFF_TEST_GUEST={}", elf.display());
}
