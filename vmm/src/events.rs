//! The event monitor (`--event-monitor path=FILE`): one JSON object per line for every lifecycle
//! event (created, booted, paused, resumed, snapshotted, restored, shutdown, device error, ...), in
//! the shape Cloud Hypervisor users know:
//! `{"timestamp":{"secs":1,"nanos":5000},"unix_ms":1763690000000,"source":"vm","event":"booted","properties":null}`.
//! `timestamp` counts from skiff's start; `unix_ms` is wall-clock time. Migration progress will use
//! the same stream.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

struct Monitor {
    out: Mutex<File>,
    start: Instant,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Open the event file (created or truncated). Call once, before events are emitted.
pub fn open(path: &Path) -> std::io::Result<()> {
    let file = File::create(path)?;
    let _ = MONITOR.set(Monitor {
        out: Mutex::new(file),
        start: Instant::now(),
    });
    Ok(())
}

/// Format one event line (without the newline).
pub fn format_event(
    since_start: std::time::Duration,
    unix_ms: u128,
    source: &str,
    event: &str,
    properties: Value,
) -> String {
    json!({
        "timestamp": { "secs": since_start.as_secs(), "nanos": since_start.subsec_nanos() },
        "unix_ms": unix_ms as u64,
        "source": source,
        "event": event,
        "properties": properties,
    })
    .to_string()
}

/// Record an event; a no-op when no monitor is configured. Write errors are logged, never fatal.
pub fn emit(source: &str, event: &str, properties: Value) {
    let Some(m) = MONITOR.get() else { return };
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let line = format_event(m.start.elapsed(), unix_ms, source, event, properties);
    let mut f = m.out.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
        log::warn!("event monitor: cannot write: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_line_shape() {
        let line = format_event(
            std::time::Duration::new(3, 500),
            1_700_000_000_123,
            "vm",
            "paused",
            json!({"vcpus": 2}),
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["timestamp"]["secs"], 3);
        assert_eq!(v["timestamp"]["nanos"], 500);
        assert_eq!(v["unix_ms"], 1_700_000_000_123u64);
        assert_eq!(v["source"], "vm");
        assert_eq!(v["event"], "paused");
        assert_eq!(v["properties"]["vcpus"], 2);
        assert!(!line.contains('\n'));
    }
}
