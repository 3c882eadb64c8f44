//! ACPI tables for a hardware-reduced x86_64 guest, built with `acpi_tables` and written into
//! guest memory at [`layout::RSDP_ADDR`].
//!
//! ```text
//! RSDP (rev 2) ─► XSDT ─┬─► FACP (FADT, HW_REDUCED_ACPI) ─► DSDT (AML)
//!                       ├─► APIC (MADT: LAPICs, IOAPIC, overrides, LAPIC NMI)
//!                       └─► MCFG (ECAM of PCI segment 0)
//! ```
//!
//! The tables follow the RSDP in the `[RSDP_ADDR, ACPI_END)` area, each 8-byte aligned. Everything
//! is assembled in host memory first; guest memory is only written when the whole set fits.
//!
//! The DSDT describes `\_SB_.PCI0` (the PCIe host bridge with its bus, I/O and MMIO windows), a
//! motherboard-resources device reserving the ECAM and the ACPI I/O ports, COM1, the `_S5_` sleep
//! object, a control-method power button and a Generic Event Device (GED) that turns a write to
//! the GED event register into `Notify(\_SB_.PWRB, 0x80)`.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::viot;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;

/// OEM ID written in the RSDP and every table header.
pub const OEM_ID: [u8; 6] = *b"SKIFF ";
/// OEM table ID written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVM ";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;
/// Creator ID written in every table header.
pub const CREATOR_ID: [u8; 4] = *b"SKIF";
/// Creator revision written in every table header.
pub const CREATOR_REVISION: u32 = 1;

/// Alignment of every table after the RSDP.
const TABLE_ALIGN: u64 = 8;
/// Offset of the checksum byte in a system description table header.
const HEADER_CHECKSUM_OFFSET: usize = 9;
/// Offset of the creator ID in a system description table header.
const HEADER_CREATOR_OFFSET: usize = 28;
/// Length of a system description table header.
const HEADER_LEN: usize = 36;

/// ECAM bytes per PCI bus: 32 devices × 8 functions × 4 KiB.
const ECAM_BYTES_PER_BUS: u64 = 1 << 20;
/// Size of the ECAM range described in MCFG and reserved in the DSDT: buses 0..=PCI_LAST_BUS.
pub const ECAM_DESCRIBED_SIZE: u64 = (layout::PCI_LAST_BUS as u64 + 1) * ECAM_BYTES_PER_BUS;
const _: () = assert!(ECAM_DESCRIBED_SIZE <= layout::PCI_ECAM_SIZE);
const _: () = assert!(layout::PCI_ECAM_START + ECAM_DESCRIBED_SIZE <= 1 << 32);
const _: () = assert!(layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE <= 1 << 32);
const _: () = assert!(layout::PCI_MMIO32_SIZE > 0);

/// ACPI sleep control register (write `SLP_TYP << 2 | SLP_EN`).
const PM_SLEEP_CONTROL_PORT: u16 = layout::ACPI_PM_PORT;
/// ACPI sleep status register.
const PM_SLEEP_STATUS_PORT: u16 = layout::ACPI_PM_PORT + 1;
/// ACPI reset register.
const PM_RESET_PORT: u16 = layout::ACPI_PM_PORT + 2;

/// The SCI interrupt named in the FADT, with its MADT override (level, active high).
///
/// A hardware-reduced platform has no SCI and the spec says the field is ignored, but Linux
/// still compares every MADT interrupt source override with `SCI_INT`: leaving it 0 would make
/// Linux treat the IRQ 0 → GSI 2 override as the SCI and program the timer line level/active-low.
/// IRQ 9 is the SCI of a PC; nothing else uses it.
const SCI_IRQ: u8 = 9;

/// FADT IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// FADT IAPC_BOOT_ARCH: VGA is not present.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT hypervisor vendor identity ("SKIFF", NUL-padded).
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"SKIFF\0\0\0";

