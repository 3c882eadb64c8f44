//! What a passthrough device's DMA addresses mean to the migration's dirty tracking: one
//! device's IOVA → guest-physical table (identity without the virtual IOMMU or while its
//! endpoint bypasses it, the guest's mappings otherwise), which IOVA ranges the device's DMA
//! log covers, and what must be marked dirty because a later report can no longer say it.
//!
//! Pure data, and the one record of what the device's DMA space holds: the VMM's mapping
//! listener records a mapping here before the device's space has it and drops one only once the
//! device can no longer write through it, and asks it, not a list of its own, what to undo on an
//! unmap or a bypass change ([`DmaSpace::mappings_in`], [`DmaSpace::mappings`],
//! [`DmaSpace::is_bypass`]) and what a DMA address the VMM serves reaches ([`DmaSpace::gpa`]);
//! the device's `sync_dirty_log` reads it after each DMA_LOGGING_REPORT. Nothing here trusts a
//! value: sums saturate, and a dirty IOVA that maps to nothing, or to something other than guest
//! RAM (a peer's BAR: its contents travel in that device's state), is skipped.
//!
//! While the log is on:
//! - a mapping removed (unmap, or a bypass change) may have been written before it went, and a
//!   report can no longer translate its IOVAs: the guest RAM it reached is pending dirty, marked
//!   at the next sync ([`DmaSpace::take_pending`]);
//! - a mapping added is covered when the log covers its IOVAs. The vIOMMU's whole input range is
//!   asked for first ([`DmaSpace::log_request`]), which covers every mapping the guest can make;
//!   a device that refuses it logs the ranges mapped at the start only, and the RAM a later
//!   mapping outside them reaches is reported by [`DmaSpace::unlogged`], to be marked dirty
//!   wholesale once the device is stopped;
//! - a remapped IOVA (unmap, then map to another GPA) reports through the new mapping: the old
//!   GPA is pending from the unmap, the new one may be marked needlessly, never missed.

use std::collections::BTreeMap;

/// Most ranges a DMA_LOGGING_START of the mapped ranges asks for (linux/vfio.h: the core
/// guarantees as many `vfio_device_feature_dma_logging_range` as fit in one kernel page).
pub const MAX_START_RANGES: usize = 4096 / 16;
/// Most ranges one sync reports (neighbours are joined; the gaps report nothing).
pub const MAX_REPORT_RANGES: usize = 64;
/// Pending ranges kept before they are merged.
const PENDING_MERGE_AT: usize = 4096;

/// A half-open range `[start, end)`; `end` saturates at `u64::MAX`.
type Span = (u64, u64);

fn span(start: u64, len: u64) -> Span {
    (start, start.saturating_add(len))
}

fn as_len(s: &[Span]) -> Vec<(u64, u64)> {
    s.iter().map(|&(a, b)| (a, b - a)).collect()
}

/// Sorted, non-empty, merged (touching spans join).
fn merge(mut v: Vec<Span>) -> Vec<Span> {
    v.retain(|s| s.0 < s.1);
    v.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(v.len());
    for s in v {
        match out.last_mut() {
            Some(last) if s.0 <= last.1 => last.1 = last.1.max(s.1),
            _ => out.push(s),
        }
    }
    out
}

/// The intersection of two merged span lists.
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if lo < hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of merged `a` outside merged `b`.
fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(mut lo, hi) in a {
        for &(bs, be) in b {
            if bs >= hi || be <= lo {
                continue;
            }
            if bs > lo {
                out.push((lo, bs));
            }
            lo = lo.max(be);
        }
        if lo < hi {
            out.push((lo, hi));
        }
    }
    out
}

/// Merged spans joined across their smallest gaps until at most `max` are left.
fn join(spans: Vec<Span>, max: usize) -> Vec<Span> {
    let spans = merge(spans);
    let max = max.max(1);
    if spans.len() <= max {
        return spans;
    }
    // Keep the `max - 1` widest gaps as separators (ties: the lower address).
    let mut gaps: Vec<(u64, usize)> = (1..spans.len())
        .map(|i| (spans[i].0 - spans[i - 1].1, i))
        .collect();
    gaps.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut cuts: Vec<usize> = gaps[..max - 1].iter().map(|g| g.1).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(max);
    let mut first = 0;
    for cut in cuts.into_iter().chain(std::iter::once(spans.len())) {
        out.push((spans[first].0, spans[cut - 1].1));
        first = cut;
    }
    out
}

