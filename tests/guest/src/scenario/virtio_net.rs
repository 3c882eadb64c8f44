//! `virtio-net`: negotiate (MAC), print the MAC, send a broadcast frame (EtherType 0x88B5,
//! payload `skiff-guest-hello`), then wait for a frame whose payload starts with
//! `skiff-host-hello`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::report::{check, fail, or_fail, param_u64};
use crate::arch::time::Deadline;
use crate::bootinfo::BootInfo;
use crate::println;
use crate::virtio::net::Net;
use crate::virtio::{types, Platform};

/// EtherType of the test frames (IEEE local experimental 2).
pub const ETHERTYPE: u16 = 0x88B5;
/// Payload the guest sends.
pub const GUEST_HELLO: &[u8] = b"skiff-guest-hello";
/// Payload prefix the guest waits for.
pub const HOST_HELLO: &[u8] = b"skiff-host-hello";

fn mac_str(mac: &[u8]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// Run the scenario; panic on failure.
pub fn run(boot: &BootInfo) {
    let timeout_ms = param_u64(boot, "net.timeout_ms", 60_000);
    let resend_ms = param_u64(boot, "net.resend_ms", 5_000);
    let mut p = Platform::discover(boot);
    let Some(&dev) = p.virtio_devices(types::NET).first() else {
        fail("no virtio-net device (1af4:1041) on bus 0");
    };
    let t = or_fail(p.open(dev));
    let mut net = or_fail(Net::init(t, 16));
    println!("net: mac {}", mac_str(&net.mac));
    check("features-ok", true, "");

    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&[0xFF; 6]);
    frame.extend_from_slice(&net.mac);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(GUEST_HELLO);
    frame.resize(60, 0);
    or_fail(net.send(&frame));
    println!("net: sent guest frame ({} bytes)", frame.len());
    check("tx", true, "");

    let deadline = Deadline::after_ms(timeout_ms);
    let mut resend = Deadline::after_ms(resend_ms);
    let (mut sends, mut ignored) = (1u32, 0u32);
    loop {
        if let Some(rx) = or_fail(net.poll_rx()) {
            let matches = rx.len() >= 14
                && u16::from_be_bytes([rx[12], rx[13]]) == ETHERTYPE
                && rx[14..].starts_with(HOST_HELLO);
            if matches {
                println!("net: received host frame");
                println!(
                    "net: host frame from {} ({} bytes; {} guest frame(s) sent, {} other frame(s) ignored)",
                    mac_str(&rx[6..12]),
                    rx.len(),
                    sends,
                    ignored
                );
                check("rx", true, "");
                break;
            }
            ignored += 1;
            continue;
        }
        if deadline.expired() {
            check(
                "rx",
                false,
                format!(
                    "no skiff-host-hello frame within {timeout_ms} ms ({sends} guest frame(s) sent, {ignored} other frame(s) ignored)"
                ),
            );
        }
        if resend_ms != 0 && resend.expired() {
            or_fail(net.send(&frame));
            sends += 1;
            resend = Deadline::after_ms(resend_ms);
        }
        core::hint::spin_loop();
    }
    println!("result: PASS");
}
