//! `--landlock`: the VMM can open only what its configuration and `--landlock-rules` name. A
//! snapshot into a directory outside them fails (and the VM keeps running); the same snapshot
//! into a directory a rule names works.

use std::time::Duration;

use integration::node::counter_values as counters;
use integration::{remote, remote_ok, run_skiff, temp_dir, wait_for_path, SkiffProcess};

const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn the_vmm_cannot_open_a_path_outside_its_configuration() {
    let dir = temp_dir("landlock");
    let socket = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let allowed = dir.join("allowed");
    let outside = dir.join("outside");
    for d in [&allowed, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut p = SkiffProcess::spawn(&[
        "--landlock".to_string(),
        "--landlock-rules".to_string(),
        format!("path={},access=rw", allowed.display()),
        "--api-socket".to_string(),
        socket.display().to_string(),
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--cmdline".to_string(),
        "scenario=counter counter.every=1 counter.blk=1".to_string(),
        "-v".to_string(),
    ]);
    wait_for_path(&socket, Duration::from_secs(30));
    // The disk is named by the configuration: the guest reads and writes it.
    p.wait_until("blk reads", DEADLINE, |t| {
        t.contains("counter: blk pattern written") && counters(t).last() > Some(&2)
    });
    remote_ok(&socket, &["pause"]);

    let denied = format!("file://{}", outside.join("snap").display());
    let (code, out, err) = remote(&socket, &["snapshot", &denied]);
    assert_ne!(
        code,
        Some(0),
        "snapshot outside the rules worked: {out}{err}"
    );
    assert!(
        err.contains("Permission denied") || out.contains("Permission denied"),
        "{out}{err}"
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside the rules"
    );

    let granted = format!("file://{}", allowed.join("snap").display());
    remote_ok(&socket, &["snapshot", &granted]);
    assert!(allowed.join("snap").read_dir().unwrap().count() > 0);

    // The failed snapshot changed nothing: the VM resumes and keeps counting.
    remote_ok(&socket, &["resume"]);
    let before = *counters(&p.stdout_now()).last().unwrap();
    p.wait_until("the counter to continue", DEADLINE, |t| {
        counters(t).last() > Some(&(before + 1))
    });
    remote_ok(&socket, &["shutdown-vmm"]);
    let run = p.wait(Duration::from_secs(60));
    run.assert_code(0);
    assert!(
        run.stderr.contains("landlock: confined to"),
        "{}",
        run.log()
    );
}

#[test]
fn bad_landlock_options_are_refused_before_anything_starts() {
    let run = run_skiff(
        &["--landlock-rules", "path=/tmp,access=rw"],
        Duration::from_secs(30),
    );
    run.assert_code(2);
    assert!(
        run.stderr.contains("--landlock-rules needs --landlock"),
        "{}",
        run.log()
    );

    let missing = "/nonexistent/skiff-landlock-test";
    let rule = format!("path={missing},access=r");
    let run = run_skiff(
        &["--landlock", "--landlock-rules", &rule],
        Duration::from_secs(30),
    );
    run.assert_code(2);
    assert!(run.stderr.contains(missing), "{}", run.log());

    let run = run_skiff(
        &["--landlock", "--landlock-rules", "path=/tmp,access=x"],
        Duration::from_secs(30),
    );
    run.assert_code(2);
    assert!(run.stderr.contains("expected r or rw"), "{}", run.log());
}
