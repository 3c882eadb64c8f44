//! Snapshot → kill → restore in a new process → resume: the `counter` guest continues from the
//! value it had (no restart), its memory checks pass, and its virtio-blk data written before the
//! snapshot is read back through the restored device. Corrupted, truncated, other-version and
//! mismatching snapshots are refused with a clear error and nothing starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::{remote, remote_ok, run_skiff, temp_dir, wait_for_path, SkiffProcess};

const DEADLINE: Duration = Duration::from_secs(300);

fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.contains("checksum"))
        .filter_map(|l| {
            l.strip_prefix("counter: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Make a snapshot of a running counter guest (with a disk) and kill its process.
fn make_snapshot(tag: &str) -> (PathBuf, u64) {
    let dir = temp_dir(tag);
    let socket = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        "scenario=counter counter.every=1 counter.blk=1",
        "--cpus",
        "boot=2",
        "--disk",
        &disk_arg,
        "--rng",
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    p.wait_until("blk reads", DEADLINE, |t| {
        t.contains("counter: blk pattern written") && counters(t).last() > Some(&3)
    });
    remote_ok(&socket, &["pause"]);
    let at_pause = *counters(&p.stdout_now()).last().unwrap();
    let snap = dir.join("snap");
    let url = format!("file://{}", snap.display());
    remote_ok(&socket, &["snapshot", &url]);
    // Kill the process outright: the snapshot must be self-contained.
    p.signal("KILL");
    let _ = p.wait(Duration::from_secs(30));
    (snap, at_pause)
}

#[test]
fn snapshot_kill_restore_resume_continues_the_guest() {
    let (snap, at_pause) = make_snapshot("snap-restore");
    let dir = snap.parent().unwrap().to_path_buf();
    let socket = dir.join("api2.sock");
    let restore = format!("source_url=file://{}", snap.display());
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket.to_str().unwrap(),
        "--restore",
        &restore,
        "-v",
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    let (_, info, _) = remote(&socket, &["info"]);
    assert!(
        info.contains("\"Paused\""),
        "a restored VM comes up paused: {info}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.stdout_now().is_empty(),
        "the restored guest ran before resume:\n{}",
        p.stdout_now()
    );
    remote_ok(&socket, &["resume"]);
    p.wait_until("the counter to continue", DEADLINE, |t| {
        counters(t).len() >= 3 && t.matches(" blk ok").count() >= 2
    });
    let out = p.stdout_now();
    let c = counters(&out);
    assert_eq!(
        c[0],
        at_pause + 1,
        "the guest restarted or skipped instead of continuing:\n{out}"
    );
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
    assert!(!out.contains("start"), "the guest booted again:\n{out}");
    assert!(!out.contains("FAIL"), "{out}");
    remote_ok(&socket, &["shutdown-vmm"]);
    p.wait(Duration::from_secs(30)).assert_code(0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn restore_fails(snap: &Path, needle: &str) {
    let arg = format!("source_url=file://{},resume=on", snap.display());
    let run = run_skiff(&["--restore", &arg], DEADLINE);
    run.assert_code(1);
    assert!(run.stdout.is_empty(), "nothing may run:\n{}", run.log());
    let err = run
        .stderr
        .lines()
        .find(|l| l.starts_with("skiff: error:"))
        .unwrap_or_default();
    assert!(
        err.contains(needle),
        "error line lacks {needle:?}:\n{}",
        run.log()
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

#[test]
fn damaged_snapshots_are_refused() {
    let (snap, _) = make_snapshot("snap-damaged");
    let base = snap.parent().unwrap().to_path_buf();
    let variant = |name: &str, f: &dyn Fn(&Path)| {
        let d = base.join(name);
        copy_dir(&snap, &d);
        f(&d);
        d
    };
    // A flipped byte in the middle of the state file.
    let corrupt = variant("corrupt", &|d| {
        let p = d.join("state.bin");
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    restore_fails(&corrupt, "state.bin");
    // Truncated.
    let truncated = variant("truncated", &|d| {
        let p = d.join("state.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 3]).unwrap();
    });
    restore_fails(&truncated, "truncated");
    // Another format version (the u32 after the 8-byte magic).
    let version = variant("version", &|d| {
        let p = d.join("state.bin");
        let mut b = std::fs::read(&p).unwrap();
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&p, b).unwrap();
    });
    restore_fails(&version, "version");
    // A configuration that does not match the state: more vCPUs than were saved.
    let mismatch = variant("mismatch", &|d| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"boot_vcpus\": 2", "\"boot_vcpus\": 3");
        std::fs::write(&p, text).unwrap();
    });
    restore_fails(&mismatch, "does not match");
    // Memory of another size.
    let memsize = variant("memsize", &|d| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("536870912", "268435456");
        std::fs::write(&p, text).unwrap();
    });
    restore_fails(&memsize, "memory");
    // Missing file.
    let missing = variant("missing", &|d| {
        std::fs::remove_file(d.join("memory.bin")).unwrap()
    });
    restore_fails(&missing, "memory.bin");
}
