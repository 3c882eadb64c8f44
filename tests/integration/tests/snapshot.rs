//! Snapshot → kill → restore in a new process → resume: the `counter` guest continues from the
//! value it had (no restart), its memory checks pass, and its virtio-blk data written before the
//! snapshot is read back through the restored device. Corrupted, truncated, other-version and
//! mismatching snapshots are refused with a clear error and nothing starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::{remote, remote_ok, run_skiff, temp_dir, wait_for_path, SkiffProcess};

const DEADLINE: Duration = Duration::from_secs(300);
/// How long a restore that must be refused may run (refusals come before anything starts).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(60);

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
    // A refusal comes before the guest runs: a restore still running after this was accepted.
    let run = run_skiff(&["--restore", &arg], REFUSAL_DEADLINE);
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

// ---------------------------------------------------------------------------------------------
// Restore by id and PCI address: every device config object (`disks[i]`, `nets[i]`, `rng`)
// carries the `pci_address` the VM placed it at; the snapshot's config.json records it; restore
// matches device state to devices by id and places each at its recorded address.

/// A counter guest with two disks on different images (ids disk0/disk1; the guest uses the
/// first virtio-blk, i.e. disk0) snapshotted while paused: (snapshot dir, counter at pause,
/// id → pci_address from `vm.info` before the snapshot).
struct TwoDiskSnapshot {
    snap: PathBuf,
    at_pause: u64,
    addresses: std::collections::BTreeMap<String, String>,
}

fn info_json(socket: &Path) -> serde_json::Value {
    let (code, out, err) = remote(socket, &["info"]);
    assert_eq!(code, Some(0), "info: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("info is not JSON ({e}): {out}"))
}

/// id → pci_address of every device `vm.info` lists.
fn device_addresses(info: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    info["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("info has no devices: {info}"))
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["pci_address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn two_disk_snapshot() -> &'static TwoDiskSnapshot {
    static SNAP: std::sync::OnceLock<TwoDiskSnapshot> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = temp_dir("snap-two-disks");
        let socket = dir.join("api.sock");
        let disk0 = dir.join("disk0.img");
        let disk1 = dir.join("disk1.img");
        std::fs::write(&disk0, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&disk1, vec![0xEEu8; 1 << 20]).unwrap();
        let d0 = format!("path={},id=disk0", disk0.display());
        let d1 = format!("path={},id=disk1", disk1.display());
        let mut p = SkiffProcess::spawn(&[
            "--api-socket",
            socket.to_str().unwrap(),
            "--cmdline",
            "scenario=counter counter.every=1 counter.blk=1",
            "--disk",
            &d0,
            "--disk",
            &d1,
            "--rng",
        ]);
        wait_for_path(&socket, Duration::from_secs(30));
        p.wait_until("blk reads", DEADLINE, |t| {
            t.contains("counter: blk pattern written") && counters(t).last() > Some(&3)
        });
        remote_ok(&socket, &["pause"]);
        let at_pause = *counters(&p.stdout_now()).last().unwrap();
        let addresses = device_addresses(&info_json(&socket));
        assert!(
            addresses.contains_key("disk0") && addresses.contains_key("disk1"),
            "{addresses:?}"
        );
        assert_ne!(addresses["disk0"], addresses["disk1"]);
        let snap = dir.join("snap");
        remote_ok(
            &socket,
            &["snapshot", &format!("file://{}", snap.display())],
        );
        p.signal("KILL");
        let _ = p.wait(Duration::from_secs(30));
        TwoDiskSnapshot {
            snap,
            at_pause,
            addresses,
        }
    })
}

/// A copy of the two-disk snapshot with its config.json edited by `edit`.
fn edited_snapshot(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let s = two_disk_snapshot();
    let d = s.snap.parent().unwrap().join(name);
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&s.snap, &d);
    let p = d.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).expect("config.json");
    edit(&mut config);
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    d
}

/// The `disks` array of a config.
fn disks(config: &mut serde_json::Value) -> &mut Vec<serde_json::Value> {
    config["disks"].as_array_mut().expect("config.json disks")
}

