//! The target side of a live migration: listen, take HELLO (and the extra connections it
//! announces) and CONFIG, build the VM from that configuration (with this host's overrides) and
//! check it matches the source's description (RAM layout, devices, CPU); ACCEPT or REFUSE; load
//! RAM from every connection (never an older copy of a page over a newer one) and the component
//! state; start the VM paused, restore, resume, and answer RESUMED. Nothing runs until the whole
//! stream arrived and checked out; any failure answers FAILED (or REFUSE) and drops the VM.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_server::migration::{MigrationPhase, ReceiveMigrationRequest};
use migration::stream::{
    read_commit_word, CommitWord, Config, Message, MigrationReceiver, MigrationSender, RamApplier,
    FEATURE_LOCAL_MEMFD,
};
use migration::StateSection;

use super::transport::{first_contact, tls_server, Conn, FirstContact, Listener};
use super::{hold_if_asked, host_record, MigrateError, SharedProgress};
use crate::config::VmConfig;
use crate::test_knobs::HoldPoint;
use crate::vm::{Origin, Vm};
use crate::vm_state::ClockMode;

/// How long the target waits for the source to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long it waits for the source's extra connections.
const EXTRA_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections a source may open.
const MAX_CONNECTIONS: usize = 16;

fn unexpected(what: &str, got: &Message) -> MigrateError {
    MigrateError::Unexpected(format!("expected {what}, got {:?}", got.kind()))
}

/// This VM's description, to compare with the source's.
fn describe(vm: &Vm) -> Config {
    Config {
        vm_config: Vec::new(),
        host: host_record(),
        ram: vm.ram_layout(),
        devices: super::device_entries(vm.registry()),
    }
}

/// The source's connections: the first (with the reply stream on it) and the others.
type Accepted = (
    MigrationReceiver<Conn>,
    MigrationSender<Conn>,
    Vec<MigrationReceiver<Conn>>,
);

