//! Custom CPU templates: user-written CPUID masks that give VMs on different hosts a common CPU
//! baseline, so that a guest can be live-migrated between them.
//!
//! The format follows Firecracker's custom CPU templates (CPUID part only):
//!
//! ```json
//! {
//!   "cpuid_modifiers": [
//!     {
//!       "leaf": "0x1",
//!       "subleaf": "0x0",
//!       "flags": 0,
//!       "modifiers": [
//!         { "register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0x" }
//!       ]
//!     }
//!   ]
//! }
//! ```
//!
//! * `leaf`, `subleaf`: a number, or a string holding a hexadecimal (`0x..`) or decimal number.
//!   `subleaf` defaults to 0.
//! * `flags`: the KVM CPUID entry flags of the leaf (as in Firecracker templates); optional,
//!   informational — entries are matched by leaf and subleaf.
//! * `register`: `eax`, `ebx`, `ecx` or `edx`.
//! * `bitmap`: `0b` and exactly 32 characters, most significant bit first: `0` clears the bit,
//!   `1` sets it and `x` keeps the value KVM/the host reported.
//!
//! Unknown fields are rejected, so a misspelt key never silently does nothing.
//!
//! ```
//! use vmm::cpu_template::CpuTemplate;
//!
//! let template = CpuTemplate::from_json(
//!     r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": 0, "modifiers": [
//!         {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0x"}]}]}"#,
//! )
//! .unwrap();
//! assert_eq!(template.cpuid_modifiers[0].modifiers[0].bitmap.apply(0b11), 0b01);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use kvm_bindings::CpuId;
use serde::Deserialize;
use serde_json::Value;

/// Errors reading, parsing or applying a CPU template.
#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    /// The template file could not be read.
    #[error("cannot read the CPU template {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The template is not JSON of the expected shape (this includes unknown fields).
    #[error("invalid CPU template: {0}")]
    Json(#[from] serde_json::Error),
    /// A leaf, subleaf or flags value is not a 32-bit number.
    #[error(
        "invalid CPU template: {location}.{field} = {value}: expected a 32-bit number, \
         or a string holding a hexadecimal (0x...) or decimal one"
    )]
    InvalidNumber {
        /// Where in the template, e.g. `cpuid_modifiers[2]`.
        location: String,
        /// `leaf`, `subleaf` or `flags`.
        field: &'static str,
        /// The value as written.
        value: String,
    },
    /// A register name is not one of eax, ebx, ecx, edx.
    #[error(
        "invalid CPU template: {location}.register = {name:?}: expected \"eax\", \"ebx\", \
         \"ecx\" or \"edx\""
    )]
    InvalidRegister {
        /// Where in the template, e.g. `cpuid_modifiers[0].modifiers[1]`.
        location: String,
        /// The name as written.
        name: String,
    },
    /// A bitmap is malformed.
    #[error("invalid CPU template: {location}.bitmap = {bitmap:?}: {reason}")]
    InvalidBitmap {
        /// Where in the template, e.g. `cpuid_modifiers[0].modifiers[1]`.
        location: String,
        /// The bitmap as written.
        bitmap: String,
        /// What is wrong with it.
        reason: BitmapError,
    },
    /// The template modifies a CPUID leaf/subleaf that the CPUID it is applied to lacks.
    #[error(
        "the CPU template modifies CPUID leaf {leaf:#x} subleaf {subleaf:#x}, which this \
         host/KVM does not report"
    )]
    LeafNotPresent {
        /// The leaf (function).
        leaf: u32,
        /// The subleaf (index).
        subleaf: u32,
    },
}

/// What is wrong with a template bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The bitmap does not start with `0b`.
    #[error("a bitmap starts with \"0b\"")]
    MissingPrefix,
    /// The bitmap does not have 32 digits.
    #[error("a bitmap has exactly 32 characters after \"0b\", this one has {0}")]
    WrongLength(usize),
    /// A digit is not 0, 1 or x.
    #[error("character {character:?} for bit {bit} is not 0, 1 or x")]
    BadCharacter {
        /// The offending character.
        character: char,
        /// The bit it stands for (31 is the first character).
        bit: u32,
    },
}

