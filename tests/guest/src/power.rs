//! ACPI power-off (S5) as the FADT describes it.

use crate::acpi::fadt::{Gas, FLAG_RESET_REG_SUP, SPACE_IO, SPACE_MEMORY};
use crate::acpi::{aml, Acpi};
use crate::arch::port::{outb, outw};
use crate::arch::time::delay_ms;

/// SLP_EN in PM1x_CNT.
const PM1_SLP_EN: u16 = 1 << 13;
/// SLP_EN in SLEEP_CONTROL_REG.
const SLEEP_CTL_SLP_EN: u8 = 1 << 5;

fn write_gas_byte(gas: &Gas, value: u8) -> Result<(), &'static str> {
    match gas.space_id {
        SPACE_IO => {
            let port = u16::try_from(gas.address).map_err(|_| "I/O port out of range")?;
            outb(port, value);
        }
        SPACE_MEMORY => {
            if gas.address >= 1 << 32 {
                return Err("register above 4 GiB is not mapped");
            }
            // SAFETY: the register address comes from the FADT and is identity mapped; it is a
            // device register, written once to request power-off.
            unsafe { core::ptr::write_volatile(gas.address as *mut u8, value) };
        }
        _ => return Err("unsupported address space"),
    }
    Ok(())
}

fn write_gas_word(gas: &Gas, value: u16) -> Result<(), &'static str> {
    match gas.space_id {
        SPACE_IO => {
            let port = u16::try_from(gas.address).map_err(|_| "I/O port out of range")?;
            outw(port, value);
        }
        SPACE_MEMORY => {
            if gas.address >= 1 << 32 {
                return Err("register above 4 GiB is not mapped");
            }
            // SAFETY: as in `write_gas_byte`.
            unsafe { core::ptr::write_volatile(gas.address as *mut u16, value) };
        }
        _ => return Err("unsupported address space"),
    }
    Ok(())
}

/// Write the S5 request to the FADT's sleep registers. `Ok` means the request was written (if
/// the VMM honours it, execution stops shortly after).
pub fn request_s5(acpi: &Acpi) -> Result<(), &'static str> {
    let fadt = acpi.fadt().ok_or("no FADT")?;
    let dsdt = acpi.find(b"DSDT").ok_or("no DSDT")?;
    let slp_typ = aml::s5_slp_typ(dsdt).or_else(|e| {
        // Some firmware defines \_S5 in an SSDT.
        acpi.tables
            .iter()
            .filter(|t| t.signature.0 == *b"SSDT")
            .find_map(|t| aml::s5_slp_typ(t).ok())
            .ok_or(e)
    })?;
    if fadt.hw_reduced() {
        let reg = fadt
            .sleep_control
            .ok_or("hardware-reduced FADT without SLEEP_CONTROL_REG")?;
        write_gas_byte(&reg, ((slp_typ & 7) << 2) | SLEEP_CTL_SLP_EN)?;
    } else {
        let value = (u16::from(slp_typ & 7) << 10) | PM1_SLP_EN;
        if fadt.pm1a_cnt_blk != 0 {
            outw(fadt.pm1a_cnt_blk as u16, value);
        } else if let Some(gas) = fadt.x_pm1a_cnt_blk {
            write_gas_word(&gas, value)?;
        } else {
            return Err("FADT has no PM1a control block");
        }
        if fadt.pm1b_cnt_blk != 0 {
            outw(fadt.pm1b_cnt_blk as u16, value);
        }
    }
    Ok(())
}

/// Power off through ACPI; panics if that fails.
pub fn power_off(rsdp_hint: u64) -> ! {
    let result = Acpi::discover(rsdp_hint)
        .map_err(|_| "no ACPI tables")
        .and_then(|acpi| request_s5(&acpi));
    let reason = match result {
        Ok(()) => {
            // The VMM may complete the shutdown asynchronously; give it a moment.
            delay_ms(2000);
            "the VMM ignored the ACPI power-off request"
        }
        Err(e) => e,
    };
    crate::println!("power: ACPI power-off failed: {}", reason);
    panic!("power-off failed: {reason}");
}

/// Reset the machine through the FADT's reset register; panics if that fails.
pub fn reset(rsdp_hint: u64) -> ! {
    let result = Acpi::discover(rsdp_hint)
        .map_err(|_| "no ACPI tables")
        .and_then(|acpi| {
            let fadt = acpi.fadt().ok_or("no FADT")?;
            if fadt.flags & FLAG_RESET_REG_SUP == 0 {
                return Err("the FADT does not offer a reset register");
            }
            let reg = fadt.reset_reg.ok_or("the FADT's reset register is empty")?;
            write_gas_byte(&reg, fadt.reset_value)
        });
    let reason = match result {
        Ok(()) => {
            delay_ms(2000);
            "the VMM ignored the ACPI reset request"
        }
        Err(e) => e,
    };
    crate::println!("power: ACPI reset failed: {}", reason);
    panic!("reset failed: {reason}");
}
