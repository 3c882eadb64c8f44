//! ACPI table discovery and validation: RSDP → XSDT (or RSDT) → every table, plus FADT → DSDT.
//!
//! Tables are read in place through the identity map; tables above 4 GiB are reported as
//! unreadable (and counted as checksum errors).

pub mod aml;
pub mod fadt;
pub mod madt;
pub mod mcfg;
pub mod viot;

use alloc::vec::Vec;
use core::fmt;

/// Length of the common system description table header.
pub const HEADER_LEN: usize = 36;
/// Largest table we are willing to read.
const MAX_TABLE_LEN: u32 = 16 * 1024 * 1024;
/// Highest mapped physical address (exclusive).
const MAPPED_LIMIT: u64 = 1 << 32;

/// Read a little-endian value from physical memory.
pub fn read_phys<T: Copy>(addr: u64) -> T {
    assert!(
        addr.checked_add(core::mem::size_of::<T>() as u64)
            .is_some_and(|end| end <= MAPPED_LIMIT),
        "physical address {addr:#x} is not mapped"
    );
    // SAFETY: the low 4 GiB are identity mapped; ACPI data is plain bytes, read unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Borrow `len` bytes of physical memory.
fn phys_bytes(addr: u64, len: usize) -> &'static [u8] {
    assert!(
        addr + len as u64 <= MAPPED_LIMIT,
        "physical range {addr:#x}+{len:#x} is not mapped"
    );
    // SAFETY: the range is below 4 GiB and therefore identity mapped; firmware tables are not
    // modified while we look at them.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

/// A 4-character table signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 4]);

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// The Root System Description Pointer.
#[derive(Clone, Copy, Debug)]
pub struct Rsdp {
    /// Where it was found.
    pub addr: u64,
    /// 0 = ACPI 1.0 (RSDT only), 2+ = XSDT present.
    pub revision: u8,
    /// OEM ID.
    pub oem_id: [u8; 6],
    /// RSDT address.
    pub rsdt: u32,
    /// XSDT address (revision >= 2).
    pub xsdt: u64,
    /// Both checksums (20-byte and, for revision >= 2, extended) are valid.
    pub checksum_ok: bool,
}

impl Rsdp {
    fn parse(addr: u64) -> Option<Rsdp> {
        let b = phys_bytes(addr, 20);
        if &b[0..8] != b"RSD PTR " {
            return None;
        }
        let revision = b[15];
        let mut ok = checksum_ok(b);
        let mut xsdt = 0;
        if revision >= 2 {
            let len: u32 = read_phys(addr + 20);
            if (36..=4096).contains(&len) {
                ok &= checksum_ok(phys_bytes(addr, len as usize));
            } else {
                ok = false;
            }
            xsdt = read_phys(addr + 24);
        }
        let mut oem_id = [0; 6];
        oem_id.copy_from_slice(&b[9..15]);
        Some(Rsdp {
            addr,
            revision,
            oem_id,
            rsdt: read_phys(addr + 16),
            xsdt,
            checksum_ok: ok,
        })
    }

    /// The OEM ID as text.
    pub fn oem(&self) -> &str {
        core::str::from_utf8(&self.oem_id).unwrap_or("??????")
    }

    /// Scan the EBDA's first KiB and the BIOS area 0xE0000..0xFFFFF for the signature.
    fn scan() -> Option<Rsdp> {
        let ebda = u64::from(read_phys::<u16>(0x40E)) << 4;
        let mut ranges = [(0xE0000u64, 0x100000u64), (0, 0)];
        if (0x80000..0xA0000).contains(&ebda) {
            ranges[1] = (ebda, ebda + 1024);
        }
        ranges
            .iter()
            .flat_map(|&(start, end)| (start..end).step_by(16))
            .find_map(|a| {
                if read_phys::<[u8; 8]>(a) == *b"RSD PTR " {
                    Rsdp::parse(a)
                } else {
                    None
                }
            })
    }
}

/// One system description table.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    /// Signature from its header.
    pub signature: Signature,
    /// Physical address.
    pub addr: u64,
    /// Length from its header (0 if unreadable).
    pub length: u32,
    /// Whether its bytes sum to zero (false if unreadable).
    pub checksum_ok: bool,
}

