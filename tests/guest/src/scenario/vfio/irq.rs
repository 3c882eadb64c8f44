//! MSI-X, level-triggered INTx and MSI.

use super::*;

/// MSI-X vector 0 -> an IDT vector; a command with IRQ_CONTROL = DONE interrupts; IRQ_STATUS
/// clears; the next command interrupts again.
pub(super) fn msix_test(
    d: &Dev,
    cfg: &'static dyn ConfigSpace,
    prm: &Params,
    all: &[Dev],
    ctx: &mut Option<IommuCtx>,
) {
    let v = prm
        .msix_vector
        .checked_add(d.bdf_index(all) as u8)
        .unwrap_or(prm.msix_vector);
    let m = &d.msix;
    for e in 0..m.entries {
        m.set_masked(e, true);
    }
    m.program(0, v, lapic::id());
    m.set_enabled(cfg, true);
    m.set_masked(0, false);
    expect(
        "msix-enabled",
        Some(d),
        m.enabled(cfg) && !m.masked(0) && m.data(0) == u32::from(v),
        format!(
            "enable {} entry 0 masked {} data {:#x}",
            m.enabled(cfg),
            m.masked(0),
            m.data(0)
        ),
    );
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);
    interrupts::enable();

    for (k, check) in ["msix-interrupt", "msix-second-interrupt"]
        .iter()
        .enumerate()
    {
        let (cmd, b) = small_cmd(d, ctx, 0x100 + k as u32);
        let before = interrupts::count(v);
        let s = d.start(&cmd);
        if interrupts::wait_for(v, before, prm.timeout_ms).is_none() {
            bad(
                check,
                Some(d),
                format!(
                    "no interrupt on vector {v:#04x} within {} ms (IRQ_STATUS {:#x}, completed {})",
                    prm.timeout_ms,
                    d.rd(regs::REG_IRQ_STATUS),
                    d.rd(regs::REG_COMPLETED)
                ),
            );
        }
        if d.finish(check, &cmd, s, prm.timeout_ms) != Outcome::Completed {
            bad(check, Some(d), "the command failed");
        }
        verify_pattern(check, d, &b, cmd.seed);
        let st = d.rd(regs::REG_IRQ_STATUS);
        if st & regs::IRQ_DONE == 0 {
            bad(
                check,
                Some(d),
                format!("IRQ_STATUS {st:#x} lacks IRQ_DONE after the interrupt"),
            );
        }
        println!("vfio: {} msix vector {:#04x} delivered", d.name, v);
        ok(check, Some(d));
        d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
        let st = d.rd(regs::REG_IRQ_STATUS);
        if k == 0 {
            expect(
                "msix-status-clear",
                Some(d),
                st & regs::IRQ_DONE == 0,
                format!("IRQ_STATUS reads {st:#x} after writing IRQ_DONE"),
            );
        }
    }
    d.wr(regs::REG_IRQ_CONTROL, 0);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    m.set_masked(0, true);
    m.set_enabled(cfg, false);
}

/// The GSI of `d`'s INTx: `vfio.gsi=` (per device, in BDF order), else the DSDT's static
/// `_PRT`, else the Interrupt Line register.
pub(super) fn intx_gsi(
    d: &Dev,
    cfg: &dyn ConfigSpace,
    prm: &Params,
    index: usize,
    pin: u8,
    prt: &[aml::PrtEntry],
) -> (u32, &'static str) {
    if let Some(&g) = prm.gsis.get(index) {
        return (g, "vfio.gsi");
    }
    let bdf = d.func.bdf;
    if let Some(e) = prt.iter().find(|e| e.matches(bdf.dev, bdf.func, pin - 1)) {
        return (e.gsi as u32, "_PRT");
    }
    let line = cfg.read8(bdf, 0x3C);
    if line != 0 && line != 0xFF {
        return (u32::from(line), "interrupt line");
    }
    bad(
        "intx-gsi",
        Some(d),
        "no vfio.gsi=, no static _PRT entry for the device, and the Interrupt Line register is unset",
    )
}

