#![no_main]
//! libFuzzer target `snapshot_state`: see `fuzz_targets::migration_files::snapshot_state`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::migration_files::snapshot_state(data);
});
