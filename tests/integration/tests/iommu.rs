//! The virtio-iommu end to end, driven by the test guest:
//!
//! * `iommu`: the guest finds the IOMMU in the VIOT, probes (MSI window) and attaches the disk,
//!   maps every buffer and ring of the virtio-blk at IOVAs (one data buffer split across two
//!   MAP requests), does rounds of I/O through the mappings, then unmaps a buffer: requests
//!   using it fail with IOERR and raise fault reports with the right endpoint and IOVA, and
//!   later requests still work. The image on the host must hold what the guest wrote.
//! * `iommu-bad`: malformed and invalid requests, each answer checked against the virtio spec.
//! * snapshot/restore with a mapped domain: the restored guest continues its rounds through the
//!   restored mappings and finishes the fault part.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::{remote, remote_ok, run_skiff, temp_dir, wait_for_path, Run, SkiffProcess};

/// The guest's kernel-mode code is emulated on the development host: be generous.
const DEADLINE: Duration = Duration::from_secs(600);
/// What sector 0 of the image starts with (the guest checks it with `iommu.expect=`).
const SECTOR0: &[u8] = b"skiff-iommu-disk";
/// Sector 2 holds this byte everywhere; the guest's write from an unmapped buffer targets it and
/// must not change it.
const SECTOR2_BYTE: u8 = 0xC3;
const SECTOR: usize = 512;

/// Byte `i` of the 8 sectors the guest writes at sector `8 * round` (same as the guest's
/// `scenario::iommu::pattern`).
fn pattern(round: u64, i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (round as u8).wrapping_mul(0x3B) ^ ((i >> 9) as u8) ^ 0x5A
}

/// A 1 MiB image: the marker in sector 0, [`SECTOR2_BYTE`] in sector 2, zeros elsewhere.
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    let mut b = vec![0u8; 1 << 20];
    b[..SECTOR0.len()].copy_from_slice(SECTOR0);
    b[2 * SECTOR..3 * SECTOR].fill(SECTOR2_BYTE);
    std::fs::write(&img, &b).unwrap();
    img
}

/// The image holds every round's data (rounds `1..=last`), and sectors 0 and 2 are unchanged.
fn assert_image(img: &Path, last: u64, log: &str) {
    let b = std::fs::read(img).unwrap();
    assert_eq!(&b[..SECTOR0.len()], SECTOR0, "sector 0 changed\n{log}");
    assert!(
        b[2 * SECTOR..3 * SECTOR].iter().all(|&x| x == SECTOR2_BYTE),
        "the write from an unmapped buffer reached the image (sector 2 changed)\n{log}"
    );
    for k in 1..=last {
        let at = 8 * k as usize * SECTOR;
        let got = &b[at..at + 8 * SECTOR];
        if let Some(i) = (0..8 * SECTOR).find(|&i| got[i] != pattern(k, i)) {
            panic!(
                "round {k}: image byte {} is {:#04x}, the guest wrote {:#04x}\n{log}",
                at + i,
                got[i],
                pattern(k, i)
            );
        }
    }
}

fn iommu_cmdline(rounds: u64, delay_ms: u64) -> String {
    format!(
        "scenario=iommu iommu.rounds={rounds} iommu.delay_ms={delay_ms} iommu.expect={}",
        std::str::from_utf8(SECTOR0).unwrap()
    )
}

/// Parse `BB:DD.F` into the 16-bit requester id.
fn requester_id(bdf: &str) -> u32 {
    let (bus, rest) = bdf.split_once(':').expect("BB:DD.F");
    let (dev, func) = rest.split_once('.').expect("DD.F");
    let n = |s: &str| u32::from_str_radix(s, 16).expect("hex");
    n(bus) << 8 | n(dev) << 3 | n(func)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
}

