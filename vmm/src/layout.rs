//! The guest physical memory map and the fixed I/O ports skiff uses.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4
//! 0x0000_0520  IDT                      0x0000_a000  PDPT
//! 0x0000_6000  PVH hvm_start_info       0x0000_b000  4 page directories (identity map of 4 GiB)
//! 0x0000_6040  PVH module list          0x0002_0000  kernel command line
//! 0x0000_6060  PVH memory map           0x0009_fc00  EBDA (reserved) .. 1 MiB
//! 0x0000_7000  zero page (boot_params)  0x000e_0000  RSDP, then the other ACPI tables
//! 0x0000_8ff0  boot stack top           0x0010_0000  kernel load address; RAM up to 3 GiB
//! 0xc000_0000  32-bit PCI MMIO window   0xe000_0000  PCI ECAM
//! 0xfec0_0000  IOAPIC                   0xfee0_0000  LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, then the 64-bit PCI MMIO window
//! ```

/// Global descriptor table used for the boot vCPU.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty) used for the boot vCPU.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one `hvm_modlist_entry`: the initramfs), right after the start info.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map entries (`hvm_memmap_table_entry`), after the module list.
pub const PVH_MEMMAP_ADDR: u64 = 0x6060;
/// Most PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) / 24) as usize;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Level-4 page table of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages) identity-mapping the low 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line (with its NUL) an ELF kernel is given; bzImages state their own limit.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable, [EBDA, 1 MiB) is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// RSDP; the other ACPI tables follow it, up to [`ACPI_END`].
pub const RSDP_ADDR: u64 = 0xe0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x100000;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit hole below 4 GiB (no RAM from here to 4 GiB).
pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit hole.
pub const MEM_32BIT_HOLE_SIZE: u64 = (1 << 32) - MEM_32BIT_HOLE_START;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM), segment 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size: 256 buses × 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Last PCI bus number described in MCFG and the DSDT.
pub const PCI_LAST_BUS: u8 = 0;
/// KVM TSS area (three pages, required on Intel hosts).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// First address above 4 GiB.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// Alignment of the 64-bit PCI window that starts after RAM.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// Size of the 64-bit PCI BAR window.
pub const PCI_MMIO64_SIZE: u64 = 1 << 36;

/// COM1 (16550) I/O base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 interrupt (ISA IRQ == GSI).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller data port (0x60) .. command port (0x64).
pub const I8042_PORT: u16 = 0x60;
/// CMOS/RTC index port (0x70); the data port follows at 0x71.
pub const CMOS_PORT: u16 = 0x70;
/// PCI configuration address port (0xCF8); the data port follows at 0xCFC.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Size of the 0xCF8..0xCFF configuration I/O range.
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// ACPI power-management block (hardware-reduced ACPI): see `devices::legacy::AcpiPm`.
/// 0x600 sleep control, 0x601 sleep status, 0x602 reset register.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Size of the ACPI power-management block.
pub const ACPI_PM_SIZE: u64 = 4;
/// ACPI generic event device (GED) event register (4 bytes, read-to-clear).
pub const ACPI_GED_PORT: u16 = 0x604;
/// Size of the GED register block.
pub const ACPI_GED_SIZE: u64 = 4;
/// Interrupt (GSI) the GED raises, e.g. for the ACPI power button.
pub const ACPI_GED_IRQ: u32 = 5;
/// SLP_TYP value for S5 (soft off) in the DSDT's `_S5_` package and the sleep control register.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// Value written to the ACPI reset register to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
