//! Simulated migrations: a source "VM" whose workload dirties memory while RAM is sent over one
//! or several connections, and a target that must end up with the same memory.

use super::*;
use crate::test_util::contents;

/// Migrate a busy `source` over `n` connections (dirty passes while the workload runs, then a
/// final pass after "stop"); returns each connection's stream.
fn migrate(source: &Mem, n: u16, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut tx: Vec<MigrationSender<Vec<u8>>> = (0..n)
        .map(|i| {
            let mut t = MigrationSender::new(Vec::new()).unwrap();
            t.set_ram_frame_bytes(64 << 10);
            t.send(&hello(i, n)).unwrap();
            t
        })
        .collect();
    tx[0].send(&Message::Config(config())).unwrap();
    let mut dirty = DirtyBitmap::new(&layout()).unwrap();
    // Iteration 0 is the full pass; then dirty passes while the guest runs; the last one after
    // the guest "stopped" (no workload).
    let passes = 5;
    for iteration in 0..=passes {
        let ranges: Vec<(u64, u64)> = if iteration == 0 {
            layout()
        } else {
            let runs = dirty.runs().collect();
            dirty.clear();
            runs
        };
        let zeros = if iteration == 0 {
            ZeroPages::Skip
        } else {
            ZeroPages::Send
        };
        let spread = spread_ranges(ranges, usize::from(n), 96 << 10);
        for (t, ranges) in tx.iter_mut().zip(spread) {
            // The guest keeps writing while each connection's share is read.
            if iteration < passes {
                dirty_pages(source, &mut dirty, rng, 40);
            }
            t.send_ram(source, ranges, zeros).unwrap();
        }
        // The barrier: iteration i ends on every connection before i + 1 starts.
        for t in &mut tx {
            t.end_iteration().unwrap();
        }
        if iteration == 1 {
            tx[0]
                .send(&Message::DevicePrecopy {
                    id: "vfio0".into(),
                    data: b"pre-copy chunk".to_vec(),
                })
                .unwrap();
        }
    }
    assert_eq!(dirty.count(), 0);
    tx[0].send(&Message::State(sections())).unwrap();
    tx.into_iter().map(|t| t.complete().unwrap().0).collect()
}

fn busy_source(rng: &mut Rng) -> Mem {
    let m = mem(&layout());
    let mut scratch = DirtyBitmap::new(&layout()).unwrap();
    dirty_pages(&m, &mut scratch, rng, 300);
    m
}

fn check_migration(n: u16, seed: u64) -> ApplyStats {
    let mut rng = Rng::new(seed);
    let source = busy_source(&mut rng);
    let streams = migrate(&source, n, &mut rng);
    assert_eq!(streams.len(), usize::from(n));
    let target = mem(&layout());
    let got = receive(&streams, &target, &mut rng).unwrap();
    assert!(
        contents(&target) == contents(&source),
        "memory differs (seed {seed})"
    );
    assert_eq!(got.config, Some(config()));
    assert_eq!(got.state, sections());
    assert_eq!(
        got.precopy,
        vec![("vfio0".to_string(), b"pre-copy chunk".to_vec())]
    );
    assert_eq!(got.ends, 6 * usize::from(n));
    assert!(got.stats.frames > u64::from(n) * 6, "{:?}", got.stats);
    got.stats
}

#[test]
fn migration_over_one_connection() {
    for seed in 1..4 {
        let stats = check_migration(1, seed);
        // In order on one connection, no copy is ever stale.
        assert_eq!(stats.stale_pages, 0);
    }
}

#[test]
fn migration_over_three_shuffled_connections() {
    let mut stale = 0;
    for seed in 1..9 {
        stale += check_migration(3, seed).stale_pages;
    }
    // The shuffled order did deliver older copies after newer ones, and they were dropped.
    assert!(stale > 0);
}