/// MADT flags: the system also has dual 8259 PICs (PCAT_COMPAT).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision (ACPI 6.5).
const MADT_REVISION: u8 = 5;
/// MADT structure: interrupt source override.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// MADT structure: local APIC NMI.
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT structure: processor local x2APIC (APIC IDs that do not fit the 8-bit entry).
const MADT_LOCAL_X2APIC: u8 = 9;
/// MPS INTI flags: polarity and trigger conform to the bus (ISA: edge, active high).
const MPS_INTI_CONFORMING: u16 = 0;
/// MPS INTI flags: active high, level triggered.
const MPS_INTI_LEVEL_ACTIVE_HIGH: u16 = 0b01 | (0b11 << 2);
/// Highest APIC ID a processor local APIC entry may carry (0xFF means broadcast).
const MAX_XAPIC_ID: u32 = 254;
/// DSDT revision; 2 or above makes AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Start of the upper PCI I/O window: the range a PC leaves to PCI devices.
const PCI_IO_HIGH_START: u16 = 0xd00;
const _: () = assert!(
    layout::PCI_CONFIG_IO_PORT as u64 + layout::PCI_CONFIG_IO_SIZE <= PCI_IO_HIGH_START as u64
);
/// Number of I/O ports of a 16550 UART.
const SERIAL_PORT_LEN: u8 = 8;

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The VM has no vCPU to describe.
    #[error("the MADT needs at least one vCPU")]
    NoCpus,
    /// The 64-bit PCI MMIO window wraps around the address space.
    #[error("the 64-bit PCI MMIO window {start:#x} + {size:#x} overflows the address space")]
    InvalidMmio64Window {
        /// Start of the window.
        start: u64,
        /// Size of the window.
        size: u64,
    },
    /// The tables do not fit in the ACPI area.
    #[error(
        "the ACPI tables do not fit: the {table} table would end at {end:#x}, \
         past the end of the ACPI area at {limit:#x}"
    )]
    TooLarge {
        /// Signature of the table that crossed the limit.
        table: String,
        /// Where that table would end (exclusive).
        end: u64,
        /// End of the ACPI area ([`layout::ACPI_END`]).
        limit: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The virtio-iommu and the PCI functions behind it, for the VIOT table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViotConfig {
    /// Device number (slot) of the virtio-iommu PCI function on bus 0.
    pub iommu_slot: u8,
    /// Device numbers (slots) on bus 0 of the functions whose DMA goes through it; each one's
    /// endpoint id is its BDF.
    pub endpoint_slots: Vec<u8>,
}

/// What the ACPI tables describe about the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has APIC ID `i` and ACPI processor UID `i`.
    pub num_cpus: u32,
    /// Start of the 64-bit PCI MMIO window (above RAM).
    pub pci_mmio64_start: u64,
    /// Size of the 64-bit PCI MMIO window; 0 leaves the window out of `\_SB_.PCI0._CRS`.
    pub pci_mmio64_size: u64,
    /// The virtual IOMMU, when the VM has one (a VIOT table is added).
    pub viot: Option<ViotConfig>,
}

/// Builds the ACPI tables for `cfg` and writes them into `mem`.
///
/// Returns the address of the RSDP ([`layout::RSDP_ADDR`]), which the boot code hands to the
/// guest (`boot_params.acpi_rsdp_addr` or PVH `rsdp_paddr`). Nothing is written if the tables
/// would not fit before [`layout::ACPI_END`].
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if cfg.pci_mmio64_size > 0
        && cfg
            .pci_mmio64_start
            .checked_add(cfg.pci_mmio64_size - 1)
            .is_none()
    {
        return Err(AcpiError::InvalidMmio64Window {
            start: cfg.pci_mmio64_start,
            size: cfg.pci_mmio64_size,
        });
    }

    let mut placer = TablePlacer::new();

    let dsdt_addr = placer.place(build_dsdt(cfg))?;
    let fadt_addr = placer.place(build_fadt(dsdt_addr))?;
    // Refuse a huge vCPU count before building a MADT that could never fit.
    placer.check_room(b"APIC", madt_len(cfg.num_cpus))?;
    let madt_addr = placer.place(build_madt(cfg.num_cpus))?;
    let mcfg_addr = placer.place(build_mcfg())?;
    let mut entries = vec![fadt_addr, madt_addr, mcfg_addr];
    if let Some(viot) = &cfg.viot {
        entries.push(placer.place(build_viot(viot))?);
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in entries {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = placer.place(finish_table(to_bytes(&xsdt)))?;

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(layout::RSDP_ADDR))?;
    for (addr, bytes) in &placer.tables {
        mem.write_slice(bytes, GuestAddress(*addr))?;
    }
    Ok(GuestAddress(layout::RSDP_ADDR))
}

/// Hands out 8-byte aligned addresses after the RSDP and keeps the tables until they are written.
struct TablePlacer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl TablePlacer {
    fn new() -> Self {
        TablePlacer {
            next: layout::RSDP_ADDR + Rsdp::len() as u64,
            tables: Vec::new(),
        }
    }

    /// Checks that a table of `len` bytes fits at the next address, which it returns.
    fn check_room(&self, signature: &[u8], len: u64) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr.saturating_add(len);
        if end > layout::ACPI_END {
            return Err(AcpiError::TooLarge {
                table: String::from_utf8_lossy(signature).into_owned(),
                end,
                limit: layout::ACPI_END,
            });
        }
        Ok(addr)
    }

    /// Reserves room for `table` and returns its guest address.
    fn place(&mut self, table: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.check_room(&table[..4], table.len() as u64)?;
        self.next = addr + table.len() as u64;
        self.tables.push((addr, table));
        Ok(addr)
    }
}

