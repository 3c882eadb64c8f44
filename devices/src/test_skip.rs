//! Tests that need a host facility (a TAP, a pseudo terminal, hole punching) fail when it is
//! missing, unless an environment variable asks to skip them; then they say so loudly.

use std::io::Write;

/// A test cannot run because `why`: skip it (returns `true`, after printing
/// `skipped: <why> (<var> is set)` straight to stderr, past the test harness's capture) when the
/// environment variable `var` is set to anything but `0` or empty; fail the test otherwise.
pub(crate) fn skip_or_fail(var: &str, why: &str) -> bool {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() && v != "0" => {
            let _ = writeln!(std::io::stderr(), "skipped: {why} ({var} is set)");
            true
        }
        _ => panic!("{why}; set {var}=1 to skip this test"),
    }
}