/// One of the four CPUID output registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuidRegister {
    /// Parses `eax`, `ebx`, `ecx` or `edx` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "eax" => Some(Self::Eax),
            "ebx" => Some(Self::Ebx),
            "ecx" => Some(Self::Ecx),
            "edx" => Some(Self::Edx),
            _ => None,
        }
    }

    /// The register's value in a CPUID entry.
    pub fn get(self, entry: &kvm_bindings::kvm_cpuid_entry2) -> u32 {
        match self {
            Self::Eax => entry.eax,
            Self::Ebx => entry.ebx,
            Self::Ecx => entry.ecx,
            Self::Edx => entry.edx,
        }
    }

    /// A mutable reference to the register in a CPUID entry.
    pub fn get_mut(self, entry: &mut kvm_bindings::kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Self::Eax => &mut entry.eax,
            Self::Ebx => &mut entry.ebx,
            Self::Ecx => &mut entry.ecx,
            Self::Edx => &mut entry.edx,
        }
    }
}

impl fmt::Display for CpuidRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Eax => "eax",
            Self::Ebx => "ebx",
            Self::Ecx => "ecx",
            Self::Edx => "edx",
        })
    }
}

/// The bits of a register a template decides, and the values it gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterValueFilter {
    /// Bits set here are decided by the template; the others keep their value.
    pub filter: u32,
    /// Values of the decided bits (zero outside `filter`).
    pub value: u32,
}

impl RegisterValueFilter {
    /// Parses a `0b` + 32 × {0, 1, x} bitmap, most significant bit first.
    pub fn parse(bitmap: &str) -> Result<Self, BitmapError> {
        let digits = bitmap
            .strip_prefix("0b")
            .ok_or(BitmapError::MissingPrefix)?;
        let len = digits.chars().count();
        if len != 32 {
            return Err(BitmapError::WrongLength(len));
        }
        let mut filter = RegisterValueFilter::default();
        for (i, character) in digits.chars().enumerate() {
            let bit = 31 - i as u32;
            match character {
                '0' => filter.filter |= 1 << bit,
                '1' => {
                    filter.filter |= 1 << bit;
                    filter.value |= 1 << bit;
                }
                'x' | 'X' => {}
                _ => return Err(BitmapError::BadCharacter { character, bit }),
            }
        }
        Ok(filter)
    }

    /// Returns `register` with the decided bits replaced.
    pub fn apply(&self, register: u32) -> u32 {
        (register & !self.filter) | (self.value & self.filter)
    }
}

/// One register modification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidRegisterModifier {
    /// The register to modify.
    pub register: CpuidRegister,
    /// What to set, clear and keep.
    pub bitmap: RegisterValueFilter,
}