/// Serialises an `Aml` object (a table) into bytes.
fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Stamps skiff's creator ID into a table header and recomputes its checksum.
fn finish_table(mut table: Vec<u8>) -> Vec<u8> {
    table[HEADER_CREATOR_OFFSET..HEADER_CREATOR_OFFSET + 4].copy_from_slice(&CREATOR_ID);
    table[HEADER_CREATOR_OFFSET + 4..HEADER_LEN].copy_from_slice(&CREATOR_REVISION.to_le_bytes());
    table[HEADER_CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[HEADER_CHECKSUM_OFFSET] = sum.wrapping_neg();
    table
}

/// An 8-bit System I/O generic address.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The Fixed ACPI Description Table: ACPI 6.5, hardware-reduced, pointing at the DSDT.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Power button: a control-method device (\_SB_.PWRB), not the fixed-feature one.
        .flag(Flags::PwrButton)
        // Sleep button: none.
        .flag(Flags::SlpButton);
    fadt.sci_int = u16::from(SCI_IRQ).into();
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_port_gas(PM_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(PM_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(PM_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    finish_table(to_bytes(&fadt.finalize()))
}

/// Size of a processor local APIC structure.
const MADT_LOCAL_APIC_LEN: u64 = 8;
/// Size of a processor local x2APIC structure.
const MADT_LOCAL_X2APIC_LEN: u64 = 16;
/// Size of the fixed part of the MADT: header, LAPIC address, flags, then the IOAPIC, two
/// interrupt source overrides and the local APIC NMI.
const MADT_FIXED_LEN: u64 = HEADER_LEN as u64 + 8 + 12 + 2 * 10 + 6;

/// Size of the MADT for `num_cpus` vCPUs.
fn madt_len(num_cpus: u32) -> u64 {
    let xapic = u64::from(num_cpus.min(MAX_XAPIC_ID + 1));
    let x2apic = u64::from(num_cpus) - xapic;
    MADT_FIXED_LEN + xapic * MADT_LOCAL_APIC_LEN + x2apic * MADT_LOCAL_X2APIC_LEN
}

/// The Multiple APIC Description Table.
fn build_madt(num_cpus: u32) -> Vec<u8> {
    // Header plus the local interrupt controller address and the flags.
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN as u32 + 8,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(HEADER_LEN, layout::LAPIC_ADDR as u32);
    madt.write_u32(HEADER_LEN + 4, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        if cpu <= MAX_XAPIC_ID {
            // processor UID == APIC ID == vCPU index, all fit in a u8 here.
            ProcessorLocalApic::new(cpu as u8, cpu as u8, EnabledStatus::Enabled)
                .to_aml_bytes(&mut entries);
        } else {
            local_x2apic(&mut entries, cpu, cpu);
        }
    }
    IoApic::new(0, layout::IOAPIC_ADDR as u32, 0).to_aml_bytes(&mut entries);
    // The PIT (ISA IRQ 0) is wired to IOAPIC pin 2.
    interrupt_source_override(&mut entries, 0, 2, MPS_INTI_CONFORMING);
    // The SCI named in the FADT: level, active high.
    interrupt_source_override(
        &mut entries,
        SCI_IRQ,
        u32::from(SCI_IRQ),
        MPS_INTI_LEVEL_ACTIVE_HIGH,
    );
    // NMI arrives on LINT1 of every processor.
    entries.push(MADT_LOCAL_APIC_NMI);
    entries.push(6);
    entries.push(0xff); // all processors
    entries.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entries.push(1); // LINT1

    madt.append_slice(&entries);
    finish_table(madt.as_slice().to_vec())
}

/// Appends a MADT interrupt source override (ISA bus).
fn interrupt_source_override(sink: &mut Vec<u8>, isa_irq: u8, gsi: u32, flags: u16) {
    sink.push(MADT_INTERRUPT_SOURCE_OVERRIDE);
    sink.push(10);
    sink.push(0); // bus: ISA
    sink.push(isa_irq);
    sink.extend_from_slice(&gsi.to_le_bytes());
    sink.extend_from_slice(&flags.to_le_bytes());
}

/// Appends a MADT processor local x2APIC structure (enabled).
fn local_x2apic(sink: &mut Vec<u8>, x2apic_id: u32, uid: u32) {
    sink.push(MADT_LOCAL_X2APIC);
    sink.push(MADT_LOCAL_X2APIC_LEN as u8);
    sink.extend_from_slice(&[0, 0]); // reserved
    sink.extend_from_slice(&x2apic_id.to_le_bytes());
    sink.extend_from_slice(&(EnabledStatus::Enabled as u32).to_le_bytes());
    sink.extend_from_slice(&uid.to_le_bytes());
}

/// The PCI Express memory-mapped configuration table: one ECAM for segment 0.
/// VIOT (virtual I/O translation table): the virtio-iommu PCI function and one PCI range node
/// per function behind it (endpoint id = BDF). Linux on x86 finds virtio-iommu only through it.
fn build_viot(cfg: &ViotConfig) -> Vec<u8> {
    // Slots come from the PCI bus (below 32); anything else would be a bug in the caller.
    let dev = |slot: u8| viot::PciDevice::new(0, 0, slot & 0x1f, 0);
    let mut table = viot::VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let iommu = table.add_virtio_pci_iommu(viot::VirtIoPciIommu::new(dev(cfg.iommu_slot)));
    for &slot in &cfg.endpoint_slots {
        table.add_pci_range(viot::PciRange::new(dev(slot), dev(slot), &iommu));
    }
    finish_table(to_bytes(&table))
}

fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, layout::PCI_LAST_BUS);
    finish_table(to_bytes(&mcfg))
}

/// A small ISA IRQ descriptor without flags (`IRQNoFlags() { irq }`): edge, active high,
/// exclusive — what a 16550 on the ISA bus has.
struct IrqNoFlags {
    irq: u8,
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource, type 0x4 (IRQ), length 2: a 16-bit mask of the IRQs.
        sink.byte((0x4 << 3) | 2);
        sink.word(1 << self.irq);
    }
}

