//! The source side of a live migration.
//!
//! 1. Connect (`connections` streams), HELLO + CONFIG on the first; wait for ACCEPT.
//! 2. Start dirty logging; send all RAM (zero pages skipped), spread over the connections.
//! 3. Iterate over the dirty pages while the planner says so, throttling the vCPUs when it asks.
//! 4. Switch over: stop throttling, pause every vCPU and component, send the last dirty pages and
//!    every component's state, COMPLETE on every connection.
//! 5. Wait for the target's READY, send the commit, wait for its RESUMED.
//!
//! Any error before the commit: the VM is resumed if this side paused it, dirty logging stops,
//! the throttle stops, and an ABORT (during the transfer) or a withdrawal (after COMPLETE) is
//! sent when the connection still works. A cancel is accepted up to the commit, never after it.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_server::migration::{MigrationPhase, MigrationUrl, SendMigrationRequest};
use migration::planner::{Decision, IterationReport, Planner, PlannerConfig};
use migration::ram::ZeroPages;
use migration::stream::{
    spread_ranges, withdrawal, Config, Hello, Message, MigrationReceiver, MigrationSender, COMMIT,
    FEATURE_LOCAL_MEMFD, FEATURE_PRECOPY, PROTOCOL_VERSION,
};

use super::transport::{connect, send_memfd, Conn};
use super::{hold_if_asked, host_record, MigrateError, SharedProgress};
use crate::config::VmConfig;
use crate::test_knobs::HoldPoint;
use crate::vm::VmCore;
use std::os::fd::AsFd;

/// Pages per RAM piece dealt to a connection.
const SPREAD_CHUNK: u64 = 4 << 20;
/// How long the target may take to load the VM and answer READY.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the target may take to resume the VM and answer RESUMED once it has the commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);

type Senders = Vec<MigrationSender<Conn>>;

/// The VM's description for the target's checks.
fn describe(core: &VmCore, config: &VmConfig) -> Result<Config, MigrateError> {
    let vm_config = serde_json::to_vec(config).map_err(|e| MigrateError::Config(e.to_string()))?;
    Ok(Config {
        vm_config,
        host: host_record(),
        ram: core.ram_layout(),
        devices: super::device_entries(core.registry()),
    })
}

