//! The serial port across pause/resume and snapshot/restore: the `serial-stream` guest writes
//! numbered, checksummed lines to COM1 as fast as it can. While paused the serial file must not
//! grow; after snapshot → kill -9 → restore in a new process → resume, the restored VM appends
//! to the same file and the whole file must be one perfect stream: every line well-formed with a
//! valid checksum and the numbers strictly consecutive (no lost, duplicated or torn byte).

use std::path::Path;
use std::time::{Duration, Instant};

use integration::{remote, remote_ok, temp_dir, wait_for_path, SkiffProcess};

/// Emulated guests are slow (HOST.md): generous waits, which fail with the serial log.
const GUEST_WAIT: Duration = Duration::from_secs(180);

const PAYLOAD_LEN: usize = 60;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// What the guest (`tests/guest/src/scenario/serial_stream.rs`) writes as line `n`.
fn expected_line(n: u64) -> String {
    let mut s = format!("ss {n:08} ");
    for i in 0..PAYLOAD_LEN {
        let x = n
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        s.push(ALPHABET[((x >> 29) % 62) as usize] as char);
    }
    let crc = s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{s} {crc:08x}\n")
}

/// Check one received line on its own terms (format and checksum) and return its number.
fn parse_line(line: &str) -> Result<u64, String> {
    let mut parts = line.split(' ');
    let (Some("ss"), Some(num), Some(payload), Some(crc), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!("malformed line {line:?}"));
    };
    let n: u64 = num.parse().map_err(|_| format!("bad number in {line:?}"))?;
    if payload.len() != PAYLOAD_LEN || crc.len() != 8 {
        return Err(format!("bad field length in {line:?}"));
    }
    let body = &line[..line.len() - 9];
    let want = body.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    if u32::from_str_radix(crc, 16).ok() != Some(want) {
        return Err(format!("bad checksum in {line:?} (want {want:08x})"));
    }
    if format!("{line}\n") != expected_line(n) {
        return Err(format!("payload of line {n} differs: {line:?}"));
    }
    Ok(n)
}

/// Number of complete `ss` lines in `text`.
fn stream_lines(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("ss ")).count()
}

