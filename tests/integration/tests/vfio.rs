//! PCI passthrough over vfio-user, end to end: real `skiff-testdev` processes (the vfio-user test
//! device) passed through to the test guest, whose `vfio` scenario enumerates them, sizes and
//! programs their BARs, runs DMA into and out of guest RAM with the data verified, takes MSI-X
//! and INTx interrupts, reads and writes their mapped device memory, and — depending on the
//! configuration — goes through the virtio-iommu (IOVAs ≠ GPAs, faults on unmapped IOVAs),
//! does peer-to-peer DMA between two devices, or checks that a `p2p=off` device can neither
//! reach nor be reached by its peer. Also: a device process that dies under a running VM, and
//! snapshots refused while a passthrough device without migration support is present.

use std::time::Duration;

use integration::{
    remote, remote_ok, run_skiff, temp_dir, wait_for_path, Run, SkiffProcess, TestDevice,
};

const DEADLINE: Duration = Duration::from_secs(300);

/// Run the `vfio` scenario with one `--user-device` per entry of `devices` (extra options for
/// each) and the scenario parameters `params`; the guest must print `vfio: all ok`, the devices
/// must end cleanly (their client disconnected) and report no protocol error.
fn vfio_scenario(name: &str, devices: &[&str], params: &str) -> Run {
    vfio_scenario_with(name, devices, params, &[])
}

/// [`vfio_scenario`] with `testdev_args` given to every test device.
fn vfio_scenario_with(name: &str, devices: &[&str], params: &str, testdev_args: &[&str]) -> Run {
    let dir = temp_dir(name);
    let mut tds: Vec<TestDevice> = (0..devices.len())
        .map(|i| TestDevice::start(&dir, &format!("td{i}"), testdev_args))
        .collect();
    let mut args: Vec<String> = Vec::new();
    for (td, extra) in tds.iter().zip(devices) {
        args.push("--user-device".into());
        args.push(td.option(extra));
    }
    args.push("--cmdline".into());
    args.push(format!("scenario=vfio {params}"));
    let run = run_skiff(&args, DEADLINE);
    run.assert_code(0);
    run.assert_stdout_has("vfio: all ok");
    run.assert_stdout_has("result: PASS");
    assert!(!run.stdout.contains("FAIL"), "{}", run.log());
    for td in &mut tds {
        let (code, log) = td.wait(Duration::from_secs(10));
        assert_eq!(code, Some(0), "the test device did not end cleanly:\n{log}");
        assert!(
            !log.contains("ERROR"),
            "the test device logged an error:\n{log}"
        );
    }
    run
}

#[test]
fn one_device_bars_dma_msix_intx_and_device_memory() {
    let run = vfio_scenario("vfio-one", &[""], "vfio.devices=1");
    for check in [
        "vfio: found 1 device(s) at 00:01.0",
        "vfio: bar-sizes ok",
        "vfio: magic-version ok",
        "vfio: dma-write-pattern ok",
        "vfio: dma-copy ok",
        "vfio: dma-read-checksum ok",
        "vfio: bar2-readwrite ok",
        "vfio: msix-interrupt ok",
        "vfio: msix-second-interrupt ok",
        "vfio: intx-interrupt ok",
        "vfio: intx-level-held ok",
        "vfio: intx-deasserted ok",
        "vfio: intx-next-command ok",
    ] {
        run.assert_stdout_has(check);
    }
}

#[test]
fn msi_with_per_vector_masking_and_pending_bits() {
    let run = vfio_scenario_with("vfio-msi", &[""], "vfio.msi=1 vfio.devices=1", &["--msi"]);
    for check in [
        "vfio: msi-capability ok",
        "vfio: msi-enabled ok",
        "vfio: msi-interrupt ok",
        "vfio: msi-masked-no-interrupt ok",
        "vfio: msi-mask-pending ok",
        "vfio: msi-disabled ok",
    ] {
        run.assert_stdout_has(check);
    }
    // skiff emulates per-vector masking: the interrupt raised while masked was held as pending.
    assert!(
        run.stdout
            .contains("msi masked: 0 interrupt(s), pending bits 0x1"),
        "{}",
        run.log()
    );
}