/// One page sent in iteration 0 on connection A and again in iteration 1 on connection B.
fn two_copies() -> (Vec<u8>, Vec<u8>, Mem) {
    let source = mem(&layout());
    source
        .write_slice(&[0xaa; 4096], GuestAddress(0x2000))
        .unwrap();
    source
        .write_slice(&[0x11; 4096], GuestAddress(0x3000))
        .unwrap();
    let mut a = MigrationSender::new(Vec::new()).unwrap();
    let mut b = MigrationSender::new(Vec::new()).unwrap();
    a.send(&hello(0, 2)).unwrap();
    b.send(&hello(1, 2)).unwrap();
    a.send_ram(&source, [(0x2000, 2 * PAGE_SIZE)], ZeroPages::Skip)
        .unwrap();
    a.end_iteration().unwrap();
    b.end_iteration().unwrap();
    source
        .write_slice(&[0xbb; 4096], GuestAddress(0x2000))
        .unwrap();
    b.send_ram(&source, [(0x2000, PAGE_SIZE)], ZeroPages::Send)
        .unwrap();
    a.end_iteration().unwrap();
    b.end_iteration().unwrap();
    (a.complete().unwrap().0, b.complete().unwrap().0, source)
}

fn ram_frames(stream: &[u8]) -> Vec<RamFrame> {
    let mut rx = MigrationReceiver::new(stream).unwrap();
    let mut out = Vec::new();
    loop {
        match rx.recv().unwrap() {
            Message::Ram(f) => out.push(f),
            Message::Complete(_) => return out,
            _ => {}
        }
    }
}

#[test]
fn an_older_copy_never_overwrites_a_newer_one() {
    let (a, b, source) = two_copies();
    let (old, new) = (ram_frames(&a), ram_frames(&b));
    assert_eq!((old.len(), new.len()), (1, 1));
    assert_eq!((old[0].iteration, new[0].iteration), (0, 1));

    // Newer first: the older frame's copy of 0x2000 is dropped, its other page applied.
    let target = mem(&layout());
    let mut applier = RamApplier::new(&layout()).unwrap();
    let s = applier.apply(&target, &new[0]).unwrap();
    assert_eq!((s.applied_pages, s.stale_pages), (1, 0));
    let s = applier.apply(&target, &old[0]).unwrap();
    assert_eq!((s.applied_pages, s.stale_pages), (1, 1));
    assert!(contents(&target) == contents(&source));
    assert_eq!(applier.versions().last_applied(0x2000), Some(1));
    assert_eq!(applier.versions().last_applied(0x3000), Some(0));
    assert_eq!(applier.versions().last_applied(0x4000), None);
    assert_eq!(applier.stats().stale_pages, 1);

    // In order: both applied, the newer last; same result.
    let target = mem(&layout());
    let mut applier = RamApplier::new(&layout()).unwrap();
    applier.apply(&target, &old[0]).unwrap();
    applier.apply(&target, &new[0]).unwrap();
    assert_eq!(applier.stats().stale_pages, 0);
    assert!(contents(&target) == contents(&source));
}

#[test]
fn page_versions_rule() {
    let mut v = PageVersions::new(&layout()).unwrap();
    assert_eq!(
        v.memory_bytes() as u64,
        (4 * MIB + 5 * PAGE_SIZE) / PAGE_SIZE
    );
    let base = 4 * MIB;
    v.mark_applied(base + PAGE_SIZE, 2, 5);
    assert!(v.is_stale(base + PAGE_SIZE, 4));
    assert!(
        !v.is_stale(base + PAGE_SIZE, 5),
        "the same iteration is not stale"
    );
    assert!(!v.is_stale(base + PAGE_SIZE, 6));
    assert!(!v.is_stale(base, 0));
    // Not RAM: never stale, never recorded.
    assert!(!v.is_stale(3 * MIB, 0));
    v.mark_applied(3 * MIB, 1, 1);
    assert_eq!(v.last_applied(3 * MIB), None);
    // Pages 0 and 3 of a 4-page record from iteration 3 are fresh, 1 and 2 stale.
    assert_eq!(v.fresh_runs(base, 4, 3), vec![(0, 1), (3, 1)]);
    assert_eq!(v.fresh_runs(base, 4, 5), vec![(0, 4)]);
    assert!(PageVersions::new(&[(0, 100)]).is_err());
}