/// One mapping of a device's DMA space: the `len` bytes at `iova` reach guest-physical `gpa` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    /// The first device (IO virtual) address.
    pub iova: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The guest-physical address `iova` reaches.
    pub gpa: u64,
}

/// One passthrough device's DMA address space: what its DMA addresses reach, for dirty tracking
/// and for the DMA the VMM serves.
#[derive(Debug, Clone, Default)]
pub struct DmaSpace {
    /// Guest RAM, merged.
    ram: Vec<Span>,
    /// The vIOMMU's input range; `None` for an identity space (no vIOMMU).
    aperture: Option<Span>,
    /// IOVA == GPA (no vIOMMU, or the endpoint bypasses it).
    bypass: bool,
    /// IOVA start → (IOVA end, GPA), disjoint.
    maps: BTreeMap<u64, (u64, u64)>,
    /// While the device's log is on: the IOVA ranges it covers, merged.
    logged: Option<Vec<Span>>,
    /// Guest RAM reached through mappings removed while logging, not yet marked.
    pending: Vec<Span>,
}

impl DmaSpace {
    /// A device without the vIOMMU: it reaches guest RAM (`(gpa, len)` regions) at identical
    /// addresses.
    pub fn identity(ram: &[(u64, u64)]) -> Self {
        DmaSpace {
            ram: merge(ram.iter().map(|&(a, l)| span(a, l)).collect()),
            bypass: true,
            ..Default::default()
        }
    }

    /// A device behind the vIOMMU whose input range is `aperture` (`(start, len)`); it reaches
    /// nothing until the guest maps (or bypasses).
    pub fn translated(ram: &[(u64, u64)], aperture: (u64, u64)) -> Self {
        DmaSpace {
            aperture: Some(span(aperture.0, aperture.1)),
            bypass: false,
            ..Self::identity(ram)
        }
    }

    /// Whether the device sits behind the vIOMMU.
    pub fn is_translated(&self) -> bool {
        self.aperture.is_some()
    }

    /// Whether the device's addresses are guest-physical now (IOVA == GPA): no vIOMMU, or its
    /// endpoint bypasses it. Its space then holds the identity map, and no mapping.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// The guest-physical address of the `len` bytes at `iova`: `iova` itself while bypassing,
    /// otherwise through the one mapping that holds all of them; `None` when none does.
    pub fn gpa(&self, iova: u64, len: u64) -> Option<u64> {
        if self.bypass {
            return Some(iova);
        }
        let (&start, &(end, gpa)) = self.maps.range(..=iova).next_back()?;
        (iova.saturating_add(len) <= end).then(|| gpa.saturating_add(iova - start))
    }

