//! `virtio-console`: send `console: hello from the guest` + newline through the transmit queue
//! (queue 1) of the first virtio-console, as a single-port console.

use super::report::{check, fail, or_fail};
use crate::bootinfo::BootInfo;
use crate::println;
use crate::virtio::console::{Console, F_MULTIPORT};
use crate::virtio::{types, Platform};

/// What the guest writes to the console.
pub const MESSAGE: &[u8] = b"console: hello from the guest\n";

/// Run the scenario; panic on failure.
pub fn run(boot: &BootInfo) {
    let mut p = Platform::discover(boot);
    let Some(&dev) = p.virtio_devices(types::CONSOLE).first() else {
        fail("no virtio-console device (1af4:1043) on bus 0");
    };
    let t = or_fail(p.open(dev));
    let offered_multiport = t.device_features() & F_MULTIPORT != 0;
    let mut c = or_fail(Console::init(t));
    if offered_multiport {
        println!("console: device offers MULTIPORT; not accepted (single port)");
    }
    check("features-ok", true, "");
    or_fail(c.write(MESSAGE));
    println!(
        "console: sent {} bytes on the transmit queue",
        MESSAGE.len()
    );
    check("console-tx", true, "");
    println!("result: PASS");
}
