//! The device handle: registers, commands (polled), DMA addresses, guest buffers with guards.

use super::*;

pub(super) fn err_name(e: u32) -> &'static str {
    match e {
        regs::ERR_NONE => "NONE",
        regs::ERR_BAD_COMMAND => "BAD_COMMAND",
        regs::ERR_BAD_LEN => "BAD_LEN",
        regs::ERR_DMA => "DMA",
        regs::ERR_QUEUE_FULL => "QUEUE_FULL",
        _ => "?",
    }
}

pub(super) fn cmd_name(c: u32) -> &'static str {
    match c {
        regs::CMD_WRITE_PATTERN => "WRITE_PATTERN",
        regs::CMD_COPY => "COPY",
        regs::CMD_READ_CHECKSUM => "READ_CHECKSUM",
        regs::CMD_P2P_WRITE => "P2P_WRITE",
        _ => "command",
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// `REG_COMPLETED` went up by one.
    Completed,
    /// `REG_FAILED` went up by one; `REG_LAST_ERROR`.
    Failed(u32),
}

/// A command's parameters.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cmd {
    pub(super) code: u32,
    pub(super) addr: u64,
    pub(super) addr2: u64,
    pub(super) len: u32,
    pub(super) seed: u32,
}

impl Cmd {
    pub(super) fn new(code: u32, addr: u64, len: u32) -> Cmd {
        Cmd {
            code,
            addr,
            addr2: 0,
            len,
            seed: 0,
        }
    }
}

/// Counters sampled before a command, to see how it ended.
#[derive(Clone, Copy, Debug)]
pub(super) struct Started {
    pub(super) completed: u32,
    pub(super) failed: u32,
}

/// The DMA context of a device behind the virtio-iommu.
#[derive(Clone, Copy, Debug)]
pub(super) struct Translated {
    pub(super) endpoint: u32,
    pub(super) domain: u32,
}

/// One skiff-testdev function.
pub(super) struct Dev {
    pub(super) func: PciFunction,
    /// `BB:DD.F`.
    pub(super) name: String,
    /// BAR 0 (registers) address.
    pub(super) regs: u64,
    /// BAR 2 (device memory) address.
    pub(super) mem: u64,
    pub(super) msix: Msix,
    /// Behind the virtio-iommu: every DMA address it is given is an IOVA.
    pub(super) iommu: Option<Translated>,
}

impl Dev {
    pub(super) fn rd(&self, reg: u64) -> u32 {
        dma::read::<u32>(self.regs + reg)
    }

    pub(super) fn wr(&self, reg: u64, value: u32) {
        dma::write::<u32>(self.regs + reg, value);
    }

    pub(super) fn bdf_index(&self, all: &[Dev]) -> usize {
        all.iter()
            .position(|d| d.func.bdf == self.func.bdf)
            .unwrap_or(0)
    }

    /// Write the parameters and ring the doorbell.
    pub(super) fn start(&self, c: &Cmd) -> Started {
        let s = Started {
            completed: self.rd(regs::REG_COMPLETED),
            failed: self.rd(regs::REG_FAILED),
        };
        self.wr(regs::REG_ADDR_LO, c.addr as u32);
        self.wr(regs::REG_ADDR_HI, (c.addr >> 32) as u32);
        self.wr(regs::REG_ADDR2_LO, c.addr2 as u32);
        self.wr(regs::REG_ADDR2_HI, (c.addr2 >> 32) as u32);
        self.wr(regs::REG_LEN, c.len);
        self.wr(regs::REG_SEED, c.seed);
        self.wr(regs::REG_DOORBELL, c.code);
        s
    }

    /// Poll `REG_COMPLETED`/`REG_FAILED` until the command started at `s` ends.
    pub(super) fn finish(&self, check: &str, c: &Cmd, s: Started, timeout_ms: u64) -> Outcome {
        let deadline = time::Deadline::after_ms(timeout_ms);
        loop {
            let (done, failed) = (self.rd(regs::REG_COMPLETED), self.rd(regs::REG_FAILED));
            let (dd, df) = (
                done.wrapping_sub(s.completed),
                failed.wrapping_sub(s.failed),
            );
            match (dd, df) {
                (0, 0) => {}
                (1, 0) => return Outcome::Completed,
                (0, 1) => return Outcome::Failed(self.rd(regs::REG_LAST_ERROR)),
                _ => bad(
                    check,
                    Some(self),
                    format!(
                        "{}: completed went up by {dd} and failed by {df} for one command",
                        cmd_name(c.code)
                    ),
                ),
            }
            if deadline.expired() {
                bad(
                    check,
                    Some(self),
                    format!(
                        "{} at {:#x} len {} did not end within {timeout_ms} ms (status {:#x}, completed {done}, failed {failed})",
                        cmd_name(c.code),
                        c.addr,
                        c.len,
                        self.rd(regs::REG_STATUS)
                    ),
                );
            }
            time::delay_us(50);
        }
    }

    /// Run a command to its end (polled).
    pub(super) fn run(&self, check: &str, c: &Cmd, timeout_ms: u64) -> Outcome {
        let s = self.start(c);
        self.finish(check, c, s, timeout_ms)
    }

