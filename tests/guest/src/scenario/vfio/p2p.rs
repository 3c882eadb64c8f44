//! Peer-to-peer writes into another device's memory, and their refusal for a p2p=off peer.

use super::*;

/// Offsets of the 32-bit words covering `[off - GUARD, off + len + GUARD)`.
pub(super) fn mem_words(off: u64, len: u32) -> impl Iterator<Item = u64> {
    let start = (off - GUARD as u64) & !3;
    let end = (off + u64::from(len) + GUARD as u64).next_multiple_of(4);
    (start..end).step_by(4)
}

/// Fill `[off - GUARD, off + len + GUARD)` of `d`'s device memory with [`MEM_SENTINEL`].
pub(super) fn mem_fill(d: &Dev, off: u64, len: u32) {
    for o in mem_words(off, len) {
        dma::write::<u32>(d.mem + o, MEM_SENTINEL);
    }
}

/// First offset in the guard bands around `[off, off + len)` that lost the sentinel.
pub(super) fn mem_guard_damage(d: &Dev, off: u64, len: u32) -> Option<u64> {
    let s = MEM_SENTINEL.to_le_bytes();
    (off - GUARD as u64..off)
        .chain(off + u64::from(len)..off + u64::from(len) + GUARD as u64)
        .find(|&o| dma::read::<u8>(d.mem + o) != s[(o % 4) as usize])
}

/// The address `src` must use to reach `dst`'s device memory at `off`: behind the IOMMU a
/// fresh IOVA mapped (MMIO) in `src`'s domain, else the guest-physical address. Err: the MAP
/// was refused (its status).
pub(super) fn peer_addr(
    src: &Dev,
    dst: &Dev,
    ctx: &mut Option<IommuCtx>,
    off: u64,
    len: u32,
) -> Result<u64, String> {
    match (src.iommu, ctx.as_mut()) {
        (Some(t), Some(c)) => {
            let flags = MAP_F_READ | MAP_F_WRITE | c.mmio_flag;
            map_range(
                &mut c.io,
                &mut c.space,
                t.domain,
                dst.mem + off,
                len as usize,
                flags,
            )
        }
        _ => Ok(dst.mem + off),
    }
}

/// `src` P2P_WRITEs a pattern into `dst`'s device memory; the guest reads it there.
pub(super) fn p2p(src: &Dev, dst: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params, check: &str) {
    let len = prm.p2p_len;
    let off = P2P_OFFSET;
    mem_fill(dst, off, len);
    let addr = peer_addr(src, dst, ctx, off, len).unwrap_or_else(|e| bad(check, Some(src), e));
    println!(
        "vfio: p2p {} -> {} bar{} +{:#x} at {} {:#x} len {}",
        src.name,
        dst.name,
        regs::MEMORY_BAR,
        off,
        if src.iommu.is_some() { "iova" } else { "gpa" },
        addr,
        len
    );
    let seed = 0x9292_0000 ^ u32::from(src.func.bdf.dev);
    let peer0 = dst.rd(regs::REG_PEER_WRITES);
    src.run_ok(
        check,
        &Cmd {
            seed,
            ..Cmd::new(regs::CMD_P2P_WRITE, addr, len)
        },
        prm.timeout_ms,
    );
    if let Some(i) = (0..len)
        .find(|&i| dma::read::<u8>(dst.mem + off + u64::from(i)) != regs::pattern_byte(seed, i))
    {
        bad(
            check,
            Some(dst),
            format!(
                "device memory byte {i} is {:#04x}, pattern says {:#04x}",
                dma::read::<u8>(dst.mem + off + u64::from(i)),
                regs::pattern_byte(seed, i)
            ),
        );
    }
    if let Some(o) = mem_guard_damage(dst, off, len) {
        bad(
            check,
            Some(dst),
            format!("the peer write reached device memory +{o:#x}, outside its range"),
        );
    }
    let peer1 = dst.rd(regs::REG_PEER_WRITES);
    expect(
        check,
        Some(src),
        peer1 != peer0,
        format!("the peer's REG_PEER_WRITES stayed at {peer0}"),
    );
}

/// The p2p=off peer (`b`): `a`'s P2P_WRITE into it fails with ERR_DMA and leaves it unchanged;
/// `b`'s P2P_WRITE into `a` fails too; both keep doing DMA to guest RAM.
pub(super) fn p2p_refused(a: &Dev, b: &Dev, ctx: &mut Option<IommuCtx>, prm: &Params) {
    let len = prm.p2p_len;
    let off = P2P_OFFSET;
    let t = prm.timeout_ms;
    let mut cases = Vec::from([(
        a,
        b,
        "p2p-off-peer-refused",
        "vfio: p2p to a p2p=off peer refused",
    )]);
    if prm.p2p_off_reverse {
        cases.push((
            b,
            a,
            "p2p-off-source-refused",
            "vfio: p2p from a p2p=off device refused",
        ));
    } else {
        println!("vfio: p2p-off-source-refused skipped (vfio.p2p_off_reverse=0)");
    }
    for (src, dst, check, line) in cases {
        mem_fill(dst, off, len);
        // Device memory just filled, as 32-bit words: the refused write must leave all of it.
        let addr = match peer_addr(src, dst, ctx, off, len) {
            Ok(a) => a,
            Err(e) => {
                // The IOMMU refused to map the peer's BAR: aim at an IOVA that is then unmapped.
                println!(
                    "vfio: map of {}'s bar{} for {} refused: {}",
                    dst.name,
                    regs::MEMORY_BAR,
                    src.name,
                    e
                );
                ctx.as_mut()
                    .map(|c| {
                        c.space
                            .alloc(u64::from(len))
                            .unwrap_or_else(|e| bad(check, Some(src), e))
                    })
                    .unwrap_or(dst.mem + off)
            }
        };
        println!(
            "vfio: p2p {} -> {} (p2p=off) at {:#x} len {}",
            src.name, dst.name, addr, len
        );
        let peer0 = dst.rd(regs::REG_PEER_WRITES);
        let f0 = src.rd(regs::REG_FAILED);
        src.run_dma_refused(
            check,
            &Cmd {
                seed: 0x0FF,
                ..Cmd::new(regs::CMD_P2P_WRITE, addr, len)
            },
            t,
        );
        let f1 = src.rd(regs::REG_FAILED);
        let changed = mem_words(off, len).find(|&o| dma::read::<u32>(dst.mem + o) != MEM_SENTINEL);
        let peer1 = dst.rd(regs::REG_PEER_WRITES);
        expect(
            check,
            Some(src),
            changed.is_none() && peer1 == peer0 && f1 == f0.wrapping_add(1),
            format!(
                "peer memory changed at +{:#x}, REG_PEER_WRITES {peer0} -> {peer1}, REG_FAILED {f0} -> {f1}",
                changed.unwrap_or(0)
            ),
        );
        println!("{}", line);
    }
    // Both still reach guest RAM.
    for d in [a, b] {
        let (cmd, buf) = small_cmd(d, ctx, 0x300);
        d.run_ok("p2p-off-dma-still-works", &cmd, t);
        verify_pattern("p2p-off-dma-still-works", d, &buf, cmd.seed);
        ok("p2p-off-dma-still-works", Some(d));
    }
}