/// Validate the whole serial file as one perfect stream; returns the number of complete lines.
fn check_stream(text: &str) -> Result<u64, String> {
    let mut rest = text;
    // The header: the guest's start line and the scenario's first line.
    for prefix in ["guest: scenario=serial-stream", "serial-stream: start"] {
        let Some((line, tail)) = rest.split_once('\n') else {
            return Err(format!("missing header line {prefix:?}"));
        };
        if !line.starts_with(prefix) {
            return Err(format!("expected {prefix:?}, found {line:?}"));
        }
        rest = tail;
    }
    let mut next = 0u64;
    while let Some((line, tail)) = rest.split_once('\n') {
        let n = parse_line(line).map_err(|e| format!("after line {}: {e}", next as i64 - 1))?;
        if n != next {
            return Err(format!(
                "line {n} follows line {} (lost or duplicated lines)",
                next as i64 - 1
            ));
        }
        next += 1;
        rest = tail;
    }
    // An incomplete final line must be the start of the next expected line.
    if !expected_line(next).starts_with(rest) {
        return Err(format!(
            "torn final line {rest:?}, expected a prefix of {:?}",
            expected_line(next)
        ));
    }
    Ok(next)
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `n` bytes of the serial file, for failure messages.
fn tail(path: &Path) -> String {
    let t = read(path);
    let cut = t.len().saturating_sub(4000);
    let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
    format!("----- serial file (last 4000 bytes) -----\n{}", &t[cut..])
}

/// Wait until the serial file satisfies `done`; on timeout or exit kill skiff and fail with the
/// serial file's tail and skiff's own output.
fn wait_file(p: &mut SkiffProcess, path: &Path, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + GUEST_WAIT;
    loop {
        if done(&read(path)) {
            return;
        }
        if Instant::now() > deadline {
            p.signal("KILL");
            let run = p.wait(Duration::from_secs(10));
            panic!(
                "timed out waiting for {what}\n{}\n{}",
                tail(path),
                run.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pause, then check the file stays the same size for a second. Returns that size.
fn pause_and_check_silent(socket: &Path, serial: &Path, round: &str) -> u64 {
    remote_ok(socket, &["pause"]);
    let at_pause = size(serial);
    std::thread::sleep(Duration::from_millis(1000));
    let later = size(serial);
    assert_eq!(
        at_pause,
        later,
        "{round}: the serial file grew from {at_pause} to {later} bytes while the VM was paused\n{}",
        tail(serial)
    );
    at_pause
}

#[test]
fn serial_stream_survives_pause_and_snapshot_restore_intact() {
    let dir = temp_dir("serial-stream");
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let serial_arg = format!("file={}", serial.display());
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket.to_str().unwrap(),
        "--serial",
        &serial_arg,
        "--cmdline",
        "scenario=serial-stream",
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    wait_file(&mut p, &serial, "the first 50 lines", |t| {
        stream_lines(t) >= 50
    });

    // Pause/resume without a snapshot, a few times.
    for round in 1..=3 {
        let at_pause = pause_and_check_silent(&socket, &serial, &format!("pause {round}"));
        remote_ok(&socket, &["resume"]);
        wait_file(
            &mut p,
            &serial,
            &format!("output after resume {round}"),
            |t| t.len() as u64 > at_pause + 1000,
        );
    }

    // Pause, snapshot, kill -9.
    let before = pause_and_check_silent(&socket, &serial, "before the snapshot");
    let snap = dir.join("snap");
    remote_ok(
        &socket,
        &["snapshot", &format!("file://{}", snap.display())],
    );
    assert_eq!(size(&serial), before, "the snapshot wrote to the serial");
    p.signal("KILL");
    let _ = p.wait(Duration::from_secs(30));
    let lines_before = check_stream(&read(&serial))
        .unwrap_or_else(|e| panic!("stream before the snapshot: {e}\n{}", tail(&serial)));

    // Restore in a new process: it appends to the same serial file.
    let socket2 = dir.join("api2.sock");
    let restore = format!("source_url=file://{}", snap.display());
    let mut p2 = SkiffProcess::spawn(&[
        "--api-socket",
        socket2.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    wait_for_path(&socket2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        size(&serial),
        before,
        "the restored VM wrote to the serial before resume (or truncated it)\n{}",
        tail(&serial)
    );
    remote_ok(&socket2, &["resume"]);
    wait_file(&mut p2, &serial, "50 more lines after restore", |t| {
        stream_lines(t) as u64 >= lines_before + 50
    });
    // Once more pause/resume on the restored VM.
    let at_pause = pause_and_check_silent(&socket2, &serial, "restored VM");
    remote_ok(&socket2, &["resume"]);
    wait_file(&mut p2, &serial, "output after the last resume", |t| {
        t.len() as u64 > at_pause + 1000
    });
    let (code, out, err) = remote(&socket2, &["shutdown-vmm"]);
    let run = p2.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "shutdown-vmm: {out}{err}\n{}", run.log());
    run.assert_code(0);

    let text = read(&serial);
    match check_stream(&text) {
        Ok(n) => {
            assert!(n > lines_before + 50, "only {n} lines in the end");
            eprintln!(
                "serial stream: {n} lines ({} bytes), {lines_before} before the snapshot",
                text.len()
            );
        }
        Err(e) => panic!("the serial stream is damaged: {e}\n{}", tail(&serial)),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stream_checker_rejects_damage() {
    // The checker itself must be able to fail: a lost, a duplicated and a torn line.
    let head = "guest: scenario=serial-stream protocol=pvh cmdline=\"x\"\nserial-stream: start\n";
    let good: String = (0..5).map(expected_line).collect();
    assert_eq!(check_stream(&format!("{head}{good}")), Ok(5));
    let partial = &expected_line(5)[..20];
    assert_eq!(check_stream(&format!("{head}{good}{partial}")), Ok(5));
    let lost: String = [0, 1, 3].iter().map(|&n| expected_line(n)).collect();
    assert!(check_stream(&format!("{head}{lost}")).is_err());
    let dup: String = [0, 1, 1, 2].iter().map(|&n| expected_line(n)).collect();
    assert!(check_stream(&format!("{head}{dup}")).is_err());
    let mut torn = good.clone();
    torn.remove(100);
    assert!(check_stream(&format!("{head}{torn}")).is_err());
    let mut flipped = good.into_bytes();
    flipped[30] ^= 1;
    assert!(check_stream(&format!("{head}{}", String::from_utf8(flipped).unwrap())).is_err());
}