/// Send the pages of `ranges` over every connection (each gets its share), then end the
/// iteration on all of them. Returns the bytes written.
fn send_pass(
    core: &VmCore,
    senders: &mut Senders,
    ranges: Vec<(u64, u64)>,
    zeros: ZeroPages,
) -> Result<u64, MigrateError> {
    let before: u64 = senders.iter().map(|s| s.bytes_sent()).sum();
    let shares = spread_ranges(ranges, senders.len(), SPREAD_CHUNK);
    let mem = core.memory();
    std::thread::scope(|scope| -> Result<(), MigrateError> {
        let workers: Vec<_> = senders
            .iter_mut()
            .zip(shares)
            .map(|(s, share)| {
                scope.spawn(move || -> Result<(), MigrateError> {
                    s.send_ram(mem, share, zeros)?;
                    s.end_iteration()?;
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| MigrateError::Unexpected("a sender thread panicked".into()))??;
        }
        Ok(())
    })?;
    Ok(senders.iter().map(|s| s.bytes_sent()).sum::<u64>() - before)
}

/// Open the connections and get the target to accept the VM.
fn handshake(
    core: &VmCore,
    config: &VmConfig,
    req: &SendMigrationRequest,
    progress: &SharedProgress,
) -> Result<(Senders, MigrationReceiver<Conn>, Conn), MigrateError> {
    let n = req.connections.max(1) as usize;
    if req.local {
        // The target maps this process's guest RAM: it is handed over, never copied.
        send_memfd(&req.destination_url, core.memfd().as_fd())?;
    }
    let mut conns = connect(&req.destination_url, n)?;
    super::transport::warn_if_plain_remote(&req.destination_url, req.tls.is_some(), "outgoing");
    if let (Some(tls), MigrationUrl::Tcp { host, .. }) = (&req.tls, &req.destination_url) {
        let config = super::tls::client_config(tls)?;
        conns = conns
            .into_iter()
            .map(|c| super::transport::tls_client(c, &config, host))
            .collect::<Result<_, _>>()?;
    }
    for c in &conns {
        progress.watch(c.try_clone()?);
    }
    progress.check_cancel()?;
    if let Some(limit) = req.bandwidth_limit_bytes_per_s() {
        let limit = super::transport::RateLimit::new(limit);
        conns = conns.into_iter().map(|c| c.limited(&limit)).collect();
    }
    let probe = conns.first().map(Conn::try_clone).transpose()?;
    introduce(core, config, req, conns).map_err(|e| match (&e, &probe) {
        // A plain source meeting a TLS target: its writes fail once the target gave up.
        (MigrateError::Io(_) | MigrateError::Stream(_), Some(p)) if p.answered_with_tls() => {
            MigrateError::Unexpected(
                "the target answered with TLS: it expects tls, so give send-migration tls (cert, key, ca) too"
                    .into(),
            )
        }
        _ => e,
    })
}

/// Say HELLO on every connection and send the configuration; the target's ACCEPT or REFUSE.
fn introduce(
    core: &VmCore,
    config: &VmConfig,
    req: &SendMigrationRequest,
    conns: Vec<Conn>,
) -> Result<(Senders, MigrationReceiver<Conn>, Conn), MigrateError> {
    let n = conns.len();
    let mut senders = Vec::with_capacity(n);
    let mut control = None;
    for (i, conn) in conns.into_iter().enumerate() {
        if i == 0 {
            control = Some(conn.try_clone()?);
        }
        let mut s = MigrationSender::new(conn)?;
        s.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: format!("skiff {}", env!("CARGO_PKG_VERSION")),
            features: if req.local {
                vec![FEATURE_LOCAL_MEMFD.into()]
            } else {
                vec![FEATURE_PRECOPY.into()]
            },
            connection: i as u16,
            connections: n as u16,
        }))?;
        senders.push(s);
    }
    let control = control.ok_or_else(|| MigrateError::Unexpected("no connection".into()))?;
    senders[0].send(&Message::Config(describe(core, config)?))?;
    for s in &mut senders {
        s.get_mut().flush()?;
    }
    // The reply stream is opened only now: reading its start waits for the target, which
    // looks at what this side sent first.
    let mut replies = MigrationReceiver::replies(control.try_clone()?)?;
    match replies.recv()? {
        Message::Accept => Ok((senders, replies, control)),
        Message::Refuse(reason) => Err(MigrateError::Refused(reason)),
        other => Err(MigrateError::Unexpected(format!(
            "expected ACCEPT or REFUSE, got {:?}",
            other.kind()
        ))),
    }
}

/// Pre-copy until the planner switches over; returns with the VM still running.
fn precopy(
    core: &VmCore,
    senders: &mut Senders,
    req: &SendMigrationRequest,
    progress: &SharedProgress,
    throttle: &crate::throttle::Throttle,
) -> Result<(), MigrateError> {
    let ram_bytes: u64 = core.ram_layout().iter().map(|(_, l)| l).sum();
    let mut planner = Planner::new(
        PlannerConfig {
            downtime_limit: Duration::from_millis(req.downtime_limit_ms),
            max_iterations: req.max_iterations.unwrap_or(30),
            ..PlannerConfig::default()
        },
        ram_bytes,
    )?;
    progress.phase(api_server::migration::MigrationPhase::Precopy);
    let mut ranges = core.ram_layout();
    let mut zeros = ZeroPages::Skip;
    loop {
        progress.check_cancel()?;
        let start = Instant::now();
        let written_before: Vec<Duration> = senders.iter().map(|s| s.write_time()).collect();
        let sent = send_pass(core, senders, ranges, zeros)?;
        // Devices with PRE_COPY stream their state beside RAM. Each iteration reads until they
        // have nothing more for now, so their initial bytes are all sent after the first one,
        // before any switch-over.
        let device_sent = send_device_precopy(core, &mut senders[0])?;
        let dirty = core.dirty_pages()?;
        let (device_pending, device_stop) = core.registry().device_state_sizes();
        let decision = planner.record(&IterationReport {
            bytes_sent: sent + device_sent,
            duration: start.elapsed(),
            link_time: senders
                .iter()
                .zip(written_before)
                .map(|(s, before)| s.write_time().saturating_sub(before))
                .max(),
            dirty_pages: dirty.count(),
            device_precopy_pending: device_pending,
            device_stop_state: device_stop,
        });
        let p = planner.progress();
        progress.update(|m| {
            m.iteration = p.iteration;
            m.bytes_sent = p.bytes_sent;
            m.bytes_remaining = p.bytes_remaining;
            m.dirty_rate_pages_per_s = p.dirty_rate;
            m.bandwidth_bytes_per_s = p.bandwidth;
            m.expected_downtime_ms = p.expected_downtime.map_or(0, |d| d.as_millis() as u64);
            m.throttle_percent = p.throttle;
        });
        ranges = dirty.runs().collect();
        zeros = ZeroPages::Send;
        match decision {
            Decision::Iterate => {}
            Decision::Throttle(pct) => throttle.set(pct),
            Decision::SwitchOver { expected_downtime } => {
                log::info!(
                    "migration: switching over after {} iteration(s), expected downtime {expected_downtime:?}",
                    p.iteration
                );
                // The pages dirtied during the last pass go in the stop phase.
                return resend_later(core, ranges);
            }
            Decision::GiveUp(reason) => return Err(MigrateError::GaveUp(reason)),
        }
    }
}

