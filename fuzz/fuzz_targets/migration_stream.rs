#![no_main]
//! libFuzzer target `migration_stream`: see `fuzz_targets::migration_stream::receive`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::migration_stream::receive(data);
});
