#![no_main]
//! libFuzzer target `virtio_net`: see `fuzz_targets::virtio::net`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::virtio::net(data);
});