    /// Every mapping, by IOVA (none while bypassing).
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.mappings_in(0, u64::MAX)
    }

    /// The mappings overlapping `[iova, iova + len)`, by IOVA: what [`DmaSpace::unmap`] of the
    /// same range removes.
    pub fn mappings_in(&self, iova: u64, len: u64) -> Vec<DmaMapping> {
        self.overlapping(span(iova, len))
            .map(|(&start, &(end, gpa))| DmaMapping {
                iova: start,
                len: end - start,
                gpa,
            })
            .collect()
    }

    /// The mappings overlapping `s`, by IOVA (none for an empty `s`).
    fn overlapping(&self, s: Span) -> impl Iterator<Item = (&u64, &(u64, u64))> {
        let before = self
            .maps
            .range(..s.0)
            .next_back()
            .filter(|(_, &(end, _))| end > s.0 && s.0 < s.1);
        before.into_iter().chain(self.maps.range(s.0..s.1))
    }

    /// `[iova, iova + len)` now maps to guest-physical `gpa` (replacing what it overlaps).
    pub fn map(&mut self, iova: u64, len: u64, gpa: u64) {
        let s = span(iova, len);
        if s.0 >= s.1 {
            return;
        }
        self.unmap(iova, len);
        self.maps.insert(s.0, (s.1, gpa));
    }

    /// Every mapping overlapping `[iova, iova + len)` is gone; while logging, the RAM it reached
    /// is pending dirty.
    pub fn unmap(&mut self, iova: u64, len: u64) {
        let gone: Vec<u64> = self.overlapping(span(iova, len)).map(|(&k, _)| k).collect();
        for k in gone {
            if let Some((end, gpa)) = self.maps.remove(&k) {
                if self.logged.is_some() {
                    let g = span(gpa, end - k);
                    let mut parts = Vec::new();
                    self.ram_parts(g, &mut |p| parts.push(p));
                    self.add_pending(parts);
                }
            }
        }
    }

    /// The endpoint bypasses the vIOMMU (`on`: IOVA == GPA) or stops doing so; every mapping is
    /// gone either way, and while logging what the device reached before is pending dirty.
    pub fn set_bypass(&mut self, on: bool) {
        if self.logged.is_some() {
            let before = self.reachable_ram();
            self.add_pending(before);
        }
        self.maps.clear();
        self.bypass = on;
    }

    fn add_pending(&mut self, parts: Vec<Span>) {
        self.pending.extend(parts);
        if self.pending.len() > PENDING_MERGE_AT {
            self.pending = merge(std::mem::take(&mut self.pending));
        }
    }

    /// The IOVA ranges the device can use now, merged.
    fn reachable(&self) -> Vec<Span> {
        if self.bypass {
            self.ram.clone()
        } else {
            merge(self.maps.iter().map(|(&s, &(e, _))| (s, e)).collect())
        }
    }

    /// The guest RAM the device can reach now, merged.
    fn reachable_ram(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for s in self.reachable() {
            self.translate(s, &mut |p| out.push(p));
        }
        merge(out)
    }

    /// The parts of guest-physical `g` that are guest RAM.
    fn ram_parts(&self, g: Span, f: &mut impl FnMut(Span)) {
        for &(rs, re) in &self.ram {
            let (lo, hi) = (g.0.max(rs), g.1.min(re));
            if lo < hi {
                f((lo, hi));
            }
        }
    }

    /// The guest RAM the IOVAs `s` reach now, piece by piece (a span straddling mappings is
    /// translated through each of them).
    fn translate(&self, s: Span, f: &mut impl FnMut(Span)) {
        if self.bypass {
            return self.ram_parts(s, f);
        }
        for (&ms, &(me, gpa)) in self.overlapping(s) {
            let (lo, hi) = (s.0.max(ms), s.1.min(me));
            if lo < hi {
                let g = (gpa.saturating_add(lo - ms), gpa.saturating_add(hi - ms));
                self.ram_parts(g, f);
            }
        }
    }

    /// The IOVA ranges to ask DMA_LOGGING_START for first (`(iova, len)`): the vIOMMU's input
    /// range (one range: every mapping the guest can make is covered, whenever it is made), or
    /// guest RAM for an identity space.
    pub fn log_request(&self) -> Vec<(u64, u64)> {
        match self.aperture {
            Some(a) if a.0 < a.1 => as_len(&[a]),
            Some(_) => Vec::new(),
            None => as_len(&self.ram),
        }
    }

    /// The IOVA ranges mapped now (`(iova, len)`), joined down to `max`: what to log when the
    /// device refuses [`DmaSpace::log_request`].
    pub fn mapped_ranges(&self, max: usize) -> Vec<(u64, u64)> {
        as_len(&join(self.reachable(), max))
    }

    /// The device's log is on over `ranges` (`(iova, len)`); nothing is pending yet.
    pub fn start_log(&mut self, ranges: &[(u64, u64)]) {
        self.logged = Some(merge(ranges.iter().map(|&(a, l)| span(a, l)).collect()));
        self.pending.clear();
    }

    /// The device's log is off.
    pub fn stop_log(&mut self) {
        self.logged = None;
        self.pending.clear();
    }

    /// The IOVA ranges (`(iova, len)`) to ask DMA_LOGGING_REPORT for: what the device can reach
    /// now and its log covers, joined down to `max` ranges.
    pub fn report_ranges(&self, max: usize) -> Vec<(u64, u64)> {
        let Some(logged) = &self.logged else {
            return Vec::new();
        };
        as_len(&join(intersect(&self.reachable(), logged), max))
    }

    /// The device reported `len` bytes at `iova` dirty: `mark(gpa, len)` for each piece of guest
    /// RAM they reach now.
    pub fn dirty(&self, iova: u64, len: u64, mut mark: impl FnMut(u64, u64)) {
        self.translate(span(iova, len), &mut |(a, b)| mark(a, b - a));
    }

    /// Guest RAM (`(gpa, len)`) reached through mappings removed since the last call, merged.
    pub fn take_pending(&mut self) -> Vec<(u64, u64)> {
        as_len(&merge(std::mem::take(&mut self.pending)))
    }

    /// Guest RAM (`(gpa, len)`) the device can reach now through IOVAs its log does not cover
    /// (everything it reaches when the log is off), merged.
    pub fn unlogged(&self) -> Vec<(u64, u64)> {
        let outside = match &self.logged {
            Some(logged) => subtract(&self.reachable(), logged),
            None => self.reachable(),
        };
        let mut out = Vec::new();
        for s in outside {
            self.translate(s, &mut |p| out.push(p));
        }
        as_len(&merge(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// RAM: 0..64 MiB and 4 GiB..4 GiB + 16 MiB.
    const RAM: [(u64, u64); 2] = [(0, 64 * MIB), (1 << 32, 16 * MIB)];
    const APERTURE: (u64, u64) = (0, 1 << 48);

    fn dirty(s: &DmaSpace, iova: u64, len: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        s.dirty(iova, len, |a, l| v.push((a, l)));
        v
    }

    fn space() -> DmaSpace {
        DmaSpace::translated(&RAM, APERTURE)
    }

    #[test]
    fn identity_translates_to_itself_within_ram() {
        let mut s = DmaSpace::identity(&RAM);
        assert!(!s.is_translated());
        assert_eq!(s.log_request(), RAM.to_vec());
        s.start_log(&RAM);
        assert_eq!(s.report_ranges(64), RAM.to_vec());
        assert_eq!(dirty(&s, 0x3000, 0x1000), [(0x3000, 0x1000)]);
        // Past the end of low RAM: only the RAM part.
        assert_eq!(
            dirty(&s, 64 * MIB - 0x800, 0x1000),
            [(64 * MIB - 0x800, 0x800)]
        );
        assert!(dirty(&s, 0xfee0_0000, 0x1000).is_empty(), "not RAM");
        assert!(s.unlogged().is_empty());
    }

    #[test]
    fn a_translated_space_reaches_only_what_is_mapped() {
        let mut s = space();
        assert!(s.is_translated());
        assert_eq!(s.log_request(), [APERTURE]);
        s.start_log(&[APERTURE]);
        assert!(s.report_ranges(64).is_empty());
        assert!(dirty(&s, 0x1000, 0x1000).is_empty());
        s.map(0x10_0000_0000, 0x2000, 0x20_0000);
        assert_eq!(s.report_ranges(64), [(0x10_0000_0000, 0x2000)]);
        assert_eq!(dirty(&s, 0x10_0000_1000, 0x1000), [(0x20_1000, 0x1000)]);
        // The IOVA as a GPA would be nothing: a wrong translation could not pass this.
        assert!(dirty(&s, 0x20_1000, 0x1000).is_empty());
        assert!(s.unlogged().is_empty(), "the aperture covers every mapping");
    }

    #[test]
    fn a_page_straddling_two_mappings_is_translated_through_each() {
        let mut s = space();
        s.start_log(&[APERTURE]);
        // IOVA 0x10000..0x10800 → GPA 0x5000.., 0x10800..0x11000 → GPA 0x9000_0000 (no RAM),
        // 0x11000..0x12000 → GPA 0x7000.
        s.map(0x1_0000, 0x800, 0x5000);
        s.map(0x1_0800, 0x800, 0x9000_0000);
        s.map(0x1_1000, 0x1000, 0x7000);
        assert_eq!(dirty(&s, 0x1_0000, 0x1000), [(0x5000, 0x800)]);
        assert_eq!(
            dirty(&s, 0x1_0000, 0x2000),
            [(0x5000, 0x800), (0x7000, 0x1000)]
        );
        // A 2 MiB report page over all of them and beyond.
        assert_eq!(dirty(&s, 0, 2 * MIB), [(0x5000, 0x800), (0x7000, 0x1000)]);
        assert_eq!(s.report_ranges(64), [(0x1_0000, 0x2000)]);
    }

    fn m(iova: u64, len: u64, gpa: u64) -> DmaMapping {
        DmaMapping { iova, len, gpa }
    }

    #[test]
    fn the_space_says_what_is_mapped_and_what_an_address_reaches() {
        let mut s = space();
        assert!(!s.is_bypass());
        assert!(s.mappings().is_empty());
        assert_eq!(s.gpa(0x1000, 4), None, "nothing mapped yet");
        s.map(0x1_0000, 0x2000, 0x5000);
        s.map(0x4_0000, 0x1000, 0xfee0_0000); // not RAM: a mapping all the same
        assert_eq!(
            s.mappings(),
            [
                m(0x1_0000, 0x2000, 0x5000),
                m(0x4_0000, 0x1000, 0xfee0_0000)
            ]
        );
        assert_eq!(s.gpa(0x1_1000, 0x1000), Some(0x6000));
        assert_eq!(s.gpa(0x1_1800, 0x1000), None, "runs past its mapping");
        assert_eq!(s.gpa(0x4_0010, 4), Some(0xfee0_0010));
        assert_eq!(s.gpa(0x3_0000, 4), None, "between mappings");
        // What an unmap of a range removes: every mapping it overlaps, and only those.
        assert_eq!(
            s.mappings_in(0x1_1000, 0x1000),
            [m(0x1_0000, 0x2000, 0x5000)]
        );
        assert!(s.mappings_in(0x1_2000, 0x2_e000).is_empty());
        assert!(s.mappings_in(0x1_0000, 0).is_empty());
        assert_eq!(s.mappings_in(0, 1 << 20), s.mappings());
        s.unmap(0x1_1000, 0x1000);
        assert_eq!(s.mappings(), [m(0x4_0000, 0x1000, 0xfee0_0000)]);
        // Bypassing: every address is itself (RAM or not: the VMM routes it), nothing mapped.
        s.set_bypass(true);
        assert!(s.is_bypass());
        assert!(s.mappings().is_empty());
        assert_eq!(s.gpa(0xfee0_0010, 4), Some(0xfee0_0010));
        s.set_bypass(false);
        assert!(!s.is_bypass());
        assert_eq!(s.gpa(0x4_0010, 4), None, "the mappings went with bypass");
        assert!(DmaSpace::identity(&RAM).is_bypass());
    }

    #[test]
    fn an_unmap_while_logging_leaves_its_ram_pending_once() {
        let mut s = space();
        s.map(0x1000_0000, 0x4000, 0x10_0000);
        s.unmap(0x1000_0000, 0x4000);
        assert!(s.take_pending().is_empty(), "not logging: nothing pending");
        s.map(0x1000_0000, 0x4000, 0x10_0000);
        s.map(0x2000_0000, 0x1000, 0xa_0000_0000); // not RAM
        s.start_log(&[APERTURE]);
        s.unmap(0x1000_0000, 0x4000);
        s.unmap(0x2000_0000, 0x1000);
        assert!(
            dirty(&s, 0x1000_0000, 0x1000).is_empty(),
            "no longer mapped"
        );
        assert_eq!(s.take_pending(), [(0x10_0000, 0x4000)]);
        assert!(s.take_pending().is_empty(), "taken");
        // An unmap of a range inside a mapping removes the whole mapping (it overlaps).
        s.map(0x3000_0000, 0x3000, 0x30_0000);
        s.unmap(0x3000_1000, 0x1000);
        assert_eq!(s.take_pending(), [(0x30_0000, 0x3000)]);
        s.stop_log();
        assert!(s.take_pending().is_empty());
    }

    #[test]
    fn a_remap_to_another_gpa_reports_through_the_new_mapping() {
        let mut s = space();
        s.map(0x8000, 0x1000, 0x11_0000);
        s.start_log(&[APERTURE]);
        s.unmap(0x8000, 0x1000);
        s.map(0x8000, 0x1000, 0x22_0000);
        // The device's bit for 0x8000 could be from either: the old GPA is pending, the new
        // one is what the report marks.
        assert_eq!(dirty(&s, 0x8000, 0x1000), [(0x22_0000, 0x1000)]);
        assert_eq!(s.take_pending(), [(0x11_0000, 0x1000)]);
        // A map over an existing mapping replaces it (and the old one is pending).
        s.map(0x8000, 0x1000, 0x33_0000);
        assert_eq!(dirty(&s, 0x8000, 0x1000), [(0x33_0000, 0x1000)]);
        assert_eq!(s.take_pending(), [(0x22_0000, 0x1000)]);
    }

    #[test]
    fn bypass_is_identity_and_changes_leave_the_old_reach_pending() {
        let mut s = space();
        s.map(0x4000_0000, 0x2000, 0x1000);
        s.start_log(&[APERTURE]);
        s.set_bypass(true);
        assert_eq!(s.take_pending(), [(0x1000, 0x2000)]);
        assert!(dirty(&s, 0x4000_0000, 0x1000).is_empty(), "mappings gone");
        assert_eq!(dirty(&s, 0x5000, 0x1000), [(0x5000, 0x1000)]);
        assert_eq!(s.report_ranges(64), [(0, 64 * MIB), (1 << 32, 16 * MIB)]);
        // Leaving bypass: all RAM was reachable.
        s.set_bypass(false);
        assert_eq!(s.take_pending(), RAM.to_vec());
        assert!(dirty(&s, 0x5000, 0x1000).is_empty());
    }

    #[test]
    fn mappings_outside_a_partial_log_are_unlogged() {
        let mut s = space();
        s.map(0x1_0000, 0x1000, 0x5000);
        // The device refused the aperture: log the mappings of now.
        let ranges = s.mapped_ranges(MAX_START_RANGES);
        assert_eq!(ranges, [(0x1_0000, 0x1000)]);
        s.start_log(&ranges);
        assert!(s.unlogged().is_empty());
        s.map(0x1_1000, 0x2000, 0x9000);
        s.map(0x9_0000, 0x1000, 0xb_0000_0000); // not RAM: nothing to mark
        assert_eq!(s.unlogged(), [(0x9000, 0x2000)]);
        // Reports cover only what is logged.
        assert_eq!(s.report_ranges(64), [(0x1_0000, 0x1000)]);
        s.stop_log();
        assert_eq!(s.unlogged(), [(0x5000, 0x1000), (0x9000, 0x2000)]);
    }

    #[test]
    fn many_ranges_are_joined_across_the_smallest_gaps() {
        let mut s = space();
        s.start_log(&[APERTURE]);
        for i in 0..1000u64 {
            // Pairs of pages 16 KiB apart, pairs 1 MiB apart.
            let base = i * MIB;
            s.map(base, 0x1000, 0x10_0000);
            s.map(base + 0x5000, 0x1000, 0x10_0000);
        }
        let r = s.report_ranges(MAX_REPORT_RANGES);
        assert_eq!(r.len(), MAX_REPORT_RANGES);
        // Every mapped page is inside one of them.
        for i in 0..1000u64 {
            for at in [i * MIB, i * MIB + 0x5000] {
                assert!(r.iter().any(|&(a, l)| at >= a && at + 0x1000 <= a + l));
            }
        }
        assert!(s.mapped_ranges(MAX_START_RANGES).len() <= MAX_START_RANGES);
        assert_eq!(join(vec![(5, 6), (1, 2), (3, 4)], 1), [(1, 6)]);
        assert_eq!(join(vec![(1, 2), (3, 4), (10, 11)], 2), [(1, 4), (10, 11)]);
    }

    #[test]
    fn hostile_values_never_panic() {
        let mut s = space();
        s.start_log(&[(u64::MAX - 0xfff, u64::MAX)]);
        s.map(u64::MAX - 0x1000, u64::MAX, u64::MAX - 5);
        s.map(0, 0, 0x1000);
        s.map(0x1000, u64::MAX, 0x2000);
        let _ = dirty(&s, u64::MAX, u64::MAX);
        let _ = dirty(&s, u64::MAX - 1, 2);
        let _ = dirty(&s, 0, u64::MAX);
        // A mapping to the top of the physical space reaches no RAM.
        assert!(dirty(&s, u64::MAX - 0x1000, 0x1000).is_empty());
        let _ = s.gpa(u64::MAX, u64::MAX);
        let _ = s.gpa(u64::MAX - 0x800, 0x1000);
        let _ = s.mappings_in(u64::MAX, u64::MAX);
        let _ = s.mappings();
        s.unmap(u64::MAX, u64::MAX);
        s.unmap(0, u64::MAX);
        assert!(s.mappings().is_empty());
        let _ = s.take_pending();
        let _ = s.report_ranges(0);
        let _ = s.mapped_ranges(0);
        let _ = s.unlogged();
        s.set_bypass(true);
        let _ = dirty(&s, u64::MAX - 0x10, u64::MAX);
        let mut e = DmaSpace::translated(&RAM, (u64::MAX, u64::MAX));
        assert!(
            e.log_request().is_empty(),
            "an empty aperture asks for nothing"
        );
        e.start_log(&[]);
        assert!(e.report_ranges(64).is_empty());
    }
}
