//! Boot the test guest through skiff: the demo, the `boot` scenario with 1 and 4 vCPUs, a guest
//! panic, serial output routing and signal handling.

use std::time::Duration;

use integration::{run_skiff, temp_dir, test_guest, Run};

/// Guest code is emulated on nested-KVM hosts: be generous.
const DEADLINE: Duration = Duration::from_secs(300);

fn summary_field<'a>(run: &'a Run, key: &str) -> &'a str {
    let line = run
        .line_starting("summary:")
        .unwrap_or_else(|| panic!("no summary line\n{}", run.log()));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("summary lacks {key}\n{}", run.log()))
}

fn boot_scenario(cpus: u32, extra: &[&str]) -> Run {
    let guest = test_guest();
    let cpus = format!("boot={cpus}");
    let mut args = vec![
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "scenario=boot",
        "--cpus",
        &cpus,
    ];
    args.extend_from_slice(extra);
    run_skiff(&args, DEADLINE)
}

fn check_boot(run: &Run, cpus: u32) {
    run.assert_code(0);
    run.assert_stdout_has("result: PASS");
    let n = cpus.to_string();
    assert_eq!(summary_field(run, "cpus"), n, "{}", run.log());
    assert_eq!(summary_field(run, "online"), n, "{}", run.log());
    assert_eq!(summary_field(run, "checksum_errors"), "0", "{}", run.log());
    assert_eq!(summary_field(run, "pci_match"), "yes", "{}", run.log());
    // Our tables, each with a valid checksum.
    for sig in ["FACP", "APIC", "MCFG", "DSDT"] {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("acpi: {sig} ")))
            .unwrap_or_else(|| panic!("table {sig} not listed\n{}", run.log()));
        assert!(line.ends_with("checksum ok"), "{line}\n{}", run.log());
    }
    // The e820 map shows low RAM, the reserved BIOS area and RAM from 1 MiB.
    run.assert_stdout_has("e820: [0x0000000000000000-0x000000000009fbff] ram");
    run.assert_stdout_has("e820: [0x0000000000100000-");
    // The host bridge is seen the same way through ECAM and 0xCF8.
    run.assert_stdout_has("pci-ecam: 00:00.0 1b36:0008 class 060000");
    run.assert_stdout_has("pci-cf8: 00:00.0 1b36:0008 class 060000");
    // Every AP reported its own APIC ID.
    for id in 1..cpus {
        run.assert_stdout_has(&format!("smp: cpu online, apic id {id}\n"));
    }
}

#[test]
fn demo_runs_with_no_arguments() {
    let run = run_skiff::<&str>(&[], DEADLINE);
    run.assert_code(0);
    run.assert_stdout_has("skiff demo guest");
    run.assert_stdout_has("CPUs: 1 of 1 online");
    run.assert_stdout_has("Powering off");
}

#[test]
fn boot_scenario_one_vcpu() {
    check_boot(&boot_scenario(1, &[]), 1);
}

#[test]
fn boot_scenario_four_vcpus() {
    check_boot(&boot_scenario(4, &["--memory", "size=1G"]), 4);
}

#[test]
fn boot_scenario_builtin_guest_above_4g() {
    // The built-in guest (no --kernel) with RAM split around the 32-bit hole.
    let run = run_skiff(
        &[
            "--cmdline",
            "scenario=boot",
            "--memory",
            "size=4G",
            "--cpus",
            "boot=2",
        ],
        DEADLINE,
    );
    check_boot(&run, 2);
    run.assert_stdout_has("e820: [0x0000000100000000-0x000000013fffffff] ram");
    run.assert_stdout_has("e820: [0x00000000e0000000-0x00000000e00fffff] reserved");
}

#[test]
fn guest_panic_fails_the_vm() {
    let guest = test_guest();
    let run = run_skiff(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "scenario=panic",
        ],
        DEADLINE,
    );
    run.assert_code(1);
    run.assert_stdout_has("PANIC");
    assert!(run.stderr.contains("triple fault"), "{}", run.log());
    assert!(
        run.stderr.contains("rip="),
        "registers not logged\n{}",
        run.log()
    );
}

#[test]
fn unknown_scenario_is_a_guest_failure() {
    let run = run_skiff(&["--cmdline", "scenario=no-such-thing"], DEADLINE);
    run.assert_code(1);
    run.assert_stdout_has("no-such-thing");
}

#[test]
fn serial_to_file_and_off() {
    let dir = temp_dir("serial");
    let log = dir.join("serial.log");
    let arg = format!("file={}", log.display());
    let run = run_skiff(&["--serial", &arg], DEADLINE);
    run.assert_code(0);
    assert!(run.stdout.is_empty(), "{}", run.log());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("skiff demo guest"), "{text}");

    let run = run_skiff(&["--serial", "off"], DEADLINE);
    run.assert_code(0);
    assert!(run.stdout.is_empty(), "{}", run.log());
}

#[test]
fn timing_and_memory_figures_are_logged() {
    let run = run_skiff(&["-v"], DEADLINE);
    run.assert_code(0);
    assert!(
        run.stderr.contains("timing: first KVM_RUN"),
        "{}",
        run.log()
    );
    assert!(run.stderr.contains("memory: VMM overhead"), "{}", run.log());
}
