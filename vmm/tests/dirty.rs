//! Dirty-page logging reports exactly the pages that were written: by the guest (KVM's dirty
//! log), by a device (virtio-blk writing a read's data and its used ring through the VMM) and by
//! the VMM itself (the mailbox written here through `vm.memory()`).
//!
//! The `dirty-log` test guest (`tests/guest/src/scenario/dirty_log.rs`) pre-touches every page it
//! will use, prints their addresses, then waits with interrupts off, reading (never writing) a mailbox
//! page. Each round: pause → (start the log | collect the previous round) → write the mailbox →
//! resume → the guest writes a known subset of a 64-page region (round 1 also does one virtio-blk
//! read) → pause → `vm.dirty_pages()` must hold every page written in the round and nothing
//! outside {that subset, the device-written pages, the mailbox, the guest's image and stack}.
//! Round 2 also proves the previous call cleared the set.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::dirty_log::{set_mode_override, DirtyLogMode};
use vmm::vm::Vm;

/// Emulated guests are slow here (HOST.md): generous waits, failing with the serial log.
const GUEST_WAIT: Duration = Duration::from_secs(300);
const PAGE: u64 = 4096;
const REGION_PAGES: u64 = 64;

/// Fail unless an explicit environment variable asks to skip; then say so loudly.
fn require_kvm() -> bool {
    let ok = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var_os("SKIFF_SKIP_KVM").is_some() {
            eprintln!("skipped: /dev/kvm is not accessible (SKIFF_SKIP_KVM is set)");
            return false;
        }
        panic!("/dev/kvm is not accessible (set SKIFF_SKIP_KVM=1 to skip this test)");
    }
    true
}

/// Wait for `needle` in the serial file; fail with the log on timeout or if the VM ended.
fn wait_for(vm: &Vm, serial: &Path, needle: &str) -> String {
    let deadline = Instant::now() + GUEST_WAIT;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        // Only once the line holding `needle` is complete (the guest prints it byte by byte).
        if text
            .find(needle)
            .is_some_and(|at| text[at..].contains('\n'))
        {
            return text;
        }
        let exited = vm.exit_event().reason();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "serial output never showed {needle:?} (VM exit: {exited:?})\n----- serial -----\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The addresses the guest printed before `dirty: ready`.
#[derive(Debug)]
struct Layout {
    image: (u64, u64),
    stack: (u64, u64),
    rings: [u64; 3],
    buffer: u64,
    region: u64,
    mailbox: u64,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("not a hex address: {s:?}"))
}

fn range(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('-').expect("range a-b");
    (hex(a), hex(b))
}

fn field<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("dirty: {key} ")))
        .unwrap_or_else(|| panic!("no `dirty: {key}` line:\n{log}"))
}

impl Layout {
    fn parse(log: &str) -> Layout {
        let rings: Vec<u64> = field(log, "rings").split(' ').map(hex).collect();
        let region = field(log, "region");
        let (addr, pages) = region.split_once(" pages ").expect("region line");
        assert_eq!(pages, REGION_PAGES.to_string(), "region size:\n{log}");
        Layout {
            image: range(field(log, "image")),
            stack: range(field(log, "stack")),
            rings: rings.try_into().expect("three ring addresses"),
            buffer: hex(field(log, "buffer")),
            region: hex(addr),
            mailbox: hex(field(log, "mailbox")),
        }
    }

    fn region_page(&self, i: u64) -> u64 {
        self.region + i * PAGE
    }

    fn in_image_or_stack(&self, gpa: u64) -> bool {
        let inside = |(s, e): (u64, u64)| gpa >= s & !(PAGE - 1) && gpa < e;
        inside(self.image) || inside(self.stack)
    }
}

fn page(a: u64) -> u64 {
    a & !(PAGE - 1)
}

/// The region pages the guest says it wrote in `round` (`dirty: round N pages i,j,...`).
fn reported_pages(log: &str, round: u32) -> Vec<u64> {
    let l = field(log, &format!("round {round} pages"));
    l.split(',')
        .map(|s| s.parse().expect("page index"))
        .collect()
}

