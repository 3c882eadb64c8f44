//! Every bad input gets a clear one-line error and a non-zero exit, never a panic or a started VM.

use std::time::Duration;

use integration::{run_command, run_skiff, skiff_bin, temp_dir, test_guest, Run};

const DEADLINE: Duration = Duration::from_secs(120);

/// The run failed with `code`, printed exactly one error line naming `needle`, and did not panic.
fn assert_refused(run: &Run, code: i32, needle: &str) {
    run.assert_code(code);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("skiff: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line\n{}", run.log());
    assert!(
        errors[0].contains(needle),
        "error line lacks {needle:?}\n{}",
        run.log()
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
    assert!(
        run.stdout.is_empty(),
        "the guest must not have run\n{}",
        run.log()
    );
}

#[test]
fn missing_kernel() {
    let run = run_skiff(&["--kernel", "/nonexistent/vmlinux"], DEADLINE);
    assert_refused(&run, 2, "/nonexistent/vmlinux");
}

#[test]
fn kernel_is_a_directory() {
    let dir = temp_dir("kdir");
    let run = run_skiff(&["--kernel", dir.to_str().unwrap()], DEADLINE);
    assert_refused(&run, 2, "not a regular file");
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    let dir = temp_dir("junk");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let run = run_skiff(&["--kernel", junk.to_str().unwrap()], DEADLINE);
    assert_refused(&run, 1, "neither an ELF vmlinux nor a bzImage");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let run = run_skiff(&["--kernel", empty.to_str().unwrap()], DEADLINE);
    assert_refused(&run, 1, "neither an ELF vmlinux nor a bzImage");
}

#[test]
fn truncated_elf() {
    let dir = temp_dir("trunc");
    let elf = std::fs::read(test_guest()).unwrap();
    let cut = dir.join("cut.elf");
    std::fs::write(&cut, &elf[..200]).unwrap();
    let run = run_skiff(&["--kernel", cut.to_str().unwrap()], DEADLINE);
    assert_refused(&run, 1, "cannot load the kernel");
}

#[test]
fn initramfs_does_not_fit() {
    let dir = temp_dir("initrd");
    let big = dir.join("big.cpio");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(40 << 20).unwrap();
    let guest = test_guest();
    let run = run_skiff(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--initramfs",
            big.to_str().unwrap(),
            "--memory",
            "size=32M",
        ],
        DEADLINE,
    );
    assert_refused(&run, 1, "does not fit");
}

#[test]
fn missing_initramfs() {
    let guest = test_guest();
    let run = run_skiff(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--initramfs",
            "/nonexistent/initrd",
        ],
        DEADLINE,
    );
    assert_refused(&run, 2, "/nonexistent/initrd");
}

#[test]
fn command_line_too_long() {
    let long = format!("scenario=boot {}", "x".repeat(3000));
    let run = run_skiff(&["--cmdline", &long], DEADLINE);
    assert_refused(&run, 1, "accepts at most 2047");
}

#[test]
fn vcpu_counts() {
    assert_refused(
        &run_skiff(&["--cpus", "boot=0"], DEADLINE),
        2,
        "at least one vCPU",
    );
    assert_refused(
        &run_skiff(&["--cpus", "boot=100000"], DEADLINE),
        2,
        "at most",
    );
    assert_refused(
        &run_skiff(&["--cpus", "boot=two"], DEADLINE),
        2,
        "not a number",
    );
    assert_refused(&run_skiff(&["--cpus", "4"], DEADLINE), 2, "key=value");
}

#[test]
fn memory_sizes() {
    assert_refused(&run_skiff(&["--memory", "size=0"], DEADLINE), 2, "at least");
    assert_refused(
        &run_skiff(&["--memory", "size=lots"], DEADLINE),
        2,
        "not a number",
    );
    assert_refused(
        &run_skiff(&["--memory", "size=12Q"], DEADLINE),
        2,
        "unknown unit",
    );
    assert_refused(
        &run_skiff(&["--memory", "size=64T"], DEADLINE),
        1,
        "larger than the host can back",
    );
}

#[test]
fn malformed_cpu_template() {
    let dir = temp_dir("tmpl");
    let cases = [
        ("not-json.json", "{ this is not json"),
        (
            "bad-register.json",
            r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"exx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#,
        ),
        (
            "short-bitmap.json",
            r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0b0101"}]}]}"#,
        ),
        (
            "unknown-field.json",
            r#"{"cpuid_modifiers":[],"colour":"blue"}"#,
        ),
    ];
    for (name, text) in cases {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let run = run_skiff(&["--cpu-template", p.to_str().unwrap()], DEADLINE);
        assert_refused(&run, 1, "--cpu-template");
    }
    let run = run_skiff(&["--cpu-template", "/nonexistent/t.json"], DEADLINE);
    assert_refused(&run, 2, "/nonexistent/t.json");
}

#[test]
fn good_cpu_template_boots() {
    // Clearing SSE3 (leaf 1 ECX bit 0) is harmless for the soft-float guest: it must still boot.
    let dir = temp_dir("tmpl-ok");
    let p = dir.join("t.json");
    std::fs::write(
        &p,
        r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}"#,
    )
    .unwrap();
    let run = run_skiff(
        &["--cpu-template", p.to_str().unwrap()],
        Duration::from_secs(300),
    );
    run.assert_code(0);
}

