//! Shared reporting helpers for the device scenarios: `check:` lines, `result: FAIL` + panic,
//! numeric command-line parameters.

use alloc::format;
use core::fmt::Display;

use crate::bootinfo::BootInfo;
use crate::println;

/// Print `result: FAIL <why>` and panic with the same reason.
pub fn fail(why: impl Display) -> ! {
    let why = format!("{why}");
    println!("result: FAIL {}", why);
    panic!("{why}");
}

/// Print `check: <name> ok`, or `check: <name> FAIL <detail>` and [`fail`].
pub fn check(name: &str, ok: bool, detail: impl Display) {
    if ok {
        println!("check: {} ok", name);
    } else {
        println!("check: {} FAIL {}", name, detail);
        fail(format!("{name}: {detail}"));
    }
}

/// Print `check: <name> skipped (<why>)`.
pub fn skip(name: &str, why: impl Display) {
    println!("check: {} skipped ({})", name, why);
}

/// Unwrap a result or [`fail`] with its error.
pub fn or_fail<T, E: Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(e))
}

/// A numeric `key=value` parameter (decimal or `0x` hex); `default` when absent, [`fail`] when
/// malformed.
pub fn param_u64(boot: &BootInfo, key: &str, default: u64) -> u64 {
    match boot.param(key) {
        None => default,
        Some(v) => {
            let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| fail(format!("bad number in {key}={v}")))
        }
    }
}

/// A vector parameter (must be 0x20..=0xFE).
pub fn param_vector(boot: &BootInfo, key: &str, default: u8) -> u8 {
    let v = param_u64(boot, key, u64::from(default));
    if !(0x20..=0xFE).contains(&v) {
        fail(format!("{key}={v:#x} is not a usable vector (0x20..=0xfe)"));
    }
    v as u8
}
