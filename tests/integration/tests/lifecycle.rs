//! How a VM ends: signals stop it cleanly with 128+N, a guest reset request ends it with status 3.

use std::time::Duration;

use integration::{run_skiff, SkiffProcess};

const DEADLINE: Duration = Duration::from_secs(300);

fn stop_idle_guest_with(sig: &str, cpus: &str) -> integration::Run {
    let mut p = SkiffProcess::spawn(&["--cmdline", "scenario=idle", "--cpus", cpus, "-v"]);
    p.wait_for_output("idle: halting", DEADLINE);
    p.signal(sig);
    p.wait(Duration::from_secs(60))
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let run = stop_idle_guest_with("TERM", "boot=2");
    run.assert_code(128 + 15);
    assert!(run.stderr.contains("received signal 15"), "{}", run.log());
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

#[test]
fn sigint_stops_the_vm_cleanly() {
    let run = stop_idle_guest_with("INT", "boot=1");
    run.assert_code(128 + 2);
}

#[test]
fn guest_reset_request_exits_with_reboot_status() {
    let run = run_skiff(&["--cmdline", "scenario=reboot"], DEADLINE);
    run.assert_code(3);
    run.assert_stdout_has("reboot: resetting through the ACPI reset register");
    assert!(run.stderr.contains("reboot"), "{}", run.log());
}

#[test]
fn linux64_entry_without_pvh_note() {
    // Hide the PVH note of the test guest (change its type) so skiff must use the 64-bit Linux boot
    // protocol (long mode, identity map, boot_params in RSI) with the same guest.
    let mut elf = std::fs::read(integration::test_guest()).unwrap();
    // Note header: namesz=4, descsz=8, type=18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen\0".
    let pattern: Vec<u8> = [4u32.to_le_bytes(), 8u32.to_le_bytes(), 18u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(*b"Xen\0")
        .collect();
    let at = elf
        .windows(pattern.len())
        .position(|w| w == pattern.as_slice())
        .expect("the test guest has a PVH note");
    elf[at + 8..at + 12].copy_from_slice(&0x7fffu32.to_le_bytes());
    let dir = integration::temp_dir("linux64");
    let path = dir.join("guest-no-pvh.elf");
    std::fs::write(&path, &elf).unwrap();
    let run = run_skiff(
        &[
            "--kernel",
            path.to_str().unwrap(),
            "--cmdline",
            "scenario=boot",
            "--cpus",
            "boot=2",
            "-v",
        ],
        DEADLINE,
    );
    run.assert_code(0);
    run.assert_stdout_has("protocol=linux64");
    run.assert_stdout_has("result: PASS");
    assert!(run.stderr.contains("Linux64 entry"), "{}", run.log());
}
