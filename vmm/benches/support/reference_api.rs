//! A reference API server for the API benchmark, built the way Cloud Hypervisor's API works (as
//! its documentation and sources describe it; no code taken): one HTTP thread runs an epoll
//! loop over the listening socket and its non-blocking connections; a complete request goes to
//! a second "VMM" thread through an mpsc channel plus an eventfd that thread's epoll loop waits
//! on; the HTTP thread blocks on a reply channel, writes the response and closes. It is a
//! lower bound of that design's cost: no routing, no JSON parsing, no timeouts, no limits. Cloud Hypervisor cannot run here (it needs nested state), so this is
//! its architecture measured in the same run as skiff, on the same noisy host: the ratio of the
//! two is the figure that means something.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What the "VMM" thread answers a ping with (the same fields as skiff's).
#[derive(serde::Serialize)]
struct Ping {
    version: &'static str,
    pid: u32,
    features: Vec<String>,
}

type Request = (String, Sender<Vec<u8>>);

/// Serve `vmm.ping` on `sock` from two new threads, for the life of the process.
pub fn start(sock: &Path) {
    let listener = UnixListener::bind(sock).expect("bind the reference API socket");
    let (to_vmm, from_api) = channel::<Request>();
    let notifier = EventFd::new(0).expect("eventfd");
    let vmm_notifier = notifier.try_clone().expect("eventfd clone");
    std::thread::Builder::new()
        .name("ref-vmm".into())
        .spawn(move || vmm_thread(vmm_notifier, from_api))
        .expect("spawn");
    std::thread::Builder::new()
        .name("ref-api".into())
        .spawn(move || http_thread(listener, to_vmm, notifier))
        .expect("spawn");
}

fn vmm_thread(notifier: EventFd, requests: Receiver<Request>) {
    let epoll = Epoll::new().expect("epoll");
    epoll
        .ctl(
            ControlOperation::Add,
            notifier.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .expect("epoll add");
    let mut events = [EpollEvent::default(); 8];
    loop {
        if epoll.wait(-1, &mut events).is_err() {
            continue;
        }
        let _ = notifier.read();
        while let Ok((path, reply)) = requests.try_recv() {
            let body = if path == "/api/v1/vmm.ping" {
                serde_json::to_vec(&Ping {
                    version: env!("CARGO_PKG_VERSION"),
                    pid: std::process::id(),
                    features: Vec::new(),
                })
                .unwrap_or_default()
            } else {
                Vec::new()
            };
            let _ = reply.send(body);
        }
    }
}

fn http_thread(listener: UnixListener, to_vmm: Sender<Request>, notifier: EventFd) {
    listener.set_nonblocking(true).expect("nonblocking");
    let epoll = Epoll::new().expect("epoll");
    let add = |fd: i32, key: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, key),
            )
            .expect("epoll add")
    };
    add(listener.as_raw_fd(), u64::MAX);
    let mut conns: HashMap<u64, (UnixStream, Vec<u8>)> = HashMap::new();
    let mut events = [EpollEvent::default(); 8];
    loop {
        let Ok(n) = epoll.wait(-1, &mut events) else {
            continue;
        };
        for e in &events[..n] {
            let key = e.data();
            if key == u64::MAX {
                while let Ok((conn, _)) = listener.accept() {
                    conn.set_nonblocking(true).expect("nonblocking");
                    let fd = conn.as_raw_fd();
                    add(fd, fd as u64);
                    conns.insert(fd as u64, (conn, Vec::new()));
                }
                continue;
            }
            let Some((conn, buf)) = conns.get_mut(&key) else {
                continue;
            };
            if read_request(conn, buf) == Some(false) {
                continue;
            }
            if let Some((conn, buf)) = conns.remove(&key) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    conn.as_raw_fd(),
                    EpollEvent::default(),
                );
                answer(conn, &buf, &to_vmm, &notifier);
            }
        }
    }
}

/// Read what the connection has; `Some(true)` once the request head is complete, `Some(false)`
/// while more is to come, `None` when the connection failed or closed.
fn read_request(conn: &mut UnixStream, buf: &mut Vec<u8>) -> Option<bool> {
    let mut chunk = [0u8; 1024];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(buf.windows(4).any(|w| w == b"\r\n\r\n"))
}

fn answer(mut conn: UnixStream, request: &[u8], to_vmm: &Sender<Request>, notifier: &EventFd) {
    let head = String::from_utf8_lossy(request);
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let (reply_tx, reply_rx) = channel();
    if to_vmm.send((path, reply_tx)).is_err() || notifier.write(1).is_err() {
        return;
    }
    let Ok(body) = reply_rx.recv() else { return };
    let _ = write!(
        conn,
        "HTTP/1.1 200 \r\nServer: reference\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(&body);
}
