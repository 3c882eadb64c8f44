//! Smoke-boot the minimal Linux kernel from `resources/guest/` (PVH vmlinux and bzImage, 2 vCPUs) and
//! judge our ACPI tables, SMP bring-up and PCI by its kernel log.
//!
//! On an emulating host (shared/HOST.md) init dies at its first system call; the kernel then panics
//! and, with `panic=-1`, reboots at once, so skiff exits with the reboot status (3). On a host with
//! real VMX/SVM the initramfs prints a marker and powers off (status 0).

use std::time::Duration;

use integration::{emulating_host, linux_cpu_workaround, run_skiff, smoke_kernel_dir, Run};

/// Linux takes ~2 minutes to reach init here (HOST.md); leave plenty of room.
const DEADLINE: Duration = Duration::from_secs(900);

fn boot(image: &str) -> Option<Run> {
    let dir = match smoke_kernel_dir() {
        Ok(d) => d,
        Err(e) if std::env::var_os("SKIFF_SKIP_LINUX").is_some() => {
            eprintln!("skipping (SKIFF_SKIP_LINUX set): {e}");
            return None;
        }
        Err(e) => panic!("{e} (set SKIFF_SKIP_LINUX=1 to skip the Linux smoke tests)"),
    };
    let kernel = dir.join(image);
    let initramfs = dir.join("initramfs.cpio");
    let cmdline = format!("console=ttyS0 panic=-1 {}", linux_cpu_workaround());
    let run = run_skiff(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            cmdline.trim(),
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "-v",
        ],
        DEADLINE,
    );
    eprintln!(
        "Linux smoke boot ({image}) ended after {:.1} s with {:?}",
        run.elapsed.as_secs_f64(),
        run.status
    );
    Some(run)
}

fn check(run: &Run) {
    for line in [
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: PCI Root Bridge [PCI0]",
        "PCI host bridge to bus 0000:00",
        "pci 0000:00:00.0: [1b36:0008]",
        "Run /init as init process",
    ] {
        run.assert_stdout_has(line);
    }
    if emulating_host() {
        // init cannot make system calls here: the kernel panics and reboots (panic=-1).
        run.assert_code(3);
    } else {
        run.assert_stdout_has("SKIFF-INIT: userspace reached");
        run.assert_code(0);
    }
}

#[test]
fn linux_pvh_vmlinux() {
    if let Some(run) = boot("vmlinux") {
        check(&run);
    }
}

#[test]
fn linux_bzimage() {
    if let Some(run) = boot("bzImage") {
        check(&run);
    }
}
