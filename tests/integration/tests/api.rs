//! The REST API on a real skiff: lifecycle through skiff-remote, every error class with its status
//! code, OpenAPI conformance of every route, pause semantics with the `counter` guest, events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api_server::client::ApiClient;
use api_server::openapi::Spec;
use integration::{remote, temp_dir, wait_for_path, SkiffProcess};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(300);

struct ApiVmm {
    proc: SkiffProcess,
    socket: PathBuf,
    dir: PathBuf,
}

impl ApiVmm {
    fn start(tag: &str, extra: &[&str]) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("api.sock");
        let events = format!("path={}", dir.join("events.jsonl").display());
        let mut args = vec![
            "--api-socket",
            socket.to_str().unwrap(),
            "--event-monitor",
            &events,
            "-v",
        ];
        args.extend_from_slice(extra);
        let proc = SkiffProcess::spawn(&args);
        wait_for_path(&socket, Duration::from_secs(30));
        Self { proc, socket, dir }
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = remote(&self.socket, args);
        assert_eq!(
            code,
            Some(0),
            "skiff-remote {args:?} failed: {err}\nskiff: {}",
            self.proc.stdout_now()
        );
        out
    }

    fn err(&self, args: &[&str]) -> String {
        let (code, _, err) = remote(&self.socket, args);
        assert_eq!(code, Some(1), "skiff-remote {args:?} should have failed");
        err
    }

    fn info(&self) -> Value {
        serde_json::from_str(&self.ok(&["info"])).unwrap()
    }

    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }
}

fn write_config(dir: &Path, json: &str) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(&p, json).unwrap();
    p
}