/// The Differentiated System Description Table.
fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml = Vec::new();
    let pci0 = PciHostBridge(cfg);
    let sb = Scope::new(
        Path::new("\\_SB_"),
        vec![
            &pci0,
            &MotherboardResources,
            &COM1,
            &RTC,
            &PowerButton,
            &GenericEventDevice,
        ],
    );
    sb.to_aml_bytes(&mut aml);

    // S5 (soft off): SLP_TYP for the sleep control register.
    let s5 = Package::new(vec![
        &layout::ACPI_S5_SLEEP_TYPE,
        &aml::ZERO,
        &aml::ZERO,
        &aml::ZERO,
    ]);
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    finish_table(dsdt.as_slice().to_vec())
}

/// `\_SB_.PCI0`: the PCI Express host bridge of segment 0.
struct PciHostBridge<'a>(&'a AcpiConfig);

impl Aml for PciHostBridge<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let cfg = self.0;
        let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
        let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
        let adr = Name::new(Path::new("_ADR"), &aml::ZERO);
        let seg = Name::new(Path::new("_SEG"), &aml::ZERO);
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        let bbn = Name::new(Path::new("_BBN"), &aml::ZERO);

        let bus_numbers = AddressSpace::new_bus_number(0u16, u16::from(layout::PCI_LAST_BUS));
        let config_io = IO::new(
            layout::PCI_CONFIG_IO_PORT,
            layout::PCI_CONFIG_IO_PORT,
            1,
            layout::PCI_CONFIG_IO_SIZE as u8,
        );
        // The I/O space minus the configuration ports, in two windows.
        let io_low = AddressSpace::new_io(0u16, layout::PCI_CONFIG_IO_PORT - 1, None);
        let io_high = AddressSpace::new_io(PCI_IO_HIGH_START, 0xffffu16, None);
        let mmio32 = AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            layout::PCI_MMIO32_START as u32,
            (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
            None,
        );
        let mmio64 = AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            cfg.pci_mmio64_start,
            cfg.pci_mmio64_start
                .wrapping_add(cfg.pci_mmio64_size)
                .wrapping_sub(1),
            None,
        );
        let mut resources: Vec<&dyn Aml> =
            vec![&bus_numbers, &config_io, &io_low, &io_high, &mmio32];
        if cfg.pci_mmio64_size > 0 {
            resources.push(&mmio64);
        }
        let crs_template = ResourceTemplate::new(resources);
        let crs = Name::new(Path::new("_CRS"), &crs_template);

        let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs];
        // PCI slot devices (Device(Sxxx) { Name(_ADR, dev << 16) ... }) and the interrupt
        // routing table (Name(_PRT, Package() { ... })) for INTx belong here, once devices
        // need them: build them like the objects above and push them onto `children`.
        let slot_objects = pci_slot_objects(cfg);
        children.extend(slot_objects.iter().map(|o| o.as_ref()));

        Device::new(Path::new("PCI0"), children).to_aml_bytes(sink);
    }
}

/// Per-slot objects and `_PRT` of `\_SB_.PCI0`: the INTx routing of every slot (1..=31, pins
/// INTA#..INTD#) straight to the IOAPIC GSIs of [`crate::pci_devices::intx_gsi`]. Entries name
/// no link device (source 0), so the OS treats them as level-triggered, active-low PCI
/// interrupts; GSIs 16..=23 need no MADT override.
fn pci_slot_objects(_cfg: &AcpiConfig) -> Vec<Box<dyn Aml>> {
    vec![Box::new(PciRoutingTable)]
}

/// `Name (_PRT, Package () { Package () { 0xSSSSFFFF, pin, 0, gsi }, ... })`.
struct PciRoutingTable;

impl PciRoutingTable {
    /// `(address, pin, gsi)` of every entry: address is `slot << 16 | 0xFFFF` (any function).
    fn entries() -> Vec<(u32, u8, u32)> {
        (1..pci::bus::NUM_SLOTS)
            .flat_map(|slot| {
                (0..4u8).map(move |pin| {
                    (
                        u32::from(slot) << 16 | 0xFFFF,
                        pin,
                        crate::pci_devices::intx_gsi(slot, pin),
                    )
                })
            })
            .collect()
    }
}

impl Aml for PciRoutingTable {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let entries = Self::entries();
        let packages: Vec<Package> = entries
            .iter()
            .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &aml::ZERO, gsi]))
            .collect();
        let refs: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
        Name::new(Path::new("_PRT"), &Package::new(refs)).to_aml_bytes(sink);
    }
}

