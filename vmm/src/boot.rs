//! Direct kernel boot: loading an ELF vmlinux (PVH or 64-bit entry) or a bzImage with linux-loader,
//! placing the command line and initramfs, and writing the boot structures (zero page / PVH start
//! info, e820 map, identity page tables, GDT) the entry path expects.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::*;
use crate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const PVH_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point (`startup_64`) from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initramfs end address when the kernel does not state one (boot protocol default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;

/// Errors while loading a kernel and writing boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// Reading the kernel image failed.
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// The image is neither an ELF file nor a bzImage.
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// linux-loader rejected the image.
    #[error("cannot load the kernel: {0}")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The ELF image has neither a PVH note nor a usable 64-bit entry.
    #[error("the ELF kernel's entry point {0:#x} is outside guest RAM")]
    BadEntry(u64),
    /// Reading the initramfs failed.
    #[error("cannot read the initramfs: {0}")]
    ReadInitramfs(#[source] std::io::Error),
    /// The initramfs is larger than the RAM available below the kernel's limit.
    #[error("the initramfs ({size} bytes) does not fit in guest RAM: at most {available} bytes are free between the kernel and {limit:#x}")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
        /// Room available.
        available: u64,
        /// Highest address the kernel accepts for the initramfs.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length of the requested command line.
        len: usize,
        /// Most bytes the kernel accepts (without the NUL).
        max: usize,
    },
    /// The command line is not acceptable (e.g. contains a NUL or non-ASCII byte).
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Too many e820 entries for the boot structures.
    #[error("too many memory map entries ({0})")]
    TooManyE820Entries(usize),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    WriteBootParams(String),
}

