//! skiff's VMM: KVM VM and vCPUs, guest memory, boot, ACPI, device wiring and the control loop.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod control;
pub mod cpu_template;
pub mod cpuid;
pub mod device_builders;
pub mod events;
pub mod interrupts;
pub mod kvm_components;
pub mod layout;
pub mod legacy_devices;
pub mod memory;
pub mod migrate;
pub mod passthrough;
pub mod pci_devices;
pub mod registry;
pub mod test_knobs;
pub mod testing;
pub mod throttle;
pub mod timing;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
pub mod vmm;