/// Largest piece of a device's pre-copy state in one DEVICE_PRECOPY message.
const DEVICE_PRECOPY_CHUNK: usize = 1 << 20;

/// Send what every device has of pre-copy state now, on the first connection (where STATE
/// follows, so the target sees a device's data in order); returns the bytes sent.
fn send_device_precopy(
    core: &VmCore,
    sender: &mut MigrationSender<Conn>,
) -> Result<u64, MigrateError> {
    let mut sent = 0u64;
    core.registry()
        .precopy_drain(DEVICE_PRECOPY_CHUNK, |id, data| {
            sent += data.len() as u64;
            sender
                .send(&Message::DevicePrecopy {
                    id: id.to_string(),
                    data,
                })
                .map_err(MigrateError::from)
        })?;
    Ok(sent)
}

/// Put `ranges` back in the dirty log so the stop phase sends them (they were taken out by the
/// last `dirty_pages` call).
fn resend_later(core: &VmCore, ranges: Vec<(u64, u64)>) -> Result<(), MigrateError> {
    core.mark_dirty(&ranges)?;
    Ok(())
}

/// Stop the guest and send the rest; returns with the VM paused. `released` ends a test hold
/// (the knob) at the switch-over.
fn switchover(
    core: &VmCore,
    mut senders: Senders,
    progress: &SharedProgress,
    send_ram: bool,
    released: &dyn Fn() -> bool,
) -> Result<(Instant, Conn), MigrateError> {
    progress.phase(MigrationPhase::Switchover);
    let paused_at = Instant::now();
    core.pause()?;
    hold_if_asked(HoldPoint::Switchover, released);
    if send_ram {
        let dirty = core.dirty_pages()?;
        send_pass(core, &mut senders, dirty.runs().collect(), ZeroPages::Send)?;
    }
    // Passthrough devices' STOP_COPY data goes in pieces ahead of the sections (it can be far
    // larger than one frame); the target writes it into the device, which is RESUMING by then.
    core.registry()
        .stop_copy_drain(DEVICE_PRECOPY_CHUNK, |id, data| {
            senders[0]
                .send(&Message::DevicePrecopy {
                    id: id.to_string(),
                    data,
                })
                .map_err(MigrateError::from)
        })?;
    let sections = core
        .registry()
        .snapshot_all()
        .map_err(crate::vm::VmError::from)?;
    senders[0].send(&Message::State(sections))?;
    progress.phase(MigrationPhase::Completing);
    let mut total = 0;
    let mut commit = None;
    for s in senders {
        total += s.bytes_sent();
        let (mut conn, _) = s.complete()?;
        conn.flush()?;
        commit.get_or_insert(conn);
    }
    let commit = commit.ok_or_else(|| MigrateError::Unexpected("no connection".into()))?;
    // Every byte the streams carried (RAM, state, framing), whatever the planner counted.
    progress.update(|p| {
        p.bytes_sent = total;
        p.bytes_remaining = 0;
    });
    Ok((paused_at, commit))
}

/// How long a failed transfer waits for the target's reason before reporting its own error.
const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// What the watcher thread read, oldest first, and the condition it signals on each arrival
/// and when it ends.
type AnswerQueue = Arc<(
    std::sync::Mutex<std::collections::VecDeque<Result<Message, MigrateError>>>,
    std::sync::Condvar,
)>;

/// Longest a wait for the target's answer sleeps before checking for a cancel again (arrivals
/// wake it at once: READY and RESUMED are on the downtime's critical path).
const ANSWER_POLL: Duration = Duration::from_millis(20);