/// The modifications of one CPUID leaf/subleaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidLeafModifier {
    /// The leaf (CPUID function, EAX input).
    pub leaf: u32,
    /// The subleaf (CPUID index, ECX input).
    pub subleaf: u32,
    /// KVM CPUID entry flags as written in the template (informational).
    pub flags: u32,
    /// The register modifications, applied in order.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// A custom CPU template: CPUID masks applied on top of what skiff computes for a vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// The CPUID leaves to modify, applied in order.
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    #[serde(default)]
    cpuid_modifiers: Vec<RawLeafModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeafModifier {
    leaf: Value,
    #[serde(default)]
    subleaf: Option<Value>,
    #[serde(default)]
    flags: Option<Value>,
    modifiers: Vec<RawRegisterModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegisterModifier {
    register: String,
    bitmap: String,
}

/// Parses a template number: a JSON number, or a string with a hex (`0x`) or decimal number.
fn parse_number(value: &Value) -> Option<u32> {
    match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

fn number_field(
    value: Option<&Value>,
    location: &str,
    field: &'static str,
) -> Result<u32, CpuTemplateError> {
    match value {
        None => Ok(0),
        Some(v) => parse_number(v).ok_or_else(|| CpuTemplateError::InvalidNumber {
            location: location.to_string(),
            field,
            value: v.to_string(),
        }),
    }
}

impl CpuTemplate {
    /// Parses a template from JSON, checking every field.
    pub fn from_json(json: &str) -> Result<Self, CpuTemplateError> {
        let raw: RawTemplate = serde_json::from_str(json)?;
        let mut cpuid_modifiers = Vec::with_capacity(raw.cpuid_modifiers.len());
        for (i, leaf) in raw.cpuid_modifiers.iter().enumerate() {
            let location = format!("cpuid_modifiers[{i}]");
            let mut modifiers = Vec::with_capacity(leaf.modifiers.len());
            for (j, m) in leaf.modifiers.iter().enumerate() {
                let location = format!("{location}.modifiers[{j}]");
                let register = CpuidRegister::from_name(&m.register).ok_or_else(|| {
                    CpuTemplateError::InvalidRegister {
                        location: location.clone(),
                        name: m.register.clone(),
                    }
                })?;
                let bitmap = RegisterValueFilter::parse(&m.bitmap).map_err(|reason| {
                    CpuTemplateError::InvalidBitmap {
                        location: location.clone(),
                        bitmap: m.bitmap.clone(),
                        reason,
                    }
                })?;
                modifiers.push(CpuidRegisterModifier { register, bitmap });
            }
            cpuid_modifiers.push(CpuidLeafModifier {
                leaf: number_field(Some(&leaf.leaf), &location, "leaf")?,
                subleaf: number_field(leaf.subleaf.as_ref(), &location, "subleaf")?,
                flags: number_field(leaf.flags.as_ref(), &location, "flags")?,
                modifiers,
            });
        }
        Ok(CpuTemplate { cpuid_modifiers })
    }

    /// Reads and parses a template file.
    pub fn from_file(path: &Path) -> Result<Self, CpuTemplateError> {
        let json = std::fs::read_to_string(path).map_err(|source| CpuTemplateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json)
    }

    /// Applies the template to `cpuid`.
    ///
    /// Every leaf/subleaf the template names must be present; if one is missing, `cpuid` is left
    /// unchanged and the error names it.
    pub fn apply(&self, cpuid: &mut CpuId) -> Result<(), CpuTemplateError> {
        let entries = cpuid.as_mut_slice();
        for m in &self.cpuid_modifiers {
            if !entries
                .iter()
                .any(|e| e.function == m.leaf && e.index == m.subleaf)
            {
                return Err(CpuTemplateError::LeafNotPresent {
                    leaf: m.leaf,
                    subleaf: m.subleaf,
                });
            }
        }
        for m in &self.cpuid_modifiers {
            for entry in entries
                .iter_mut()
                .filter(|e| e.function == m.leaf && e.index == m.subleaf)
            {
                for r in &m.modifiers {
                    let reg = r.register.get_mut(entry);
                    *reg = r.bitmap.apply(*reg);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0x000906ea, 0x0010_0800, 0xfffa_3203, 0x178b_fbff]),
            entry(7, 0, [0, 0xffff_ffff, 0, 0]),
            entry(7, 1, [0xffff_ffff, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    const KEEP: &str = "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

    #[test]
    fn bitmap_parsing() {
        let f = RegisterValueFilter::parse("0b1xxxxxxxxxxxxxxxxxxxxxxxxxxxxx0x").unwrap();
        assert_eq!(f.filter, 0x8000_0002);
        assert_eq!(f.value, 0x8000_0000);
        assert_eq!(f.apply(0x0000_0003), 0x8000_0001);
        assert_eq!(
            RegisterValueFilter::parse(KEEP).unwrap().apply(0x1234),
            0x1234
        );
        let all_ones = format!("0b{}", "1".repeat(32));
        assert_eq!(
            RegisterValueFilter::parse(&all_ones).unwrap().apply(0),
            u32::MAX
        );
    }

    #[test]
    fn template_sets_clears_and_keeps_bits() {
        let json = r#"{"cpuid_modifiers": [
            {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                {"register": "ecx", "bitmap": "0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxx1x"},
                {"register": "edx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx0000"}
            ]},
            {"leaf": 7, "subleaf": "1", "modifiers": [
                {"register": "EAX", "bitmap": "0b00000000000000000000000000000001"}
            ]},
            {"leaf": "0x7", "modifiers": [
                {"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxx0000000000000000"}
            ]}
        ]}"#;
        let t = CpuTemplate::from_json(json).unwrap();
        assert_eq!(t.cpuid_modifiers.len(), 3);
        assert_eq!(t.cpuid_modifiers[2].subleaf, 0, "subleaf defaults to 0");

        let mut c = cpuid();
        let before = c.clone();
        t.apply(&mut c).unwrap();
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ecx, (0xfffa_3203 & !0x8000_0000) | 0b10);
        assert_eq!(leaf1.edx, 0x178b_fbf0);
        assert_eq!(
            leaf1.eax, 0x000906ea,
            "untouched registers keep their value"
        );
        assert_eq!(leaf1.ebx, 0x0010_0800);
        assert_eq!(find(&c, 7, 1).eax, 1);
        assert_eq!(find(&c, 7, 0).ebx, 0xffff_0000);
        assert_eq!(find(&c, 0, 0), find(&before, 0, 0));
    }

    #[test]
    fn empty_template_is_valid() {
        let t = CpuTemplate::from_json("{}").unwrap();
        let mut c = cpuid();
        t.apply(&mut c).unwrap();
        assert_eq!(c, cpuid());
    }

    #[test]
    fn missing_leaf_is_named_and_nothing_changes() {
        let json = format!(
            r#"{{"cpuid_modifiers": [
                {{"leaf": "0x1", "modifiers": [{{"register": "ecx", "bitmap": "0b{}"}}]}},
                {{"leaf": "0x80000001", "subleaf": 0, "modifiers": []}}
            ]}}"#,
            "0".repeat(32)
        );
        let t = CpuTemplate::from_json(&json).unwrap();
        let mut c = cpuid();
        let err = t.apply(&mut c).unwrap_err();
        assert!(matches!(
            err,
            CpuTemplateError::LeafNotPresent {
                leaf: 0x8000_0001,
                subleaf: 0
            }
        ));
        assert!(err.to_string().contains("0x80000001"), "{err}");
        assert_eq!(c, cpuid(), "nothing applied");

        // A present leaf with an absent subleaf.
        let t = CpuTemplate::from_json(
            r#"{"cpuid_modifiers": [{"leaf": 7, "subleaf": 2, "modifiers": []}]}"#,
        )
        .unwrap();
        assert!(matches!(
            t.apply(&mut c),
            Err(CpuTemplateError::LeafNotPresent {
                leaf: 7,
                subleaf: 2
            })
        ));
    }

    fn one_modifier(leaf: &str, register: &str, bitmap: &str) -> String {
        format!(
            r#"{{"cpuid_modifiers": [{{"leaf": {leaf}, "subleaf": 0, "flags": 0,
                "modifiers": [{{"register": "{register}", "bitmap": "{bitmap}"}}]}}]}}"#
        )
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let top = r#"{"cpuid_modifiers": [], "msr_modifiers": []}"#;
        let err = CpuTemplate::from_json(top).unwrap_err();
        assert!(matches!(err, CpuTemplateError::Json(_)));
        assert!(err.to_string().contains("msr_modifiers"), "{err}");

        let leaf = r#"{"cpuid_modifiers": [{"leaf": 1, "sublef": 0, "modifiers": []}]}"#;
        let err = CpuTemplate::from_json(leaf).unwrap_err();
        assert!(err.to_string().contains("sublef"), "{err}");

        let reg = format!(
            r#"{{"cpuid_modifiers": [{{"leaf": 1, "modifiers": [
                {{"register": "eax", "bitmap": "{KEEP}", "mask": 1}}]}}]}}"#
        );
        let err = CpuTemplate::from_json(&reg).unwrap_err();
        assert!(err.to_string().contains("mask"), "{err}");

        assert!(matches!(
            CpuTemplate::from_json("not json"),
            Err(CpuTemplateError::Json(_))
        ));
        let missing = r#"{"cpuid_modifiers": [{"leaf": 1}]}"#;
        let err = CpuTemplate::from_json(missing).unwrap_err();
        assert!(err.to_string().contains("modifiers"), "{err}");
    }

    #[test]
    fn bad_register_is_rejected() {
        let err = CpuTemplate::from_json(&one_modifier("1", "exx", KEEP)).unwrap_err();
        match &err {
            CpuTemplateError::InvalidRegister { location, name } => {
                assert_eq!(location, "cpuid_modifiers[0].modifiers[0]");
                assert_eq!(name, "exx");
            }
            e => panic!("unexpected {e}"),
        }
        assert!(err.to_string().contains("\"exx\""), "{err}");
    }

    #[test]
    fn bad_bitmaps_are_rejected() {
        let cases = [
            (
                "1bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                BitmapError::MissingPrefix,
            ),
            (
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                BitmapError::MissingPrefix,
            ),
            (
                "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                BitmapError::WrongLength(31),
            ),
            (
                "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                BitmapError::WrongLength(33),
            ),
            ("0b", BitmapError::WrongLength(0)),
            (
                "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx2x",
                BitmapError::BadCharacter {
                    character: '2',
                    bit: 1,
                },
            ),
            (
                "0b?xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                BitmapError::BadCharacter {
                    character: '?',
                    bit: 31,
                },
            ),
        ];
        for (bitmap, expected) in cases {
            let err = CpuTemplate::from_json(&one_modifier("1", "ecx", bitmap)).unwrap_err();
            match &err {
                CpuTemplateError::InvalidBitmap {
                    location,
                    bitmap: b,
                    reason,
                } => {
                    assert_eq!(location, "cpuid_modifiers[0].modifiers[0]");
                    assert_eq!(b, bitmap);
                    assert_eq!(*reason, expected, "{bitmap}");
                }
                e => panic!("unexpected {e} for {bitmap}"),
            }
            assert!(err.to_string().contains(bitmap), "{err}");
        }
    }

    #[test]
    fn bad_numbers_are_rejected() {
        for leaf in [
            r#""0xzz""#,
            r#""one""#,
            "-1",
            "4294967296",
            r#""0x100000000""#,
            "1.5",
            "true",
            "null",
        ] {
            let err = CpuTemplate::from_json(&one_modifier(leaf, "eax", KEEP)).unwrap_err();
            match &err {
                CpuTemplateError::InvalidNumber {
                    location, field, ..
                } => {
                    assert_eq!(location, "cpuid_modifiers[0]");
                    assert_eq!(*field, "leaf");
                }
                e => panic!("unexpected {e} for {leaf}"),
            }
        }
        let json = r#"{"cpuid_modifiers": [{"leaf": 1, "modifiers": []},
                {"leaf": 1, "subleaf": "0xg", "modifiers": []}]}"#;
        let err = CpuTemplate::from_json(json).unwrap_err();
        assert!(matches!(
            &err,
            CpuTemplateError::InvalidNumber { location, field: "subleaf", .. } if location == "cpuid_modifiers[1]"
        ));
        // Accepted spellings.
        for (leaf, expected) in [
            (r#""0x8000001e""#, 0x8000_001e),
            (r#""0X1F""#, 0x1f),
            (r#""13""#, 13),
            ("2147483656", 0x8000_0008),
        ] {
            let t = CpuTemplate::from_json(&one_modifier(leaf, "eax", KEEP)).unwrap();
            assert_eq!(t.cpuid_modifiers[0].leaf, expected);
        }
    }

    #[test]
    fn from_file() {
        let dir = std::env::temp_dir().join(format!("skiff-cpu-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        std::fs::write(&path, one_modifier(r#""0x1""#, "ecx", KEEP)).unwrap();
        let t = CpuTemplate::from_file(&path).unwrap();
        assert_eq!(t.cpuid_modifiers[0].leaf, 1);

        let missing = dir.join("missing.json");
        let err = CpuTemplate::from_file(&missing).unwrap_err();
        assert!(matches!(err, CpuTemplateError::Read { .. }));
        assert!(err.to_string().contains("missing.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
