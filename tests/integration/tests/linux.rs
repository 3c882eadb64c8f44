//! Smoke-boot the minimal Linux kernel from `resources/guest/` (PVH vmlinux and bzImage, 2 vCPUs) and
//! judge our ACPI tables, SMP bring-up and PCI by its kernel log.
//!
//! On an emulating host (shared/HOST.md) init dies at its first system call; the kernel then panics
//! and, with `panic=-1`, reboots at once, so skiff exits with the reboot status (3). On a host with
//! real VMX/SVM the initramfs prints a marker and powers off (status 0).

use std::time::Duration;

use integration::{
    emulating_host, linux_cpu_workaround, remote, remote_ok, run_command, run_skiff, skiff_bin,
    skip_or_fail, smoke_kernel_dir, smoke_rootfs, temp_dir, wait_for_path, NetNamespace, Run,
    SkiffProcess, TestDevice,
};

/// Linux takes ~2 minutes to reach init here (HOST.md); leave plenty of room.
const DEADLINE: Duration = Duration::from_secs(900);

fn boot(image: &str) -> Option<Run> {
    let dir = match smoke_kernel_dir() {
        Ok(d) => d,
        Err(e) => {
            skip_or_fail("SKIFF_SKIP_LINUX", &e);
            return None;
        }
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

#[test]
/// Root on virtio-blk behind the virtio-iommu (as are the console and rng; the NIC is not): Linux
/// finds the IOMMU through the VIOT, attaches the devices and mounts ext4 through translated DMA.
fn linux_root_on_virtio_blk_behind_iommu_with_net_console_rng() {
    let (dir, rootfs) = match (smoke_kernel_dir(), smoke_rootfs()) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => return skip_or_fail("SKIFF_SKIP_LINUX", &e),
    };
    let tmp = temp_dir("linux-devices");
    // The guest mounts the root read-write: boot a copy.
    let root = tmp.join("root.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    let console = tmp.join("console.log");
    let ns = match NetNamespace::create("linux") {
        Ok(ns) => ns,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let cmdline = format!(
        "console=ttyS0 console=hvc0 root=/dev/vda rw rootfstype=ext4 init=/init panic=-1 {}",
        linux_cpu_workaround()
    );
    let disk = format!("path={},id=root,serial=skiff-root,iommu=on", root.display());
    let net = format!("tap={},id=net0,mac=52:54:00:12:34:56", ns.tap);
    let con = format!("file={},iommu=on", console.display());
    let kernel = dir.join("vmlinux");
    let mut cmd = ns.command(&skiff_bin());
    cmd.args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &disk,
        "--net",
        &net,
        "--console",
        &con,
        "--rng",
        "iommu=on",
    ])
    .args([
        "--cmdline",
        cmdline.trim(),
        "--cpus",
        "boot=2",
        "--memory",
        "size=512M",
        "-v",
    ]);
    let run = run_command(&mut cmd, DEADLINE);
    eprintln!(
        "Linux boot with root on virtio-blk ended after {:.1} s with {:?}",
        run.elapsed.as_secs_f64(),
        run.status
    );
    for line in [
        "ACPI: VIOT",
        "pci 0000:00:01.0: [1af4:1057]",
        "pci 0000:00:02.0: [1af4:1042]",
        "pci 0000:00:03.0: [1af4:1041]",
        "pci 0000:00:04.0: [1af4:1043]",
        "pci 0000:00:05.0: [1af4:1044]",
        // virtioN numbering follows probe order, which deferred probing makes vary.
        "virtio_iommu virtio",
        ": input address: 48 bits",
        ": page mask: 0xfffffffffffff000",
        "virtio-pci 0000:00:02.0: Adding to iommu group",
        "virtio-pci 0000:00:04.0: Adding to iommu group",
        "virtio-pci 0000:00:05.0: Adding to iommu group",
        ": [vda] 131072 512-byte logical blocks",
        "EXT4-fs (vda): mounted filesystem",
        "VFS: Mounted root (ext4 filesystem)",
        "Run /init as init process",
    ] {
        run.assert_stdout_has(line);
    }
    // The NIC is not behind the IOMMU.
    assert!(
        !run.stdout.contains("0000:00:03.0: Adding to iommu group"),
        "net0 was put behind the IOMMU\n{}",
        run.log()
    );
    // Every driver probed: each device reached DRIVER_OK (skiff logs the activation).
    for id in ["iommu0", "root", "net0", "console0", "rng0"] {
        assert!(
            run.stderr
                .contains(&format!("{id}: driver ready, activated")),
            "{id} was not activated by its Linux driver\n{}",
            run.log()
        );
    }
    // The virtio console carried the kernel log once hvc0 registered.
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.contains("EXT4-fs (vda): mounted filesystem"),
        "console file:\n{text}\n{}",
        run.log()
    );
    if emulating_host() {
        run.assert_code(3);
    } else {
        run.assert_stdout_has("SKIFF-INIT: userspace reached");
        run.assert_code(0);
    }
}

