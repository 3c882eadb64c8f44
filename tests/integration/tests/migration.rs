//! Live migration end to end with real `skiff` processes: two "hosts" (network namespaces joined
//! by a veth pair) with one skiff each; the guest continues on the target from exactly where it
//! was; the memory-dirtying workload verifies every page after migration; failures leave the
//! source running and a second attempt succeeds; round trips; cancel.

use std::time::{Duration, Instant};

use integration::node::{
    assert_continuous, counters, send_migration as send, wait_for_counter, Node, DEADLINE,
};
use integration::{remote_ok, skiff_remote_bin, skip_or_fail, temp_dir, TwoHosts};

#[test]
fn counter_guest_continues_on_the_other_host() {
    let hosts = match TwoHosts::create("mig") {
        Ok(h) => h,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let dir = temp_dir("migration-hosts");
    let (mut src, serial) = Node::guest(
        &dir,
        "src",
        Some(&hosts.a),
        "size=256M",
        "scenario=counter counter.every=1",
    );
    let mut dst = Node::start(&dir, "dst", Some(&hosts.b), &[]);
    wait_for_counter(&serial, 5);
    let url = format!("tcp:{}:6000", TwoHosts::B_ADDR);
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out) = send(&src, &url, &[]);
    assert_eq!(
        code,
        Some(0),
        "send-migration failed: {out}\n{}",
        src.process.wait(Duration::from_secs(5)).log()
    );
    assert!(out.contains("migration completed"), "{out}");
    // The source ends as Migrated and exits 0.
    let run = src.process.wait(Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{}", run.log());
    // The guest goes on on host B from exactly the next value.
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 5);
    assert_continuous(&serial);
    let (code, info, _) = dst.remote(&["info"]);
    assert_eq!(code, Some(0));
    assert!(info.contains("\"Running\""), "{info}");
    let (_, progress, _) = dst.remote(&["migration-progress"]);
    assert!(progress.contains("\"completed\""), "{progress}");
    remote_ok(&dst.api, &["shutdown-vmm"]);
    let run = dst.process.wait(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.log());
}

/// Round trips on one host over Unix sockets: A → B → A → ... five times, the guest counting on.
#[test]
fn five_round_trips_over_unix_sockets() {
    let dir = temp_dir("migration-trips");
    let (mut current, serial) = Node::guest(
        &dir,
        "n0",
        None,
        "size=128M",
        "scenario=counter counter.every=1",
    );
    wait_for_counter(&serial, 3);
    for trip in 1..=5 {
        let next = Node::start(&dir, &format!("n{trip}"), None, &[]);
        let url = format!("unix:{}", dir.join(format!("mig{trip}.sock")).display());
        let (code, out, err) = next.remote(&["receive-migration", &url]);
        if code != Some(0) {
            let mut next = next;
            let run = next.process.wait(Duration::from_millis(100));
            panic!(
                "trip {trip}: receive-migration: {out}{err}\ntarget: {}",
                run.log()
            );
        }
        let (code, out) = send(&current, &url, &["--connections", "2"]);
        assert_eq!(code, Some(0), "trip {trip}: {out}");
        let run = current.process.wait(Duration::from_secs(30));
        assert_eq!(run.code(), Some(0), "trip {trip}: {}", run.log());
        let last = counters(&serial).last().copied().unwrap_or(0);
        wait_for_counter(&serial, last + 2);
        current = next;
    }
    assert_continuous(&serial);
    remote_ok(&current.api, &["shutdown-vmm"]);
    current.process.wait(Duration::from_secs(30));
}

