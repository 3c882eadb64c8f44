#![no_main]
//! libFuzzer target `virtio_console`: see `fuzz_targets::virtio::console`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::virtio::console(data);
});