/// `\_SB_.MBRD`: motherboard resources — the ECAM and the ACPI PM and GED I/O ports — so that
/// the OS neither hands them to devices nor distrusts the MCFG.
struct MotherboardResources;

impl Aml for MotherboardResources {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        let ecam = Memory32Fixed::new(
            true,
            layout::PCI_ECAM_START as u32,
            ECAM_DESCRIBED_SIZE as u32,
        );
        let pm = IO::new(
            layout::ACPI_PM_PORT,
            layout::ACPI_PM_PORT,
            1,
            layout::ACPI_PM_SIZE as u8,
        );
        let ged = IO::new(
            layout::ACPI_GED_PORT,
            layout::ACPI_GED_PORT,
            1,
            layout::ACPI_GED_SIZE as u8,
        );
        let crs_template = ResourceTemplate::new(vec![&ecam, &pm, &ged]);
        let crs = Name::new(Path::new("_CRS"), &crs_template);
        Device::new(Path::new("MBRD"), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// A legacy ISA device with one I/O range and one edge-triggered IRQ (COM1, the RTC).
struct IsaDevice {
    /// ACPI name of the device object.
    name: &'static str,
    /// PNP hardware id.
    hid: &'static str,
    /// I/O base.
    port: u16,
    /// I/O length.
    len: u8,
    /// ISA IRQ.
    irq: u8,
}

/// `\_SB_.COM1`: the 16550 UART at 0x3F8, IRQ 4.
const COM1: IsaDevice = IsaDevice {
    name: "COM1",
    hid: "PNP0501",
    port: layout::SERIAL_PORT,
    len: SERIAL_PORT_LEN,
    irq: layout::SERIAL_IRQ as u8,
};

/// `\_SB_.RTC_`: the MC146818 RTC/CMOS at 0x70, IRQ 8.
const RTC: IsaDevice = IsaDevice {
    name: "RTC_",
    hid: "PNP0B00",
    port: layout::CMOS_PORT,
    len: 2,
    irq: 8,
};

impl Aml for IsaDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new(Path::new("_HID"), &EISAName::new(self.hid));
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        let io = IO::new(self.port, self.port, 1, self.len);
        let irq = IrqNoFlags { irq: self.irq };
        let crs_template = ResourceTemplate::new(vec![&io, &irq]);
        let crs = Name::new(Path::new("_CRS"), &crs_template);
        Device::new(Path::new(self.name), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}
const _: () = assert!(layout::SERIAL_IRQ < 16);

/// `\_SB_.PWRB`: the control-method power button the GED notifies.
struct PowerButton;

impl Aml for PowerButton {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        Device::new(Path::new("PWRB"), vec![&hid, &uid]).to_aml_bytes(sink);
    }
}

/// GED event register bit: the power button was pressed.
const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// `\_SB_.GED_`: the Generic Event Device. Its interrupt makes the OS run `_EVT`, which reads the
/// (read-to-clear) event register and notifies the devices whose bits are set.
struct GenericEventDevice;

impl Aml for GenericEventDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new(Path::new("_HID"), &"ACPI0013");
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        // ResourceConsumer, Edge, ActiveHigh, Exclusive.
        let irq = Interrupt::new(true, true, false, false, layout::ACPI_GED_IRQ);
        let crs_template = ResourceTemplate::new(vec![&irq]);
        let crs = Name::new(Path::new("_CRS"), &crs_template);

        let region_base = layout::ACPI_GED_PORT as usize;
        let region_len = layout::ACPI_GED_SIZE as usize;
        let region = OpRegion::new(
            Path::new("GDST"),
            OpRegionSpace::SystemIO,
            &region_base,
            &region_len,
        );
        let field = Field::new(
            Path::new("GDST"),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![FieldEntry::Named(*b"GDAT", 32)],
        );

        // Method (_EVT, 1) { Local0 = GDAT; If ((Local0 & 1) == 1) { Notify (PWRB, 0x80) } }
        let gdat = Path::new("GDAT");
        let read = Store::new(&Local(0), &gdat);
        let power_bit = GED_EVENT_POWER_BUTTON;
        let masked = aml::And::new(&aml::ZERO, &Local(0), &power_bit);
        let is_set = aml::Equal::new(&masked, &power_bit);
        let pwrb = Path::new("\\_SB_.PWRB");
        let notify = Notify::new(&pwrb, &0x80u8);
        let on_power = If::new(&is_set, vec![&notify]);
        let evt = Method::new(Path::new("_EVT"), 1, true, vec![&read, &on_power]);