/// `fresh_runs` and `mark_applied` work on whole runs of a region at a time; runs that cross
/// a region's end, a hole and the last region's end give the same answers as page-by-page
/// checks through `is_stale` / `last_applied`.
#[test]
fn page_versions_runs_match_page_by_page() {
    let mut v = PageVersions::new(&layout()).unwrap();
    let mut rng = Rng(0x5eed_0007);
    // From 8 pages before the first region's end, across the hole (3..4 MiB) into the second
    // region, and past its end.
    let starts = [
        3 * MIB - 8 * PAGE_SIZE,
        4 * MIB - 2 * PAGE_SIZE,
        4 * MIB + MIB,
    ];
    for round in 0..200u32 {
        let gpa = starts[round as usize % starts.len()] + rng.below(4) * PAGE_SIZE;
        let pages = 1 + rng.below(300);
        let iteration = rng.below(8) as u32;
        let expected: Vec<u64> = (0..pages)
            .filter(|&p| !v.is_stale(gpa + p * PAGE_SIZE, iteration))
            .collect();
        let runs = v.fresh_runs(gpa, pages, iteration);
        let got: Vec<u64> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
        assert_eq!(
            got, expected,
            "fresh pages of {gpa:#x}+{pages} at {iteration}"
        );
        if rng.below(2) == 0 {
            v.mark_applied(gpa, pages, iteration);
            for p in 0..pages {
                let a = gpa + p * PAGE_SIZE;
                let ram = layout().iter().any(|&(s, l)| a >= s && a < s + l);
                let want = ram.then_some(iteration);
                assert_eq!(v.last_applied(a), want, "page {a:#x} after marking");
            }
        }
    }
}

#[test]
fn spread_ranges_deals_every_page_once() {
    let ranges = vec![(0x10, 5 * PAGE_SIZE), (MIB, 3 * PAGE_SIZE), (2 * MIB, 0)];
    let spread = spread_ranges(ranges, 3, 2 * PAGE_SIZE);
    assert_eq!(
        spread,
        vec![
            vec![(0, 2 * PAGE_SIZE), (MIB, 2 * PAGE_SIZE)],
            vec![
                (2 * PAGE_SIZE, 2 * PAGE_SIZE),
                (MIB + 2 * PAGE_SIZE, PAGE_SIZE)
            ],
            vec![(4 * PAGE_SIZE, 2 * PAGE_SIZE)],
        ]
    );
    assert_eq!(
        spread_ranges([(0, PAGE_SIZE)], 0, 0),
        vec![vec![(0, PAGE_SIZE)]]
    );
}

#[test]
fn page_pieces_and_wrapping_ranges() {
    let pieces: Vec<_> = ram_frames::page_pieces(0x1800, 0x2000, 2 * PAGE_SIZE)
        .unwrap()
        .collect();
    assert_eq!(pieces, vec![(0x1000, 0x2000), (0x3000, 0x1000)]);
    assert_eq!(
        ram_frames::page_pieces(0x1000, 0, PAGE_SIZE)
            .unwrap()
            .count(),
        0
    );
    assert!(ram_frames::page_pieces(u64::MAX - 10, 100, PAGE_SIZE).is_none());
    // A wrapping range is passed on whole, and the sender refuses it.
    let spread = spread_ranges([(u64::MAX - 10, 100)], 2, PAGE_SIZE);
    assert_eq!(spread, vec![vec![(u64::MAX - 10, 100)], vec![]]);
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    tx.send(&hello(0, 1)).unwrap();
    let err = tx
        .send_ram(&mem(&layout()), spread[0].clone(), ZeroPages::Send)
        .unwrap_err();
    assert!(err.to_string().contains("wraps around"), "{err}");
}