/// Pause and collect the dirty set: the only place that calls the dirty-page API (keep it here
/// so adapting to the final API is one edit).
fn collect_dirty(vm: &Vm) -> (BTreeSet<u64>, impl Fn(u64) -> bool) {
    let d = vm.dirty_pages().expect("dirty_pages");
    let set: BTreeSet<u64> = d.pages().into_iter().collect();
    (set, move |gpa| d.is_dirty(gpa))
}

/// What one round wrote.
struct Round {
    /// 1 or 2.
    n: u32,
    /// Region page indices the guest wrote.
    written: Vec<u64>,
    /// Addresses a device wrote in the round.
    device: Vec<u64>,
    /// Addresses written only in an earlier round (or never), which must not be dirty now.
    must_be_clean: Vec<u64>,
}

/// Every assertion about one round's dirty set (`dirty`: `DirtyBitmap::pages()`, `is_dirty`:
/// `DirtyBitmap::is_dirty`).
fn check_round(
    layout: &Layout,
    r: &Round,
    dirty: &BTreeSet<u64>,
    is_dirty: &dyn Fn(u64) -> bool,
    log: &str,
) {
    let (round, written, device, must_be_clean) = (r.n, &r.written, &r.device, &r.must_be_clean);
    let ctx = || {
        format!(
            "round {round}: dirty pages {:x?}\nlayout {layout:x?}\n----- serial -----\n{log}",
            dirty.iter().collect::<Vec<_>>()
        )
    };
    for &a in dirty {
        assert_eq!(a % PAGE, 0, "unaligned dirty address {a:#x}\n{}", ctx());
    }
    // Everything written in the round is reported.
    for &i in written.iter() {
        let a = layout.region_page(i);
        assert!(
            dirty.contains(&a) && is_dirty(a),
            "region page {i} ({a:#x}) was written by the guest but is not dirty\n{}",
            ctx()
        );
    }
    for &a in device {
        assert!(
            dirty.contains(&page(a)) && is_dirty(a),
            "page {a:#x} was written by the device but is not dirty\n{}",
            ctx()
        );
    }
    assert!(
        dirty.contains(&layout.mailbox) && is_dirty(layout.mailbox),
        "the mailbox {:#x} was written by the VMM but is not dirty\n{}",
        layout.mailbox,
        ctx()
    );
    // No other region page is.
    for i in 0..REGION_PAGES {
        let a = layout.region_page(i);
        if !written.contains(&i) {
            assert!(
                !dirty.contains(&a) && !is_dirty(a),
                "region page {i} ({a:#x}) was not written in round {round} but is dirty\n{}",
                ctx()
            );
        }
    }
    for &a in must_be_clean {
        assert!(
            !dirty.contains(&page(a)) && !is_dirty(a),
            "page {a:#x} was not written in round {round} but is dirty (not cleared by the previous call?)\n{}",
            ctx()
        );
    }
    // Nothing outside what the round may have written.
    let allowed = |a: u64| {
        (a >= layout.region
            && a < layout.region_page(REGION_PAGES)
            && written.contains(&((a - layout.region) / PAGE)))
            || device.iter().any(|&d| page(d) == a)
            || a == layout.mailbox
            || layout.rings.iter().any(|&r| page(r) == a)
            || layout.in_image_or_stack(a)
    };
    let stray: Vec<String> = dirty
        .iter()
        .filter(|&&a| !allowed(a))
        .map(|a| format!("{a:#x}"))
        .collect();
    assert!(
        stray.is_empty(),
        "round {round}: pages nobody should have written are dirty: {stray:?}\n{}",
        ctx()
    );
}

/// Write the mailbox while paused, then resume.
fn post(vm: &Vm, layout: &Layout, value: u64) {
    vm.memory()
        .write_obj(value, GuestAddress(layout.mailbox))
        .expect("write the mailbox");
    vm.resume().expect("resume");
}

