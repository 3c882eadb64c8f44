//! The test guest drives each virtio device through skiff's virtio-pci transport: block I/O with
//! verification on the host side, a read-only disk, network frames both ways through a TAP in a
//! network namespace, console output, entropy, MSI-X (masking, pending bits, vector changes),
//! INTx through the IOAPIC, and hostile descriptor chains.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use integration::{run_skiff, skip_or_fail, temp_dir, NetNamespace, Run};

const DEADLINE: Duration = Duration::from_secs(300);

fn assert_checks_pass(run: &Run) {
    run.assert_code(0);
    run.assert_stdout_has("result: PASS");
    assert!(!run.stdout.contains("FAIL"), "{}", run.log());
}

#[test]
fn virtio_blk_read_write_flush_id_and_readonly() {
    let dir = temp_dir("blk");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    let mut image = b"skiff-disk-pattern".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&rw, &image).unwrap();
    let ro_image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro, &ro_image).unwrap();
    let disk_rw = format!("path={},serial=skiff-serial-1", rw.display());
    let disk_ro = format!("path={},readonly=on,id=ro", ro.display());
    let run = run_skiff(
        &[
            "--disk",
            &disk_rw,
            "--disk",
            &disk_ro,
            "--cmdline",
            "scenario=virtio-blk blk.expect=skiff-disk-pattern blk.require_ro=1",
        ],
        DEADLINE,
    );
    assert_checks_pass(&run);
    for line in [
        "blk: capacity 2048",
        "check: sector0-matches-expect ok",
        "check: readback-matches ok",
        "check: flush ok",
        "blk: serial skiff-serial-1",
        "read-only yes",
        "check: readonly-rejects-write ok",
    ] {
        run.assert_stdout_has(line);
    }
    // The guest's writes reached the image file (sectors 1..8 are no longer zero); the
    // read-only image is unchanged.
    let after = std::fs::read(&rw).unwrap();
    assert_eq!(&after[..18], b"skiff-disk-pattern");
    assert!(
        after[512..9 * 512].iter().any(|&b| b != 0),
        "the guest's write did not reach the image"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_image,
        "a read-only disk was modified"
    );
}

#[test]
fn virtio_rng_delivers_entropy() {
    let run = run_skiff(&["--rng", "--cmdline", "scenario=virtio-rng"], DEADLINE);
    assert_checks_pass(&run);
    run.assert_stdout_has("check: rng-not-constant ok");
    run.assert_stdout_has("check: rng-reads-differ ok");
}

#[test]
fn virtio_console_output_reaches_the_file() {
    let dir = temp_dir("console");
    let out = dir.join("console.txt");
    let arg = format!("file={}", out.display());
    let run = run_skiff(
        &["--console", &arg, "--cmdline", "scenario=virtio-console"],
        DEADLINE,
    );
    assert_checks_pass(&run);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "console: hello from the guest\n"
    );
}

#[test]
fn msix_vectors_masking_and_pending_bits() {
    let run = run_skiff(&["--rng", "--cmdline", "scenario=msix"], DEADLINE);
    assert_checks_pass(&run);
    for line in [
        "msix: queue interrupt on vector 0x30",
        "check: no-interrupt-while-masked ok",
        "msix: pending while masked ok",
        "msix: delivered after unmask ok",
        "check: pba-cleared-after-delivery ok",
        "msix: delivered on new vector 0x31 ok",
        "check: old-vector-quiet ok",
    ] {
        run.assert_stdout_has(line);
    }
}

#[test]
fn intx_through_the_ioapic() {
    let run = run_skiff(&["--rng", "--cmdline", "scenario=intx"], DEADLINE);
    assert_checks_pass(&run);
    // Slot 1, pin A: the _PRT routes it to GSI 17 and the interrupt line register says so.
    run.assert_stdout_has("intx: device 00:01.0 pin INTA line 17 gsi 17");
    run.assert_stdout_has("intx: interrupt on gsi 17 ok");
    run.assert_stdout_has("check: line-deasserted ok");
    run.assert_stdout_has("check: second-interrupt ok");
}

