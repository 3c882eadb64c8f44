//! Helpers for the end-to-end tests: find the `skiff` binary, the test guest and the smoke kernel,
//! run `skiff` with a deadline, and fail with the guest's serial log attached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the test guest ELF built by this crate's build script.
pub fn test_guest() -> PathBuf {
    PathBuf::from(env!("SKIFF_TEST_GUEST"))
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Path of the `skiff` binary of the same build profile as this test.
///
/// `cargo test --workspace` builds it because the `vmm` package has integration tests of its own.
pub fn skiff_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_BIN") {
        return PathBuf::from(p);
    }
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("skiff");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (which builds skiff) or set SKIFF_BIN",
        bin.display()
    );
    bin
}

/// True when this host's KVM emulates guest kernel code (nested KVM on PVM, see shared/HOST.md):
/// Linux guests then need `clearcpuid=` and cannot run userspace.
pub fn emulating_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The `clearcpuid=` option a Linux guest needs on an emulating host (empty elsewhere).
pub fn linux_cpu_workaround() -> &'static str {
    if emulating_host() {
        "clearcpuid=xsave,cx16,popcnt,fsgsbase,rdpid,pcid,invpcid,movbe,erms,fsrm,smap,smep"
    } else {
        ""
    }
}

/// A prerequisite of a test is missing (`why`). Fails the test (panics) unless the environment
/// variable `var` (e.g. `SKIFF_SKIP_NETNS`) is set to a non-empty value, in which case it prints
/// `skipped: <why> (<var> is set)` straight to stderr (visible without `--nocapture`) and returns;
/// the caller then returns. One variable per missing thing, so skipping is always a decision:
///
/// | variable | missing |
/// |---|---|
/// | `SKIFF_SKIP_LINUX` | the smoke kernel / root filesystem (not built) |
/// | `SKIFF_SKIP_NETNS` | a network namespace with a TAP (needs root, `ip`, /dev/net/tun) |
/// | `SKIFF_SKIP_UNSHARE` | a private mount namespace (`unshare -m`, needs root) |
pub fn skip_or_fail(var: &str, why: &str) {
    if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: {why} ({var} is set)");
    } else {
        panic!("{why} (set {var}=1 to skip this test)");
    }
}