type Result<T> = std::result::Result<T, BootError>;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info` (ELF with a PVH note).
    Pvh,
    /// 64-bit long mode with an identity map, RSI = zero page (bzImage, or ELF without a PVH note).
    Linux64,
}

/// Where and how to start the boot vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest physical address of the first instruction.
    pub addr: GuestAddress,
    /// Entry protocol.
    pub protocol: BootProtocol,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry point.
    pub entry: EntryPoint,
    /// First byte after the loaded image.
    pub kernel_end: u64,
    /// The bzImage setup header, when booting a bzImage.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Longest command line (without its NUL) this kernel accepts.
    pub fn cmdline_max_len(&self) -> usize {
        match self.setup_header {
            // `cmdline_size` exists from boot protocol 2.06 on; older kernels take 255 bytes.
            Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
            Some(_) => 255,
            None => CMDLINE_MAX_SIZE - 1,
        }
        .min(CMDLINE_MAX_SIZE - 1)
    }

    /// Highest address (inclusive) the initramfs may occupy.
    pub fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => {
                u64::from(h.initrd_addr_max)
            }
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

/// An initramfs placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitramfsRange {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One e820 memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type (`E820_RAM`, `E820_RESERVED`).
    pub kind: u32,
}

/// The RAM ranges (start, size) for a guest with `mem_size` bytes of RAM: RAM below the 32-bit hole,
/// and the rest from 4 GiB up.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MEM_32BIT_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MEM_32BIT_HOLE_START),
            (RAM_64BIT_START, mem_size - MEM_32BIT_HOLE_START),
        ]
    }
}

/// The e820 map the guest is given: low RAM, the reserved EBDA/BIOS area (ACPI tables live there),
/// RAM from 1 MiB, the reserved ECAM window, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MEM_32BIT_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: ecam_size(),
        kind: E820_RESERVED,
    });
    if mem_size > MEM_32BIT_HOLE_START {
        map.push(E820Entry {
            addr: RAM_64BIT_START,
            size: mem_size - MEM_32BIT_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Size of the ECAM window that is decoded (buses 0..=PCI_LAST_BUS).
pub fn ecam_size() -> u64 {
    (u64::from(PCI_LAST_BUS) + 1) << 20
}

/// Load a kernel image (ELF vmlinux or bzImage) into guest memory.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel>
where
    F: Read + ReadVolatile + Seek,
{
    let mut magic = [0u8; 4];
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let n = read_up_to(image, &mut magic)?;
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    if n == 4 && magic == *b"\x7fELF" {
        let res = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::LoadKernel)?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
                addr,
                protocol: BootProtocol::Pvh,
            },
            _ => EntryPoint {
                addr: res.kernel_load,
                protocol: BootProtocol::Linux64,
            },
        };
        if !mem.address_in_range(entry.addr) {
            return Err(BootError::BadEntry(entry.addr.raw_value()));
        }
        return Ok(LoadedKernel {
            entry,
            kernel_end: res.kernel_end,
            setup_header: None,
        });
    }
    let mut hdr = [0u8; 4];
    let is_bzimage = image.seek(SeekFrom::Start(0x202)).is_ok()
        && read_up_to(image, &mut hdr)? == 4
        && u32::from_le_bytes(hdr) == KERNEL_HDR_MAGIC;
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    if !is_bzimage {
        return Err(BootError::UnknownKernelFormat);
    }
    let res = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    let addr = res
        .kernel_load
        .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
        .ok_or(BootError::BadEntry(res.kernel_load.raw_value()))?;
    Ok(LoadedKernel {
        entry: EntryPoint {
            addr,
            protocol: BootProtocol::Linux64,
        },
        kernel_end: res.kernel_end,
        setup_header: res.setup_header,
    })
}

fn read_up_to<F: Read>(f: &mut F, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BootError::ReadKernel(e)),
        }
    }
    Ok(done)
}

/// Build the kernel command line, checking it against the kernel's limit.
pub fn build_cmdline(kernel: &LoadedKernel, cmdline: &str) -> Result<Cmdline> {
    let max = kernel.cmdline_max_len();
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut c = Cmdline::new(max + 1).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline.trim())
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    Ok(c)
}

/// Place an initramfs as high as possible below the kernel's limit and the end of low RAM.
pub fn load_initramfs<F>(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    mem_size: u64,
    initramfs: &mut F,
) -> Result<InitramfsRange>
where
    F: Read + ReadVolatile + Seek,
{
    let size = initramfs
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitramfs)?;
    initramfs
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitramfs)?;
    let low_ram_end = mem_size.min(MEM_32BIT_HOLE_START);
    let limit = low_ram_end.min(kernel.initrd_addr_max().saturating_add(1));
    let floor = kernel
        .kernel_end
        .max(HIMEM_START)
        .next_multiple_of(PAGE_SIZE);
    let available = limit.saturating_sub(floor);
    let addr = limit.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= floor && size > 0 => a,
        _ => {
            return Err(BootError::InitramfsTooLarge {
                size,
                available,
                limit,
            });
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), initramfs, size as usize)
        .map_err(|e| BootError::ReadInitramfs(std::io::Error::other(e.to_string())))?;
    Ok(InitramfsRange { addr, size })
}

/// Write everything the entry protocol needs: command line, zero page or PVH start info, e820 map,
/// identity page tables and GDT (the latter two are used by the vCPU register setup).
pub fn configure_system(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initramfs: Option<InitramfsRange>,
    mem_size: u64,
    rsdp: GuestAddress,
) -> Result<()> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| BootError::WriteBootParams(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    let map = e820_map(mem_size);
    match kernel.entry.protocol {
        BootProtocol::Pvh => write_pvh_info(mem, &map, initramfs, rsdp)?,
        BootProtocol::Linux64 => {
            write_zero_page(mem, kernel, cmdline_len, &map, initramfs, rsdp)?;
            write_identity_map(mem)?;
        }
    }
    Ok(())
}

/// Build the Linux `boot_params` for the 64-bit entry.
pub fn build_zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    map: &[E820Entry],
    initramfs: Option<InitramfsRange>,
    rsdp: GuestAddress,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(rd) = initramfs {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    map: &[E820Entry],
    initramfs: Option<InitramfsRange>,
    rsdp: GuestAddress,
) -> Result<()> {
    let params = build_zero_page(kernel, cmdline_len, map, initramfs, rsdp)?;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::WriteBootParams(e.to_string()))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initramfs: Option<InitramfsRange>,
    rsdp: GuestAddress,
) -> Result<()> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some(rd) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        bp.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    bp.set_sections(&entries, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::WriteBootParams(e.to_string()))
}

/// Identity-map the low 4 GiB with 2 MiB pages (PML4 → PDPT → 4 page directories).
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootError::WriteBootParams(e.to_string()))
    };
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * PAGE_SIZE;
        w(pd_addr | 0x3, PDPT_ADDR + pd * 8)?;
        for i in 0..512u64 {
            // Present | writable | 2 MiB page.
            w(((pd * 512 + i) << 21) | 0x83, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

/// Encode a GDT entry from its flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT for a protocol: null, code, data, TSS (selectors 0x8, 0x10, 0x18).
pub fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (L bit)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: EntryPoint {
                addr: GuestAddress(0x100000),
                protocol: BootProtocol::Linux64,
            },
            kernel_end: 0x200000,
            setup_header: None,
        }
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(512 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (512 << 20) - 0x100000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: PCI_ECAM_START,
                    size: 1 << 20,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_large_guest_splits_around_hole() {
        let size = 4u64 << 30;
        let map = e820_map(size);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the reserved EBDA..1MiB area is usable.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        let high = map.last().unwrap();
        assert_eq!(
            (high.addr, high.size, high.kind),
            (1 << 32, 1 << 30, E820_RAM)
        );
        // No RAM entry overlaps the hole.
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(e.addr + e.size <= MEM_32BIT_HOLE_START || e.addr >= 1 << 32);
        }
        assert_eq!(ram_ranges(size), vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
    }

    #[test]
    fn zero_page_fields() {
        let map = e820_map(256 << 20);
        let rd = InitramfsRange {
            addr: 0x0f00_0000,
            size: 0x1234,
        };
        let p =
            build_zero_page(&elf_kernel(), 20, &map, Some(rd), GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 21);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, RSDP_ADDR);
        assert_eq!(p.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let t = p.e820_table[i];
            assert_eq!(
                ({ t.addr }, { t.size }, { t.r#type }),
                (e.addr, e.size, e.kind)
            );
        }
        // The written zero page reads back at the documented offsets.
        let m = mem(256 << 20);
        let bp = BootParams::new::<boot_params>(&p, GuestAddress(ZERO_PAGE_ADDR));
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, &m).unwrap();
        let n: u8 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
        assert_eq!(n as usize, map.len());
        let a: u64 = m
            .read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x2d0 + 20 * 2))
            .unwrap();
        assert_eq!(a, 0x100000);
        let ptr: u32 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x228)).unwrap();
        assert_eq!(ptr, CMDLINE_ADDR as u32);
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        let _ = p.as_slice();
    }

    #[test]
    fn bzimage_header_is_kept() {
        let mut hdr = setup_header {
            version: 0x020f,
            cmdline_size: 4095,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        hdr.header = KERNEL_HDR_MAGIC;
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        let k = LoadedKernel {
            setup_header: Some(hdr),
            ..elf_kernel()
        };
        assert_eq!(k.cmdline_max_len(), CMDLINE_MAX_SIZE - 1);
        assert_eq!(k.initrd_addr_max(), 0x7fff_ffff);
        let p = build_zero_page(&k, 3, &e820_map(1 << 30), None, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn cmdline_limits() {
        let k = elf_kernel();
        assert!(build_cmdline(&k, "console=ttyS0").is_ok());
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&k, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let hdr = setup_header {
            version: 0x0206,
            cmdline_size: 16,
            ..Default::default()
        };
        let small = LoadedKernel {
            setup_header: Some(hdr),
            ..k
        };
        assert!(build_cmdline(&small, "0123456789abcdef").is_ok());
        assert!(matches!(
            build_cmdline(&small, "0123456789abcdefg"),
            Err(BootError::CmdlineTooLong { len: 17, max: 16 })
        ));
    }

    #[test]
    fn initramfs_placement_and_overflow() {
        let size = 64u64 << 20;
        let m = mem(size);
        let k = elf_kernel();
        let data = vec![0xa5u8; 10_000];
        let rd = load_initramfs(&m, &k, size, &mut std::io::Cursor::new(&data[..])).unwrap();
        assert_eq!(rd.addr % PAGE_SIZE, 0);
        assert!(rd.addr >= k.kernel_end && rd.addr + rd.size <= size);
        let mut back = vec![0u8; data.len()];
        m.read_slice(&mut back, GuestAddress(rd.addr)).unwrap();
        assert_eq!(back, data);
        let huge = vec![0u8; 63 << 20];
        assert!(matches!(
            load_initramfs(&m, &k, size, &mut std::io::Cursor::new(&huge[..])),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }

    #[test]
    fn unknown_format_rejected() {
        let m = mem(64 << 20);
        let junk = vec![0x42u8; 8192];
        assert!(matches!(
            load_kernel(&m, &mut std::io::Cursor::new(&junk[..])),
            Err(BootError::UnknownKernelFormat)
        ));
        let empty: Vec<u8> = Vec::new();
        assert!(load_kernel(&m, &mut std::io::Cursor::new(&empty[..])).is_err());
        let truncated_elf = b"\x7fELF\x02\x01\x01".to_vec();
        assert!(matches!(
            load_kernel(&m, &mut std::io::Cursor::new(&truncated_elf[..])),
            Err(BootError::LoadKernel(_))
        ));
    }

    #[test]
    fn pvh_info_and_page_tables() {
        let size = 128u64 << 20;
        let m = mem(size);
        let rd = InitramfsRange {
            addr: 0x400_0000,
            size: 4096,
        };
        write_pvh_info(&m, &e820_map(size), Some(rd), GuestAddress(RSDP_ADDR)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, RSDP_ADDR);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (rd.addr, rd.size));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 2 * 24)).unwrap();
        assert_eq!((e.addr, e.type_), (HIMEM_START, E820_RAM));

        write_identity_map(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        // The last 2 MiB page of the 4 GiB map covers the LAPIC.
        let last: u64 = m
            .read_obj(GuestAddress(PD_ADDR + 3 * 4096 + 511 * 8))
            .unwrap();
        assert_eq!(last, (0xffe0_0000) | 0x83);
    }

    #[test]
    fn gdt_entries() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }
}