/// INTx through the I/O APIC, level-triggered: the line stays asserted until IRQ_STATUS is
/// cleared (seen by unmasking the pin while the status is still set), goes down once it is,
/// and the next command raises it again.
#[allow(clippy::too_many_arguments)]
pub(super) fn intx_test(
    d: &Dev,
    cfg: &'static dyn ConfigSpace,
    prm: &Params,
    all: &[Dev],
    p: &Platform,
    prt: &[aml::PrtEntry],
    ctx: &mut Option<IommuCtx>,
) {
    let index = d.bdf_index(all);
    let v = prm
        .intx_vector
        .checked_add(index as u8)
        .unwrap_or(prm.intx_vector);
    let bdf = d.func.bdf;
    d.msix.set_enabled(cfg, false);
    update_command(cfg, bdf, 0, command::INTX_DISABLE);
    let pin = cfg.read8(bdf, 0x3D);
    expect(
        "intx-pin",
        Some(d),
        pin == 1,
        format!("Interrupt Pin register {pin}, expected 1 (INTA#)"),
    );
    let (gsi, from) = intx_gsi(d, cfg, prm, index, pin, prt);
    println!(
        "vfio: {} intx pin INTA gsi {} (from {}) vector {:#04x} level active-low",
        d.name, gsi, from, v
    );
    let Some(madt) = &p.madt else {
        bad(
            "intx-interrupt",
            Some(d),
            "no MADT: cannot find the I/O APIC",
        );
    };
    let Some(ioapic) = madt
        .ioapics
        .iter()
        .map(|a| IoApic::new(u64::from(a.addr), a.gsi_base))
        .find(|a| a.serves(gsi))
    else {
        bad(
            "intx-interrupt",
            Some(d),
            format!("no I/O APIC in the MADT serves gsi {gsi}"),
        );
    };
    let t = prm.timeout_ms;
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);

    // Phase 1: the handler masks the pin (leaving the device's status alone).
    interrupts::disable();
    interrupts::set_status_clear(v, 0, 0);
    interrupts::set_mask_on_arrival(v, ioapic.base(), gsi - ioapic.gsi_base);
    ioapic.route(gsi, v, Trigger::Level, Polarity::Low, lapic::id());
    interrupts::enable();

    let (cmd, b) = small_cmd(d, ctx, 0x200);
    let before = interrupts::count(v);
    let s = d.start(&cmd);
    if interrupts::wait_for(v, before, t).is_none() {
        bad(
            "intx-interrupt",
            Some(d),
            format!(
                "no interrupt on gsi {gsi} (vector {v:#04x}) within {t} ms; ioapic entry {:#x}, IRQ_STATUS {:#x}",
                ioapic.entry_low(gsi),
                d.rd(regs::REG_IRQ_STATUS)
            ),
        );
    }
    if d.finish("intx-interrupt", &cmd, s, t) != Outcome::Completed {
        bad("intx-interrupt", Some(d), "the command failed");
    }
    verify_pattern("intx-interrupt", d, &b, cmd.seed);
    let st = d.rd(regs::REG_IRQ_STATUS);
    expect(
        "intx-interrupt",
        Some(d),
        st & regs::IRQ_DONE != 0,
        format!("IRQ_STATUS {st:#x} lacks IRQ_DONE after the interrupt"),
    );

    // Phase 2: status still set -> unmasking the pin must interrupt again (level held).
    time::delay_ms(100);
    let now = interrupts::count(v);
    interrupts::disable();
    ioapic.unmask(gsi);
    interrupts::enable();
    if interrupts::wait_for(v, now, t).is_none() {
        bad(
            "intx-level-held",
            Some(d),
            format!(
                "IRQ_STATUS still {:#x}, pin unmasked, but no new interrupt within {t} ms (ioapic entry {:#x}): the line did not stay asserted",
                d.rd(regs::REG_IRQ_STATUS),
                ioapic.entry_low(gsi)
            ),
        );
    }
    ok("intx-level-held", Some(d));

    // Phase 3: clear IRQ_STATUS, unmask: the line must go down (a few spurious deliveries of
    // the old assertion are tolerated) and the remote IRR clear.
    interrupts::disable();
    interrupts::set_mask_on_arrival(v, 0, 0);
    interrupts::set_status_clear(v, d.regs + regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    interrupts::reset_status_seen(v);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    let st = d.rd(regs::REG_IRQ_STATUS);
    let base = interrupts::count(v);
    ioapic.unmask(gsi);
    interrupts::enable();
    expect(
        "intx-status-clear",
        Some(d),
        st & regs::IRQ_DONE == 0,
        format!("IRQ_STATUS reads {st:#x} after writing IRQ_DONE"),
    );
    let settled = settle(v);
    let extra = settled - base;
    let low = ioapic.entry_low(gsi);
    expect(
        "intx-deasserted",
        Some(d),
        extra <= 2 && low & (1 << 14) == 0,
        format!(
            "{extra} interrupt(s) after IRQ_STATUS was cleared (line stuck?), ioapic entry {low:#x}"
        ),
    );

    // Phase 4: the next command interrupts again; the handler clears IRQ_STATUS.
    let (cmd, b) = small_cmd(d, ctx, 0x201);
    let s = d.start(&cmd);
    if interrupts::wait_for(v, settled, t).is_none() {
        bad(
            "intx-next-command",
            Some(d),
            format!("no interrupt on gsi {gsi} for the next command within {t} ms"),
        );
    }
    if d.finish("intx-next-command", &cmd, s, t) != Outcome::Completed {
        bad("intx-next-command", Some(d), "the command failed");
    }
    verify_pattern("intx-next-command", d, &b, cmd.seed);
    let after = settle(v);
    let seen = interrupts::status_seen(v);
    let low = ioapic.entry_low(gsi);
    expect(
        "intx-next-command",
        Some(d),
        seen & regs::IRQ_DONE != 0 && after - settled <= 3 && low & (1 << 14) == 0,
        format!(
            "handler saw IRQ_STATUS bits {seen:#x}, {} interrupt(s), ioapic entry {low:#x}",
            after - settled
        ),
    );
    println!(
        "vfio: {} intx {} interrupt(s) in all, {} after IRQ_STATUS was cleared",
        d.name,
        after - before,
        extra
    );

    interrupts::disable();
    ioapic.mask(gsi);
    interrupts::set_status_clear(v, 0, 0);
    d.wr(regs::REG_IRQ_CONTROL, 0);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    update_command(cfg, bdf, command::INTX_DISABLE, 0);
    interrupts::enable();
}

