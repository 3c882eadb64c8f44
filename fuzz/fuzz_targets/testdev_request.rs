#![no_main]
//! libFuzzer target `testdev_request`: see `fuzz_targets::testdev_server::request`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::testdev_server::request(data);
});