#[test]
fn device_behind_the_virtio_iommu_dmas_at_iovas_and_faults_on_unmapped_ones() {
    let run = vfio_scenario("vfio-iommu", &[",iommu=on"], "vfio.iommu=1 vfio.devices=1");
    for check in [
        "vfio: iommu-attach ok",
        "vfio: iommu-iovas-differ ok",
        "vfio: iommu-unmapped-write-refused ok",
        "vfio: iommu-unmapped-read-refused ok",
        "vfio: iommu-unmap-followed ok",
        "vfio: iommu-works-after-faults ok",
    ] {
        run.assert_stdout_has(check);
    }
}

#[test]
fn two_devices_write_into_each_others_bars() {
    let run = vfio_scenario("vfio-p2p", &["", ""], "vfio.p2p=1 vfio.devices=2");
    run.assert_stdout_has("vfio: p2p-a-to-b ok");
    run.assert_stdout_has("vfio: p2p-b-to-a ok");
}

#[test]
fn two_devices_behind_the_iommu_do_p2p_through_iovas() {
    let run = vfio_scenario(
        "vfio-iommu-p2p",
        &[",iommu=on", ",iommu=on"],
        "vfio.iommu=1 vfio.p2p=1 vfio.devices=2",
    );
    run.assert_stdout_has("vfio: p2p-a-to-b ok");
    run.assert_stdout_has("vfio: p2p-b-to-a ok");
}

#[test]
fn a_p2p_off_device_can_neither_reach_nor_be_reached() {
    let run = vfio_scenario(
        "vfio-p2p-off",
        &["", ",p2p=off"],
        "vfio.p2p_off=1 vfio.devices=2",
    );
    run.assert_stdout_has("vfio: p2p to a p2p=off peer refused");
    run.assert_stdout_has("vfio: p2p from a p2p=off device refused");
    run.assert_stdout_has("vfio: p2p-off-dma-still-works ok");
}

/// A device process that dies while the VM runs: the VM keeps running, a device-error event
/// names the device, `vm.counters` shows it failed, `vm.info` still lists it; and a snapshot of
/// a VM with a passthrough device without migration support is refused with a clear error,
/// leaving the VM running.
#[test]
fn a_dying_device_leaves_the_vm_running_and_snapshots_are_refused() {
    let dir = temp_dir("vfio-dying");
    let mut td = TestDevice::start(&dir, "td0", &["--migration", "none"]);
    let api = dir.join("api.sock");
    let events = dir.join("events.jsonl");
    let mut skiff = SkiffProcess::spawn(&[
        "--api-socket",
        api.to_str().unwrap(),
        "--event-monitor",
        &format!("path={}", events.display()),
        "--user-device",
        &td.option(",id=accel0"),
        "--cmdline",
        "scenario=counter counter.every=1",
    ]);
    wait_for_path(&api, Duration::from_secs(30));
    skiff.wait_until("counter output", DEADLINE, |out| {
        out.contains("counter: 3 ")
    });
    let (code, info, err) = remote(&api, &["info"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        info.contains("\"accel0\"")
            && info.contains("\"vfio-user\"")
            && info.contains("0000:00:01.0")
            && info.contains(&td.socket.display().to_string()),
        "{info}"
    );

    // A snapshot is refused (the device cannot save its state); the VM goes on.
    remote_ok(&api, &["pause"]);
    let snap = dir.join("snap");
    let (code, out, err) = remote(&api, &["snapshot", &format!("file://{}", snap.display())]);
    assert_ne!(code, Some(0), "the snapshot was taken: {out}");
    assert!(
        (out.clone() + &err).contains("passthrough device does not offer"),
        "the refusal does not say why: {out}{err}"
    );
    assert!(
        !snap.join("state.bin").exists(),
        "a partial snapshot was written"
    );
    remote_ok(&api, &["resume"]);

    // The device dies.
    td.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("device-error") && l.contains("accel0"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no device-error event for accel0:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = skiff.stdout_now().matches("counter: ").count();
    skiff.wait_until("the guest to keep running", DEADLINE, |out| {
        out.matches("counter: ").count() > before + 3
    });
    let (code, counters, err) = remote(&api, &["counters"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&counters).expect("counters JSON");
    assert_eq!(v["accel0"]["failed"], 1, "{counters}");
    remote_ok(&api, &["shutdown-vmm"]);
    let run = skiff.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}