/// Accept the source's connections: the first one's HELLO says how many follow. A local
/// migration's source first hands its guest-RAM memfd over on a connection of its own.
fn accept_all(
    listener: &Listener,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<(Accepted, Option<std::fs::File>), MigrateError> {
    // With TLS, a source is authenticated before a byte of its stream is read.
    let accept = |timeout| -> Result<Conn, MigrateError> {
        let conn = listener.accept(timeout)?;
        Ok(match tls {
            Some(config) => tls_server(conn, config)?,
            None => conn,
        })
    };
    let (conn0, memfd) = match first_contact(accept(ACCEPT_TIMEOUT)?)? {
        FirstContact::Memfd(f) => (accept(EXTRA_ACCEPT_TIMEOUT)?, Some(f)),
        FirstContact::Stream(c) => (c, None),
    };
    let reply = MigrationSender::replies(conn0.try_clone()?)?;
    let mut rx0 = MigrationReceiver::new(conn0)?;
    let hello = match rx0.recv()? {
        Message::Hello(h) => h,
        other => return Err(unexpected("HELLO", &other)),
    };
    let n = usize::from(hello.connections);
    if n == 0 || n > MAX_CONNECTIONS || hello.connection != 0 {
        return Err(MigrateError::Unexpected(format!(
            "HELLO announces connection {} of {n} (1 to {MAX_CONNECTIONS} connections)",
            hello.connection
        )));
    }
    let mut others = Vec::with_capacity(n - 1);
    for i in 1..n {
        let mut rx = MigrationReceiver::new(accept(EXTRA_ACCEPT_TIMEOUT)?)?;
        match rx.recv()? {
            Message::Hello(h) if usize::from(h.connection) == i => others.push(rx),
            other => return Err(unexpected(&format!("HELLO of connection {i}"), &other)),
        }
    }
    if hello.has_feature(FEATURE_LOCAL_MEMFD) != memfd.is_some() {
        return Err(MigrateError::Unexpected(
            "a local migration needs the source's guest RAM handed over first (and only then)"
                .into(),
        ));
    }
    Ok(((rx0, reply, others), memfd))
}

/// Build the VM the CONFIG describes (with this host's overrides) and check it matches; with
/// `memfd` its guest RAM is the source's.
fn build(
    req: &ReceiveMigrationRequest,
    cfg: &Config,
    memfd: Option<std::fs::File>,
) -> Result<Vm, MigrateError> {
    let mut config: VmConfig = serde_json::from_slice(&cfg.vm_config)
        .map_err(|e| MigrateError::Config(format!("the source's configuration: {e}")))?;
    req.apply_overrides(&mut config)
        .map_err(|e| MigrateError::Config(e.to_string()))?;
    config
        .validate()
        .map_err(|e| MigrateError::Config(e.to_string()))?;
    let origin = match memfd {
        Some(f) => Origin::RestoreInto(f),
        None => Origin::Restore,
    };
    let vm = Vm::create(config, origin)?;
    let diffs = cfg.differences(&describe(&vm));
    if !diffs.is_empty() {
        return Err(MigrateError::Config(diffs.join("; ")));
    }
    Ok(vm)
}

/// How long a loaded target waits for the source's commit before it drops the VM.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Read the source's commit ([`migration::stream::COMMIT`]) from connection 0 after its
/// COMPLETE; a withdrawal, anything else, or nothing in time is an error (the VM is dropped).
/// A commit also ends the time a cancel is accepted here.
fn wait_for_commit(mut conn: Conn, progress: &SharedProgress) -> Result<(), MigrateError> {
    conn.set_read_timeout(Some(COMMIT_WAIT))?;
    match read_commit_word(&mut conn) {
        Ok(CommitWord::Commit) => progress.commit(),
        Ok(CommitWord::Withdraw(reason)) => Err(MigrateError::Aborted(format!(
            "{reason}; the VM was never run here"
        ))),
        Err(e) => Err(MigrateError::Unexpected(format!(
            "no commit from the source ({e}); the VM was never run here"
        ))),
    }
}

/// Read every connection to its COMPLETE, loading RAM into `vm`; returns the state sections.
fn load(
    vm: &Vm,
    rx0: &mut MigrationReceiver<Conn>,
    others: Vec<MigrationReceiver<Conn>>,
) -> Result<Vec<StateSection>, MigrateError> {
    let mut applier = RamApplier::new(&vm.ram_layout())
        .map_err(|e| MigrateError::Unexpected(format!("RAM layout: {e}")))?;
    // Guest RAM is a shared mapping of a memfd and no vCPU runs yet: pages go in through the
    // file, which spares the kernel zeroing each page before its data overwrites it.
    applier.write_through_files(true);
    let applier = Mutex::new(applier);
    let mem = vm.memory();
    let drain =
        |rx: &mut MigrationReceiver<Conn>| -> Result<Option<Vec<StateSection>>, MigrateError> {
            let mut sections = None;
            loop {
                match rx.recv()? {
                    Message::Ram(frame) => {
                        applier
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .apply(mem, &frame)?;
                        rx.recycle(frame);
                    }
                    Message::IterationEnd(_) => {}
                    Message::DevicePrecopy { id, data } => {
                        vm.registry().precopy_write(&id, &data)?
                    }
                    Message::State(s) => sections = Some(s),
                    Message::Complete(_) => return Ok(sections),
                    Message::Abort(reason) => return Err(MigrateError::Aborted(reason)),
                    other => return Err(unexpected("RAM, STATE or COMPLETE", &other)),
                }
            }
        };
    std::thread::scope(|scope| {
        let workers: Vec<_> = others
            .into_iter()
            .map(|mut rx| scope.spawn(move || drain(&mut rx)))
            .collect();
        let main = drain(rx0);
        let mut sections = main?;
        for w in workers {
            let s = w
                .join()
                .map_err(|_| MigrateError::Unexpected("a receiver thread panicked".into()))??;
            if s.is_some() {
                sections = s;
            }
        }
        sections.ok_or_else(|| MigrateError::Unexpected("the stream carried no STATE".into()))
    })
}

/// Receive a VM on `req.receiver_url`; returns it running.
pub fn receive(req: ReceiveMigrationRequest, progress: SharedProgress) -> Result<Vm, MigrateError> {
    let result = (|| {
        let tls = req
            .tls
            .as_ref()
            .map(super::tls::server_config)
            .transpose()?;
        let listener = Listener::bind(&req.receiver_url)?;
        super::transport::warn_if_plain_remote(&req.receiver_url, tls.is_some(), "incoming");
        let ((mut rx0, mut reply, others), memfd) = accept_all(&listener, tls.as_ref())?;
        drop(listener);
        let cfg = match rx0.recv()? {
            Message::Config(c) => c,
            other => return Err(unexpected("CONFIG", &other)),
        };
        let probe = reply.get_mut().try_clone()?;
        // A cancel here shuts connection 0 down: the source stops, and so does this side.
        progress.watch(probe.try_clone()?);
        hold_if_asked(HoldPoint::Config, || {
            progress.cancelled() || probe.peer_spoke()
        });
        let mut vm = match build(&req, &cfg, memfd) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = reply.send(&Message::Refuse(e.to_string()));
                let _ = reply.get_mut().flush();
                return Err(e);
            }
        };
        // Passthrough devices leave RUNNING through the P2P grace state, all of them before any
        // is stopped, and wait in STOP for their data (RESUMING starts with the first of it).
        if let Err(e) = vm.registry().pause_passthrough() {
            let e = MigrateError::from(e);
            let _ = reply.send(&Message::Refuse(e.to_string()));
            let _ = reply.get_mut().flush();
            return Err(e);
        }
        reply.send(&Message::Accept)?;
        reply.get_mut().flush()?;
        progress.phase(MigrationPhase::Precopy);
        let loaded = load(&vm, &mut rx0, others).and_then(|sections| {
            progress.phase(MigrationPhase::Completing);
            hold_if_asked(HoldPoint::Restore, || probe.peer_spoke());
            vm.restore_components(&sections, ClockMode::Advance)?;
            vm.start()?;
            // Loaded and stopped: the VM runs only once the source has committed (fencing,
            // see migration::stream's "The commit").
            reply.send(&Message::Ready)?;
            reply.get_mut().flush()?;
            wait_for_commit(rx0.into_inner(), &progress)?;
            vm.resume()?;
            hold_if_asked(HoldPoint::Resumed, || probe.peer_spoke());
            Ok(())
        });
        match loaded {
            Ok(()) => {
                if crate::test_knobs::drop_resumed() {
                    log::warn!("TEST KNOB: not answering RESUMED");
                    return Ok(vm);
                }
                // The VM runs here now (the source committed and stays paused): a lost answer
                // must not stop it — the source then reports "outcome unknown".
                if let Err(e) = reply
                    .send(&Message::Resumed)
                    .map_err(MigrateError::from)
                    .and_then(|()| Ok(reply.get_mut().flush()?))
                {
                    log::warn!(
                        "migration: the VM runs here, but RESUMED did not reach the source: {e}"
                    );
                }
                Ok(vm)
            }
            Err(e) => {
                let _ = reply.send(&Message::Failed(e.to_string()));
                let _ = reply.get_mut().flush();
                Err(e)
            }
        }
    })();
    progress.unwatch();
    match &result {
        Ok(_) => progress.phase(MigrationPhase::Completed),
        Err(e) => {
            log::error!("incoming migration failed: {e}");
            progress.fail(e);
        }
    }
    result
}
