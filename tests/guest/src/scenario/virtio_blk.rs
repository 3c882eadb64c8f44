//! `virtio-blk`: negotiate, capacity, read sector 0 (compare with `blk.expect=`), write sectors
//! 1..=8 + FLUSH + read back, GET_ID, and — on a second, read-only device — check that a write
//! fails with IOERR.

use alloc::format;
use alloc::vec::Vec;

use super::report::{check, fail, or_fail, param_u64, skip};
use crate::bootinfo::BootInfo;
use crate::dma;
use crate::println;
use crate::virtio::blk::{self, Blk, F_FLUSH, S_IOERR, S_OK, S_UNSUPP};
use crate::virtio::{types, Platform};

fn pattern(i: usize) -> u8 {
    ((i / blk::SECTOR) as u8 + 1) ^ (i as u8).wrapping_mul(31) ^ 0xA5
}

/// Run the checks; panic on the first failure.
pub fn run(boot: &BootInfo) {
    let mut p = Platform::discover(boot);
    let devs = p.virtio_devices(types::BLOCK);
    let Some(&first) = devs.first() else {
        fail("no virtio-blk device (1af4:1042) on bus 0");
    };
    let t = or_fail(p.open(first));
    let mut b = or_fail(Blk::init(t, 0));
    println!("blk: capacity {}", b.capacity);
    println!("blk: features {:#x}", b.t.features);
    check("features-ok", true, "");

    // Sector 0: the host test wrote a known pattern there.
    let s0 = dma::alloc(blk::SECTOR, 4096);
    let st = or_fail(b.read(0, s0, blk::SECTOR as u32));
    check("read-sector0", st == S_OK, format!("status {st}"));
    let sector0 = dma::read_bytes(s0, blk::SECTOR);
    println!("blk: sector0 {}", dma::hex(&sector0[..16]));
    match boot.param("blk.expect") {
        Some(text) => check(
            "sector0-matches-expect",
            text.len() <= blk::SECTOR && sector0.starts_with(text.as_bytes()),
            format!("expected \"{text}\""),
        ),
        None => skip("sector0-matches-expect", "no blk.expect="),
    }

    // Write sectors 1..=8, flush, read back.
    const LEN: usize = 8 * blk::SECTOR;
    if b.read_only {
        skip("write-readback", "device is read-only");
    } else if b.capacity < 9 {
        skip("write-readback", "capacity below 9 sectors");
    } else {
        let out = dma::alloc(LEN, 4096);
        let data: Vec<u8> = (0..LEN).map(pattern).collect();
        dma::write_bytes(out, &data);
        let st = or_fail(b.write(1, out, LEN as u32));
        check("write-sectors-1-8", st == S_OK, format!("status {st}"));
        if b.t.features & F_FLUSH != 0 {
            let st = or_fail(b.flush());
            check("flush", st == S_OK, format!("status {st}"));
        } else {
            skip("flush", "no VIRTIO_BLK_F_FLUSH");
        }
        let back = dma::alloc(LEN, 4096);
        let st = or_fail(b.read(1, back, LEN as u32));
        check("read-sectors-1-8", st == S_OK, format!("status {st}"));
        let got = dma::read_bytes(back, LEN);
        let first_diff = got.iter().zip(&data).position(|(a, b)| a != b);
        check(
            "readback-matches",
            first_diff.is_none(),
            format!("first difference at byte {}", first_diff.unwrap_or(0)),
        );
    }

    // GET_ID.
    let (st, id) = or_fail(b.get_id());
    match st {
        S_OK => {
            println!("blk: serial {}", id);
            check("get-id", true, "");
        }
        S_UNSUPP => {
            println!("blk: serial (unsupported)");
            skip("get-id", "device answered UNSUPP");
        }
        _ => check("get-id", false, format!("status {st}")),
    }

    // A second device: if it is read-only, a write must fail with IOERR.
    let require_ro = param_u64(boot, "blk.require_ro", 0) != 0;
    match devs.get(1) {
        Some(&second) => {
            let t = or_fail(p.open(second));
            let mut b2 = or_fail(Blk::init(t, 0));
            println!(
                "blk: second device {} capacity {} read-only {}",
                second.bdf,
                b2.capacity,
                if b2.read_only { "yes" } else { "no" }
            );
            if b2.read_only {
                let buf = dma::alloc(blk::SECTOR, 4096);
                dma::fill(buf, blk::SECTOR, 0xEE);
                let st = or_fail(b2.write(0, buf, blk::SECTOR as u32));
                check(
                    "readonly-rejects-write",
                    st == S_IOERR,
                    format!("status {st}, expected {S_IOERR} (IOERR)"),
                );
            } else if require_ro {
                check(
                    "readonly-rejects-write",
                    false,
                    "second device does not offer VIRTIO_BLK_F_RO",
                );
            } else {
                skip("readonly-rejects-write", "second device is not read-only");
            }
        }
        None if require_ro => check(
            "readonly-rejects-write",
            false,
            "no second virtio-blk device",
        ),
        None => skip("readonly-rejects-write", "no second virtio-blk device"),
    }
    println!("result: PASS");
}
