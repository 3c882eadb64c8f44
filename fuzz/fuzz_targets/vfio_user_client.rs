#![no_main]
//! libFuzzer target `vfio_user_client`: see `fuzz_targets::vfio_user::client`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::vfio_user::client(data);
});