/// Every KVM dirty log mode (legacy, manual protection in chunks, dirty ring) reports the same.
#[test]
fn dirty_log_reports_exactly_the_pages_written() {
    if !require_kvm() {
        return;
    }
    for mode in DirtyLogMode::ALL {
        if mode == DirtyLogMode::Ring && vmm::dirty_log::pvm_host() {
            eprintln!("dirty ring: skipped on this PVM host (its KVM overflows the ring)");
            continue;
        }
        set_mode_override(Some(mode));
        exactly_the_pages_written(mode);
    }
    set_mode_override(None);
}

fn exactly_the_pages_written(mode: DirtyLogMode) {
    eprintln!("dirty log mode {}", mode.name());
    let (config, dir, serial) = vmm::testing::guest_config(
        &format!("dirty-{}", mode.name()),
        "scenario=dirty-log",
        |dir| serde_json::json!({ "disks": [ { "path": dir.join("disk.img") } ] }),
    );
    // Written before the VM opens it. Sector 0 (warm-up read) and sector 1 (round 1) differ,
    // so round 1 changes the buffer.
    let mut img = vec![0x11u8; 1 << 20];
    for (i, b) in img[512..1024].iter_mut().enumerate() {
        *b = 0xd0 ^ i as u8;
    }
    std::fs::write(dir.join("disk.img"), &img).unwrap();
    let mut vm = Vm::new(config).expect("build VM");
    assert_eq!(vm.dirty_log_mode(), mode, "this host offers every mode");
    vm.start().expect("start vCPUs");

    let log = wait_for(&vm, &serial, "dirty: ready");
    let layout = Layout::parse(&log);
    assert!(
        layout.region >= layout.image.1 && layout.mailbox >= layout.image.1,
        "region/mailbox inside the image: {layout:x?}"
    );
    let round1: Vec<u64> = (0..REGION_PAGES).filter(|i| i % 3 == 1).collect();
    let round2: Vec<u64> = (0..REGION_PAGES).filter(|i| i % 5 == 0).collect();
    let used_ring = layout.rings[2];

    // Round 1: guest writes + one virtio-blk read (device writes the buffer and the used ring).
    vm.pause().expect("pause");
    vm.start_dirty_log().expect("start_dirty_log"); // DIRTY-API
    post(&vm, &layout, 1);
    let log = wait_for(&vm, &serial, "dirty: round 1 pages");
    vm.pause().expect("pause");
    assert_eq!(reported_pages(&log, 1), round1, "round 1 pages:\n{log}");
    assert!(
        log.contains("dirty: buffer d0d1d2d3"),
        "round 1 did not read sector 1 into the buffer:\n{log}"
    );
    let r1 = Round {
        n: 1,
        written: round1.clone(),
        device: vec![layout.buffer, used_ring],
        must_be_clean: vec![],
    };
    let (dirty, is_dirty) = collect_dirty(&vm); // DIRTY-API
    check_round(&layout, &r1, &dirty, &is_dirty, &log); // DIRTY-API

    // Round 2: guest writes only. Round-1-only pages and the buffer must be clean again.
    post(&vm, &layout, 2);
    let log = wait_for(&vm, &serial, "dirty: round 2 pages");
    vm.pause().expect("pause");
    assert_eq!(reported_pages(&log, 2), round2, "round 2 pages:\n{log}");
    let mut clean: Vec<u64> = round1
        .iter()
        .filter(|i| !round2.contains(i))
        .map(|&i| layout.region_page(i))
        .collect();
    clean.push(layout.buffer);
    let r2 = Round {
        n: 2,
        written: round2.clone(),
        device: vec![],
        must_be_clean: clean,
    };
    let (dirty, is_dirty) = collect_dirty(&vm); // DIRTY-API
    check_round(&layout, &r2, &dirty, &is_dirty, &log); // DIRTY-API
    vm.stop_dirty_log().expect("stop_dirty_log"); // DIRTY-API

    // Round 3: the guest powers off.
    post(&vm, &layout, 3);
    let log = wait_for(&vm, &serial, "dirty: end");
    let deadline = Instant::now() + GUEST_WAIT;
    while vm.exit_event().reason().is_none() {
        assert!(
            Instant::now() < deadline,
            "the guest did not power off:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        vm.exit_event().reason(),
        Some(devices::ExitReason::PowerOff),
        "{}",
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
    vm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
