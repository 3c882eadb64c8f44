//! skiff's VMM: KVM VM and vCPUs, guest memory, boot, ACPI, device wiring and the control loop.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod control;
pub mod cpu_template;
pub mod cpuid;
pub mod events;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod pci_devices;
pub mod testing;
pub mod timing;
pub mod vcpu;
pub mod vcpu_state;
pub mod virtio_devices;
pub mod vm;
pub mod vm_state;
pub mod vmm;