    /// Run a command that must complete.
    pub(super) fn run_ok(&self, check: &str, c: &Cmd, timeout_ms: u64) {
        if let Outcome::Failed(e) = self.run(check, c, timeout_ms) {
            bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} len {} failed: REG_LAST_ERROR {e} ({})",
                    cmd_name(c.code),
                    c.addr,
                    c.len,
                    err_name(e)
                ),
            );
        }
    }

    /// Run a command that must fail with ERR_DMA.
    pub(super) fn run_dma_refused(&self, check: &str, c: &Cmd, timeout_ms: u64) {
        match self.run(check, c, timeout_ms) {
            Outcome::Failed(regs::ERR_DMA) => {}
            Outcome::Failed(e) => bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} failed with REG_LAST_ERROR {e} ({}), expected {} (DMA)",
                    cmd_name(c.code),
                    c.addr,
                    err_name(e),
                    regs::ERR_DMA
                ),
            ),
            Outcome::Completed => bad(
                check,
                Some(self),
                format!(
                    "{} at {:#x} completed; it must fail with REG_LAST_ERROR {} (DMA)",
                    cmd_name(c.code),
                    c.addr,
                    regs::ERR_DMA
                ),
            ),
        }
    }
}

/// The virtio-iommu and the IOVA allocator, with `vfio.iommu=1`.
pub(super) struct IommuCtx {
    pub(super) io: Iommu,
    pub(super) space: IovaSpace,
    pub(super) mmio_flag: u32,
}

/// Map `[gpa, gpa + len)` for `dev`: its IOVA behind the IOMMU, else `gpa` itself.
pub(super) fn dma_addr(
    dev: &Dev,
    ctx: &mut Option<IommuCtx>,
    gpa: u64,
    len: usize,
    flags: u32,
) -> Result<u64, String> {
    match (dev.iommu, ctx.as_mut()) {
        (Some(t), Some(c)) => map_range(&mut c.io, &mut c.space, t.domain, gpa, len, flags),
        _ => Ok(gpa),
    }
}

/// A guest buffer with guard bytes: `len` bytes at `at`, [`GUARD`] untouched bytes before and
/// after, everything filled with [`SENTINEL`].
pub(super) struct GuestBuf {
    pub(super) base: u64,
    pub(super) total: usize,
    pub(super) at: u64,
    pub(super) len: usize,
}

impl GuestBuf {
    pub(super) fn new(len: usize, offset: usize) -> GuestBuf {
        let total = (offset + len + GUARD).next_multiple_of(4096);
        let base = dma::alloc(total, 4096);
        let b = GuestBuf {
            base,
            total,
            at: base + offset as u64,
            len,
        };
        b.reset();
        b
    }

    pub(super) fn reset(&self) {
        dma::fill(self.base, self.total, SENTINEL);
    }

    /// First byte in `[at - GUARD, at)` or `[at + len, at + len + GUARD)` that is not the
    /// sentinel.
    pub(super) fn guard_damage(&self) -> Option<u64> {
        let before = (self.at - self.base).min(GUARD as u64);
        (self.at - before..self.at)
            .chain(self.at + self.len as u64..self.at + (self.len + GUARD) as u64)
            .find(|&a| dma::read::<u8>(a) != SENTINEL)
    }

    /// First index where the contents differ from `want(i)`.
    pub(super) fn first_diff(&self, want: impl Fn(u32) -> u8) -> Option<(usize, u8, u8)> {
        (0..self.len).find_map(|i| {
            let got = dma::read::<u8>(self.at + i as u64);
            let w = want(i as u32);
            (got != w).then_some((i, got, w))
        })
    }

    pub(super) fn untouched(&self) -> bool {
        (0..self.total as u64).all(|i| dma::read::<u8>(self.base + i) == SENTINEL)
    }
}

/// Verify a buffer the device wrote with pattern `seed` (and the guards around it).
pub(super) fn verify_pattern(check: &str, dev: &Dev, b: &GuestBuf, seed: u32) {
    if let Some((i, got, want)) = b.first_diff(|i| regs::pattern_byte(seed, i)) {
        bad(
            check,
            Some(dev),
            format!(
                "byte {i} of {} is {got:#04x}, pattern says {want:#04x}",
                b.len
            ),
        );
    }
    if let Some(a) = b.guard_damage() {
        bad(
            check,
            Some(dev),
            format!(
                "the device wrote outside the buffer: byte at offset {} from the start",
                a as i64 - b.at as i64
            ),
        );
    }
}

/// A small WRITE_PATTERN into a fresh guest buffer (mapped for `d`), to raise an interrupt.
pub(super) fn small_cmd(d: &Dev, ctx: &mut Option<IommuCtx>, seed: u32) -> (Cmd, GuestBuf) {
    let b = GuestBuf::new(SMALL_LEN as usize, 0);
    let addr = dma_addr(d, ctx, b.at, b.len, MAP_F_READ | MAP_F_WRITE)
        .unwrap_or_else(|e| bad("iommu-map", Some(d), e));
    (
        Cmd {
            seed,
            ..Cmd::new(regs::CMD_WRITE_PATTERN, addr, SMALL_LEN)
        },
        b,
    )
}
