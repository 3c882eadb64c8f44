#![no_main]
//! libFuzzer target `virtio_blk`: see `fuzz_targets::virtio::blk`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::virtio::blk(data);
});
