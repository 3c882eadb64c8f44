//! The component registry through a real VM: every component is paused with the vCPUs (the serial
//! port refuses input while paused), the host bridge's configuration space is part of the
//! snapshot and comes back on restore, and the snapshot lists every component once.

use std::time::{Duration, Instant};

use vmm::config::{SerialConfig, VmConfig};
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

/// Read config register `reg` of the host bridge (00:00.0) through the 0xCF8/0xCFC ports.
fn host_bridge_reg(vm: &Vm, reg: u32) -> u32 {
    let (pio, _) = vm.buses();
    pio.write(0xcf8, &(0x8000_0000u32 | (reg * 4)).to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    pio.read(0xcfc, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn set_host_bridge_reg(vm: &Vm, reg: u32, value: u32) {
    let (pio, _) = vm.buses();
    pio.write(0xcf8, &(0x8000_0000u32 | (reg * 4)).to_le_bytes())
        .unwrap();
    pio.write(0xcfc, &value.to_le_bytes()).unwrap();
}

#[test]
fn pause_covers_every_component_and_the_host_bridge_round_trips() {
    if vmm::testing::require_kvm().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("skiff-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.log");
    let mut config = VmConfig {
        serial: SerialConfig::File(serial.clone()),
        rng: Some(Default::default()),
        ..Default::default()
    };
    config.payload.cmdline = Some("scenario=idle".into());
    let mut vm = Vm::new(config).expect("build VM");
    vm.start().expect("start vCPUs");
    wait_for(&serial, "idle: halting", Duration::from_secs(120));

    let ids: Vec<&str> = vm
        .registry()
        .components()
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    for id in [
        "cpu0",
        "irqchip",
        "pit",
        "clock",
        "i8042",
        "cmos",
        "acpi-pm",
        "acpi-ged",
        "serial0",
        "pci-host-bridge",
        "rng0",
    ] {
        assert!(ids.contains(&id), "{id} is not registered: {ids:?}");
    }
    let rng = vm.registry().get("rng0").unwrap();
    assert_eq!(rng.kind, "virtio-rng");
    assert_eq!(
        rng.pci_address.map(|a| a.to_string()).as_deref(),
        Some("0000:00:01.0")
    );
    assert_eq!(
        vm.config().rng.as_ref().and_then(|r| r.pci_address),
        rng.pci_address,
        "the VM's configuration records where the device was placed"
    );

    // The serial port is paused with the VM: input is refused until resume.
    let serial_port = vm.serial().unwrap().clone();
    assert!(serial_port.lock().unwrap().enqueue_input(b"x").is_ok());
    vm.pause().unwrap();
    assert!(serial_port.lock().unwrap().enqueue_input(b"x").is_err());
    vm.resume().unwrap();
    assert!(serial_port.lock().unwrap().enqueue_input(b"x").is_ok());

    // The host bridge's configuration space (the command register, writable) is saved and restored.
    let before = host_bridge_reg(&vm, 1);
    set_host_bridge_reg(&vm, 1, (before & !0xffff) | 0x0006);
    let saved = host_bridge_reg(&vm, 1);
    assert_eq!(saved & 0xffff, 0x0006, "the command register takes writes");
    vm.pause().unwrap();
    let snap = dir.join("snap");
    vm.snapshot(&snap).unwrap();
    set_host_bridge_reg(&vm, 1, before);
    vm.resume().unwrap();
    vm.shutdown();
    drop(vm);

    let restored = Vm::restore(&snap).expect("restore");
    assert_eq!(host_bridge_reg(&restored, 1), saved);
    // The restored configuration kept the device where it was.
    assert_eq!(
        restored
            .config()
            .rng
            .as_ref()
            .and_then(|r| r.pci_address)
            .map(|a| a.to_string())
            .as_deref(),
        Some("0000:00:01.0")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
