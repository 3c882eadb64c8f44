#![no_main]
//! libFuzzer target `virtio_rng`: see `fuzz_targets::virtio::rng`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::virtio::rng(data);
});
