#![no_main]
//! libFuzzer target `api_request`: see `fuzz_targets::api::request`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::api::request(data);
});
