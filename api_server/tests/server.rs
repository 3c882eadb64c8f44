//! The API server against a fake control thread: every endpoint and status code, the OpenAPI spec,
//! bad requests, concurrency and socket handling.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::channel;
use std::time::Duration;

use api_server::config::VmConfig;
use api_server::openapi::Spec;
use api_server::{
    ApiAction, ApiClient, ApiErrorBody, ApiServer, ApiServerError, ClientError, ServerOptions,
    VmState, ROUTES,
};
use common::{socket_path, Harness};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

const V1: &str = "/api/v1/";

fn err_body(r: &api_server::client::RawResponse) -> ApiErrorBody {
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("error body {:?}: {e}", String::from_utf8_lossy(&r.body)))
}

fn api_status(r: Result<(), ClientError>) -> (u16, String, Option<VmState>) {
    match r {
        Err(ClientError::Api {
            status,
            message,
            state,
        }) => (status, message, state),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn lifecycle_and_conflicts() {
    let h = Harness::start("life");
    let c = h.client();
    let ping = c.ping().unwrap();
    assert_eq!(ping.pid, std::process::id());

    // Nothing exists yet: boot, pause, info are conflicts without a state.
    let (st, msg, state) = api_status(c.boot());
    assert_eq!((st, state), (409, None));
    assert!(msg.contains("create one first"), "{msg}");
    assert_eq!(c.info().unwrap_err().status(), Some(409));

    let cfg: VmConfig = serde_json::from_value(json!({"cpus": {"boot_vcpus": 2}})).unwrap();
    c.create(&cfg).unwrap();
    assert_eq!(h.state(), Some(VmState::Created));
    assert_eq!(api_status(c.create(&cfg)).0, 409);
    assert_eq!(
        api_status(c.pause()),
        (
            409,
            "vm.pause: the VM is Created".into(),
            Some(VmState::Created)
        )
    );
    c.boot().unwrap();
    c.pause().unwrap();
    let (st, _, state) = api_status(c.pause());
    assert_eq!(
        (st, state),
        (409, Some(VmState::Paused)),
        "pause a paused VM"
    );
    c.snapshot("file:///tmp/snap").unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Paused);
    assert_eq!(info.config.cpus.boot_vcpus, 2);
    c.resume().unwrap();
    assert_eq!(
        api_status(c.restore("file:///tmp/snap", false)).2,
        Some(VmState::Running),
        "restore into a running VM"
    );
    assert_eq!(c.counters().unwrap()["disk0"]["read_ops"], 3);
    c.power_button().unwrap();
    c.reboot().unwrap();
    c.shutdown().unwrap();
    assert_eq!(h.state(), Some(VmState::Shutdown));
    c.boot().unwrap();
    c.delete().unwrap();
    assert_eq!(h.state(), None);
    c.restore("file:///tmp/snap", true).unwrap();
    assert_eq!(h.state(), Some(VmState::Running));
    c.delete().unwrap();
    c.shutdown_vmm().unwrap();
}

/// Every endpoint, in states that make it succeed and fail, answers only what the spec
/// documents, with bodies of the documented shape; undocumented paths get 404.
#[test]
fn server_conforms_to_the_openapi_spec() {
    let spec = Spec::load();
    let h = Harness::start("spec");
    let c = h.client();
    let mut seen = std::collections::BTreeSet::new();
    let mut check = |method: &str, ep: &str, body: Option<Value>| -> u16 {
        let path = format!("{V1}{ep}");
        let r = c
            .raw(method, &path, body.map(|b| serde_json::to_vec(&b).unwrap()))
            .unwrap();
        spec.check_response(&path, method, r.status, &r.body)
            .unwrap_or_else(|e| panic!("{e}"));
        seen.insert((path, r.status));
        r.status
    };
    // No VM: every vm.* action but create/restore/delete conflicts.
    assert_eq!(check("GET", "vmm.ping", None), 200);
    for ep in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
    ] {
        assert_eq!(check("PUT", ep, None), 409, "{ep}");
    }
    assert_eq!(check("GET", "vm.info", None), 409);
    assert_eq!(check("GET", "vm.counters", None), 409);
    let snap = json!({"destination_url": "file:///tmp/s"});
    assert_eq!(check("PUT", "vm.snapshot", Some(snap.clone())), 409);
    // Bad bodies, for every endpoint that takes one and one that does not.
    assert_eq!(check("PUT", "vm.create", Some(json!({"cpus": 1}))), 400);
    assert_eq!(check("PUT", "vm.snapshot", Some(json!({}))), 400);
    assert_eq!(
        check("PUT", "vm.restore", Some(json!({"source_url": 3}))),
        400
    );
    assert_eq!(check("PUT", "vm.boot", Some(json!({"x": 1}))), 400);
    assert_eq!(check("GET", "vm.info", Some(json!([1]))), 400);
    // Successes.
    let create = json!({"disks": [], "nets": [{"tap": {"name": "tap0"}, "mac": "52:54:00:00:00:01"}],
                        "rng": {}, "serial": "off", "console": "pty"});
    assert_eq!(check("PUT", "vm.create", Some(create)), 204);
    assert_eq!(check("PUT", "vm.boot", None), 204);
    assert_eq!(check("GET", "vm.info", None), 200);
    assert_eq!(check("GET", "vm.counters", None), 200);
    assert_eq!(check("PUT", "vm.power-button", None), 204);
    assert_eq!(check("PUT", "vm.reboot", None), 204);
    assert_eq!(check("PUT", "vm.pause", None), 204);
    assert_eq!(check("PUT", "vm.snapshot", Some(snap)), 204);
    let fail = json!({"destination_url": "file:///fail/x"});
    assert_eq!(check("PUT", "vm.snapshot", Some(fail)), 500);
    assert_eq!(check("PUT", "vm.resume", Some(json!({}))), 204);
    assert_eq!(check("PUT", "vm.shutdown", None), 204);
    let restore = json!({"source_url": "file:///tmp/s", "resume": true});
    assert_eq!(check("PUT", "vm.restore", Some(restore.clone())), 409);
    assert_eq!(check("PUT", "vm.delete", None), 204);
    assert_eq!(check("PUT", "vm.restore", Some(restore)), 204);
    assert_eq!(check("GET", "vm.info", None), 200);
    // Live migration: progress always answers; cancel with nothing to cancel conflicts.
    assert_eq!(check("GET", "vm.migration-progress", None), 200);
    assert_eq!(check("PUT", "vm.migration-cancel", None), 409);
    let recv = json!({"receiver_url": "tcp:[::]:6000", "overrides": {"disk0": {"path": "/n"}}});
    assert_eq!(
        check("PUT", "vm.receive-migration", Some(recv.clone())),
        409
    );
    assert_eq!(
        check(
            "PUT",
            "vm.receive-migration",
            Some(json!({"receiver_url": 1}))
        ),
        400
    );
    assert_eq!(
        check(
            "PUT",
            "vm.send-migration",
            Some(json!({"destination_url": "x"}))
        ),
        400
    );
    let slow = json!({"destination_url": "unix:/run/slow.sock", "local": true, "connections": 4});
    assert_eq!(check("PUT", "vm.send-migration", Some(slow.clone())), 204);
    assert_eq!(check("PUT", "vm.send-migration", Some(slow)), 409);
    assert_eq!(check("GET", "vm.migration-progress", None), 200);
    assert_eq!(check("PUT", "vm.migration-cancel", None), 204);
    assert_eq!(check("GET", "vm.migration-progress", None), 200);
    assert_eq!(h.state(), Some(VmState::Running));
    let send = json!({"destination_url": "tcp:192.0.2.1:6000", "downtime_limit_ms": 50,
                      "bandwidth_limit_mbps": 1000, "max_iterations": 8});
    assert_eq!(check("PUT", "vm.send-migration", Some(send.clone())), 204);
    for _ in 0..6 {
        assert_eq!(check("GET", "vm.migration-progress", None), 200);
    }
    assert_eq!(h.state(), Some(VmState::Migrated));
    assert_eq!(check("GET", "vm.info", None), 200);
    assert_eq!(check("PUT", "vm.send-migration", Some(send)), 409);
    assert_eq!(check("PUT", "vm.delete", None), 204);
    assert_eq!(check("PUT", "vm.receive-migration", Some(recv)), 204);
    assert_eq!(
        check(
            "PUT",
            "vm.restore",
            Some(json!({"source_url": "file:///s"}))
        ),
        204
    );
    // Wrong methods: 405 is documented for every operation.
    for r in ROUTES {
        let other = if r.method == "GET" { "PUT" } else { "GET" };
        let resp = c.raw(other, r.path, None).unwrap();
        assert_eq!(resp.status, 405, "{other} {}", r.path);
        assert_eq!(resp.allow.as_deref(), Some(r.method));
        let doc = spec.responses(r.path, r.method).unwrap();
        let schema = doc[&405].schema.as_ref().unwrap();
        spec.validate(schema, &serde_json::from_slice(&resp.body).unwrap())
            .unwrap();
    }
    assert_eq!(check("PUT", "vmm.shutdown", None), 204);
    // Every documented operation was exercised.
    for (path, _) in spec.routes() {
        assert!(seen.iter().any(|(p, _)| *p == path), "{path} not exercised");
    }
    // Undocumented paths are 404 with the error body.
    let documented: Vec<String> = spec.routes().into_iter().map(|(p, _)| p).collect();
    for p in [
        "/",
        "/api/v1",
        "/api/v1/",
        "/api/v1/vm.nope",
        "/api/v1/vm.info/",
        "/api/v1/vm.info/x",
        "/api/v2/vm.info",
        "/api/v1/VM.INFO",
        "/vm.info",
    ] {
        assert!(!documented.contains(&p.to_string()));
        for m in ["GET", "PUT", "POST", "DELETE"] {
            let r = c.raw(m, p, None).unwrap();
            assert_eq!(r.status, 404, "{m} {p}");
            let e = err_body(&r);
            assert!(e.error.contains("no endpoint"), "{}", e.error);
            let nf = spec
                .resolve(&json!({"$ref": "#/components/responses/NotFound"}))
                .clone();
            spec.validate(
                &nf["content"]["application/json"]["schema"],
                &serde_json::to_value(&e).unwrap(),
            )
            .unwrap();
        }
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let h = Harness::start("405");
    let c = h.client();
    for (m, p, allow) in [
        ("POST", "vm.pause", "PUT"),
        ("DELETE", "vm.delete", "PUT"),
        ("PUT", "vm.info", "GET"),
        ("PATCH", "vmm.ping", "GET"),
        ("GET", "vm.create", "PUT"),
    ] {
        let r = c.raw(m, &format!("{V1}{p}"), None).unwrap();
        assert_eq!(r.status, 405, "{m} {p}");
        assert_eq!(r.allow.as_deref(), Some(allow));
        assert!(err_body(&r).error.contains("method not allowed"));
    }
    assert!(
        h.vm.lock().unwrap().log.is_empty(),
        "nothing reached the VMM"
    );
}

#[test]
fn bad_bodies_are_400_and_leave_the_vm_alone() {
    let h = Harness::start("400");
    let c = h.client();
    c.create_raw(br#"{"payload": {}}"#.to_vec()).unwrap();
    c.boot().unwrap();
    let create = format!("{V1}vm.create");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("vm.create", b"{".to_vec(), "EOF"),
        ("vm.create", b"not json".to_vec(), "expected"),
        ("vm.create", b"".to_vec(), "JSON body is required"),
        (
            "vm.create",
            br#"{"cpus": {"boot_vcpus": 1}, "colour": 1}"#.to_vec(),
            "unknown field `colour`",
        ),
        (
            "vm.create",
            br#"{"cpus": {"boot_vcpus": "two"}}"#.to_vec(),
            "invalid type",
        ),
        (
            "vm.create",
            br#"{"memory": {"size": -5}}"#.to_vec(),
            "invalid value",
        ),
        (
            "vm.create",
            br#"{"cpus": {"boot_vcpus": 0}}"#.to_vec(),
            "boot_vcpus",
        ),
        (
            "vm.create",
            br#"{"payload": {"initramfs": "/nonexistent/i"}}"#.to_vec(),
            "--initramfs needs --kernel",
        ),
        (
            "vm.create",
            br#"{"serial": "stdout", "console": "stdout"}"#.to_vec(),
            "cannot both use stdout",
        ),
        (
            "vm.create",
            br#"{"payload": {"kernel": "/nonexistent/k"}}"#.to_vec(),
            "/nonexistent/k",
        ),
        (
            "vm.create",
            br#"{"serial": "tty"}"#.to_vec(),
            "unknown variant",
        ),
        ("vm.create", br#"[]"#.to_vec(), "expected object"),
        (
            "vm.create",
            br#"{"cpus": [2]}"#.to_vec(),
            "$.cpus: expected object",
        ),
        (
            "vm.restore",
            br#"["file:///x", true]"#.to_vec(),
            "expected object",
        ),
        (
            "vm.snapshot",
            br#"{"destination_url": "/tmp/x"}"#.to_vec(),
            "file://",
        ),
        (
            "vm.snapshot",
            br#"{"destination_url": "file:///x", "compress": true}"#.to_vec(),
            "unknown field",
        ),
        (
            "vm.restore",
            br#"{"source_url": "file:///x", "resume": "yes"}"#.to_vec(),
            "invalid type",
        ),
        (
            "vm.restore",
            br#"{"resume": true}"#.to_vec(),
            "missing field `source_url`",
        ),
        (
            "vm.pause",
            br#"{"now": true}"#.to_vec(),
            "takes no request body",
        ),
        ("vm.pause", b"garbage".to_vec(), "takes no request body"),
    ];
    for (ep, body, want) in cases {
        let r = c
            .raw("PUT", &format!("{V1}{ep}"), Some(body.clone()))
            .unwrap();
        let e = err_body(&r);
        assert_eq!(
            r.status,
            400,
            "{ep} {:?}: {}",
            String::from_utf8_lossy(&body),
            e.error
        );
        assert!(e.error.contains(want), "{ep}: {:?} lacks {want:?}", e.error);
        assert!(e.error.starts_with(ep), "{}", e.error);
    }
    // Body size limit: just under is parsed, over is refused and names the limit.
    let mut big = br#"{"payload": {"cmdline": ""#.to_vec();
    big.resize(70 * 1024, b'a');
    big.extend_from_slice(br#""}}"#);
    let r = c.raw("PUT", &create, Some(big)).unwrap();
    assert_eq!(r.status, 400);
    assert!(err_body(&r).error.contains("65536 bytes"));
    let mut ok = br#"{"payload": {"cmdline": ""#.to_vec();
    ok.resize(60 * 1024, b'a');
    ok.extend_from_slice(br#""}}"#);
    let r = c.raw("PUT", &create, Some(ok)).unwrap();
    assert_eq!(
        r.status, 409,
        "a valid config reaches the VMM, which already has a VM"
    );
    // The VM kept running through all of it; only the two creates and boot reached it.
    assert_eq!(h.state(), Some(VmState::Running));
    assert_eq!(
        h.vm.lock().unwrap().log,
        vec!["vm.create", "vm.boot", "vm.create"]
    );
    c.pause().unwrap();
}

/// A chunked body without Content-Length over the limit is refused too (raw socket request);
/// the server reads what the client still sends (2 MiB here) before answering, so the client's
/// writes do not fail and it reads the 400.
#[test]
fn chunked_body_over_limit() {
    let h = Harness::start_with(
        "chunk",
        ServerOptions {
            body_limit: 1024,
            ..Default::default()
        },
    );
    let mut s = UnixStream::connect(&h.path).unwrap();
    let chunk = vec![b' '; 64 << 10];
    let mut req = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..32 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req)
        .expect("the server reads the whole over-limit body");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("limit of 1024 bytes"), "{out}");
    assert!(h.vm.lock().unwrap().log.is_empty());
}

#[test]
fn many_clients_at_once() {
    let h = Harness::start("many");
    let path = h.path.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = ApiClient::new(&path).unwrap();
                for i in 0..50 {
                    let p = c.ping().unwrap();
                    assert_eq!(p.pid, std::process::id(), "thread {t} ping {i}");
                    // A request the VMM answers (409: no VM), so that each goes through the
                    // channel while the others do.
                    let r = c.raw("PUT", "/api/v1/vm.pause", None).unwrap();
                    assert_eq!(r.status, 409, "thread {t} pause {i}");
                    // And a 400 in between, which must not disturb anyone.
                    if i % 10 == 0 {
                        let r = c
                            .raw("PUT", "/api/v1/vm.create", Some(b"{oops".to_vec()))
                            .unwrap();
                        assert_eq!(r.status, 400);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.vm.lock().unwrap().log.len(), 400);
}

/// Connections are served concurrently: a VMM that answers only once it holds two requests
/// gets both while the first client is still waiting.
#[test]
fn requests_wait_concurrently() {
    let path = socket_path("conc");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let wake = EventFd::new(0).unwrap();
    let _server = ApiServer::start(&path, tx, wake).unwrap();
    std::thread::spawn(move || {
        let a = rx.recv().unwrap();
        let b = rx.recv().unwrap();
        for r in [b, a] {
            let _ = r.respond.send(Ok(api_server::ApiReply::Empty));
        }
    });
    let p2 = path.clone();
    let t = std::thread::spawn(move || ApiClient::new(&p2).unwrap().pause());
    std::thread::sleep(Duration::from_millis(50));
    ApiClient::new(&path).unwrap().resume().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn vmm_trouble_is_500_or_503() {
    // A VMM that drops requests unanswered: 500.
    let path = socket_path("drop");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let opts = ServerOptions {
        reply_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let _s = ApiServer::start_with(&path, tx, EventFd::new(0).unwrap(), opts.clone()).unwrap();
    let vmm = std::thread::spawn(move || {
        let r = rx.recv().unwrap();
        assert_eq!(r.action, ApiAction::Pause);
        drop(r);
        // The next one is never answered: 503 after the timeout.
        let held = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(600));
        drop(held);
        // Then the VMM is gone: 503 at once.
    });
    let c = ApiClient::new(&path).unwrap();
    let (st, msg, _) = api_status(c.pause());
    assert_eq!(st, 500, "{msg}");
    assert!(msg.contains("dropped"), "{msg}");
    let t0 = std::time::Instant::now();
    let (st, msg, _) = api_status(c.resume());
    assert_eq!(st, 503, "{msg}");
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    vmm.join().unwrap();
    let (st, msg, _) = api_status(c.boot());
    assert_eq!(st, 503, "{msg}");
    let spec = Spec::load();
    let r = c.raw("PUT", "/api/v1/vm.boot", None).unwrap();
    spec.check_response("/api/v1/vm.boot", "PUT", r.status, &r.body)
        .unwrap();
}

#[test]
fn socket_path_handling() {
    // A live server is not displaced.
    let h = Harness::start("sock");
    let (tx, _rx) = channel();
    let e = ApiServer::start(&h.path, tx.clone(), EventFd::new(0).unwrap()).unwrap_err();
    assert!(matches!(e, ApiServerError::InUse(_)), "{e}");
    assert!(e.to_string().contains("already serving"));
    h.client().ping().unwrap();

    // A stale socket file is replaced; stop removes the socket.
    let stale = socket_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut s = ApiServer::start(&stale, tx.clone(), EventFd::new(0).unwrap()).unwrap();
    assert_eq!(s.socket_path(), stale.as_path());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&stale).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The socket was staged under a temporary name and renamed into place: none is left.
    let staged = stale
        .parent()
        .unwrap()
        .join(format!(".skiff-api-{}", std::process::id()));
    assert!(!staged.exists(), "{} left behind", staged.display());
    s.stop();
    assert!(!stale.exists(), "stop removes the socket");
    s.stop();
    drop(s);

    // A regular file is not deleted.
    let file = socket_path("file");
    std::fs::write(&file, b"precious").unwrap();
    let e = ApiServer::start(&file, tx.clone(), EventFd::new(0).unwrap()).unwrap_err();
    assert!(matches!(e, ApiServerError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    // A missing directory is named.
    let missing = std::path::Path::new("/nonexistent-skiff-dir/api.sock");
    let e = ApiServer::start(missing, tx.clone(), EventFd::new(0).unwrap()).unwrap_err();
    assert!(
        e.to_string()
            .contains("/nonexistent-skiff-dir does not exist"),
        "{e}"
    );

    // Drop stops the server too.
    let p = socket_path("drop2");
    let s = ApiServer::start(&p, tx, EventFd::new(0).unwrap()).unwrap();
    drop(s);
    assert!(!p.exists());
    let e = ApiClient::new(&p).unwrap().ping().unwrap_err();
    assert!(e.to_string().contains("--api-socket"), "{e}");
}

#[test]
fn eventfd_is_written_per_request() {
    let path = socket_path("wake");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let probe = wake.try_clone().unwrap();
    let _s = ApiServer::start(&path, tx, wake).unwrap();
    std::thread::spawn(move || {
        for r in rx {
            let _ = r.respond.send(Ok(api_server::ApiReply::Empty));
        }
    });
    let c = ApiClient::new(&path).unwrap();
    for _ in 0..3 {
        c.pause().unwrap();
    }
    assert_eq!(probe.read().unwrap(), 3);
}

/// `vmm.ping` is answered by the server itself: no request reaches the control thread, none
/// wakes it, and a control thread busy with a long operation does not delay it.
#[test]
fn ping_is_answered_without_the_control_thread() {
    let path = socket_path("ping");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let probe = wake.try_clone().unwrap();
    let _s = ApiServer::start(&path, tx, wake).unwrap();
    let c = ApiClient::new(&path).unwrap();
    // A request the control thread holds (it never answers during the pings).
    let p = path.clone();
    let held = std::thread::spawn(move || ApiClient::new(&p).unwrap().pause());
    let pending = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(pending.action, ApiAction::Pause);
    // The server queues a request, then writes the eventfd: the write may come a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let woken = loop {
        match probe.read() {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the held request never woke the control thread"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("eventfd: {e}"),
        }
    };
    assert_eq!(woken, 1);
    for _ in 0..5 {
        let ping = c.ping().unwrap();
        assert_eq!(ping, api_server::models::PingResponse::current());
    }
    assert!(rx.try_recv().is_err(), "a ping reached the control thread");
    assert!(probe.read().is_err(), "a ping woke the control thread");
    let _ = pending.respond.send(Ok(api_server::ApiReply::Empty));
    held.join().unwrap().unwrap();
}

/// The control thread answers vmm.shutdown and stops the server right away: the client still
/// gets its 204, and a request waiting for the VMM does not hold the stop up for long.
#[test]
fn stop_right_after_answering_delivers_the_answer() {
    for _ in 0..20 {
        let path = socket_path("stop");
        let (tx, rx) = channel::<api_server::ApiRequest>();
        let server = ApiServer::start(&path, tx, EventFd::new(0).unwrap()).unwrap();
        let vmm = std::thread::spawn(move || {
            let mut server = server;
            let r = rx.recv().unwrap();
            assert_eq!(r.action, ApiAction::VmmShutdown);
            let _ = r.respond.send(Ok(api_server::ApiReply::Empty));
            server.stop();
        });
        ApiClient::new(&path).unwrap().shutdown_vmm().unwrap();
        vmm.join().unwrap();
        assert!(!path.exists());
    }
    let path = socket_path("stop2");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let mut server = ApiServer::start(&path, tx, EventFd::new(0).unwrap()).unwrap();
    let p = path.clone();
    let waiting = std::thread::spawn(move || ApiClient::new(&p).unwrap().pause());
    let held = rx.recv().unwrap();
    let t0 = std::time::Instant::now();
    server.stop();
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(waiting.join().unwrap().is_err());
    drop(held);
}

fn send_body(extra: Value) -> Vec<u8> {
    let mut v = json!({"destination_url": "tcp:192.0.2.1:6000"});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::to_vec(&v).unwrap()
}

/// Every bad field of the migration bodies is a 400 that names the field; nothing reaches the
/// VMM.
#[test]
fn migration_bodies_name_the_bad_field() {
    let h = Harness::start("mig400");
    let c = h.client();
    let send = |extra: Value| send_body(extra);
    let recv =
        |o: Value| serde_json::to_vec(&json!({"receiver_url": "tcp:h:1", "overrides": o})).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("vm.send-migration", b"".to_vec(), "JSON body is required"),
        (
            "vm.send-migration",
            b"{}".to_vec(),
            "\"destination_url\" is missing",
        ),
        (
            "vm.send-migration",
            br#"{"destination_url": 5}"#.to_vec(),
            "$.destination_url: expected string",
        ),
        (
            "vm.send-migration",
            br#"{"destination_url": "file:///x"}"#.to_vec(),
            "destination_url: \"file:///x\": expected tcp:HOST:PORT",
        ),
        (
            "vm.send-migration",
            br#"{"destination_url": "tcp:h:0"}"#.to_vec(),
            "destination_url: \"tcp:h:0\": port 0",
        ),
        (
            "vm.send-migration",
            br#"{"destination_url": "tcp:::1:6000"}"#.to_vec(),
            "destination_url: \"tcp:::1:6000\": put an IPv6 address in brackets",
        ),
        (
            "vm.send-migration",
            br#"{"destination_url": "unix:rel.sock"}"#.to_vec(),
            "destination_url: \"unix:rel.sock\": the socket path must be absolute",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": 0})),
            "connections: 0 is out of range (1 to 16)",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": 17})),
            "connections: 17 is out of range (1 to 16)",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": 5000000000u64})),
            "$.connections: 5000000000 is above the maximum 16",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": -1})),
            "$.connections: -1 is below the minimum 1",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": "2"})),
            "$.connections: expected integer",
        ),
        (
            "vm.send-migration",
            send(json!({"local": true})),
            "local: a local migration needs a unix: destination_url, not tcp:192.0.2.1:6000",
        ),
        (
            "vm.send-migration",
            send(json!({"local": "yes"})),
            "$.local: expected boolean",
        ),
        (
            "vm.send-migration",
            send(json!({"downtime_limit_ms": 0})),
            "downtime_limit_ms: 0 is out of range",
        ),
        (
            "vm.send-migration",
            send(json!({"downtime_limit_ms": 1.5})),
            "$.downtime_limit_ms: expected integer",
        ),
        (
            "vm.send-migration",
            send(json!({"downtime_limit_ms": 1e30})),
            "$.downtime_limit_ms: expected integer",
        ),
        (
            "vm.send-migration",
            send(json!({"bandwidth_limit_mbps": 0})),
            "bandwidth_limit_mbps: 0 is out of range",
        ),
        (
            "vm.send-migration",
            send(json!({"bandwidth_limit_mbps": null})),
            "$.bandwidth_limit_mbps: expected integer, got null",
        ),
        (
            "vm.send-migration",
            send(json!({"max_iterations": 0})),
            "max_iterations: 0 is out of range",
        ),
        (
            "vm.send-migration",
            send(json!({"max_iterations": 99999999999u64})),
            "$.max_iterations: 99999999999 is above the maximum 10000",
        ),
        (
            "vm.send-migration",
            send(json!({"migration_timeout": 10})),
            "property \"migration_timeout\" is not documented",
        ),
        (
            "vm.send-migration",
            br#"["tcp:h:1"]"#.to_vec(),
            "expected object",
        ),
        (
            "vm.receive-migration",
            b"{}".to_vec(),
            "\"receiver_url\" is missing",
        ),
        (
            "vm.receive-migration",
            br#"{"receiver_url": "tcp:h"}"#.to_vec(),
            "receiver_url: \"tcp:h\": missing :PORT",
        ),
        (
            "vm.receive-migration",
            br#"{"receiver_url": "unix:/r", "local": true}"#.to_vec(),
            "property \"local\" is not documented",
        ),
        (
            "vm.receive-migration",
            recv(json!([])),
            "$.overrides: expected object",
        ),
        (
            "vm.receive-migration",
            recv(json!({"disk0": "/x"})),
            "$.overrides.disk0: expected object",
        ),
        (
            "vm.receive-migration",
            recv(json!({"disk0": {"file": "/x"}})),
            "$.overrides.disk0: property \"file\" is not documented",
        ),
        (
            "vm.receive-migration",
            recv(json!({"disk0": {"path": 3}})),
            "$.overrides.disk0.path: expected string",
        ),
        (
            "vm.receive-migration",
            recv(json!({"disk0": {}})),
            "overrides.disk0: give exactly one of path, tap, socket (got none)",
        ),
        (
            "vm.receive-migration",
            recv(json!({"net0": {"tap": "t", "path": "/p"}})),
            "overrides.net0: give exactly one of path, tap, socket (got path, tap)",
        ),
        (
            "vm.receive-migration",
            recv(json!({"disk0": {"path": "img"}})),
            "overrides.disk0.path: \"img\" must be an absolute path",
        ),
        (
            "vm.receive-migration",
            recv(json!({"net0": {"tap": "much-too-long-name"}})),
            "overrides.net0.tap: \"much-too-long-name\" is not an interface name",
        ),
        (
            "vm.receive-migration",
            recv(json!({"accel0": {"socket": "x"}})),
            "overrides.accel0.socket",
        ),
        (
            "vm.receive-migration",
            recv(json!({"a b": {"path": "/x"}})),
            "overrides: \"a b\" is not a device id",
        ),
    ];
    for (ep, body, want) in cases {
        let r = c
            .raw("PUT", &format!("{V1}{ep}"), Some(body.clone()))
            .unwrap();
        let e = err_body(&r);
        assert_eq!(
            r.status,
            400,
            "{ep} {}: {}",
            String::from_utf8_lossy(&body),
            e.error
        );
        assert!(e.error.starts_with(ep), "{}", e.error);
        assert!(
            e.error.contains(want),
            "{ep} {}: {:?} lacks {want:?}",
            String::from_utf8_lossy(&body),
            e.error
        );
    }
    // Body limit applies as everywhere.
    let mut big = br#"{"receiver_url": "unix:/r", "overrides": {"#.to_vec();
    for i in 0..3000 {
        big.extend_from_slice(format!(r#""disk{i}": {{"path": "/img/{i}"}},"#).as_bytes());
    }
    big.extend_from_slice(br#""x": {"path": "/x"}}}"#);
    let r = c
        .raw("PUT", &format!("{V1}vm.receive-migration"), Some(big))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(err_body(&r).error.contains("65536 bytes"));
    assert!(
        h.vm.lock().unwrap().log.is_empty(),
        "nothing reached the VMM"
    );
    // Good bodies reach it, parsed and with defaults filled in.
    c.raw("PUT", &format!("{V1}vm.receive-migration"), Some(br#"{"receiver_url": "tcp:[::1]:6000", "overrides": {"hostdev0": {"path": "/sys/bus/pci/devices/0000:01:00.0"}}}"#.to_vec())).unwrap();
    let got = h.vm.lock().unwrap().received.clone().unwrap();
    assert_eq!(
        got.receiver_url.tcp_address().as_deref(),
        Some("[::1]:6000")
    );
    assert_eq!(got.overrides["hostdev0"].fields(), vec!["path"]);
}

#[test]
fn migration_through_the_client() {
    use api_server::{MigrationPhase, MigrationUrl, ReceiveMigrationRequest, SendMigrationRequest};
    let h = Harness::start("migc");
    let c = h.client();
    let p = c.migration_progress().unwrap();
    assert_eq!(p.phase, MigrationPhase::None);
    let (st, _, state) = api_status(c.migration_cancel());
    assert_eq!((st, state), (409, None));
    let url = MigrationUrl::parse("tcp:192.0.2.1:6000").unwrap();
    let (st, msg, _) = api_status(c.send_migration(&SendMigrationRequest::new(url.clone())));
    assert_eq!(st, 409, "{msg}");

    // The client's request is what the server passes on, validated.
    let mut bad = SendMigrationRequest::new(url.clone());
    bad.connections = 0;
    let (st, msg, _) = api_status(c.send_migration(&bad));
    assert_eq!(st, 400);
    assert!(msg.contains("connections"), "{msg}");

    c.create(&VmConfig::default()).unwrap();
    c.boot().unwrap();
    let mut req = SendMigrationRequest::new(url);
    req.connections = 4;
    req.bandwidth_limit_mbps = Some(800);
    c.send_migration(&req).unwrap();
    assert_eq!(h.vm.lock().unwrap().sent.as_ref(), Some(&req));
    assert_eq!(h.state(), Some(VmState::Migrating));
    let (st, _, state) = api_status(c.pause());
    assert_eq!((st, state), (409, Some(VmState::Migrating)));
    let mut phases = Vec::new();
    loop {
        let p = c.migration_progress().unwrap();
        if phases.last() != Some(&p.phase) {
            phases.push(p.phase);
        }
        if p.phase.is_final() {
            assert_eq!(p.downtime_ms, Some(42));
            break;
        }
    }
    use MigrationPhase as P;
    assert_eq!(
        phases,
        vec![
            P::Setup,
            P::Precopy,
            P::Switchover,
            P::Completing,
            P::Completed
        ]
    );
    assert_eq!(h.state(), Some(VmState::Migrated));
    assert_eq!(c.info().unwrap().state, VmState::Migrated);

    // A failed one puts the source back as it was.
    c.delete().unwrap();
    c.create(&VmConfig::default()).unwrap();
    c.boot().unwrap();
    c.pause().unwrap();
    c.send_migration(&SendMigrationRequest::new(
        MigrationUrl::parse("tcp:fail.invalid:1").unwrap(),
    ))
    .unwrap();
    let last = loop {
        let p = c.migration_progress().unwrap();
        if p.phase.is_final() {
            break p;
        }
    };
    assert_eq!(last.phase, P::Failed);
    assert_eq!(
        last.error.as_deref(),
        Some("the target closed the connection")
    );
    assert_eq!(h.state(), Some(VmState::Paused));

    // Receive on a skiff without a VM.
    c.delete().unwrap();
    let mut r = ReceiveMigrationRequest::new(MigrationUrl::parse("unix:/run/r.sock").unwrap());
    r.overrides.insert(
        "net0".into(),
        api_server::DeviceOverride {
            tap: Some("tap1".into()),
            ..Default::default()
        },
    );
    c.receive_migration(&r).unwrap();
    assert_eq!(h.vm.lock().unwrap().received.as_ref(), Some(&r));
}

/// The VMM of this build answers the migration actions with 501; that is documented.
#[test]
fn not_implemented_is_documented() {
    let path = socket_path("501");
    let (tx, rx) = channel::<api_server::ApiRequest>();
    let _s = ApiServer::start(&path, tx, EventFd::new(0).unwrap()).unwrap();
    std::thread::spawn(move || {
        for r in rx {
            let _ = r.respond.send(Err(api_server::ApiError::not_implemented(
                "live migration is not available in this build yet",
            )));
        }
    });
    let c = ApiClient::new(&path).unwrap();
    let spec = Spec::load();
    for (m, ep, body) in [
        ("PUT", "vm.send-migration", Some(send_body(json!({})))),
        (
            "PUT",
            "vm.receive-migration",
            Some(br#"{"receiver_url": "unix:/r"}"#.to_vec()),
        ),
        ("GET", "vm.migration-progress", None),
        ("PUT", "vm.migration-cancel", None),
    ] {
        let path = format!("{V1}{ep}");
        let r = c.raw(m, &path, body).unwrap();
        assert_eq!(r.status, 501, "{ep}");
        spec.check_response(&path, m, r.status, &r.body).unwrap();
    }
    let e = c.migration_progress().unwrap_err();
    assert_eq!(e.status(), Some(501));
    assert!(e.to_string().contains("not available in this build"), "{e}");
}