/// The memory-dirtying workload, migrated while it rewrites pages fast, while it is paced, and
/// over a link slower than its dirty rate (the migration only converges by throttling the
/// vCPUs): afterwards it verifies every page (no lost or stale page); its longest stall is
/// printed. How fast the emulated guest dirties pages depends on the host's load: when it was
/// slower than the link and the migration converged without throttling, the throttled case is
/// run again over a link half as fast (at most twice), and fails if it never needed throttling.
#[test]
fn dirtying_guest_loses_no_page_at_three_rates() {
    let mut throttled = false;
    for (name, rate, extra) in [
        ("fast", "0", &[][..]),
        ("paced", "2000", &[][..]),
        ("throttled", "0", &["--bandwidth-mbps", "24"][..]),
        ("throttled", "0", &["--bandwidth-mbps", "12"][..]),
        ("throttled", "0", &["--bandwidth-mbps", "6"][..]),
        // Only on a host so loaded that the emulated guest dirties less than 6 Mbit/s under
        // dirty logging (seen with a load average of 9 on 2 cores): long, but it converges.
        ("throttled", "0", &["--bandwidth-mbps", "2"][..]),
    ] {
        if name == "throttled" && throttled {
            break;
        }
        let slowest = extra.last() == Some(&"2");
        let dir = temp_dir(&format!("migration-dirty-{name}"));
        let cmdline =
            format!("scenario=dirty dirty.mib=32 dirty.rate={rate} dirty.report_ms=300 dirty.verify_every=2");
        let (mut src, serial) = Node::guest(&dir, "src", None, "size=256M", &cmdline);
        let dst = Node::start(&dir, "dst", None, &[]);
        let verified = |text: &str| text.matches("dirty: verified").count();
        let wait = |n: usize| {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let text = std::fs::read_to_string(&serial).unwrap_or_default();
                assert!(!text.contains("FAIL"), "{text}");
                if verified(&text) >= n {
                    return text;
                }
                assert!(Instant::now() < deadline, "no verification line:\n{text}");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let before = verified(&wait(1));
        let url = format!("unix:{}", dir.join("mig.sock").display());
        let (code, out, err) = dst.remote(&["receive-migration", &url]);
        assert_eq!(code, Some(0), "{out}{err}");
        let mut args = vec!["--downtime-ms", "300"];
        args.extend_from_slice(extra);
        let (code, out) = send(&src, &url, &args);
        assert_eq!(code, Some(0), "{name}: {out}");
        src.process.wait(Duration::from_secs(30));
        let (_, progress, _) = dst.remote(&["migration-progress"]);
        eprintln!(
            "dirty workload ({name}): {}",
            out.lines().last().unwrap_or("")
        );
        if name == "throttled" {
            // The source's progress lines show the throttle it needed.
            throttled = out
                .lines()
                .any(|l| l.contains("throttle") && !l.contains("throttle 0%"));
            assert!(
                throttled || !slowest,
                "the migration converged without throttling, even over 2 Mbit/s: {out}\n{progress}"
            );
            if !throttled {
                eprintln!(
                    "dirty workload (throttled, {extra:?}): the guest dirtied pages slower than \
                     the link and the migration converged without throttling; again over a \
                     slower link"
                );
            }
        }
        // Two more full verifications on the target.
        let text = wait(before + 2);
        let stall = text
            .lines()
            .rev()
            .find_map(|l| l.split("max_stall_us ").nth(1)?.split_whitespace().next())
            .unwrap_or("?");
        eprintln!("dirty workload ({name}, rate {rate}): migrated, longest guest stall {stall} us");
        remote_ok(&dst.api, &["shutdown-vmm"]);
    }
}

/// Failures leave the source running: a target that refuses the VM, a target killed during the
/// transfer, a cancel; after each, a second attempt to a good target succeeds.
#[test]
fn failed_migrations_leave_the_source_running() {
    let dir = temp_dir("migration-fail");
    // 8 MiB of data (the rest of RAM is never written: holes the source skips without reading)
    // at 8 Mbit/s: the transfers below last about 8 s, long enough to be interrupted at 2 s.
    let (src, serial) = Node::guest(
        &dir,
        "src",
        None,
        "size=512M",
        "scenario=counter counter.every=1 counter.fill_mb=8",
    );
    wait_for_counter(&serial, 3);
    let still_running = |what: &str| {
        let (code, info, _) = src.remote(&["info"]);
        assert_eq!(code, Some(0), "{what}: the source does not answer");
        assert!(info.contains("\"Running\""), "{what}: {info}");
        let last = counters(&serial).last().copied().unwrap_or(0);
        wait_for_counter(&serial, last + 2);
    };

    // 1. The target refuses: an override for a device the VM does not have.
    let refusing = Node::start(&dir, "refusing", None, &[]);
    let url = format!("unix:{}", dir.join("m1.sock").display());
    let (code, out, err) = refusing.remote(&[
        "receive-migration",
        &url,
        "--override",
        "disk9:path=/nonexistent",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out) = send(&src, &url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refused") && out.contains("disk9"), "{out}");
    still_running("after a refusal");

    // 2. The target dies during the transfer (the bandwidth limit makes it last).
    let dying = Node::start(&dir, "dying", None, &[]);
    let url = format!("unix:{}", dir.join("m2.sock").display());
    let (code, _, _) = dying.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0));
    let sender = {
        let api = src.api.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            std::process::Command::new(skiff_remote_bin())
                .arg("--api-socket")
                .arg(&api)
                .args(["send-migration", &url, "--bandwidth-mbps", "8"])
                .output()
                .expect("skiff-remote")
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    dying.process.signal("KILL");
    let out = sender.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    still_running("after the target died");

    // 3. Cancel during the transfer.
    let slow = Node::start(&dir, "slow", None, &[]);
    let url = format!("unix:{}", dir.join("m3.sock").display());
    let (code, _, _) = slow.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0));
    let (code, out, err) =
        src.remote(&["send-migration", &url, "--bandwidth-mbps", "8", "--no-wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    std::thread::sleep(Duration::from_secs(2));
    let (code, out, err) = src.remote(&["migration-cancel"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, p, _) = src.remote(&["migration-progress"]);
        if p.contains("\"cancelled\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration was not cancelled: {p}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    still_running("after a cancel");
    drop(slow);

    // 4. A good target: it works now.
    let good = Node::start(&dir, "good", None, &[]);
    let url = format!("unix:{}", dir.join("m4.sock").display());
    let (code, _, _) = good.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0));
    let (code, out) = send(&src, &url, &[]);
    assert_eq!(code, Some(0), "{out}");
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    remote_ok(&good.api, &["shutdown-vmm"]);
}

/// Forward TCP connections from `listen` to `target`, flipping one bit of the source's stream
/// after `after` bytes of the first connection (a corrupted link).
fn corrupting_proxy(listen: std::net::TcpListener, target: String, after: usize) {
    std::thread::spawn(move || {
        let mut first = true;
        for client in listen.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                return;
            };
            let flip_at = first.then_some(after);
            first = false;
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = 0usize;
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(at) = flip_at {
                        if seen <= at && at < seen + n {
                            buf[at - seen] ^= 0x10;
                        }
                    }
                    seen += n;
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A corrupted stream is caught by the target (checksums) and the source runs on; a guest that
/// dirties memory faster than the downtime limit allows makes the migration give up with the
/// figures, and the source runs on with nothing lost.
#[test]
fn corrupted_streams_and_impossible_downtimes_fail_cleanly() {
    let dir = temp_dir("migration-corrupt");
    let (src, serial) = Node::guest(
        &dir,
        "src",
        None,
        "size=256M",
        "scenario=dirty dirty.mib=4 dirty.rate=0 dirty.report_ms=300 dirty.verify_every=2",
    );
    let verified = || {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(!text.contains("FAIL"), "{text}");
        text.matches("dirty: verified").count()
    };
    let wait_verified = |n: usize| {
        let deadline = Instant::now() + DEADLINE;
        while verified() < n {
            assert!(Instant::now() < deadline, "no verification");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_verified(1);

    // 1. A bit flipped in the middle of the RAM transfer.
    let target = Node::start(&dir, "dst1", None, &[]);
    let (code, _, _) = target.remote(&["receive-migration", "tcp:127.0.0.1:6101"]);
    assert_eq!(code, Some(0));
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = proxy.local_addr().unwrap().port();
    corrupting_proxy(proxy, "127.0.0.1:6101".into(), 1 << 20);
    let (code, out) = send(&src, &format!("tcp:127.0.0.1:{port}"), &[]);
    assert_eq!(code, Some(1), "a corrupted migration succeeded: {out}");
    let (_, tp, _) = target.remote(&["migration-progress"]);
    assert!(
        tp.contains("\"failed\"") && tp.to_lowercase().contains("checksum"),
        "{tp}"
    );
    let (_, info, _) = src.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    let n = verified();
    wait_verified(n + 1);

    // 2. A downtime limit the dirtying guest cannot meet over a slow link, in few iterations:
    // the migration gives up.
    let target = Node::start(&dir, "dst2", None, &[]);
    let url = format!("unix:{}", dir.join("m2.sock").display());
    let (code, _, _) = target.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0));
    let (code, out) = send(
        &src,
        &url,
        &[
            "--downtime-ms",
            "1",
            "--max-iterations",
            "3",
            "--bandwidth-mbps",
            "8",
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    let (_, p, _) = src.remote(&["migration-progress"]);
    assert!(p.contains("\"failed\"") && p.contains("converge"), "{p}");
    let (_, info, _) = src.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    let n = verified();
    wait_verified(n + 1);
    remote_ok(&src.api, &["shutdown-vmm"]);
}

/// The link between the hosts is cut during the transfer: the source gives up on the dead
/// connection and runs on; its guest loses nothing.
#[test]
fn a_cut_link_leaves_the_source_running() {
    let hosts = match TwoHosts::create("cut") {
        Ok(h) => h,
        Err(why) => return skip_or_fail("SKIFF_SKIP_NETNS", &why),
    };
    let dir = temp_dir("migration-cut");
    // 8 MiB of data at 8 Mbit/s: the transfer lasts about 8 s, and is cut at 2 s.
    let (src, serial) = Node::guest(
        &dir,
        "src",
        Some(&hosts.a),
        "size=512M",
        "scenario=counter counter.every=1 counter.fill_mb=8",
    );
    let dst = Node::start(&dir, "dst", Some(&hosts.b), &[]);
    wait_for_counter(&serial, 3);
    let url = format!("tcp:{}:6002", TwoHosts::B_ADDR);
    let (code, _, _) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0));
    let (code, out, err) =
        src.remote(&["send-migration", &url, "--bandwidth-mbps", "8", "--no-wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    std::thread::sleep(Duration::from_secs(2));
    hosts.cut();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, p, _) = src.remote(&["migration-progress"]);
        if p.contains("\"failed\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source did not notice the cut: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, info, _) = src.remote(&["info"]);
    assert!(info.contains("\"Running\""), "{info}");
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 3);
    assert_continuous(&serial);
    remote_ok(&src.api, &["shutdown-vmm"]);
}

/// `local=on`: the source hands its guest-RAM memfd to a target on the same host, so no RAM is
/// copied at all (the stream carries only the state), and the guest goes on.
#[test]
fn local_migration_hands_the_ram_over_without_copying_it() {
    let dir = temp_dir("migration-local");
    let (mut src, serial) = Node::guest(
        &dir,
        "src",
        None,
        "size=1G",
        "scenario=counter counter.every=1",
    );
    let dst = Node::start(&dir, "dst", None, &[]);
    wait_for_counter(&serial, 3);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let (code, out, err) = dst.remote(&["receive-migration", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    // The progress the source reports at the end: almost nothing sent for a 1 GiB guest.
    let (code, out, err) = src.remote(&["send-migration", &url, "--local", "--no-wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let deadline = Instant::now() + DEADLINE;
    let progress = loop {
        let (_, p, _) = src.remote(&["migration-progress"]);
        if p.contains("\"completed\"") {
            break p;
        }
        assert!(!p.contains("\"failed\""), "{p}");
        assert!(Instant::now() < deadline, "{p}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let v: serde_json::Value = serde_json::from_str(&progress).expect("progress JSON");
    let sent = v["bytes_sent"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent < 1 << 20,
        "a local migration copied {sent} bytes of RAM: {progress}"
    );
    eprintln!(
        "local migration of a 1 GiB guest: downtime {} ms",
        v["downtime_ms"]
    );
    let run = src.process.wait(Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{}", run.log());
    let last = counters(&serial).last().copied().unwrap_or(0);
    wait_for_counter(&serial, last + 5);
    assert_continuous(&serial);
    remote_ok(&dst.api, &["shutdown-vmm"]);
}