/// The snapshot's config.json records each device's PCI address, as `vm.info` reported it.
fn assert_recorded_addresses(config: &serde_json::Value) {
    let s = two_disk_snapshot();
    for d in config["disks"].as_array().expect("disks") {
        let id = d["id"].as_str().expect("disk id");
        assert_eq!(
            d["pci_address"].as_str(),
            Some(s.addresses[id].as_str()),
            "config.json must record {id}'s pci_address as vm.info reported it: {config:#}"
        );
    }
    if let Some(rng) = config.get("rng").filter(|r| !r.is_null()) {
        let id = rng["id"].as_str().unwrap_or("rng0");
        assert_eq!(
            rng["pci_address"].as_str(),
            s.addresses.get(id).map(String::as_str),
            "config.json must record the rng's pci_address: {config:#}"
        );
    }
}

/// Restore `snap` (paused), check the disks sit where they were, resume, and require the counter
/// and its virtio-blk reads of disk0 to continue.
fn restore_continues(snap: &Path, tag: &str) {
    let s = two_disk_snapshot();
    let socket = snap.parent().unwrap().join(format!("{tag}.sock"));
    let restore = format!("source_url=file://{}", snap.display());
    let mut p = SkiffProcess::spawn(&[
        "--api-socket",
        socket.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if std::time::Instant::now() > deadline || p.has_exited() {
            let run = p.wait(Duration::from_secs(10));
            panic!("{tag}: the restore did not come up\n{}", run.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let now = device_addresses(&info_json(&socket));
    for id in ["disk0", "disk1"] {
        assert_eq!(
            now.get(id),
            s.addresses.get(id),
            "{tag}: {id} moved (before the snapshot {:?}, after restore {now:?})",
            s.addresses
        );
    }
    remote_ok(&socket, &["resume"]);
    p.wait_until("the counter to continue", DEADLINE, |t| {
        (counters(t).len() >= 3 && t.matches(" blk ok").count() >= 2) || t.contains("FAIL")
    });
    let out = p.stdout_now();
    assert!(!out.contains("FAIL"), "{tag}:\n{out}");
    let c = counters(&out);
    assert_eq!(
        c[0],
        s.at_pause + 1,
        "{tag}: the guest restarted or skipped instead of continuing:\n{out}"
    );
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
    remote_ok(&socket, &["shutdown-vmm"]);
    p.wait(Duration::from_secs(30)).assert_code(0);
}

#[test]
fn restore_matches_disks_by_id_not_by_order() {
    let snap = edited_snapshot("swapped", |c| {
        assert_recorded_addresses(c);
        disks(c).swap(0, 1);
    });
    restore_continues(&snap, "swapped");
}

#[test]
fn restore_refuses_a_disk_at_another_pci_address() {
    let snap = edited_snapshot("moved", |c| {
        assert_recorded_addresses(c);
        let d1 = disks(c)
            .iter_mut()
            .find(|d| d["id"] == "disk1")
            .expect("disk1 in config.json");
        d1["pci_address"] = "0000:00:1f.0".into();
    });
    restore_fails(&snap, "disk1");
}

#[test]
fn restore_refuses_a_missing_disk() {
    let snap = edited_snapshot("missing-disk1", |c| {
        disks(c).retain(|d| d["id"] != "disk1");
    });
    restore_fails(&snap, "disk1");
}

#[test]
fn restore_without_recorded_addresses_keeps_the_order() {
    // A snapshot from before PCI addresses were recorded: placed in config order, as then.
    let snap = edited_snapshot("no-addresses", |c| {
        for d in disks(c).iter_mut() {
            d.as_object_mut().unwrap().remove("pci_address");
        }
        for key in ["nets"] {
            if let Some(a) = c[key].as_array_mut() {
                for d in a.iter_mut() {
                    d.as_object_mut().unwrap().remove("pci_address");
                }
            }
        }
        if let Some(r) = c.get_mut("rng").and_then(|r| r.as_object_mut()) {
            r.remove("pci_address");
        }
    });
    restore_continues(&snap, "no-addresses");
}
