//! The Fixed ACPI Description Table: where the DSDT is and how to enter S5.

use super::Table;

/// FADT flag: hardware-reduced ACPI (no PM1 blocks; sleep through SLEEP_CONTROL_REG).
pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

/// An ACPI Generic Address Structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space_id: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Bit offset within the register.
    pub bit_offset: u8,
    /// Access size (1 = byte, 2 = word, 3 = dword, 4 = qword).
    pub access_size: u8,
    /// Address in that space.
    pub address: u64,
}

/// GAS space: system memory.
pub const SPACE_MEMORY: u8 = 0;
/// GAS space: system I/O.
pub const SPACE_IO: u8 = 1;

impl Gas {
    fn read(t: &Table, offset: usize) -> Option<Gas> {
        let raw: [u8; 12] = t.field(offset)?;
        Some(Gas {
            space_id: raw[0],
            bit_width: raw[1],
            bit_offset: raw[2],
            access_size: raw[3],
            address: u64::from_le_bytes(raw[4..12].try_into().ok()?),
        })
    }
}

/// The FADT fields skiff's tests care about.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fadt {
    /// Feature flags (offset 112).
    pub flags: u32,
    /// DSDT address: X_DSDT (offset 140) if nonzero, else DSDT (offset 40).
    pub dsdt: u64,
    /// PM1a control block I/O port (offset 64), or 0.
    pub pm1a_cnt_blk: u32,
    /// PM1b control block I/O port (offset 68), or 0.
    pub pm1b_cnt_blk: u32,
    /// X_PM1a_CNT_BLK (offset 172).
    pub x_pm1a_cnt_blk: Option<Gas>,
    /// SLEEP_CONTROL_REG (offset 244), for hardware-reduced ACPI.
    pub sleep_control: Option<Gas>,
    /// RESET_REG (offset 116), valid when flag RESET_REG_SUP is set.
    pub reset_reg: Option<Gas>,
    /// RESET_VALUE (offset 128).
    pub reset_value: u8,
}

/// FADT flag: the reset register is supported.
pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;

impl Fadt {
    /// Parse the FADT; fields beyond the table's length are left empty.
    pub fn parse(t: &Table) -> Fadt {
        let dsdt32: u32 = t.field(40).unwrap_or(0);
        let x_dsdt: u64 = t.field(140).unwrap_or(0);
        Fadt {
            flags: t.field(112).unwrap_or(0),
            dsdt: if x_dsdt != 0 {
                x_dsdt
            } else {
                u64::from(dsdt32)
            },
            pm1a_cnt_blk: t.field(64).unwrap_or(0),
            pm1b_cnt_blk: t.field(68).unwrap_or(0),
            x_pm1a_cnt_blk: Gas::read(t, 172).filter(|g| g.address != 0),
            sleep_control: Gas::read(t, 244).filter(|g| g.address != 0),
            reset_reg: Gas::read(t, 116).filter(|g| g.address != 0),
            reset_value: t.field(128).unwrap_or(0),
        }
    }

    /// Whether the platform is hardware-reduced ACPI.
    pub fn hw_reduced(&self) -> bool {
        self.flags & FLAG_HW_REDUCED_ACPI != 0
    }
}