/// The round numbers in `iommu: round K ok` lines, in order.
fn rounds(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("iommu: round "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Everything the `iommu` scenario must have printed after the rounds: the unmapped buffer's
/// accesses fail with IOERR and each raises a fault report (right endpoint, IOVA, direction),
/// and valid mappings keep working. `text` is the serial output, `endpoint` the blk's id.
fn assert_fault_part(text: &str, endpoint: u32, log: &str) {
    let has = |needle: &str| {
        assert!(
            text.contains(needle),
            "serial output lacks {needle:?}\n{log}"
        )
    };
    let unmapped = text
        .lines()
        .find(|l| l.starts_with("iommu: unmapped victim iova "))
        .unwrap_or_else(|| panic!("no unmap line\n{log}"));
    assert!(unmapped.ends_with(": OK"), "{unmapped}\n{log}");
    let iova = field(unmapped, "iova")
        .split('-')
        .next()
        .unwrap()
        .to_string();
    for line in [
        "check: unmap-victim ok",
        "iommu: read into the unmapped buffer: status 1",
        "check: read-into-unmapped-ioerr ok",
        "check: unmapped-buffer-untouched ok",
        "check: fault-on-device-write ok",
        "iommu: write from the unmapped buffer: status 1",
        "check: write-from-unmapped-ioerr ok",
        "check: fault-on-device-read ok",
        "iommu: after the faults, requests with valid mappings ok",
        "check: read-after-remap ok",
        "check: remap-reaches-the-new-page ok",
        "check: no-extra-faults ok",
        "result: PASS",
    ] {
        has(line);
    }
    // The fault reports, as the guest read them from the event queue: reason 2 (mapping), the
    // device's write (0x2) then its read (0x1) with ADDRESS (0x100), the blk's endpoint id and
    // the unmapped IOVA.
    let faults: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("iommu: fault "))
        .collect();
    assert_eq!(faults.len(), 2, "expected two fault reports\n{log}");
    for (line, flags) in faults.iter().zip(["0x102", "0x101"]) {
        let want = format!(
            "iommu: fault reason 2 (mapping) flags {flags} endpoint {endpoint:#x} address {iova} len 24"
        );
        assert_eq!(*line, want, "\n{log}");
    }
}

/// The blk function and its endpoint id as the guest printed them; checks endpoint == BDF.
fn blk_endpoint(text: &str, log: &str) -> u32 {
    let line = text
        .lines()
        .find(|l| l.starts_with("iommu: blk ") && l.contains(" endpoint "))
        .unwrap_or_else(|| panic!("no blk endpoint line\n{log}"));
    let bdf = field(line, "blk");
    let ep = u32::from_str_radix(field(line, "endpoint").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        ep,
        requester_id(bdf),
        "skiff's endpoint ids are BDFs: {line}\n{log}"
    );
    ep
}

fn assert_pass(run: &Run) {
    run.assert_code(0);
    run.assert_stdout_has("result: PASS");
    assert!(
        !run.stdout.contains("FAIL") && !run.stdout.contains("PANIC"),
        "{}",
        run.log()
    );
}

#[test]
fn blk_dma_through_iommu_mappings_with_faults_on_unmapped_buffers() {
    let dir = temp_dir("iommu");
    let img = make_image(&dir);
    let disk = format!("path={},iommu=on", img.display());
    let run = run_skiff(
        &["--disk", &disk, "--cmdline", &iommu_cmdline(3, 0)],
        DEADLINE,
    );
    let log = run.log();
    assert_pass(&run);
    let out = &run.stdout;
    // VIOT: the virtio-iommu at 00:01.0, the disk behind it at 00:02.0 with endpoint id = BDF.
    for line in [
        "check: viot-checksum ok",
        "check: viot-parse ok",
        "viot: node @0x30 virtio-iommu-pci 0000:00:01.0",
        "viot: node @0x40 pci-range endpoints 0x10.. bdf 00:02.0-00:02.0 segments 0-0 -> node @0x30",
        "viot: 00:02.0 virtio-blk endpoint 0x10",
        "check: viot-iommu-is-virtio-iommu ok",
        // The configuration skiff documents.
        "iommu: features 0x100000077 (input-range domain-range map-unmap probe mmio bypass-config)",
        "iommu: config page_size_mask 0xfffffffffffff000 input 0x0-0xffffffffffff domains 0-4294967295 probe_size 512 bypass 0",
        "iommu: probe resv-mem msi 0xfee00000-0xfeefffff",
        "check: probe-msi-window ok",
        "iommu: attach endpoint 0x10 to domain 7: OK",
        "check: blk-offers-access-platform ok",
        "iommu: blk FEATURES_OK without ACCESS_PLATFORM refused",
        "check: blk-refuses-features-without-access-platform ok",
        "check: blk-features-ok ok",
        "check: ring-iovas-differ ok",
        "check: blk-driver-ok ok",
        "iommu: blk interrupts msi-x, iommu interrupts msi-x",
        "check: blk-msix-through-the-msi-window ok",
        "check: no-fault-before-unmap ok",
        "check: fault-on-device-write-interrupt ok",
        "check: fault-on-device-read-interrupt ok",
    ] {
        assert!(out.contains(line), "serial output lacks {line:?}\n{log}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("iommu: split buffer iova ") && l.contains("] + [iova ")),
        "{log}"
    );
    // 3 rounds, then one more after the faults.
    assert_eq!(rounds(out), vec![1, 2, 3, 4], "{log}");
    let ep = blk_endpoint(out, &log);
    assert_eq!(ep, 0x10);
    assert_fault_part(out, ep, &log);
    assert_image(&img, 4, &log);
    assert!(!run.stderr.contains("panicked"), "{log}");
}

/// Every case of the `iommu-bad` scenario, in order.
const BAD_CASES: &[&str] = &[
    "unknown-type",
    "head-reserved-ignored",
    "truncated-attach",
    "truncated-map",
    "missing-tail",
    "short-tail",
    "readonly-tail",
    "no-tail-requests-not-executed",
    "attach-unknown-endpoint",
    "attach-unknown-flags",
    "attach-reserved-nonzero",
    "attach-bypass-flag-mismatch",
    "map-unknown-flags",
    "map-unaligned-start",
    "map-unaligned-end",
    "map-unaligned-phys",
    "map-one-byte",
    "map-end-before-start",
    "map-outside-input-range",
    "map-straddling-input-end",
    "map-overlap",
    "map-over-msi-window",
    "map-unknown-domain",
    "unmap-split",
    "unmap-split-kept-the-mapping",
    "unmap-unknown-domain",
    "unmap-nothing-mapped",
    "unmap-spilling-over",
    "map-after-unmap",
    "probe-unknown-endpoint",
    "probe-small-buffer",
    "probe-small-buffer-no-property",
    "probe-reserved-ignored",
    "probe-reserved-ignored-msi-property",
    "detach-unknown-endpoint",
    "detach-wrong-domain",
    "detach-reserved-ignored",
    "detach-not-attached",
    "map-on-destroyed-domain",
    "attach-bypass-domain",
    "map-on-bypass-domain",
    "unmap-on-bypass-domain",
    "bypass-writable",
    "bypass-kept-across-device-reset",
    "still-serves-valid-requests",
];

#[test]
fn malformed_iommu_requests_get_the_spec_status() {
    let dir = temp_dir("iommu-bad");
    let img = make_image(&dir);
    let disk = format!("path={},iommu=on", img.display());
    // A second endpoint (the rng) lets the guest detach from a domain the disk is not in.
    let run = run_skiff(
        &[
            "--disk",
            &disk,
            "--rng",
            "iommu=on",
            "--cmdline",
            "scenario=iommu-bad",
        ],
        DEADLINE,
    );
    let log = run.log();
    let failed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("check: ") && l.contains(" FAIL "))
        .collect();
    assert!(
        failed.is_empty(),
        "cases answered against the spec:\n{}\n\n{log}",
        failed.join("\n")
    );
    assert_pass(&run);
    run.assert_stdout_has("iommu-bad: endpoint 0x10 (second endpoint 0x18), granule 0x1000");
    for case in BAD_CASES {
        run.assert_stdout_has(&format!("check: {case} ok\n"));
    }
    // Each case printed what came back, and nothing was left unanswered.
    for case in BAD_CASES.iter().filter(|c| {
        !c.ends_with("-no-property")
            && !c.ends_with("-msi-property")
            && !c.starts_with("bypass-")
            && **c != "still-serves-valid-requests"
    }) {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with(&format!("iommu-bad: {case} -> "))),
            "no outcome line for {case}\n{log}"
        );
    }
    assert!(!run.stdout.contains("no completion"), "{log}");
    run.assert_stdout_has("iommu-bad: device still serves valid requests ok");
    run.assert_stdout_has("iommu-bad: 0 case(s) failed");
    assert!(!run.stderr.contains("panicked"), "{log}");
}

