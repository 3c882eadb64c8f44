//! The boot information both entry paths reduce to: memory map, command line, RSDP address.
//!
//! Everything is copied out of the VMM-provided structures (`hvm_start_info` for PVH, the zero
//! page for the Linux 64-bit protocol) first thing, because low memory is reused afterwards (the AP
//! trampoline lives at 0x8000).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// PVH `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// How the guest was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit entry with `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol with a zero page.
    Linux64,
}

impl fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux64",
        })
    }
}

/// Kind of a memory map range (E820 / PVH types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
    /// ACPI reclaimable (type 3).
    Acpi,
    /// Any other type.
    Other(u32),
}

impl MemoryKind {
    /// From the numeric E820 type.
    pub fn from_type(t: u32) -> Self {
        match t {
            1 => MemoryKind::Ram,
            2 => MemoryKind::Reserved,
            3 => MemoryKind::Acpi,
            n => MemoryKind::Other(n),
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryKind::Ram => f.write_str("ram"),
            MemoryKind::Reserved => f.write_str("reserved"),
            MemoryKind::Acpi => f.write_str("acpi"),
            MemoryKind::Other(n) => write!(f, "type {n}"),
        }
    }
}

/// One memory map range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: MemoryKind,
}

/// What the guest knows about its machine from the boot protocol.
#[derive(Debug)]
pub struct BootInfo {
    /// Entry path taken.
    pub protocol: BootProtocol,
    /// Memory map in the order the VMM gave it (zero-sized entries dropped).
    pub memory_map: Vec<MemoryRegion>,
    /// Kernel command line ("" if none).
    pub cmdline: String,
    /// RSDP physical address from the VMM, or 0 (then the BIOS area is scanned).
    pub rsdp_addr: u64,
}

impl BootInfo {
    /// Value of the first `key=value` word of the command line.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// Total bytes of RAM in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_regions().map(|r| r.size).sum()
    }

    /// The RAM ranges of the memory map.
    pub fn ram_regions(&self) -> impl Iterator<Item = &MemoryRegion> {
        self.memory_map.iter().filter(|r| r.kind == MemoryKind::Ram)
    }
}

/// Physical memory readers for the boot structures (identity mapped by the boot page tables).
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: called only for addresses the VMM handed us (below 4 GiB, identity mapped); the
    // structures are plain data, read unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn read_c_string(addr: u64, max: usize) -> String {
    let mut s = String::new();
    if addr == 0 || addr >= 1 << 32 {
        return s;
    }
    for i in 0..max as u64 {
        let b: u8 = rd(addr + i);
        if b == 0 {
            break;
        }
        s.push(if b.is_ascii() { b as char } else { '?' });
    }
    s
}

const MAX_CMDLINE: usize = 4096;

/// Parse `hvm_start_info` at `addr`. Panics if the magic is wrong.
pub fn from_pvh(addr: u64) -> BootInfo {
    let magic: u32 = rd(addr);
    assert_eq!(
        magic, HVM_START_MAGIC,
        "hvm_start_info at {addr:#x} has bad magic {magic:#x}"
    );
    let version: u32 = rd(addr + 4);
    let cmdline_paddr: u64 = rd(addr + 24);
    let rsdp_addr: u64 = rd(addr + 32);
    let mut memory_map = Vec::new();
    if version >= 1 {
        let map: u64 = rd(addr + 40);
        let entries: u32 = rd(addr + 48);
        for i in 0..u64::from(entries.min(1024)) {
            let e = map + i * 24;
            memory_map.push(MemoryRegion {
                addr: rd(e),
                size: rd(e + 8),
                kind: MemoryKind::from_type(rd(e + 16)),
            });
        }
    }
    memory_map.retain(|r| r.size != 0);
    BootInfo {
        protocol: BootProtocol::Pvh,
        memory_map,
        cmdline: read_c_string(cmdline_paddr, MAX_CMDLINE),
        rsdp_addr,
    }
}

/// Parse the Linux zero page (`struct boot_params`) at `addr`.
pub fn from_linux(addr: u64) -> BootInfo {
    let rsdp_addr: u64 = rd(addr + 0x070);
    let ext_cmd_line_ptr: u32 = rd(addr + 0x0c8);
    let e820_entries: u8 = rd(addr + 0x1e8);
    let cmd_line_ptr: u32 = rd(addr + 0x228);
    let mut memory_map = Vec::new();
    for i in 0..u64::from(e820_entries.min(128)) {
        let e = addr + 0x2d0 + i * 20;
        memory_map.push(MemoryRegion {
            addr: rd(e),
            size: rd(e + 8),
            kind: MemoryKind::from_type(rd(e + 16)),
        });
    }
    memory_map.retain(|r| r.size != 0);
    let cmdline = u64::from(cmd_line_ptr) | (u64::from(ext_cmd_line_ptr) << 32);
    BootInfo {
        protocol: BootProtocol::Linux64,
        memory_map,
        cmdline: read_c_string(cmdline, MAX_CMDLINE),
        rsdp_addr,
    }
}