#[test]
/// Two vfio-user test devices passed through, one behind the virtio-iommu: Linux enumerates both
/// (vendor:device, the BARs skiff assigned) and puts the one behind the IOMMU in an iommu group.
fn linux_enumerates_passthrough_devices_and_groups_the_one_behind_the_iommu() {
    let dir = match smoke_kernel_dir() {
        Ok(d) => d,
        Err(e) => return skip_or_fail("SKIFF_SKIP_LINUX", &e),
    };
    let tmp = temp_dir("linux-vfio");
    let behind = TestDevice::start(&tmp, "td-iommu", &[]);
    let plain = TestDevice::start(&tmp, "td-plain", &[]);
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio");
    // vfio-pci (built in) binds the test devices by id, so Linux configures their DMA: the one
    // behind the IOMMU joins an iommu group; the other cannot (vfio-pci then refuses it).
    let cmdline = format!(
        "console=ttyS0 panic=-1 vfio-pci.ids=1b36:0f5f {}",
        linux_cpu_workaround()
    );
    let run = run_skiff(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--user-device",
            &behind.option(",id=accel0,iommu=on"),
            "--user-device",
            &plain.option(",id=accel1"),
            "--cmdline",
            cmdline.trim(),
            "--memory",
            "size=512M",
            "-v",
        ],
        DEADLINE,
    );
    eprintln!(
        "Linux boot with passthrough devices ended after {:.1} s with {:?}",
        run.elapsed.as_secs_f64(),
        run.status
    );
    for line in [
        "ACPI: VIOT",
        "pci 0000:00:01.0: [1af4:1057]",
        "pci 0000:00:02.0: [1b36:0f5f]",
        "pci 0000:00:03.0: [1b36:0f5f]",
        "virtio_iommu virtio",
        "0000:00:02.0: Adding to iommu group",
        "Run /init as init process",
    ] {
        run.assert_stdout_has(line);
    }
    // Linux reads the BARs where skiff placed them (BAR 0: 4 KiB of registers, BAR 2: 1 MiB of
    // 64-bit prefetchable device memory); skiff logs "<id>: vfio-user at <dev>, BARs [(0, a, s), ...]".
    for (id, dev) in [("accel0", "0000:00:02.0"), ("accel1", "0000:00:03.0")] {
        let placed = run
            .stderr
            .lines()
            .find(|l| l.contains(&format!("{id}: vfio-user at {dev}, BARs")))
            .unwrap_or_else(|| panic!("skiff did not log {id}'s BARs\n{}", run.log()));
        let list = &placed[placed.find("BARs [").unwrap() + 6..];
        let n: Vec<u64> = list
            .split(|c: char| !c.is_ascii_hexdigit())
            .filter(|t| !t.is_empty())
            .filter_map(|t| u64::from_str_radix(t, 16).ok())
            .collect();
        assert_eq!(n.len(), 6, "cannot parse {placed:?}");
        for line in [
            format!(
                "pci {dev}: BAR 0 [mem {:#010x}-{:#010x}]",
                n[1],
                n[1] + n[2] - 1
            ),
            format!(
                "pci {dev}: BAR 2 [mem {:#010x}-{:#010x} 64bit pref]",
                n[4],
                n[4] + n[5] - 1
            ),
        ] {
            run.assert_stdout_has(&line);
        }
    }
    run.assert_stdout_has("vfio-pci 0000:00:02.0: Adding to iommu group");
    assert!(
        !run.stdout.contains("0000:00:03.0: Adding to iommu group"),
        "accel1 was put behind the IOMMU\n{}",
        run.log()
    );
    if emulating_host() {
        run.assert_code(3);
    } else {
        run.assert_code(0);
    }
}

#[test]
/// The smoke kernel is live-migrated to a second skiff in the middle of its boot (once PCI is
/// scanned) and reaches init on the target.
fn linux_migrated_mid_boot_reaches_init_on_the_target() {
    let dir = match smoke_kernel_dir() {
        Ok(d) => d,
        Err(e) => return skip_or_fail("SKIFF_SKIP_LINUX", &e),
    };
    let tmp = temp_dir("linux-migrate");
    let serial = tmp.join("serial.log");
    let (src_api, dst_api) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio");
    let cmdline = format!("console=ttyS0 panic=-1 {}", linux_cpu_workaround());
    let serial_arg = format!("file={}", serial.display());
    let mut src = SkiffProcess::spawn(&[
        "--api-socket",
        src_api.to_str().unwrap(),
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
        "--serial",
        &serial_arg,
    ]);
    let mut dst = SkiffProcess::spawn(&["--api-socket", dst_api.to_str().unwrap()]);
    wait_for_path(&src_api, Duration::from_secs(30));
    wait_for_path(&dst_api, Duration::from_secs(30));
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !text().contains("PCI host bridge to bus 0000:00") {
        assert!(
            std::time::Instant::now() < deadline,
            "no PCI scan:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("unix:{}", tmp.join("mig.sock").display());
    remote_ok(&dst_api, &["receive-migration", &url]);
    let (code, out, err) = remote(&src_api, &["send-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        !text().contains("Run /init"),
        "the kernel reached init before the migration: make the trigger earlier\n{}",
        text()
    );
    let run = src.wait(Duration::from_secs(60));
    assert_eq!(run.code(), Some(0), "{}", run.log());
    while !text().contains("Run /init as init process") {
        assert!(
            std::time::Instant::now() < deadline,
            "the migrated kernel did not reach init:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = text();
    assert_eq!(
        log.matches("Linux version").count(),
        1,
        "the kernel booted again on the target:\n{log}"
    );
    let _ = remote(&dst_api, &["shutdown-vmm"]);
    let _ = dst.wait(Duration::from_secs(30));
}
