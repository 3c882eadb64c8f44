//! `hostile`: malformed descriptor chains against virtio-blk (and virtio-rng, if present). After
//! each one the guest waits for the chain to come back (or a timeout), prints what happened,
//! resets the device if it reports NEEDS_RESET, and checks that a good request still works.
//!
//! With `hostile.garbage_avail=1` only one case runs instead: the driver publishes an available
//! index further ahead than the queue has entries, which no device can serve; the device must
//! report NEEDS_RESET, and after a reset serve good requests again.
//!
//! Every bad buffer is harmless to the guest if the device honours it: device-writable bad
//! buffers point at unmapped addresses or at a scratch page, and the huge buffer is a
//! device-*readable* one (a write to the last sector).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::report::{check, fail, or_fail, param_u64};
use crate::arch::time::Deadline;
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::println;
use crate::virtio::blk::{self, Blk, S_OK, T_IN, T_OUT};
use crate::virtio::queue::{
    self, Buf, Used, Virtqueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use crate::virtio::rng::Rng;
use crate::virtio::{status, types, Platform, Transport, F_INDIRECT_DESC};

/// Guest-physical address far outside any guest RAM.
const BAD_ADDR: u64 = 0x7_0000_0000_0000;

/// The malformed virtio-blk requests, in order.
pub const BLK_CASES: [&str; 7] = [
    "loop",
    "too-long",
    "bad-address",
    "zero-length",
    "huge-length",
    "wrong-direction",
    "no-status",
];

/// The malformed virtio-rng requests, in order.
pub const RNG_CASES: [&str; 4] = [
    "rng-loop",
    "rng-bad-address",
    "rng-zero-length",
    "rng-wrong-direction",
];

/// Wait for `head` to come back, stopping early if the device sets NEEDS_RESET.
fn wait(q: &mut Virtqueue, t: &Transport, head: u16, ms: u64) -> Option<Used> {
    let deadline = Deadline::after_ms(ms);
    loop {
        while let Some(u) = q.poll() {
            if u.id == u32::from(head) {
                return Some(u);
            }
        }
        if deadline.expired() || t.status() & status::NEEDS_RESET != 0 {
            return q.poll().filter(|u| u.id == u32::from(head));
        }
        crate::arch::time::delay_us(200);
    }
}

/// Print the outcome line of a case.
fn report(case: &str, used: Option<Used>, status_byte: Option<u8>) {
    match (used, status_byte) {
        (Some(u), Some(s)) => println!("hostile: {} -> status {} len {}", case, s, u.len),
        (Some(u), None) => println!("hostile: {} -> len {}", case, u.len),
        (None, _) => println!("hostile: {} -> no completion", case),
    }
}

/// If the device asks for a reset, say so and (unless `hostile.noreset=1`) reset it.
fn needs_reset(case: &str, t: &Transport, noreset: bool) -> bool {
    let s = t.status();
    if s & (status::NEEDS_RESET | status::FAILED) == 0 {
        return false;
    }
    println!(
        "hostile: {} -> device status {:#04x} (NEEDS_RESET), resetting",
        case, s
    );
    if noreset {
        fail(format!("{case}: device needed a reset (hostile.noreset=1)"));
    }
    true
}

/// Submit one malformed blk request; returns (head, whether it has a status byte).
fn submit_blk_case(b: &mut Blk, case: &str, scratch: u64) -> Option<(u16, bool)> {
    let hdr = b.header_addr();
    let st = b.status_addr();
    let sector_bytes = blk::SECTOR as u32;
    let plain = |b: &mut Blk, kind: u32, sector: u64, bufs: &[Buf], has_status: bool| {
        b.prepare(kind, sector);
        b.q.submit(bufs).map(|h| (h, has_status))
    };
    match case {
        "loop" => {
            b.prepare(T_IN, 0);
            let d = b.q.alloc_descs(3)?;
            b.q.write_desc(d[0], hdr, 16, DESC_F_NEXT, d[1]);
            b.q.write_desc(
                d[1],
                scratch,
                sector_bytes,
                DESC_F_WRITE | DESC_F_NEXT,
                d[2],
            );
            b.q.write_desc(d[2], st, 1, DESC_F_WRITE | DESC_F_NEXT, d[0]);
            b.q.publish(d[0], d.clone());
            Some((d[0], true))
        }
        "too-long" if b.indirect() => {
            let data = usize::from(b.q.size).max(1024) + 1;
            let n = data + 2;
            println!(
                "hostile: too-long uses an indirect table of {} descriptors",
                n
            );
            b.prepare(T_IN, 0);
            let table = dma::alloc(16 * n, 16);
            queue::write_desc(table, 0, hdr, 16, DESC_F_NEXT, 1);
            for i in 1..=data as u16 {
                queue::write_desc(
                    table,
                    i,
                    scratch,
                    sector_bytes,
                    DESC_F_WRITE | DESC_F_NEXT,
                    i + 1,
                );
            }
            queue::write_desc(table, (n - 1) as u16, st, 1, DESC_F_WRITE, 0);
            let d = b.q.alloc_descs(1)?;
            b.q.write_desc(d[0], table, (16 * n) as u32, DESC_F_INDIRECT, 0);
            b.q.publish(d[0], d.clone());
            Some((d[0], true))
        }
        "too-long" => {
            let n = b.q.free_count();
            if n < 3 {
                return None;
            }
            println!("hostile: too-long loops through all {} descriptors", n);
            b.prepare(T_IN, 0);
            let d = b.q.alloc_descs(n)?;
            b.q.write_desc(d[0], hdr, 16, DESC_F_NEXT, d[1]);
            for k in 1..n - 1 {
                b.q.write_desc(
                    d[k],
                    scratch,
                    sector_bytes,
                    DESC_F_WRITE | DESC_F_NEXT,
                    d[k + 1],
                );
            }
            b.q.write_desc(d[n - 1], st, 1, DESC_F_WRITE | DESC_F_NEXT, d[0]);
            b.q.publish(d[0], d.clone());
            Some((d[0], true))
        }
        "bad-address" => plain(
            b,
            T_IN,
            0,
            &[
                Buf::out(hdr, 16),
                Buf::input(BAD_ADDR, sector_bytes),
                Buf::input(st, 1),
            ],
            true,
        ),
        "zero-length" => plain(
            b,
            T_IN,
            0,
            &[Buf::out(hdr, 16), Buf::input(scratch, 0), Buf::input(st, 1)],
            true,
        ),
        "huge-length" => {
            let last = b.capacity.saturating_sub(1);
            plain(
                b,
                T_OUT,
                last,
                &[
                    Buf::out(hdr, 16),
                    Buf::out(scratch, 0xFFFF_F000),
                    Buf::input(st, 1),
                ],
                true,
            )
        }
        "wrong-direction" => plain(
            b,
            T_IN,
            0,
            &[
                Buf::out(hdr, 16),
                Buf::out(scratch, sector_bytes),
                Buf::input(st, 1),
            ],
            true,
        ),
        "no-status" => plain(b, T_IN, 0, &[Buf::out(hdr, 16)], false),
        _ => unreachable!(),
    }
}

fn good_blk_read(b: &mut Blk) -> Result<Vec<u8>, String> {
    let buf = dma::alloc(blk::SECTOR, 4096);
    match b.read(0, buf, blk::SECTOR as u32)? {
        S_OK => Ok(dma::read_bytes(buf, blk::SECTOR)),
        s => Err(format!("status {s}")),
    }
}

fn submit_rng_case(r: &mut Rng, case: &str, scratch: u64) -> Option<u16> {
    match case {
        "rng-loop" => {
            let d = r.q.alloc_descs(2)?;
            r.q.write_desc(d[0], scratch, 64, DESC_F_WRITE | DESC_F_NEXT, d[1]);
            r.q.write_desc(d[1], scratch + 64, 64, DESC_F_WRITE | DESC_F_NEXT, d[0]);
            r.q.publish(d[0], d.clone());
            Some(d[0])
        }
        "rng-bad-address" => r.q.submit(&[Buf::input(BAD_ADDR, 64)]),
        "rng-zero-length" => r.q.submit(&[Buf::input(scratch, 0)]),
        "rng-wrong-direction" => r.q.submit(&[Buf::out(scratch, 64)]),
        _ => unreachable!(),
    }
}

/// The garbage-available-index case (see the module documentation).
fn garbage_avail(b: &mut Blk, baseline: &[u8], wait_ms: u64) {
    let ahead = b.q.size + 1;
    b.q.publish_bogus_avail_idx(ahead);
    let deadline = Deadline::after_ms(wait_ms);
    while b.t.status() & status::NEEDS_RESET == 0 && !deadline.expired() {
        crate::arch::time::delay_us(200);
    }
    let s = b.t.status();
    println!(
        "hostile: garbage-avail ({} entries ahead) -> device status {:#04x}",
        ahead, s
    );
    check(
        "garbage-avail-needs-reset",
        s & status::NEEDS_RESET != 0,
        format!("device status {s:#04x} without NEEDS_RESET"),
    );
    or_fail(b.reinit());
    let good = good_blk_read(b);
    check(
        "garbage-avail-then-good-read",
        matches!(&good, Ok(data) if data.as_slice() == baseline),
        match &good {
            Ok(_) => String::from("sector 0 changed"),
            Err(e) => e.clone(),
        },
    );
}

/// Run the scenario; panic on failure.
pub fn run(boot: &BootInfo) {
    let wait_ms = param_u64(boot, "hostile.wait_ms", 2_000);
    let noreset = param_u64(boot, "hostile.noreset", 0) != 0;
    let mut p = Platform::discover(boot);

    // virtio-blk
    let Some(&dev) = p.virtio_devices(types::BLOCK).first() else {
        fail("no virtio-blk device (1af4:1042) on bus 0");
    };
    let t = or_fail(p.open(dev));
    let mut b = or_fail(Blk::init(t, F_INDIRECT_DESC));
    println!(
        "hostile: virtio-blk {} queue size {} indirect {}",
        dev.bdf,
        b.q.size,
        if b.indirect() { "yes" } else { "no" }
    );
    let baseline = or_fail(good_blk_read(&mut b));
    if param_u64(boot, "hostile.garbage_avail", 0) != 0 {
        garbage_avail(&mut b, &baseline, wait_ms);
        println!("result: PASS");
        return;
    }
    for case in BLK_CASES {
        let scratch = dma::alloc(4096, 4096);
        let submitted = submit_blk_case(&mut b, case, scratch);
        let Some((head, has_status)) = submitted else {
            fail(format!("{case}: could not build the request (queue full)"));
        };
        let used = wait(&mut b.q, &b.t, head, wait_ms);
        report(case, used, has_status.then(|| b.status()));
        if needs_reset(case, &b.t, noreset) {
            or_fail(b.reinit());
        }
        let mut good = good_blk_read(&mut b);
        // The device may only trip over the bad chain when the next request arrives.
        if good.is_err() && needs_reset(case, &b.t, noreset) {
            or_fail(b.reinit());
            good = good_blk_read(&mut b);
        }
        check(
            &format!("{case}-then-good-read"),
            matches!(&good, Ok(data) if *data == baseline),
            match &good {
                Ok(_) => String::from("sector 0 changed"),
                Err(e) => e.clone(),
            },
        );
    }

    // virtio-rng (optional)
    match p.virtio_devices(types::RNG).first() {
        Some(&dev) => {
            let t = or_fail(p.open(dev));
            let mut r = or_fail(Rng::init(t, None));
            for case in RNG_CASES {
                let scratch = dma::alloc(4096, 4096);
                let Some(head) = submit_rng_case(&mut r, case, scratch) else {
                    fail(format!("{case}: could not build the request (queue full)"));
                };
                let used = wait(&mut r.q, &r.t, head, wait_ms);
                report(case, used, None);
                if needs_reset(case, &r.t, noreset) {
                    or_fail(r.reinit());
                }
                let mut good = r.read(16);
                // virtio-rng may look at the bad buffer only once a good one asks for data.
                if good.is_err() && needs_reset(case, &r.t, noreset) {
                    or_fail(r.reinit());
                    good = r.read(16);
                }
                check(
                    &format!("{case}-then-good-read"),
                    good.is_ok(),
                    good.err().unwrap_or_default(),
                );
            }
        }
        None => println!("hostile: no virtio-rng; rng cases skipped"),
    }
    println!("hostile: device still serves good requests ok");
    println!("result: PASS");
}