/// The target's answers (READY, then RESUMED; or FAILED), read by a watcher thread while
/// this side sends.
struct Answer {
    /// What the watcher read.
    queue: AnswerQueue,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Answer {
    fn watcher_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether the target answered something not yet taken, or its reply stream ended.
    fn pending(&self) -> bool {
        !self.watcher_running()
            || !self
                .queue
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }

    /// The target's failure, if it answered with one; waits up to [`ANSWER_GRACE`] for the
    /// watcher (a write that failed because the target gave up races with its reason).
    fn failure(&self) -> Option<MigrateError> {
        let deadline = Instant::now() + ANSWER_GRACE;
        let (lock, arrived) = &*self.queue;
        let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
        // The watcher's last entry is anything but READY (it ends right after pushing it).
        while self.watcher_running() && queue.iter().all(|m| matches!(m, Ok(Message::Ready))) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            queue = arrived
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match queue.back() {
            Some(Ok(Message::Failed(reason))) => Some(MigrateError::TargetFailed(reason.clone())),
            Some(Err(e)) => Some(MigrateError::Unexpected(format!(
                "the target's reply stream: {e}"
            ))),
            _ => None,
        }
    }

    /// The next answer, waiting at most `timeout` (then the connections are shut down) or
    /// until a cancel.
    fn next(
        &mut self,
        timeout: Duration,
        progress: &SharedProgress,
    ) -> Result<Message, MigrateError> {
        let deadline = Instant::now() + timeout;
        let (lock, arrived) = &*self.queue;
        let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(got) = queue.pop_front() {
                return got;
            }
            progress.check_cancel()?;
            if !self.watcher_running() {
                return Err(MigrateError::Unexpected("no answer from the target".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                progress.shut_connections();
                return Err(MigrateError::Unexpected(format!(
                    "no answer from the target within {} s",
                    timeout.as_secs()
                )));
            }
            let wait = ANSWER_POLL.min(deadline - now);
            queue = arrived
                .wait_timeout(queue, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Read the target's answers on a thread until its final one; anything but READY or RESUMED
/// shuts the connections down.
fn watch_replies(
    mut replies: MigrationReceiver<Conn>,
    progress: &SharedProgress,
    control: &Conn,
) -> Result<Answer, MigrateError> {
    let queue: AnswerQueue = Arc::default();
    let (q, p) = (queue.clone(), progress.clone());
    // The reply stream stays silent until the end: no read timeout on it (writes keep theirs,
    // so a dead link still ends the transfer); the waits are bounded by [`Answer::next`].
    control.set_read_timeout(None)?;
    let thread = std::thread::Builder::new()
        .name("skiff-migrate-replies".into())
        .spawn(move || loop {
            let got = replies.recv().map_err(MigrateError::from);
            let ready = matches!(got, Ok(Message::Ready));
            let stop = !ready && !matches!(got, Ok(Message::Resumed));
            q.0.lock().unwrap_or_else(|e| e.into_inner()).push_back(got);
            q.1.notify_all();
            if stop {
                p.shut_connections();
            }
            if !ready {
                break;
            }
        })
        .map_err(MigrateError::Io)?;
    Ok(Answer {
        queue,
        thread: Some(thread),
    })
}

/// Tell the target, which has everything and waits for the commit, that none will come and why
/// (best effort: the connection may be dead). The caller then shuts every connection down.
fn withdraw(conn: &mut Conn, why: &MigrateError) {
    let reason = format!("the source withdrew before its commit: {why}");
    if let Err(e) = conn
        .write_all(&withdrawal(&reason))
        .and_then(|()| conn.flush())
    {
        log::debug!("migration: the withdrawal did not reach the target: {e}");
    }
}

/// Run a migration of the VM behind `core` (configuration `config`) as `req` asks. On success
/// the target runs the VM and this VM stays paused (the caller stops it); on failure the VM runs.
pub fn send(
    core: Arc<VmCore>,
    config: VmConfig,
    req: SendMigrationRequest,
    progress: SharedProgress,
) -> Result<(), MigrateError> {
    let mut paused = false;
    let mut committed = false;
    // Connection 0 once everything was sent: where the commit, or a withdrawal, goes.
    let mut last_word: Option<Conn> = None;
    let result = (|| {
        let (mut senders, replies, control) = handshake(&core, &config, &req, &progress)?;
        // The target's answer can come at any time (a FAILED while RAM is still being sent): a
        // watcher reads it and, on anything but RESUMED, shuts the connections down so this
        // side stops at once instead of writing into a dead stream.
        let mut answer = watch_replies(replies, &progress, &control)?;
        let pre = if req.local {
            // Both sides map the same RAM: nothing to copy, straight to the switch-over.
            Ok(())
        } else {
            core.start_dirty_log()?;
            let mut throttle = core.throttle()?;
            let pre = precopy(&core, &mut senders, &req, &progress, &throttle);
            throttle.stop();
            pre
        };
        if let Err(e) = pre {
            let _ = senders[0].send(&Message::Abort(e.to_string()));
            // The target's own reason, when it is what stopped the transfer.
            return Err(answer.failure().unwrap_or(e));
        }
        progress.check_cancel()?;
        paused = true;
        let released = || progress.cancelled() || answer.pending();
        let switched = switchover(&core, senders, &progress, !req.local, &released);
        let (paused_at, mut commit) = match switched {
            Ok(done) => done,
            Err(e) => return Err(answer.failure().unwrap_or(e)),
        };
        last_word = Some(commit.try_clone()?);
        progress.await_commit();
        match answer.next(RESUME_TIMEOUT, &progress)? {
            Message::Ready => {}
            Message::Failed(reason) => return Err(MigrateError::TargetFailed(reason)),
            other => {
                return Err(MigrateError::Unexpected(format!(
                    "expected READY, got {:?}",
                    other.kind()
                )))
            }
        }
        hold_if_asked(HoldPoint::Commit, || {
            progress.cancelled() || answer.pending()
        });
        // A target that went away (or answered FAILED) after READY gets no commit: it cannot
        // run the VM, so this side may resume it.
        if answer.pending() {
            return Err(answer.failure().unwrap_or_else(|| {
                MigrateError::Unexpected("the target went away before the commit".into())
            }));
        }
        // From the first byte of the commit on, the target may run the VM: this side must not;
        // a cancel that came first wins, and none is accepted after this.
        progress.commit()?;
        committed = true;
        commit.write_all(&COMMIT)?;
        commit.flush()?;
        match answer.next(COMMIT_TIMEOUT, &progress) {
            Ok(Message::Resumed) => {
                let downtime = paused_at.elapsed();
                progress.update(|p| p.downtime_ms = Some(downtime.as_millis() as u64));
                Ok(())
            }
            Ok(Message::Failed(reason)) => Err(MigrateError::TargetFailed(reason)),
            Ok(other) => Err(MigrateError::Unexpected(format!(
                "expected RESUMED, got {:?}",
                other.kind()
            ))),
            Err(e) => Err(e),
        }
    })();
    let _ = core.stop_dirty_log();
    conclude(&core, &progress, result, paused, committed, last_word)
}

/// End a migration: report a cancel as such, withdraw from a target that has everything but the
/// commit, and resume the VM — unless the commit was sent and the target's RESUMED never came.
fn conclude(
    core: &VmCore,
    progress: &SharedProgress,
    result: Result<(), MigrateError>,
    paused: bool,
    committed: bool,
    mut last_word: Option<Conn>,
) -> Result<(), MigrateError> {
    // A cancel shuts the connections down: the error it causes is the cancel.
    let result = match result {
        Err(_) if progress.cancelled() => Err(MigrateError::Cancelled),
        r => r,
    };
    if let (Err(e), false, Some(conn)) = (&result, committed, last_word.as_mut()) {
        withdraw(conn, e);
        progress.shut_connections();
    }
    progress.unwatch();
    // Committed but no RESUMED (or the target's FAILED after it resumed nothing — it answers
    // FAILED only before running the VM, but a FAILED that got lost looks the same): the target
    // may be running the VM, so this copy stays paused.
    let result = match result {
        Err(e) if committed && !matches!(e, MigrateError::TargetFailed(_)) => {
            Err(MigrateError::OutcomeUnknown(e.to_string()))
        }
        r => r,
    };
    match result {
        Ok(()) => {
            progress.phase(MigrationPhase::Completed);
            Ok(())
        }
        Err(e @ MigrateError::OutcomeUnknown(_)) => {
            log::error!("migration: {e}");
            progress.fail(&e);
            Err(e)
        }
        Err(e) => {
            if paused {
                if let Err(r) = core.resume() {
                    log::error!("migration failed and the VM cannot be resumed: {r}");
                }
            }
            log::error!("migration failed: {e}; the VM keeps running here");
            progress.fail(&e);
            Err(e)
        }
    }
}