        Device::new(
            Path::new("GED_"),
            vec![&hid, &uid, &crs, &region, &field, &evt],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 20)]).unwrap()
    }

    fn config(num_cpus: u32) -> AcpiConfig {
        AcpiConfig {
            num_cpus,
            pci_mmio64_start: 1 << 40,
            pci_mmio64_size: layout::PCI_MMIO64_SIZE,
            viot: None,
        }
    }

    fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads a whole table (header length) and checks its checksum and skiff's header fields.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        assert_eq!(
            addr % TABLE_ALIGN,
            0,
            "table at {addr:#x} is not 8-byte aligned"
        );
        let header = read_bytes(mem, addr, HEADER_LEN);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= HEADER_LEN);
        assert!(addr + len as u64 <= layout::ACPI_END);
        let table = read_bytes(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[..4]);
        assert_eq!(&table[10..16], &OEM_ID);
        assert_eq!(&table[16..24], &OEM_TABLE_ID);
        assert_eq!(&table[28..32], &CREATOR_ID);
        table
    }

    /// Tables listed in the XSDT, with their addresses.
    type Tables = Vec<(u64, Vec<u8>)>;

    /// Returns (RSDP, XSDT, tables listed in the XSDT).
    fn parse(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>, Tables) {
        let rsdp = read_bytes(mem, layout::RSDP_ADDR, 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let tables = xsdt[HEADER_LEN..]
            .chunks(8)
            .map(|c| {
                let addr = u64::from_le_bytes(c.try_into().unwrap());
                (addr, read_table(mem, addr))
            })
            .collect();
        (rsdp, xsdt, tables)
    }

    fn table<'a>(tables: &'a [(u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        let found: Vec<_> = tables.iter().filter(|(_, t)| &t[..4] == sig).collect();
        assert_eq!(found.len(), 1, "{sig:?} listed once in the XSDT");
        &found[0].1
    }

    fn dsdt(mem: &GuestMemoryMmap) -> Vec<u8> {
        let (_, _, tables) = parse(mem);
        let fadt = table(&tables, b"FACP");
        let dsdt = read_table(mem, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        dsdt
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// MADT interrupt controller structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = HEADER_LEN + 8;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            assert!(len >= 2 && off + len <= madt.len());
            entries.push((madt[off], madt[off..off + len].to_vec()));
            off += len;
        }
        entries
    }

    #[test]
    fn rsdp_and_xsdt() {
        let mem = guest_memory();
        let rsdp_addr = create_acpi_tables(&mem, &config(2)).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(layout::RSDP_ADDR));

        let (rsdp, xsdt, tables) = parse(&mem);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(&rsdp[9..15], &OEM_ID);
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        assert_eq!(xsdt[8], 1, "XSDT revision");

        let sigs: Vec<&[u8]> = tables.iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC", b"MCFG"]);
        // Every table lies in the ACPI area after the RSDP, without overlaps.
        let mut ranges: Vec<(u64, u64)> = tables
            .iter()
            .map(|(a, t)| (*a, *a + t.len() as u64))
            .collect();
        ranges.push((u64_at(&rsdp, 24), u64_at(&rsdp, 24) + xsdt.len() as u64));
        ranges.push((layout::RSDP_ADDR, layout::RSDP_ADDR + 36));
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?} overlap");
        }
        assert!(ranges.last().unwrap().1 <= layout::ACPI_END);
    }

    #[test]
    fn viot_describes_the_iommu_and_its_endpoints() {
        let mem = guest_memory();
        let mut cfg = config(1);
        cfg.viot = Some(ViotConfig {
            iommu_slot: 1,
            endpoint_slots: vec![2, 4],
        });
        create_acpi_tables(&mem, &cfg).unwrap();
        let (_, _, tables) = parse(&mem);
        let viot = table(&tables, b"VIOT");
        assert_eq!(sum(viot), 0, "checksum");
        assert_eq!(u32_at(viot, 4) as usize, viot.len());
        assert_eq!(u16_at(viot, 36), 3, "node count");
        let first = u16_at(viot, 38) as usize;
        assert_eq!(first, 48, "node offset");
        // virtio-pci IOMMU node: type 3, length 16, segment 0, BDF 00:01.0.
        assert_eq!(viot[first], 3);
        assert_eq!(u16_at(viot, first + 2), 16);
        assert_eq!(u16_at(viot, first + 4), 0);
        assert_eq!(u16_at(viot, first + 6), 1 << 3);
        // Two PCI range nodes (type 1, length 24), one function each, endpoint id = BDF, output
        // node = the IOMMU node's offset.
        for (i, slot) in [2u16, 4].into_iter().enumerate() {
            let n = first + 16 + 24 * i;
            assert_eq!(viot[n], 1, "node {i} type");
            assert_eq!(u16_at(viot, n + 2), 24);
            assert_eq!(u32_at(viot, n + 4), u32::from(slot << 3), "endpoint start");
            assert_eq!(u16_at(viot, n + 12), slot << 3, "BDF start");
            assert_eq!(u16_at(viot, n + 14), slot << 3, "BDF end");
            assert_eq!(u16_at(viot, n + 16) as usize, first, "output node");
        }
        // Without an IOMMU there is no VIOT.
        let mem = guest_memory();
        create_acpi_tables(&mem, &config(1)).unwrap();
        let (_, _, tables) = parse(&mem);
        assert!(tables.iter().all(|(_, t)| &t[..4] != b"VIOT"));
    }

    #[test]
    fn fadt_is_hardware_reduced() {
        let mem = guest_memory();
        create_acpi_tables(&mem, &config(1)).unwrap();
        let (_, _, tables) = parse(&mem);
        let fadt = table(&tables, b"FACP");

        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "major version");
        assert_eq!(fadt[131], 5, "minor version");
        let flags = u32_at(fadt, 112);
        for flag in [
            Flags::HwReducedAcpi,
            Flags::ResetRegSup,
            Flags::PwrButton,
            Flags::SlpButton,
        ] {
            assert_ne!(flags & flag as u32, 0, "{flag:?}");
        }
        let iapc = u16_at(fadt, 109);
        assert_eq!(iapc, 0b110, "8042 present, no VGA, MSI allowed");
        assert_eq!(u16_at(fadt, 46), u16::from(SCI_IRQ));

        // X_DSDT, and no 32-bit DSDT pointer.
        assert_eq!(u32_at(fadt, 40), 0);
        let dsdt = read_table(&mem, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");

        // GAS: space, bit width, bit offset, access size, address.
        let gas = |off: usize| {
            (
                fadt[off],
                fadt[off + 1],
                fadt[off + 2],
                fadt[off + 3],
                u64_at(fadt, off + 4),
            )
        };
        let port = |p: u16| (1, 8, 0, 1, u64::from(p));
        assert_eq!(gas(116), port(layout::ACPI_PM_PORT + 2), "RESET_REG");
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        assert_eq!(gas(244), port(layout::ACPI_PM_PORT), "SLEEP_CONTROL_REG");
        assert_eq!(gas(256), port(layout::ACPI_PM_PORT + 1), "SLEEP_STATUS_REG");
        assert_eq!(&fadt[268..276], b"SKIFF\0\0\0");
    }

    #[test]
    fn madt_describes_every_vcpu() {
        for num_cpus in [1u32, 4, 64] {
            let mem = guest_memory();
            create_acpi_tables(&mem, &config(num_cpus)).unwrap();
            let (_, _, tables) = parse(&mem);
            let madt = table(&tables, b"APIC");
            assert_eq!(u32_at(madt, 36), layout::LAPIC_ADDR as u32);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);

            let entries = madt_entries(madt);
            let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
            assert_eq!(lapics.len(), num_cpus as usize);
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(e[2] as usize, i, "processor uid");
                assert_eq!(e[3] as usize, i, "apic id");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let ioapic = &ioapics[0].1;
            assert_eq!(ioapic[2], 0, "IOAPIC id");
            assert_eq!(u32_at(ioapic, 4), layout::IOAPIC_ADDR as u32);
            assert_eq!(u32_at(ioapic, 8), 0, "GSI base");

            let overrides: Vec<_> = entries
                .iter()
                .filter(|(t, _)| *t == 2)
                .map(|(_, e)| (e[2], e[3], u32_at(e, 4), u16_at(e, 8)))
                .collect();
            assert_eq!(overrides, [(0, 0, 2, 0), (0, 9, 9, 0xd)]);

            let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
            assert_eq!(nmis.len(), 1);
            assert_eq!(nmis[0].1, [4, 6, 0xff, 0, 0, 1]);
            assert!(entries.iter().all(|(t, _)| [0, 1, 2, 4].contains(t)));
        }
    }

    #[test]
    fn madt_uses_x2apic_entries_above_254() {
        let mem = guest_memory();
        create_acpi_tables(&mem, &config(300)).unwrap();
        let (_, _, tables) = parse(&mem);
        let entries = madt_entries(table(&tables, b"APIC"));
        assert_eq!(entries.iter().filter(|(t, _)| *t == 0).count(), 255);
        let x2apics: Vec<_> = entries.iter().filter(|(t, _)| *t == 9).collect();
        assert_eq!(x2apics.len(), 45);
        for (i, (_, e)) in x2apics.iter().enumerate() {
            assert_eq!(u32_at(e, 4), 255 + i as u32, "x2apic id");
            assert_eq!(u32_at(e, 8), 1, "enabled");
            assert_eq!(u32_at(e, 12), 255 + i as u32, "uid");
        }
    }

    #[test]
    fn mcfg_matches_layout() {
        let mem = guest_memory();
        create_acpi_tables(&mem, &config(1)).unwrap();
        let (_, _, tables) = parse(&mem);
        let mcfg = table(&tables, b"MCFG");
        assert_eq!(mcfg.len(), HEADER_LEN + 8 + 16);
        let entry = &mcfg[HEADER_LEN + 8..];
        assert_eq!(u64_at(entry, 0), layout::PCI_ECAM_START);
        assert_eq!(u16_at(entry, 8), 0, "segment");
        assert_eq!(entry[10], 0, "start bus");
        assert_eq!(entry[11], layout::PCI_LAST_BUS, "end bus");
    }

    #[test]
    fn dsdt_contents() {
        let mem = guest_memory();
        let cfg = config(4);
        create_acpi_tables(&mem, &cfg).unwrap();
        let dsdt = dsdt(&mem);
        assert_eq!(dsdt[8], DSDT_REVISION);
        for name in [
            &b"_S5_"[..],
            b"_SB_",
            b"PCI0",
            b"MBRD",
            b"COM1",
            b"RTC_",
            b"PWRB",
            b"GED_",
            b"_EVT",
            b"GDAT",
            b"_PRT",
        ] {
            assert!(contains(&dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        // EisaId("PNP0A08") == 0x080AD041: a DWordConst.
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        // EisaId("PNP0A03"), PNP0C02, PNP0501, PNP0C0C.
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        // EisaId("PNP0B00") for the RTC.
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
        assert!(contains(&dsdt, b"ACPI0013\0"));
        // Name(_S5_, Package(4) { 5, 0, 0, 0 }).
        let s5 = [
            0x08,
            b'_',
            b'S',
            b'5',
            b'_',
            0x12,
            0x07,
            0x04,
            0x0a,
            layout::ACPI_S5_SLEEP_TYPE,
            0,
            0,
            0,
        ];
        assert!(contains(&dsdt, &s5));
        // The 64-bit window: QWord address space descriptor min/max.
        let mut qword = Vec::new();
        qword.extend_from_slice(&cfg.pci_mmio64_start.to_le_bytes());
        qword.extend_from_slice(&(cfg.pci_mmio64_start + cfg.pci_mmio64_size - 1).to_le_bytes());
        assert!(contains(&dsdt, &qword));
        // The ECAM reservation: Memory32Fixed(ReadWrite, base, (last bus + 1) MiB).
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(ECAM_DESCRIBED_SIZE as u32).to_le_bytes());
        assert!(contains(&dsdt, &ecam));
        // GED interrupt: Extended IRQ, consumer | edge, one interrupt.
        let mut ged_irq = vec![0x89, 6, 0, 0b11, 1];
        ged_irq.extend_from_slice(&layout::ACPI_GED_IRQ.to_le_bytes());
        assert!(contains(&dsdt, &ged_irq));
        // COM1: IO(Decode16, 0x3F8, 0x3F8, 1, 8) and IRQNoFlags() { 4 }.
        assert!(contains(
            &dsdt,
            &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8, 0x22, 0x10, 0x00]
        ));
    }

    #[test]
    fn prt_routes_every_slot_and_pin() {
        let entries = PciRoutingTable::entries();
        assert_eq!(entries.len(), 31 * 4);
        assert_eq!(entries[0], (0x0001_ffff, 0, 17));
        assert_eq!(entries[3], (0x0001_ffff, 3, 20));
        assert_eq!(entries[4 * 7 + 1], (0x0008_ffff, 1, 17));
        assert!(entries.iter().all(|e| (16..24).contains(&e.2)));
        let mem = guest_memory();
        create_acpi_tables(&mem, &config(1)).unwrap();
        let dsdt = dsdt(&mem);
        // Package (4) { 0x0001FFFF, Zero, Zero, 17 } for slot 1 INTA#.
        assert!(contains(
            &dsdt,
            &[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x11]
        ));
        // Slot 31 INTD#: pin 3, GSI 16 + (31 + 3) % 8 = 18.
        assert!(contains(
            &dsdt,
            &[0x12, 0x0c, 0x04, 0x0c, 0xff, 0xff, 0x1f, 0x00, 0x0a, 0x03, 0x00, 0x0a, 0x12]
        ));
    }

    #[test]
    fn dsdt_without_64bit_window() {
        let mem = guest_memory();
        let cfg = AcpiConfig {
            pci_mmio64_size: 0,
            ..config(1)
        };
        create_acpi_tables(&mem, &cfg).unwrap();
        let dsdt = dsdt(&mem);
        // No QWord address space descriptor left.
        assert!(!contains(&dsdt, &[0x8a, 0x2b, 0x00]));
    }

    #[test]
    fn tables_that_do_not_fit_are_rejected() {
        let mem = guest_memory();
        let err = create_acpi_tables(&mem, &config(20_000)).unwrap_err();
        match err {
            AcpiError::TooLarge { table, end, limit } => {
                assert_eq!(table, "APIC");
                assert!(end > limit);
                assert_eq!(limit, layout::ACPI_END);
            }
            e => panic!("unexpected error {e}"),
        }
        // Nothing was written.
        assert_eq!(read_bytes(&mem, layout::RSDP_ADDR, 8), [0; 8]);
        // Refused before building anything huge.
        assert!(matches!(
            create_acpi_tables(&mem, &config(u32::MAX)),
            Err(AcpiError::TooLarge { .. })
        ));
    }

    #[test]
    fn madt_len_matches_the_table() {
        for n in [1, 2, 254, 255, 256, 300] {
            assert_eq!(build_madt(n).len() as u64, madt_len(n), "{n} vCPUs");
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mem = guest_memory();
        assert!(matches!(
            create_acpi_tables(&mem, &config(0)),
            Err(AcpiError::NoCpus)
        ));
        let cfg = AcpiConfig {
            pci_mmio64_start: u64::MAX - 10,
            pci_mmio64_size: 1 << 30,
            ..config(1)
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(AcpiError::InvalidMmio64Window { .. })
        ));
    }

    #[test]
    fn memory_without_the_acpi_area_fails() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, &config(1)),
            Err(AcpiError::GuestMemory(_))
        ));
    }
}