#[test]
fn snapshot_restore_keeps_the_iommu_mappings() {
    const ROUNDS: u64 = 5;
    let dir = temp_dir("iommu-snap");
    let img = make_image(&dir);
    let socket = dir.join("api.sock");
    let disk = format!("path={},iommu=on", img.display());
    // A long delay between rounds: the VM is paused while the guest waits, mappings live.
    let cmdline = iommu_cmdline(ROUNDS, 3000);
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket.to_str().unwrap(),
        "--disk",
        &disk,
        "--cmdline",
        &cmdline,
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    p.wait_for_output("iommu: round 1 ok", DEADLINE);
    remote_ok(&socket, &["pause"]);
    // Let the output reader catch up with what the guest printed before the pause.
    std::thread::sleep(Duration::from_millis(300));
    let before = p.stdout_now();
    let done = *rounds(&before).last().unwrap();
    assert!(
        done < ROUNDS,
        "the guest finished its rounds before the pause; make the delay longer:\n{before}"
    );
    let ep = blk_endpoint(&before, &before);
    let snap = dir.join("snap");
    remote_ok(
        &socket,
        &["snapshot", &format!("file://{}", snap.display())],
    );
    // Kill the process outright: the snapshot must carry the IOMMU's domains and mappings.
    p.signal("KILL");
    let _ = p.wait(Duration::from_secs(30));

    let socket2 = dir.join("api2.sock");
    let restore = format!("source_url=file://{}", snap.display());
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket2.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    wait_for_path(&socket2, Duration::from_secs(30));
    let (_, info, _) = remote(&socket2, &["info"]);
    assert!(
        info.contains("\"Paused\""),
        "a restored VM comes up paused: {info}"
    );
    remote_ok(&socket2, &["resume"]);
    p.wait_until("the scenario to finish", DEADLINE, |t| {
        t.contains("result: ") || t.contains("PANIC")
    });
    // With an API socket the process outlives the guest: wait for the ACPI power-off (a guest
    // crash never gets there), then end the VMM.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, info, _) = remote(&socket2, &["info"]);
        if info.contains("\"Shutdown\"") {
            break;
        }
        if Instant::now() > deadline {
            let run = p.wait(Duration::from_secs(5));
            panic!(
                "the restored guest did not power off: {info}\n{before}\n{}",
                run.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    remote_ok(&socket2, &["shutdown-vmm"]);
    let run = p.wait(Duration::from_secs(60));
    let log = format!(
        "----- before the snapshot -----\n{before}\n----- after restore -----\n{}",
        run.log()
    );
    run.assert_code(0);
    let after = &run.stdout;
    assert!(
        !after.contains("guest: scenario="),
        "the guest booted again instead of continuing\n{log}"
    );
    assert!(!after.contains("FAIL") && !after.contains("PANIC"), "{log}");
    // The remaining rounds, then the one after the faults, all through the restored mappings.
    let expected: Vec<u64> = (done + 1..=ROUNDS + 1).collect();
    assert_eq!(rounds(after), expected, "{log}");
    assert_fault_part(after, ep, &log);
    assert_image(&img, ROUNDS + 1, &log);
}

/// A VM with virtio-blk (behind the virtio-iommu, with live mappings), virtio-net, a console and
/// virtio-rng (behind the IOMMU too) is live-migrated to a second skiff mid-scenario (the disk
/// image is shared storage, the NIC gets another TAP on the target): the guest's remaining I/O
/// rounds go on through the migrated mappings, then the fault part, and the image holds every
/// round.
#[test]
fn live_migration_keeps_the_iommu_mappings_and_the_devices() {
    const ROUNDS: u64 = 5;
    let dir = temp_dir("iommu-migrate");
    let img = make_image(&dir);
    let serial = dir.join("serial.log");
    let console = dir.join("console.log");
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let tag = std::process::id() % 100_000;
    let (tap_a, tap_b) = (format!("mta{tag}"), format!("mtb{tag}"));
    let disk = format!("path={},iommu=on", img.display());
    let net = format!("tap={tap_a},id=net0");
    let con = format!("file={}", console.display());
    let serial_arg = format!("file={}", serial.display());
    let cmdline = iommu_cmdline(ROUNDS, 3000);
    let mut src = SkiffProcess::spawn(&[
        "--api-socket",
        src_api.to_str().unwrap(),
        "--disk",
        &disk,
        "--net",
        &net,
        "--console",
        &con,
        "--rng",
        "iommu=on",
        "--serial",
        &serial_arg,
        "--cmdline",
        &cmdline,
    ]);
    let mut dst = SkiffProcess::spawn(&["--api-socket", dst_api.to_str().unwrap()]);
    wait_for_path(&src_api, Duration::from_secs(30));
    wait_for_path(&dst_api, Duration::from_secs(30));
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
    let deadline = Instant::now() + DEADLINE;
    while !serial_text().contains("iommu: round 1 ok") {
        assert!(Instant::now() < deadline, "no round 1:\n{}", serial_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let over = format!("net0:tap={tap_b}");
    remote_ok(&dst_api, &["receive-migration", &url, "--override", &over]);
    let (code, out, err) = remote(&src_api, &["send-migration", &url]);
    let before = serial_text();
    assert_eq!(
        code,
        Some(0),
        "send-migration: {out}{err}\n{}",
        src.wait(Duration::from_secs(5)).log()
    );
    let done = *rounds(&before).last().unwrap();
    assert!(
        done < ROUNDS,
        "the guest finished before the migration:\n{before}"
    );
    let run = src.wait(Duration::from_secs(30));
    assert_eq!(
        run.code(),
        Some(0),
        "the source did not end cleanly:\n{}",
        run.log()
    );
    let ep = blk_endpoint(&before, &before);
    // The target runs the rest of the scenario, then powers the guest off.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, info, _) = remote(&dst_api, &["info"]);
        if info.contains("\"Shutdown\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migrated guest did not finish: {info}\n{}",
            serial_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    remote_ok(&dst_api, &["shutdown-vmm"]);
    let dst_run = dst.wait(Duration::from_secs(60));
    let all = serial_text();
    let log = format!("{all}\n----- target -----\n{}", dst_run.log());
    assert!(all.contains("result: PASS"), "{log}");
    assert_eq!(
        all.matches("guest: scenario=").count(),
        1,
        "the guest booted again instead of continuing\n{log}"
    );
    assert_eq!(rounds(&all), (1..=ROUNDS + 1).collect::<Vec<_>>(), "{log}");
    assert_fault_part(&all, ep, &log);
    assert_image(&img, ROUNDS + 1, &log);
}