/// Wait until `vector`'s count stops changing (300 ms steps, at most ~3 s); the final count.
pub(super) fn settle(vector: u8) -> u32 {
    let deadline = time::Deadline::after_ms(3_000);
    let mut last = interrupts::count(vector);
    loop {
        time::delay_ms(300);
        let now = interrupts::count(vector);
        if now == last || deadline.expired() {
            return now;
        }
        last = now;
    }
}

/// How long a masked MSI vector must stay quiet after its command completed.
const MSI_MASKED_QUIET_MS: u64 = 300;

/// MSI (`vfio.msi=1`): the capability (ID 0x05) in the guest's view of config space; message
/// address and data programmed, MSI-X off, MSI on (one vector): a command with IRQ_CONTROL = DONE
/// interrupts on the MSI vector; with the per-vector mask bit set the next command's interrupt is
/// held and arrives, once, on unmask; once MSI is off, a command no longer interrupts on it.
pub(super) fn msi_test(
    d: &Dev,
    cfg: &'static dyn ConfigSpace,
    prm: &Params,
    all: &[Dev],
    ctx: &mut Option<IommuCtx>,
) {
    let bdf = d.func.bdf;
    let t = prm.timeout_ms;
    let caps = capabilities(cfg, bdf);
    let Some(&(cap, _)) = caps.iter().find(|&&(_, id)| id == msi::CAP_ID) else {
        let list: Vec<String> = caps
            .iter()
            .map(|&(off, id)| format!("{id:#04x} at {off:#x}"))
            .collect();
        bad(
            "msi-capability",
            Some(d),
            format!(
                "no MSI capability (ID 0x05) in the capability list [{}]: vfio.msi=1 needs skiff-testdev --msi and a VMM that shows MSI to the guest",
                list.join(", ")
            ),
        );
    };
    let m = Msi::parse(cfg, bdf, cap);
    println!(
        "vfio: {} msi capability at {:#x} control {:#06x}: {}-bit address, {}per-vector masking, {} vector(s) capable",
        d.name,
        cap,
        m.control,
        if m.is64() { 64 } else { 32 },
        if m.per_vector_mask() { "" } else { "no " },
        m.vectors_capable()
    );
    expect(
        "msi-capability",
        Some(d),
        m.control & msi::CTRL_ENABLE == 0 && m.vectors_capable() <= u32::from(regs::MSI_VECTORS),
        format!(
            "control {:#06x}: enabled before the guest enabled it, or more than the device's {} vector(s)",
            m.control,
            regs::MSI_VECTORS
        ),
    );

    // MSI-X off (never both), the vector programmed and unmasked, then MSI on.
    let v = prm
        .msi_vector
        .checked_add(d.bdf_index(all) as u8)
        .unwrap_or(prm.msi_vector);
    let apic = lapic::id();
    d.msix.set_enabled(cfg, false);
    interrupts::disable();
    interrupts::set_status_clear(v, 0, 0);
    interrupts::set_mask_on_arrival(v, 0, 0);
    interrupts::enable();
    m.set_masked(cfg, 0, false);
    m.program(cfg, v, apic);
    m.set_enabled(cfg, true);
    let (addr, data, mask) = (m.address(cfg), m.data(cfg), m.mask_bits(cfg));
    expect(
        "msi-enabled",
        Some(d),
        m.enabled(cfg)
            && !d.msix.enabled(cfg)
            && addr == u64::from(m.address_for(apic))
            && data == u16::from(v)
            && mask & 1 == 0,
        format!(
            "msi enable {} (msix enable {}), address {addr:#x} data {data:#x} mask bits {mask:#x}; want address {:#x} data {v:#x} vector 0 unmasked",
            m.enabled(cfg),
            d.msix.enabled(cfg),
            m.address_for(apic)
        ),
    );
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    d.wr(regs::REG_IRQ_CONTROL, regs::IRQ_DONE);

    // An interrupt on the MSI vector.
    let (cmd, b) = small_cmd(d, ctx, 0x300);
    let before = interrupts::count(v);
    let s = d.start(&cmd);
    if interrupts::wait_for(v, before, t).is_none() {
        bad(
            "msi-interrupt",
            Some(d),
            format!(
                "no interrupt on vector {v:#04x} within {t} ms (IRQ_STATUS {:#x}, completed {}, msi control {:#06x}, pending bits {:#x})",
                d.rd(regs::REG_IRQ_STATUS),
                d.rd(regs::REG_COMPLETED),
                cfg.read16(bdf, cap + 2),
                m.pending_bits(cfg)
            ),
        );
    }
    if d.finish("msi-interrupt", &cmd, s, t) != Outcome::Completed {
        bad("msi-interrupt", Some(d), "the command failed");
    }
    verify_pattern("msi-interrupt", d, &b, cmd.seed);
    let st = d.rd(regs::REG_IRQ_STATUS);
    if st & regs::IRQ_DONE == 0 {
        bad(
            "msi-interrupt",
            Some(d),
            format!("IRQ_STATUS {st:#x} lacks IRQ_DONE after the interrupt"),
        );
    }
    println!("vfio: {} msi vector {:#04x} delivered", d.name, v);
    ok("msi-interrupt", Some(d));
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    let st = d.rd(regs::REG_IRQ_STATUS);
    expect(
        "msi-status-clear",
        Some(d),
        st & regs::IRQ_DONE == 0,
        format!("IRQ_STATUS reads {st:#x} after writing IRQ_DONE"),
    );

    // Masked: the next command's interrupt is held; unmasking delivers it, once.
    if m.per_vector_mask() {
        let base = settle(v);
        m.set_masked(cfg, 0, true);
        let mask = m.mask_bits(cfg);
        if mask & 1 == 0 {
            bad(
                "msi-masked-no-interrupt",
                Some(d),
                format!("the mask bit of vector 0 does not stick (mask bits {mask:#x})"),
            );
        }
        let (cmd, b) = small_cmd(d, ctx, 0x301);
        let s = d.start(&cmd);
        if d.finish("msi-masked-no-interrupt", &cmd, s, t) != Outcome::Completed {
            bad("msi-masked-no-interrupt", Some(d), "the command failed");
        }
        verify_pattern("msi-masked-no-interrupt", d, &b, cmd.seed);
        time::delay_ms(MSI_MASKED_QUIET_MS);
        let now = interrupts::count(v);
        let st = d.rd(regs::REG_IRQ_STATUS);
        println!(
            "vfio: {} msi masked: {} interrupt(s), pending bits {:#x}, IRQ_STATUS {:#x}",
            d.name,
            now - base,
            m.pending_bits(cfg),
            st
        );
        expect(
            "msi-masked-no-interrupt",
            Some(d),
            now == base && st & regs::IRQ_DONE != 0,
            format!(
                "{} interrupt(s) on vector {v:#04x} while it was masked, IRQ_STATUS {st:#x}",
                now - base
            ),
        );
        m.set_masked(cfg, 0, false);
        if interrupts::wait_for(v, now, t).is_none() {
            bad(
                "msi-mask-pending",
                Some(d),
                format!(
                    "the interrupt held while vector 0 was masked did not arrive within {t} ms of unmasking (mask bits {:#x}, pending bits {:#x})",
                    m.mask_bits(cfg),
                    m.pending_bits(cfg)
                ),
            );
        }
        let after = settle(v);
        expect(
            "msi-mask-pending",
            Some(d),
            after - now == 1,
            format!("{} interrupts after unmasking, want exactly 1", after - now),
        );
        d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
    } else {
        println!(
            "vfio: {} msi has no per-vector masking: msi-mask-pending skipped",
            d.name
        );
    }

    // MSI off: the next command no longer interrupts on the MSI vector (INTx stays disabled in
    // the command register, its I/O APIC pin masked).
    update_command(cfg, bdf, command::INTX_DISABLE, 0);
    m.set_enabled(cfg, false);
    let base = settle(v);
    let (cmd, b) = small_cmd(d, ctx, 0x302);
    let s = d.start(&cmd);
    if d.finish("msi-disabled", &cmd, s, t) != Outcome::Completed {
        bad("msi-disabled", Some(d), "the command failed");
    }
    verify_pattern("msi-disabled", d, &b, cmd.seed);
    time::delay_ms(MSI_MASKED_QUIET_MS);
    let now = interrupts::count(v);
    let ctrl = cfg.read16(bdf, cap + 2);
    expect(
        "msi-disabled",
        Some(d),
        ctrl & msi::CTRL_ENABLE == 0 && now == base,
        format!(
            "msi control {ctrl:#06x}, {} interrupt(s) on vector {v:#04x} after MSI was disabled",
            now - base
        ),
    );
    d.wr(regs::REG_IRQ_CONTROL, 0);
    d.wr(regs::REG_IRQ_STATUS, regs::IRQ_DONE);
}