/// Result of one `skiff` run.
#[derive(Debug)]
pub struct Run {
    /// Exit status (None when it had to be killed at the deadline).
    pub status: Option<ExitStatus>,
    /// Standard output (the guest's serial output with `--serial stdout`).
    pub stdout: String,
    /// Standard error (skiff's log and error messages).
    pub stderr: String,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Run {
    /// Exit code, or None if killed by a signal or the deadline.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything the run printed, for failure messages.
    pub fn log(&self) -> String {
        format!(
            "exit: {:?} after {:.1}s\n----- stdout (serial) -----\n{}\n----- stderr -----\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// Assert the run exited with `code`, printing the logs otherwise.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status\n{}",
            self.log()
        );
    }

    /// Assert that the serial output contains `needle`.
    pub fn assert_stdout_has(&self, needle: &str) {
        assert!(
            self.stdout.contains(needle),
            "serial output lacks {needle:?}\n{}",
            self.log()
        );
    }

    /// The first line of stdout starting with `prefix`.
    pub fn line_starting(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }
}

/// Run `skiff` with `args`, killing it after `deadline`.
pub fn run_skiff<S: AsRef<std::ffi::OsStr>>(args: &[S], deadline: Duration) -> Run {
    run_command(Command::new(skiff_bin()).args(args), deadline)
}

/// Run a prepared command with captured output and a deadline.
pub fn run_command(cmd: &mut Command, deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Directory with the smoke kernel (vmlinux, bzImage, initramfs.cpio), built by
/// `resources/guest/build-kernel.sh`; None (with the reason) when it has not been built.
pub fn smoke_kernel_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("SKIFF_KERNEL_DIR") {
        return Ok(PathBuf::from(d));
    }
    let script = repo_root().join("resources/guest/build-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print-dir")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    let dir = PathBuf::from(dir);
    if out.status.success() && dir.join(".done").exists() {
        Ok(dir)
    } else {
        Err(format!(
            "the smoke kernel is not built ({}): run `bash resources/guest/build-kernel.sh` (scripts/test.sh does)",
            dir.display()
        ))
    }
}

/// The ext4 root filesystem image built by `resources/guest/build-rootfs.sh`.
pub fn smoke_rootfs() -> Result<PathBuf, String> {
    let script = repo_root().join("resources/guest/build-rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print-path")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let img = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && img.exists() {
        Ok(img)
    } else {
        Err(format!(
            "the smoke root filesystem is not built ({}): run `bash resources/guest/build-rootfs.sh` (scripts/test.sh does)",
            img.display()
        ))
    }
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("skiff-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A running `skiff` whose output is collected in the background, for tests that act while the
/// guest runs (signals now; the API later).
pub struct SkiffProcess {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

fn collect<R: Read + Send + 'static>(
    mut r: R,
    into: std::sync::Arc<std::sync::Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

impl SkiffProcess {
    /// Start `skiff` with `args`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let mut cmd = Command::new(skiff_bin());
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// Start `cmd` (a `skiff` command, e.g. inside a network namespace).
    pub fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skiff");
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Self {
            child,
            stdout,
            stderr,
            readers,
            start: Instant::now(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (without reaping its output; call [`Self::wait`] for that).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Wait until the serial output contains `needle`; on timeout or early exit, kill the process
    /// and panic with everything it printed.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout.lock().unwrap().contains(needle) {
                return;
            }
            let exited = self.child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let _ = self.child.kill();
                let run = self.wait(Duration::from_secs(5));
                panic!("serial output never showed {needle:?}\n{}", run.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send signal `sig` (e.g. "TERM", "INT") with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// Wait for the process to exit (killing it after `timeout`) and return what it printed.
    pub fn wait(&mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Run {
            status,
            stdout,
            stderr,
            elapsed: self.start.elapsed(),
        }
    }
}

impl Drop for SkiffProcess {
    fn drop(&mut self) {
        // A process a test left running (a failed assertion, a helper node) does not outlive it.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Two "hosts" for migration tests: network namespaces `a` and `b` joined by a veth pair, with
/// addresses [`TwoHosts::A_ADDR`] and [`TwoHosts::B_ADDR`]; removed when dropped.
pub struct TwoHosts {
    /// Namespace of host A.
    pub a: String,
    /// Namespace of host B.
    pub b: String,
}

impl TwoHosts {
    /// Host A's address.
    pub const A_ADDR: &'static str = "10.213.0.1";
    /// Host B's address.
    pub const B_ADDR: &'static str = "10.213.0.2";

    /// Create both namespaces and the link; the reason when this host cannot (pass it to
    /// [`skip_or_fail`] with `SKIFF_SKIP_NETNS`).
    pub fn create(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let hosts = Self {
            a: format!("skiff-{tag}-a-{id}"),
            b: format!("skiff-{tag}-b-{id}"),
        };
        let (va, vb) = (format!("va{}", id % 100_000), format!("vb{}", id % 100_000));
        let a_cidr = format!("{}/24", Self::A_ADDR);
        let b_cidr = format!("{}/24", Self::B_ADDR);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &hosts.a],
            vec!["netns", "add", &hosts.b],
            vec![
                "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb,
                "netns", &hosts.b,
            ],
            vec!["-n", &hosts.a, "addr", "add", &a_cidr, "dev", &va],
            vec!["-n", &hosts.b, "addr", "add", &b_cidr, "dev", &vb],
            vec!["-n", &hosts.a, "link", "set", &va, "up"],
            vec!["-n", &hosts.b, "link", "set", &vb, "up"],
            vec!["-n", &hosts.a, "link", "set", "lo", "up"],
            vec!["-n", &hosts.b, "link", "set", "lo", "up"],
        ];
        for args in steps {
            match Command::new("ip").args(&args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(format!(
                        "cannot set up two network namespaces (ip {}): {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                Err(e) => return Err(format!("cannot run ip: {e}")),
            }
        }
        Ok(hosts)
    }

    /// A command running `program` on host `ns` (one of [`Self::a`], [`Self::b`]).
    pub fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Cut the link between the hosts (the veth pair goes down on host A).
    pub fn cut(&self) {
        let _ = Command::new("ip")
            .args(["-n", &self.a, "link", "set", "dev"])
            .arg(format!("va{}", std::process::id() % 100_000))
            .arg("down")
            .output();
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A network namespace with a persistent, up TAP interface in it: a "host" for network tests.
pub struct NetNamespace {
    /// Namespace name (under /var/run/netns).
    pub name: String,
    /// TAP interface name inside it.
    pub tap: String,
}

impl NetNamespace {
    /// Create namespace `skiff-<tag>-<pid>` with TAP `tap0` up; the reason when this host cannot
    /// (no `ip`, no CAP_NET_ADMIN, no /dev/net/tun). Pass it to [`skip_or_fail`] with
    /// `SKIFF_SKIP_NETNS`.
    pub fn create(tag: &str) -> Result<Self, String> {
        let name = format!("skiff-{tag}-{}", std::process::id());
        let ns = Self {
            name,
            tap: "tap0".into(),
        };
        let steps: [&[&str]; 3] = [
            &["netns", "add", &ns.name],
            &[
                "-n", &ns.name, "tuntap", "add", "dev", &ns.tap, "mode", "tap",
            ],
            &["-n", &ns.name, "link", "set", &ns.tap, "up"],
        ];
        for args in steps {
            match Command::new("ip").args(args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(format!(
                        "cannot set up a network namespace with a TAP (ip {}): {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                Err(e) => return Err(format!("cannot run ip: {e}")),
            }
        }
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Open an AF_PACKET socket bound to the TAP inside the namespace (from a helper thread, so
    /// the test's own thread keeps its namespace).
    pub fn packet_socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let ns_path = format!("/var/run/netns/{}", self.name);
        let tap = self.tap.clone();
        std::thread::spawn(move || -> std::io::Result<std::os::fd::OwnedFd> {
            use std::os::fd::{AsRawFd, FromRawFd};
            let ns = std::fs::File::open(&ns_path)?;
            // SAFETY: setns on this (helper) thread only; `ns` is a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2) call; the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new descriptor we own.
            let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            let cname = std::ffi::CString::new(tap).unwrap();
            // SAFETY: `cname` is a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid initial value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto as u16;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(sock)
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Path of the `skiff-remote` binary of the same build profile (built because `api_server` has
/// integration tests of its own).
pub fn skiff_remote_bin() -> PathBuf {
    let bin = skiff_bin().with_file_name("skiff-remote");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Path of the `skiff-testdev` binary (the vfio-user test device) of the same build profile
/// (built because the `testdev` package has integration tests of its own).
pub fn testdev_bin() -> PathBuf {
    let bin = skiff_bin().with_file_name("skiff-testdev");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// A running `skiff-testdev` serving one vfio-user client on a socket; killed when dropped.
pub struct TestDevice {
    /// Its socket.
    pub socket: PathBuf,
    child: std::process::Child,
    log: PathBuf,
}

impl TestDevice {
    /// Start a device named `id` on `dir/id.sock` (with `args` added) and wait for its socket.
    pub fn start(dir: &Path, id: &str, args: &[&str]) -> Self {
        let socket = dir.join(format!("{id}.sock"));
        let log = dir.join(format!("{id}.log"));
        let child = Command::new(testdev_bin())
            .arg("--socket")
            .arg(&socket)
            .arg("--id")
            .arg(id)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("testdev log"))
            .spawn()
            .expect("spawn skiff-testdev");
        // Generous: a device with large, filled memory starts slowly on a loaded host.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "skiff-testdev {id}: {} did not appear within 60 s; its log:\n{}",
                socket.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { socket, child, log }
    }

    /// The `--user-device` option for this device, with `extra` options appended.
    pub fn option(&self, extra: &str) -> String {
        format!("socket={}{extra}", self.socket.display())
    }

    /// What the device has logged so far.
    pub fn log_now(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The state the device's last migration-state change (or reset) left it in, from its log
    /// (`migration state A -> B`), if it ever changed.
    pub fn last_state(&self) -> Option<String> {
        self.log_now()
            .lines()
            .filter_map(|l| l.split("migration state ").nth(1))
            .filter_map(|rest| rest.split(" -> ").nth(1))
            .map(|s| s.trim().to_string())
            .next_back()
    }

    /// Kill the device process (a device that dies under a running VM).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the device to exit on its own (its client disconnected); its exit status and log.
    pub fn wait(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `skiff-remote --api-socket SOCKET args...`; returns (exit code, stdout, stderr).
pub fn remote(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(skiff_remote_bin())
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run skiff-remote");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `skiff-remote` and require success (exit 0); panics with its output otherwise.
pub fn remote_ok(socket: &Path, args: &[&str]) {
    let (code, out, err) = remote(socket, args);
    assert_eq!(code, Some(0), "skiff-remote {args:?}: {out}{err}");
}

/// Wait until `path` exists (a socket skiff creates).
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl SkiffProcess {
    /// The serial output so far.
    pub fn stdout_now(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Wait until `done` holds for the serial output so far; panics with the output after
    /// `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.stdout_now()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.stdout_now()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub mod certs;
pub mod node;

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "set SKIFF_SKIP_SELFTEST_NEVER_SET=1 to skip this test")]
    fn a_missing_prerequisite_fails_without_its_variable() {
        super::skip_or_fail("SKIFF_SKIP_SELFTEST_NEVER_SET", "nothing is missing");
    }
}