impl Table {
    /// Read the header at `addr` and verify the checksum.
    pub fn at(addr: u64) -> Table {
        if addr == 0 || addr + HEADER_LEN as u64 > MAPPED_LIMIT {
            return Table {
                signature: Signature(*b"????"),
                addr,
                length: 0,
                checksum_ok: false,
            };
        }
        let signature = Signature(read_phys(addr));
        let length: u32 = read_phys(addr + 4);
        let readable = (HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&length)
            && addr + u64::from(length) <= MAPPED_LIMIT;
        Table {
            signature,
            addr,
            length,
            checksum_ok: readable && checksum_ok(phys_bytes(addr, length as usize)),
        }
    }

    /// The whole table (empty if unreadable).
    pub fn bytes(&self) -> &'static [u8] {
        if self.length < HEADER_LEN as u32 || self.addr + u64::from(self.length) > MAPPED_LIMIT {
            return &[];
        }
        phys_bytes(self.addr, self.length as usize)
    }

    /// Read a field at byte `offset`, or None if the table is shorter.
    pub fn field<T: Copy>(&self, offset: usize) -> Option<T> {
        let end = offset + core::mem::size_of::<T>();
        (end <= self.length as usize).then(|| read_phys(self.addr + offset as u64))
    }

    /// The table header's revision byte.
    pub fn revision(&self) -> u8 {
        self.field(8).unwrap_or(0)
    }
}

/// Why ACPI could not be used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP at the given address nor in the BIOS area.
    NoRsdp,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp => f.write_str("no RSDP found"),
        }
    }
}

/// Everything found from the RSDP down.
#[derive(Clone, Debug)]
pub struct Acpi {
    /// The RSDP.
    pub rsdp: Rsdp,
    /// The XSDT (or RSDT for revision 0).
    pub root: Table,
    /// Every table the root lists, in order, then the DSDT (from the FADT) if there is one.
    pub tables: Vec<Table>,
}

impl Acpi {
    /// Find the RSDP (at `hint`, or by scanning when `hint` is 0 or wrong) and walk the tables.
    pub fn discover(hint: u64) -> Result<Acpi, AcpiError> {
        let rsdp = (hint != 0)
            .then(|| Rsdp::parse(hint))
            .flatten()
            .or_else(Rsdp::scan)
            .ok_or(AcpiError::NoRsdp)?;
        let (root_addr, entry_size) = if rsdp.revision >= 2 && rsdp.xsdt != 0 {
            (rsdp.xsdt, 8)
        } else {
            (u64::from(rsdp.rsdt), 4)
        };
        let root = Table::at(root_addr);
        let mut tables = Vec::new();
        let count = (root.length as usize).saturating_sub(HEADER_LEN) / entry_size;
        for i in 0..count {
            let at = root.addr + (HEADER_LEN + i * entry_size) as u64;
            let addr = if entry_size == 8 {
                read_phys::<u64>(at)
            } else {
                u64::from(read_phys::<u32>(at))
            };
            tables.push(Table::at(addr));
        }
        let dsdt = tables
            .iter()
            .find(|t| t.signature.0 == *b"FACP")
            .map(|fadt| fadt::Fadt::parse(fadt).dsdt)
            .filter(|&a| a != 0);
        if let Some(addr) = dsdt {
            tables.push(Table::at(addr));
        }
        Ok(Acpi { rsdp, root, tables })
    }

    /// First table with signature `sig`.
    pub fn find(&self, sig: &[u8; 4]) -> Option<&Table> {
        self.tables.iter().find(|t| t.signature.0 == *sig)
    }

    /// Number of tables checked: the root table, every listed table and the DSDT.
    pub fn table_count(&self) -> usize {
        1 + self.tables.len()
    }

    /// Checksum failures among the RSDP, the root table and every other table.
    pub fn checksum_errors(&self) -> usize {
        usize::from(!self.rsdp.checksum_ok)
            + usize::from(!self.root.checksum_ok)
            + self.tables.iter().filter(|t| !t.checksum_ok).count()
    }

    /// The FADT, parsed.
    pub fn fadt(&self) -> Option<fadt::Fadt> {
        self.find(b"FACP").map(fadt::Fadt::parse)
    }
}
