//! Just enough AML to read `\_S5_`'s SLP_TYPa.

use alloc::vec::Vec;

use super::Table;

/// Find `_S5_` in the AML of `table` and return the first package element (SLP_TYPa).
///
/// Expects `"_S5_" PackageOp(0x12) PkgLength NumElements` followed by a ByteConst (`0x0A xx`),
/// WordConst (`0x0B lo hi`), ZeroOp (`0x00`) or OneOp (`0x01`).
pub fn s5_slp_typ(table: &Table) -> Result<u8, &'static str> {
    let aml = table.bytes().get(super::HEADER_LEN..).unwrap_or(&[]);
    let mut found_name = false;
    for pos in aml
        .windows(4)
        .enumerate()
        .filter_map(|(i, w)| (w == b"_S5_").then_some(i))
    {
        found_name = true;
        if let Some(v) = parse_package_first(&aml[pos + 4..]) {
            return Ok(v);
        }
    }
    Err(if found_name {
        "_S5_ is not a package starting with an integer constant"
    } else {
        "no _S5_ object"
    })
}

fn parse_package_first(b: &[u8]) -> Option<u8> {
    if *b.first()? != 0x12 {
        return None;
    }
    // PkgLength: bits 7:6 of the lead byte = number of extra bytes.
    let lead = *b.get(1)?;
    let pkg_len_bytes = 1 + usize::from(lead >> 6);
    let num_elements_at = 1 + pkg_len_bytes;
    let _num_elements = *b.get(num_elements_at)?;
    let e = b.get(num_elements_at + 1..)?;
    match *e.first()? {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0A | 0x0B => e.get(1).copied(),
        _ => None,
    }
}

/// One entry of a static `_PRT` (PCI interrupt routing table) whose source is a GSI (no link
/// device): `Package () { address, pin, 0, gsi }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrtEntry {
    /// `device << 16 | function` (function 0xFFFF: every function of the device).
    pub address: u64,
    /// INTx pin: 0 = INTA# .. 3 = INTD#.
    pub pin: u64,
    /// The global system interrupt.
    pub gsi: u64,
}

impl PrtEntry {
    /// Whether this entry routes `pin` (0 = INTA#) of function `func` of device `dev`.
    pub fn matches(&self, dev: u8, func: u8, pin: u8) -> bool {
        self.address >> 16 == u64::from(dev)
            && (self.address & 0xFFFF == 0xFFFF || self.address & 0xFFFF == u64::from(func))
            && self.pin == u64::from(pin)
    }
}

/// Decode a PkgLength at the start of `b`: (package length, bytes the encoding takes).
fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let extra = usize::from(lead >> 6);
    if extra == 0 {
        return Some((usize::from(lead & 0x3F), 1));
    }
    let mut len = usize::from(lead & 0x0F);
    for i in 0..extra {
        len |= usize::from(*b.get(1 + i)?) << (4 + 8 * i);
    }
    Some((len, 1 + extra))
}

/// Decode an integer constant (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordConst): (value,
/// bytes taken). None for anything else (a name, a method call, ...).
fn integer(b: &[u8]) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<u64> {
        let bytes = b.get(1..1 + n)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
        )
    };
    match *b.first()? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xFF => Some((u64::MAX, 1)),
        0x0A => Some((le(1)?, 2)),
        0x0B => Some((le(2)?, 3)),
        0x0C => Some((le(4)?, 5)),
        0x0E => Some((le(8)?, 9)),
        _ => None,
    }
}

/// Parse one `Package () { address, pin, source, index }` at the start of `b` (which begins with
/// PackageOp): Some(entry) when all four are integers and the source is 0, and the bytes the
/// package takes.
fn prt_package(b: &[u8]) -> Option<(Option<PrtEntry>, usize)> {
    if *b.first()? != 0x12 {
        return None;
    }
    let (len, n) = pkg_length(b.get(1..)?)?;
    let total = 1 + len;
    let body = b.get(1 + n..total)?;
    let count = *body.first()?;
    let mut at = 1;
    let mut values = [0u64; 4];
    for v in values.iter_mut().take(usize::from(count.min(4))) {
        match integer(body.get(at..)?) {
            Some((x, used)) => {
                *v = x;
                at += used;
            }
            None => return Some((None, total)),
        }
    }
    let entry = (count == 4 && values[2] == 0).then_some(PrtEntry {
        address: values[0],
        pin: values[1],
        gsi: values[3],
    });
    Some((entry, total))
}

/// The entries of the first static `Name (_PRT, Package () { ... })` in the AML of `table` whose
/// entries route straight to GSIs. Empty when there is none (a `_PRT` method, link devices).
pub fn prt(table: &Table) -> Vec<PrtEntry> {
    let aml = table.bytes().get(super::HEADER_LEN..).unwrap_or(&[]);
    for pos in aml
        .windows(4)
        .enumerate()
        .filter_map(|(i, w)| (w == b"_PRT").then_some(i))
    {
        let b = &aml[pos + 4..];
        if b.first() != Some(&0x12) {
            continue;
        }
        let Some((len, n)) = pkg_length(&b[1..]) else {
            continue;
        };
        let Some(outer) = b.get(1 + n..1 + len) else {
            continue;
        };
        let count = outer.first().copied().unwrap_or(0);
        let mut at = 1;
        let mut entries = Vec::new();
        for _ in 0..count {
            let Some((entry, used)) = outer.get(at..).and_then(prt_package) else {
                break;
            };
            entries.extend(entry);
            at += used;
        }
        if !entries.is_empty() {
            return entries;
        }
    }
    Vec::new()
}
