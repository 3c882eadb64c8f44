//! Pausing stops every vCPU, including vCPUs blocked inside KVM_RUN on a halted guest, and resume
//! lets them continue. The later API and migration work rely on "all vCPUs stopped" being a fact.

use std::time::{Duration, Instant};

use vmm::config::{CpusConfig, SerialConfig, VmConfig};
use vmm::vm::Vm;

fn wait_for(path: &std::path::Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "serial output never showed {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_and_resume_all_vcpus() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("skiff-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.log");
    let mut config = VmConfig {
        cpus: CpusConfig { boot_vcpus: 3 },
        serial: SerialConfig::File(serial.clone()),
        ..Default::default()
    };
    config.payload.cmdline = Some("scenario=idle".into());
    let mut vm = Vm::new(config).expect("build VM");
    vm.start().expect("start vCPUs");
    wait_for(&serial, "idle: halting", Duration::from_secs(120));

    for _ in 0..3 {
        vm.pause().expect("pause");
        assert_eq!(
            vm.parked_vcpus(),
            3,
            "every vCPU must be parked after pause()"
        );
        vm.resume().expect("resume");
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.parked_vcpus() != 0 {
            assert!(
                Instant::now() < deadline,
                "vCPUs did not leave the parked state after resume()"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Still alive: the exit event has not fired and shutdown joins every thread.
    assert!(vm.exit_event().reason().is_none());
    vm.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
