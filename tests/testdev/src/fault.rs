//! Fault injection, for testing how a VMM handles a migration that fails at each phase: a
//! device refusing an arc, a read error in the middle of the stream, the target rejecting the
//! device data, a device process dying mid-migration. Every fault is off unless its
//! command-line flag is given; every injected fault is logged at warn level as
//! `fault injected: ...`.
//!
//! - `--fail-arc FROM:TO[:N]`: the Nth request (default the 1st) for the direct arc FROM -> TO
//!   fails with EIO and leaves the state unchanged; earlier and later requests for it succeed.
//!   Repeatable (each occurrence counts the requests for its arc on its own).
//! - `--fail-read-after BYTES`: once BYTES bytes of migration data have been read in the
//!   current STOP_COPY state (counted from its arc; PRE_COPY reads do not count), the next
//!   MIG_DATA_READ fails with EIO. It consumes nothing: the session stays, and later reads
//!   continue the stream where it stopped. Fires once per device process.
//! - `--reject-resume`: RESUMING -> STOP always fails with EINVAL as if the data were corrupt,
//!   and the device goes to ERROR (only a reset leaves it), as with real bad data.
//! - `--exit-on-arc FROM:TO`: when the arc FROM -> TO is requested the device process exits
//!   with code 3 without replying (the in-process server ends the session with
//!   [`crate::Error::InjectedExit`]). Repeatable.
//!
//! The order for one request: `--exit-on-arc`, then `--fail-arc`, then the arc itself (which
//! is where `--reject-resume` applies). Arcs are given by the kernel's state names (`RUNNING`,
//! `STOP`, `RUNNING_P2P`, `STOP_COPY`, `PRE_COPY`, `PRE_COPY_P2P`, `RESUMING`) and must be
//! direct arcs of the machine the device offers (`--migration`), else the flag is refused:
//! the fault could never fire.

use log::warn;

use crate::device::DeviceState;
use crate::fsm::is_direct_arc;

/// `--fail-arc`: the `nth` request for `from -> to` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArcFault {
    /// The state the request is made in.
    pub from: DeviceState,
    /// The state requested.
    pub to: DeviceState,
    /// Which request fails (1: the first).
    pub nth: u32,
}

/// The faults to inject (the command line); the default injects none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// `--fail-arc`.
    pub fail_arcs: Vec<ArcFault>,
    /// `--fail-read-after`.
    pub fail_read_after: Option<u64>,
    /// `--reject-resume`.
    pub reject_resume: bool,
    /// `--exit-on-arc`.
    pub exit_on_arcs: Vec<(DeviceState, DeviceState)>,
}

/// Parses `FROM:TO` (`with_nth`: also `FROM:TO:N`, N >= 1, default 1).
pub fn parse_arc(v: &str, with_nth: bool) -> Result<ArcFault, String> {
    let parts: Vec<&str> = v.split(':').collect();
    let state = |s: &str| {
        DeviceState::from_name(s.trim())
            .filter(|&st| st != DeviceState::Error)
            .ok_or_else(|| format!("unknown migration state {s:?} in {v:?}"))
    };
    let nth = match parts.len() {
        2 => 1,
        3 if with_nth => parts[2]
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("bad request number in {v:?} (1 or more)"))?,
        _ if with_nth => return Err(format!("{v:?}: expected FROM:TO or FROM:TO:N")),
        _ => return Err(format!("{v:?}: expected FROM:TO")),
    };
    Ok(ArcFault {
        from: state(parts[0])?,
        to: state(parts[1])?,
        nth,
    })
}

impl Faults {
    /// Whether no fault is configured.
    pub fn is_empty(&self) -> bool {
        *self == Faults::default()
    }

    /// Refuses arcs that are not direct arcs of the machine `caps` (`VFIO_MIGRATION_*`)
    /// offers: such a fault could never fire.
    pub fn check(&self, caps: u64) -> Result<(), String> {
        let arcs = self.fail_arcs.iter().map(|a| ("--fail-arc", a.from, a.to));
        let exits = self
            .exit_on_arcs
            .iter()
            .map(|a| ("--exit-on-arc", a.0, a.1));
        for (flag, from, to) in arcs.chain(exits) {
            if !is_direct_arc(caps, from, to) {
                return Err(format!(
                    "{flag} {}:{}: not a direct arc with the migration capabilities offered",
                    from.name(),
                    to.name()
                ));
            }
        }
        if (self.fail_read_after.is_some() || self.reject_resume) && caps == 0 {
            return Err("fault injection needs migration (--migration is none)".into());
        }
        Ok(())
    }
}

/// What a state change request runs into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcVerdict {
    /// No fault: the arc is executed.
    Proceed,
    /// `--fail-arc`: EIO, the state unchanged.
    Fail,
    /// `--exit-on-arc`: the process exits without replying.
    Exit,
}

/// The faults of one device and what they have counted so far.
#[derive(Debug, Default)]
pub struct FaultState {
    faults: Faults,
    /// Per `fail_arcs` entry: requests for its arc seen so far.
    requests: Vec<u32>,
    /// Migration data bytes read in the current STOP_COPY state.
    stop_copy_read: u64,
    /// `--fail-read-after` fired already.
    read_fired: bool,
    /// `--exit-on-arc` fired: the session must end without replying.
    exit: bool,
}

impl FaultState {
    /// The state for `faults`, nothing counted yet.
    pub fn new(faults: Faults) -> FaultState {
        FaultState {
            requests: vec![0; faults.fail_arcs.len()],
            faults,
            ..FaultState::default()
        }
    }