/// A driver that publishes an available index no queue can hold breaks the queue: virtio-blk
/// reports DEVICE_NEEDS_RESET to the guest, skiff emits a `device-error` event naming the device,
/// and after the driver resets it the device serves again.
#[test]
fn garbage_available_index_needs_reset_and_is_reported_as_an_event() {
    let dir = temp_dir("garbage-avail");
    let img = dir.join("g.img");
    let mut image = b"garbage-avail-disk".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&img, &image).unwrap();
    let events = dir.join("events.jsonl");
    let disk = format!("path={},id=victim", img.display());
    let monitor = format!("path={}", events.display());
    let run = run_skiff(
        &[
            "--disk",
            &disk,
            "--event-monitor",
            &monitor,
            "--cmdline",
            "scenario=hostile hostile.garbage_avail=1",
        ],
        DEADLINE,
    );
    assert_checks_pass(&run);
    run.assert_stdout_has("check: garbage-avail-needs-reset ok");
    run.assert_stdout_has("check: garbage-avail-then-good-read ok");
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let errors: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "device-error")
        .collect();
    assert_eq!(errors.len(), 1, "events:\n{text}\n{}", run.log());
    assert_eq!(errors[0]["source"], "device");
    assert_eq!(errors[0]["properties"]["id"], "victim");
    let reason = errors[0]["properties"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("available"), "{reason}");
}

#[test]
fn hostile_descriptor_chains_are_rejected_and_the_devices_keep_serving() {
    let dir = temp_dir("hostile");
    let img = dir.join("h.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", img.display());
    // noreset: skiff must reject each bad chain without needing a device reset.
    let run = run_skiff(
        &[
            "--disk",
            &disk,
            "--rng",
            "--cmdline",
            "scenario=hostile hostile.noreset=1",
        ],
        DEADLINE,
    );
    assert_checks_pass(&run);
    for case in [
        "loop",
        "too-long",
        "bad-address",
        "zero-length",
        "huge-length",
        "wrong-direction",
        "no-status",
        "rng-loop",
        "rng-bad-address",
        "rng-zero-length",
        "rng-wrong-direction",
    ] {
        run.assert_stdout_has(&format!("check: {case}-then-good-read ok"));
    }
    run.assert_stdout_has("hostile: device still serves good requests ok");
    // Rejections are logged, rate-limited, and never crash the VMM.
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn recv_frame(fd: i32, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n <= 0 {
            continue;
        }
        // SAFETY: `buf` is a valid writable buffer of its length.
        let len = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if len > 14 {
            let frame = buf[..len as usize].to_vec();
            if frame[12..14] == ETHERTYPE {
                return Some(frame);
            }
        }
    }
    None
}

#[test]
fn virtio_net_frames_both_ways_through_a_tap() {
    let ns = match NetNamespace::create("net") {
        Ok(ns) => ns,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let sock = ns.packet_socket().expect("packet socket on the TAP");
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let mut cmd = ns.command(&integration::skiff_bin());
    cmd.args([
        "--net",
        "tap=tap0,mac=52:54:00:ab:cd:ef,id=net0",
        "--cmdline",
        "scenario=virtio-net",
    ]);
    let child = std::thread::spawn(move || integration::run_command(&mut cmd, DEADLINE));

    // The guest's frame arrives on the TAP.
    let frame = recv_frame(sock.as_raw_fd(), Duration::from_secs(120));
    let Some(frame) = frame else {
        let run = child.join().unwrap();
        panic!("no frame from the guest on the TAP\n{}", run.log());
    };
    assert_eq!(frame[6..12], mac, "source MAC is the configured one");
    assert!(
        frame.windows(17).any(|w| w == b"skiff-guest-hello"),
        "unexpected payload {:?}",
        String::from_utf8_lossy(&frame[14..])
    );
    // Inject the host's frame.
    let mut reply = Vec::new();
    reply.extend_from_slice(&mac);
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    reply.extend_from_slice(&ETHERTYPE);
    reply.extend_from_slice(b"skiff-host-hello");
    reply.resize(60, 0);
    // SAFETY: sending a valid buffer on our socket.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            reply.as_ptr() as *const libc::c_void,
            reply.len(),
            0,
        )
    };
    assert_eq!(
        sent,
        reply.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );

    let run = child.join().unwrap();
    assert_checks_pass(&run);
    run.assert_stdout_has("net: mac 52:54:00:ab:cd:ef");
    run.assert_stdout_has("check: tx ok");
    run.assert_stdout_has("net: received host frame");
    run.assert_stdout_has("check: rx ok");
}
