//! Just enough AML to read `\_S5_`'s SLP_TYPa.

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