fn last_counter(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.strip_prefix("counter: ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn wait_counter_above(vmm: &ApiVmm, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(c) = last_counter(&vmm.proc.stdout_now()) {
            if c > n {
                return c;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counter never passed {n}:\n{}",
            vmm.proc.stdout_now()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lifecycle_through_skiff_remote() {
    let mut vmm = ApiVmm::start("api-life", &[]);
    let ping: Value = serde_json::from_str(&vmm.ok(&["ping"])).unwrap();
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    // No VM yet.
    assert!(vmm.err(&["info"]).contains("409"));
    assert!(vmm.err(&["boot"]).contains("409"));
    let cfg = write_config(
        &vmm.dir,
        r#"{"payload":{"cmdline":"scenario=counter counter.every=1"},"cpus":{"boot_vcpus":2},"rng":{}}"#,
    );
    vmm.ok(&["create", cfg.to_str().unwrap()]);
    assert_eq!(vmm.info()["state"], "Created");
    vmm.ok(&["boot"]);
    let info = vmm.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["devices"][0]["id"], "rng0");
    assert_eq!(info["devices"][0]["kind"], "virtio-rng");
    assert_eq!(info["devices"][0]["pci_address"], "0000:00:01.0");

    // Pause: no guest output while paused; resume continues from the same value.
    wait_counter_above(&vmm, 3);
    vmm.ok(&["pause"]);
    assert_eq!(vmm.info()["state"], "Paused");
    let frozen = vmm.proc.stdout_now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        vmm.proc.stdout_now(),
        frozen,
        "the guest printed while paused"
    );
    assert!(
        vmm.err(&["pause"]).contains("409"),
        "pausing a paused VM is a conflict"
    );
    let at_pause = last_counter(&frozen).unwrap();
    vmm.ok(&["resume"]);
    let next = wait_counter_above(&vmm, at_pause);
    let after = vmm.proc.stdout_now();
    let resumed_lines: Vec<u64> = after[frozen.len()..]
        .lines()
        .filter_map(|l| {
            l.strip_prefix("counter: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        resumed_lines.first(),
        Some(&(at_pause + 1)),
        "the counter restarted instead of continuing (next {next})"
    );

    let counters: Value = serde_json::from_str(&vmm.ok(&["counters"])).unwrap();
    assert!(counters["rng0"].is_object(), "{counters}");
    vmm.ok(&["power-button"]);
    vmm.ok(&["shutdown"]);
    assert_eq!(vmm.info()["state"], "Shutdown");
    assert!(vmm.err(&["resume"]).contains("409"));
    vmm.ok(&["delete"]);
    assert!(vmm.err(&["info"]).contains("409"));
    vmm.ok(&["shutdown-vmm"]);
    let run = vmm.proc.wait(Duration::from_secs(30));
    run.assert_code(0);
    let events = vmm.events();
    for e in [
        "created",
        "booted",
        "paused",
        "resumed",
        "power-button",
        "shutdown",
        "deleted",
    ] {
        assert!(
            events.iter().any(|x| x == e),
            "event {e} missing from {events:?}"
        );
    }
}

#[test]
fn bad_requests_get_exact_status_codes_and_change_nothing() {
    let mut vmm = ApiVmm::start(
        "api-errors",
        &["--cmdline", "scenario=counter counter.every=1"],
    );
    let client = ApiClient::new(&vmm.socket).unwrap();
    let put = |path: &str, body: &[u8]| client.raw("PUT", path, Some(body.to_vec())).unwrap();
    // Malformed JSON, unknown fields, wrong types, oversized bodies → 400 naming the problem.
    for (path, body) in [
        ("/api/v1/vm.create", &b"{ not json"[..]),
        (
            "/api/v1/vm.create",
            br#"{"cpus":{"boot_vcpus":2},"colour":"red"}"#,
        ),
        ("/api/v1/vm.create", br#"{"cpus":{"boot_vcpus":"two"}}"#),
        ("/api/v1/vm.snapshot", br#"{"destination_url": 5}"#),
        ("/api/v1/vm.pause", br#"{"now": true}"#),
    ] {
        let r = put(path, body);
        assert_eq!(
            r.status,
            400,
            "{path} {:?}: {:?}",
            String::from_utf8_lossy(body),
            r.body
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let big = vec![b' '; 1 << 20];
    assert_eq!(put("/api/v1/vm.create", &big).status, 400);
    // Invalid in the current state → 409 with the state.
    let r = put("/api/v1/vm.create", b"{}");
    assert_eq!(r.status, 409);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["state"], "Running");
    assert_eq!(put("/api/v1/vm.resume", b"").status, 409);
    assert_eq!(
        put(
            "/api/v1/vm.restore",
            br#"{"source_url":"file:///tmp/none"}"#
        )
        .status,
        409
    );
    // Unknown path → 404; wrong method → 405.
    assert_eq!(
        client
            .raw("GET", "/api/v1/vm.nonsense", None)
            .unwrap()
            .status,
        404
    );
    assert_eq!(client.raw("GET", "/", None).unwrap().status, 404);
    let r = client.raw("GET", "/api/v1/vm.pause", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.allow.as_deref().unwrap_or("").contains("PUT"));
    assert_eq!(
        client
            .raw("PUT", "/api/v1/vm.info", Some(b"{}".to_vec()))
            .unwrap()
            .status,
        405
    );
    // The VM was unaffected: still running and counting.
    let info: Value =
        serde_json::from_slice(&client.raw("GET", "/api/v1/vm.info", None).unwrap().body).unwrap();
    assert_eq!(info["state"], "Running");
    let c = last_counter(&vmm.proc.stdout_now()).unwrap_or(0);
    wait_counter_above(&vmm, c);
    // Several clients at once.
    let socket = vmm.socket.clone();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let s = socket.clone();
            std::thread::spawn(move || {
                let c = ApiClient::new(&s).unwrap();
                (0..30).all(|_| {
                    c.raw("GET", "/api/v1/vmm.ping", None)
                        .map(|r| r.status == 200)
                        .unwrap_or(false)
                })
            })
        })
        .collect();
    assert!(threads.into_iter().all(|t| t.join().unwrap()));
    vmm.ok(&["shutdown-vmm"]);
    vmm.proc.wait(Duration::from_secs(30)).assert_code(0);
}

#[test]
fn running_server_conforms_to_the_openapi_spec() {
    let mut vmm = ApiVmm::start("api-spec", &[]);
    let spec = Spec::load();
    let client = ApiClient::new(&vmm.socket).unwrap();
    let check = |method: &str, path: &str, body: Option<&[u8]>| {
        let r = client.raw(method, path, body.map(|b| b.to_vec())).unwrap();
        spec.check_response(path, method, r.status, &r.body)
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {path} -> {}: {e}\n{}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )
            });
        r.status
    };
    // In the empty state, then with a created, running, paused and shut-down VM, call every route the
    // spec documents and check each answer against it.
    let create = br#"{"payload":{"cmdline":"scenario=idle"},"rng":{}}"#;
    let mut seen = std::collections::BTreeSet::new();
    let routes = spec.routes();
    let call_all = |seen: &mut std::collections::BTreeSet<(String, u16)>| {
        for (path, method) in &routes {
            if path.ends_with("vmm.shutdown")
                || path.ends_with("vm.delete")
                || path.ends_with("vm.create")
                || path.ends_with("vm.boot")
            {
                continue;
            }
            let body: Option<&[u8]> = if path.ends_with("vm.snapshot") {
                Some(br#"{"destination_url":"file:///nonexistent/snap"}"#)
            } else if path.ends_with("vm.restore") {
                Some(br#"{"source_url":"file:///nonexistent/snap"}"#)
            } else {
                None
            };
            let status = check(method, path, body);
            seen.insert((path.clone(), status));
        }
    };
    call_all(&mut seen);
    assert_eq!(check("PUT", "/api/v1/vm.create", Some(create)), 204);
    call_all(&mut seen);
    assert_eq!(check("PUT", "/api/v1/vm.boot", None), 204);
    call_all(&mut seen);
    assert_eq!(check("PUT", "/api/v1/vm.delete", None), 204);
    // Undocumented paths are 404 with the documented error shape.
    for p in ["/api/v1/vm.nothing", "/api/v2/vm.info", "/metrics"] {
        let r = client.raw("GET", p, None).unwrap();
        assert_eq!(r.status, 404, "{p}");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"].is_string());
    }
    assert_eq!(check("PUT", "/api/v1/vmm.shutdown", None), 204);
    vmm.proc.wait(Duration::from_secs(30)).assert_code(0);
    assert!(seen.len() >= routes.len() - 4, "{seen:?}");
}

#[test]
fn cli_vm_with_api_alongside() {
    // With VM options and --api-socket, skiff boots the VM and serves the API.
    let vmm = ApiVmm::start(
        "api-cli",
        &["--cmdline", "scenario=idle", "--cpus", "boot=2"],
    );
    let info = vmm.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    vmm.ok(&["shutdown-vmm"]);
}
