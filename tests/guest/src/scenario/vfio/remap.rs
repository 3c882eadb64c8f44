//! `vfio_migrate.remap_pages=N` (with `vfio_migrate.iommu=1`): besides its stream, each device
//! DMA-writes a fresh page of a pool of `N` pages every `vfio_migrate.remap_ms` (default 20)
//! through one IOVA window that the guest maps to that page just before and unmaps just after:
//! MAP window → page k, `CMD_WRITE_PATTERN` of [`REMAP_LEN`] bytes (a seed unique to the device
//! and page), UNMAP. Each page is written once (after `N` rounds the pool is done), so a page
//! a migration failed to carry stays wrong until the final check.
//!
//! This is what a VMM's DMA dirty logging behind the vIOMMU gets wrong when it translates the
//! device's dirty IOVAs only through the mappings of the moment it reads the log: by then the
//! window is unmapped or maps the next page, and the page written is on nobody's list.

use super::migrate::command;
use super::*;
use crate::scenario::iommu::map_pages;

/// Bytes each round writes (at the start of its page).
const REMAP_LEN: u32 = 64;
/// A pool page.
const PAGE: u64 = 4096;

/// The seed of device `dev`'s page `page` (never 0, so a written page differs from a fresh one).
fn seed(dev: usize, page: u64) -> u32 {
    (((dev as u32) << 20) | page as u32).wrapping_add(1)
}

/// The remapping writers of every device.
pub(super) struct Remap {
    pages: u64,
    period: u64,
    /// Per device: the guest-physical address of pool page 0.
    pools: Vec<u64>,
    /// Per device: the IOVA of its window.
    windows: Vec<u64>,
    /// Pages written so far (by every device).
    done: u64,
    /// TSC of the next round.
    next: u64,
}

impl Remap {
    /// Pools of `pages` zeroed pages and one window per device; rounds every `period` TSC ticks
    /// from `now`.
    pub(super) fn new(
        devs: &[Dev],
        ctx: &mut IommuCtx,
        pages: u64,
        period: u64,
        now: u64,
    ) -> Remap {
        let mut pools = Vec::new();
        let mut windows = Vec::new();
        for i in 0..devs.len() {
            let base = dma::alloc((pages * PAGE) as usize, PAGE as usize);
            dma::fill_u64(base, pages * PAGE / 8, 0);
            pools.push(base);
            let w = ctx.space.alloc(PAGE).unwrap_or_else(|e| {
                println!("vfio-migrate: FAIL remap window dev={} {}", i, e);
                fail(format!("vfio-migrate: remap window: {e}"))
            });
            windows.push(w);
        }
        println!(
            "vfio-migrate: remap pages {} per device, window dma {:#x}",
            pages,
            windows.first().copied().unwrap_or(0)
        );
        Remap {
            pages,
            period,
            pools,
            windows,
            done: 0,
            next: now,
        }
    }

    /// Pages written so far (by every device).
    pub(super) fn done(&self) -> u64 {
        self.done
    }

    /// One round when it is due at `now` (MAP, WRITE_PATTERN, UNMAP for every device): Ok(true)
    /// when it ran one.
    pub(super) fn tick(
        &mut self,
        devs: &[Dev],
        ctx: &mut IommuCtx,
        now: u64,
    ) -> Result<bool, String> {
        if self.done >= self.pages || (now.wrapping_sub(self.next) as i64) < 0 {
            return Ok(false);
        }
        let k = self.done;
        for (i, d) in devs.iter().enumerate() {
            let t = d.iommu.as_ref().ok_or("a device is not behind the IOMMU")?;
            let (w, page) = (self.windows[i], self.pools[i] + k * PAGE);
            map_pages(
                &mut ctx.io,
                t.domain,
                w,
                page,
                PAGE,
                MAP_F_READ | MAP_F_WRITE,
            )?;
            d.wr(regs::REG_ADDR_LO, w as u32);
            d.wr(regs::REG_ADDR_HI, (w >> 32) as u32);
            d.wr(regs::REG_LEN, REMAP_LEN);
            d.wr(regs::REG_SEED, seed(i, k));
            let written = command(d, regs::CMD_WRITE_PATTERN);
            let st = ctx.io.unmap(t.domain, w, w + PAGE - 1)?;
            written.map_err(|e| format!("dev={i} page={k}: {e}"))?;
            if st != iommu::S_OK {
                return Err(format!("UNMAP {w:#x} answered {st}"));
            }
        }
        self.done += 1;
        self.next = now.wrapping_add(self.period);
        Ok(true)
    }

    /// The final check: every page written holds its pattern, every other page is still zero.
    /// Prints the first mismatches and the summary; returns the number of bad pages.
    pub(super) fn check(&self) -> u64 {
        let mut bad = 0;
        for (i, &pool) in self.pools.iter().enumerate() {
            for k in 0..self.pages {
                let at = pool + k * PAGE;
                let ok = if k < self.done {
                    let s = seed(i, k);
                    (0..REMAP_LEN)
                        .all(|j| dma::read::<u8>(at + u64::from(j)) == regs::pattern_byte(s, j))
                } else {
                    dma::scan(at, PAGE / 8, 0) == PAGE / 8
                };
                if !ok {
                    if bad < 4 {
                        println!(
                            "vfio-migrate: FAIL remap dev={} page={} ({}) first bytes {:#018x}",
                            i,
                            k,
                            if k < self.done {
                                "written"
                            } else {
                                "never written"
                            },
                            dma::read::<u64>(at)
                        );
                    }
                    bad += 1;
                }
            }
        }
        println!(
            "vfio-migrate: remap pages written {} per device, bad {}",
            self.done, bad
        );
        bad
    }
}
