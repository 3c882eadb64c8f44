#![no_main]
//! libFuzzer target `vm_config`: see `fuzz_targets::api::vm_config`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::api::vm_config(data);
});
