#![no_main]
//! libFuzzer target `memory_file`: see `fuzz_targets::migration_files::memory_file`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::migration_files::memory_file(data);
});