    /// A request for the arc `from -> to` (a direct arc: the caller checked).
    pub fn on_arc(&mut self, from: DeviceState, to: DeviceState) -> ArcVerdict {
        let (f, t) = (from.name(), to.name());
        if self.faults.exit_on_arcs.contains(&(from, to)) {
            warn!("fault injected: --exit-on-arc {f}:{t}: exiting without a reply");
            self.exit = true;
            return ArcVerdict::Exit;
        }
        let mut verdict = ArcVerdict::Proceed;
        for (a, n) in self.faults.fail_arcs.iter().zip(self.requests.iter_mut()) {
            if (a.from, a.to) == (from, to) {
                *n = n.saturating_add(1);
                if *n == a.nth {
                    warn!("fault injected: --fail-arc {f}:{t}:{}: request {} fails with EIO, state stays {f}", a.nth, a.nth);
                    verdict = ArcVerdict::Fail;
                }
            }
        }
        verdict
    }

    /// Whether `--exit-on-arc` fired.
    pub fn exit_requested(&self) -> bool {
        self.exit
    }

    /// The device entered STOP_COPY: its read count starts at 0.
    pub fn stop_copy_entered(&mut self) {
        self.stop_copy_read = 0;
    }

    /// Before a MIG_DATA_READ in STOP_COPY: whether it must fail (`--fail-read-after`).
    pub fn read_fails(&mut self) -> bool {
        match self.faults.fail_read_after {
            Some(limit) if !self.read_fired && self.stop_copy_read >= limit => {
                self.read_fired = true;
                warn!(
                    "fault injected: --fail-read-after {limit}: MIG_DATA_READ after {} bytes of STOP_COPY data fails with EIO",
                    self.stop_copy_read
                );
                true
            }
            _ => false,
        }
    }

    /// After a MIG_DATA_READ in STOP_COPY returned `n` bytes.
    pub fn read_done(&mut self, n: usize) {
        self.stop_copy_read = self.stop_copy_read.saturating_add(n as u64);
    }

    /// RESUMING -> STOP: whether it must be rejected (`--reject-resume`), logged when so.
    pub fn reject_resume(&self) -> bool {
        if self.faults.reject_resume {
            warn!("fault injected: --reject-resume: RESUMING -> STOP fails with EINVAL as for corrupt data, device in ERROR");
        }
        self.faults.reject_resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{MIGRATION_ALL, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
    use DeviceState::*;

    #[test]
    fn arcs_parse_by_kernel_names() {
        let a = parse_arc("RUNNING_P2P:STOP", true).unwrap();
        assert_eq!((a.from, a.to, a.nth), (RunningP2p, Stop, 1));
        let a = parse_arc("stop_copy:STOP:3", true).unwrap();
        assert_eq!((a.from, a.to, a.nth), (StopCopy, Stop, 3));
        assert_eq!(
            parse_arc("PRE_COPY:PRE_COPY_P2P", false).unwrap().to,
            PreCopyP2p
        );
        for bad in [
            "RUNNING",
            "RUNNING:STOPPED",
            "ERROR:RUNNING",
            "STOP:RUNNING:0",
            "STOP:RUNNING:x",
            "STOP:RUNNING:1:2",
            "",
        ] {
            assert!(parse_arc(bad, true).is_err(), "{bad:?}");
        }
        assert!(parse_arc("STOP:RUNNING_P2P:2", false).is_err(), "no N");
    }

    #[test]
    fn faults_must_be_able_to_fire() {
        let arc = |from, to| ArcFault { from, to, nth: 1 };
        let f = Faults {
            fail_arcs: vec![arc(Running, RunningP2p)],
            exit_on_arcs: vec![(Stop, StopCopy)],
            ..Faults::default()
        };
        assert!(f.check(MIGRATION_ALL).is_ok());
        assert!(f.check(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY).is_err());
        let f = Faults {
            exit_on_arcs: vec![(Running, Stop)],
            ..Faults::default()
        };
        assert!(f.check(MIGRATION_ALL).is_err(), "not direct with P2P");
        assert!(f.check(MIGRATION_STOP_COPY).is_ok());
        let f = Faults {
            reject_resume: true,
            ..Faults::default()
        };
        assert!(f.check(0).is_err() && f.check(MIGRATION_ALL).is_ok());
        assert!(Faults::default().is_empty() && !f.is_empty());
    }

    #[test]
    fn the_nth_request_fails_once() {
        let mut s = FaultState::new(Faults {
            fail_arcs: vec![
                ArcFault {
                    from: Running,
                    to: RunningP2p,
                    nth: 2,
                },
                ArcFault {
                    from: Running,
                    to: RunningP2p,
                    nth: 4,
                },
            ],
            ..Faults::default()
        });
        let v: Vec<_> = (0..5).map(|_| s.on_arc(Running, RunningP2p)).collect();
        use ArcVerdict::*;
        assert_eq!(v, [Proceed, Fail, Proceed, Fail, Proceed]);
        assert_eq!(s.on_arc(RunningP2p, Stop), Proceed);
        assert!(!s.exit_requested());
    }

    #[test]
    fn exit_wins_and_reads_fail_once() {
        let mut s = FaultState::new(Faults {
            fail_arcs: vec![ArcFault {
                from: Stop,
                to: StopCopy,
                nth: 1,
            }],
            exit_on_arcs: vec![(Stop, StopCopy)],
            fail_read_after: Some(100),
            ..Faults::default()
        });
        assert_eq!(s.on_arc(Stop, StopCopy), ArcVerdict::Exit);
        assert!(s.exit_requested());
        s.stop_copy_entered();
        assert!(!s.read_fails());
        s.read_done(99);
        assert!(!s.read_fails());
        s.read_done(1);
        assert!(s.read_fails(), "100 bytes read");
        assert!(!s.read_fails(), "once");
        s.stop_copy_entered();
        s.read_done(1000);
        assert!(!s.read_fails(), "once per process");
        assert!(!s.reject_resume());
    }
}
