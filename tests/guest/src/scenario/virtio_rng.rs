//! `virtio-rng`: two 64-byte reads; neither may be constant and they must differ.

use alloc::format;

use super::report::{check, fail, or_fail};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::println;
use crate::virtio::rng::Rng;
use crate::virtio::{types, Platform};

/// Run the scenario; panic on failure.
pub fn run(boot: &BootInfo) {
    let mut p = Platform::discover(boot);
    let Some(&dev) = p.virtio_devices(types::RNG).first() else {
        fail("no virtio-rng device (1af4:1044) on bus 0");
    };
    let t = or_fail(p.open(dev));
    let mut rng = or_fail(Rng::init(t, None));
    check("features-ok", true, "");
    let a = or_fail(rng.read(64));
    let b = or_fail(rng.read(64));
    println!("rng: {}", dma::hex(&a[..16]));
    let constant = |v: &[u8]| v.iter().all(|&x| x == v[0]);
    check(
        "rng-not-constant",
        !constant(&a) && !constant(&b),
        format!("{} / {}", dma::hex(&a), dma::hex(&b)),
    );
    check("rng-reads-differ", a != b, dma::hex(&a));
    println!("result: PASS");
}