#[test]
fn serial_file_in_missing_directory() {
    let run = run_skiff(&["--serial", "file=/nonexistent/dir/serial.log"], DEADLINE);
    assert_refused(&run, 1, "/nonexistent/dir/serial.log");
}

#[test]
fn kvm_missing_is_explained() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare).
    let probe = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .output();
    match probe {
        Ok(ref o) if o.status.success() => {}
        Ok(o) => {
            let why = format!(
                "cannot create a mount namespace (unshare -m: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return integration::skip_or_fail("SKIFF_SKIP_UNSHARE", &why);
        }
        Err(e) => {
            let why = format!("cannot run unshare: {e}");
            return integration::skip_or_fail("SKIFF_SKIP_UNSHARE", &why);
        }
    }
    let script = format!("mount -t tmpfs none /dev && exec {}", skiff_bin().display());
    let run = run_command(
        std::process::Command::new("unshare").args(["-m", "sh", "-c", &script]),
        DEADLINE,
    );
    assert_refused(&run, 1, "/dev/kvm");
    assert!(run.stderr.contains("KVM is not available"), "{}", run.log());
}

#[test]
fn device_options_are_checked_before_the_guest_starts() {
    let dir = temp_dir("devopts");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let d = |extra: &str| format!("path={}{extra}", img.display());
    // Missing image.
    assert_refused(
        &run_skiff(&["--disk", "path=/nonexistent/disk.img"], DEADLINE),
        2,
        "/nonexistent/disk.img",
    );
    // Conflicting ids, given or defaulted.
    assert_refused(
        &run_skiff(&["--disk", &d(",id=a"), "--disk", &d(",id=a")], DEADLINE),
        2,
        "used twice",
    );
    assert_refused(
        &run_skiff(&["--disk", &d(",id=disk1"), "--disk", &d("")], DEADLINE),
        2,
        "used twice",
    );
    // Malformed options.
    assert_refused(
        &run_skiff(&["--disk", &d(",readonly=yes")], DEADLINE),
        2,
        "expected on or off",
    );
    assert_refused(
        &run_skiff(&["--net", "tap=a,mac=nonsense"], DEADLINE),
        2,
        "mac=",
    );
    assert_refused(
        &run_skiff(&["--net", "bridge=br0"], DEADLINE),
        2,
        "unknown key",
    );
    assert_refused(
        &run_skiff(&["--console", "tty"], DEADLINE),
        2,
        "expected off, stdout",
    );
    assert_refused(
        &run_skiff(&["--console", "stdout"], DEADLINE),
        2,
        "both use stdout",
    );
    // Virtual IOMMU options.
    assert_refused(
        &run_skiff(&["--console", "off,iommu=on"], DEADLINE),
        2,
        "needs a console device",
    );
    assert_refused(
        &run_skiff(&["--rng", "iommu=maybe"], DEADLINE),
        2,
        "expected on or off",
    );
    assert_refused(
        &run_skiff(&["--rng", "speed=fast"], DEADLINE),
        2,
        "unknown key",
    );
    assert_refused(
        &run_skiff(&["--disk", &d(",id=iommu0,iommu=on")], DEADLINE),
        2,
        "taken by the virtio-iommu",
    );
    // A TAP fd that is not open, and a file descriptor that is not a TAP.
    assert_refused(&run_skiff(&["--net", "fd=987"], DEADLINE), 1, "net0");
    // An empty image cannot be a disk.
    let empty = dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let e = format!("path={}", empty.display());
    assert_refused(&run_skiff(&["--disk", &e], DEADLINE), 1, "empty.img");
}

#[test]
fn passthrough_options_are_checked_before_the_guest_starts() {
    let dir = temp_dir("passthrough-bad");
    let missing = dir.join("no-server.sock");
    let socket = format!("socket={}", missing.display());
    // No server at the socket: a clear error naming the device and the socket, nothing runs.
    let run = run_skiff(&["--user-device", &socket], DEADLINE);
    assert_refused(&run, 1, "userdev0");
    assert!(run.stderr.contains("no-server.sock"), "{}", run.log());
    // One server serves one device.
    assert_refused(
        &run_skiff(
            &["--user-device", &socket, "--user-device", &socket],
            DEADLINE,
        ),
        2,
        "twice",
    );
    assert_refused(
        &run_skiff(&["--user-device", "id=x"], DEADLINE),
        2,
        "socket=",
    );
    assert_refused(
        &run_skiff(&["--user-device", &format!("{socket},p2p=maybe")], DEADLINE),
        2,
        "p2p",
    );
    // Host devices: group=take only with managed=on; a path that is not a PCI device; on a host
    // without an IOMMU, a real PCI device is refused with that reason.
    assert_refused(
        &run_skiff(
            &[
                "--device",
                "path=/sys/bus/pci/devices/0000:00:00.0,group=take",
            ],
            DEADLINE,
        ),
        2,
        "managed=on",
    );
    let run = run_skiff(&["--device", "path=/nonexistent/0000:99:00.0"], DEADLINE);
    assert_refused(&run, 1, "hostdev0");
    if let Some(first) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
    {
        if !std::path::Path::new("/sys/kernel/iommu_groups")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
        {
            let arg = format!("path={}", first.path().display());
            let run = run_skiff(&["--device", &arg], DEADLINE);
            assert_refused(&run, 1, "IOMMU");
        }
    }
}
