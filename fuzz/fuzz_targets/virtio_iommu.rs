#![no_main]
//! libFuzzer target `virtio_iommu`: see `fuzz_targets::virtio::iommu`.

libfuzzer_sys::fuzz_target!(init: fuzz_targets::ignore_sigpipe(), |data: &[u8]| {
    fuzz_targets::virtio::iommu(data);
});
