//! The VM's fixed platform devices on port I/O — COM1, i8042, CMOS/RTC, ACPI PM and GED — and
//! the PCI configuration mechanisms (0xCF8 ports and ECAM), built from one table and registered
//! on the buses and in the component registry.

use std::sync::{Arc, Mutex};

use devices::bus::SharedBusDevice;
use devices::legacy::{AcpiGed, AcpiPm, Cmos, EventFdTrigger, Serial, I8042};
use devices::{Bus, VmExitEvent};
use kvm_ioctls::VmFd;
use pci::{PciBus, PciConfigIo, PciConfigMmio};

use crate::boot;
use crate::config::{SerialConfig, VmConfig};
use crate::layout::*;
use crate::registry::{Registry, SharedComponent};
use crate::vm::VmError;

/// The platform devices other code needs to reach.
pub struct LegacyDevices {
    /// COM1, when configured.
    pub serial: Option<Arc<Mutex<Serial>>>,
    /// The ACPI generic event device (power button).
    pub ged: Arc<Mutex<AcpiGed>>,
    /// The irqfd triggers that must live as long as the VM.
    pub triggers: Vec<EventFdTrigger>,
}

/// One port I/O device: id, port, length, the bus device and, when it has state, the component.
struct PortDevice {
    id: &'static str,
    port: u16,
    len: u64,
    device: SharedBusDevice,
    component: Option<SharedComponent>,
}

/// An edge-triggered interrupt line on `gsi` through an irqfd.
fn irq_line(vm_fd: &VmFd, gsi: u32, id: &str) -> Result<(EventFdTrigger, EventFdTrigger), VmError> {
    let io = |source| VmError::EventFd {
        id: id.to_string(),
        source,
    };
    let t = EventFdTrigger::new().map_err(io)?;
    vm_fd
        .register_irqfd(t.eventfd(), gsi)
        .map_err(|source| VmError::Kvm {
            what: "KVM_IRQFD",
            source,
        })?;
    let keep = t.try_clone().map_err(io)?;
    Ok((t, keep))
}

/// Where COM1's output goes; `restoring` appends to a file instead of truncating it, so a
/// restored VM continues the output of the one it was saved from.
fn serial_output(
    config: &SerialConfig,
    restoring: bool,
) -> Result<Option<Box<dyn std::io::Write + Send>>, VmError> {
    Ok(match config {
        SerialConfig::Off => None,
        SerialConfig::Stdout => Some(Box::new(StdoutWriter)),
        SerialConfig::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(restoring)
                .truncate(!restoring)
                .open(p)
                .map_err(|source| VmError::Open {
                    what: "--serial file=",
                    path: p.display().to_string(),
                    source,
                })?,
        )),
    })
}

/// Build the platform devices, put them on `pio` (and ECAM on `mmio`) and register the ones with
/// state in `registry`.
pub fn create_legacy_devices(
    vm_fd: &VmFd,
    (pio, mmio): (&Bus, &Bus),
    exit: &Arc<VmExitEvent>,
    config: &VmConfig,
    restoring: bool,
    pci_bus: &Arc<Mutex<PciBus>>,
    registry: &mut Registry,
) -> Result<LegacyDevices, VmError> {
    let mut triggers = Vec::new();
    let mut irq = |gsi, id| -> Result<EventFdTrigger, VmError> {
        let (t, keep) = irq_line(vm_fd, gsi, id)?;
        triggers.push(keep);
        Ok(t)
    };
    let serial = match serial_output(&config.serial, restoring)? {
        Some(out) => {
            let line = Arc::new(irq(SERIAL_IRQ, "serial0")?);
            Some(Arc::new(Mutex::new(
                Serial::new(line, out).with_id("serial0"),
            )))
        }
        None => None,
    };
    let ged = Arc::new(Mutex::new(AcpiGed::new(Arc::new(irq(
        ACPI_GED_IRQ,
        "acpi-ged",
    )?))));
    let (below_4g, above_4g) = match boot::ram_ranges(config.memory.size).as_slice() {
        [(_, low), (_, high)] => (*low, *high),
        [(_, low)] => (*low, 0),
        _ => (0, 0),
    };
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    let cmos = Arc::new(Mutex::new(Cmos::new(below_4g, above_4g)));
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
        exit.clone(),
        ACPI_S5_SLEEP_TYPE,
        ACPI_RESET_VALUE,
    )));
    let mut table = vec![
        PortDevice {
            id: "i8042",
            port: I8042_PORT,
            len: 5,
            device: i8042.clone(),
            component: Some(i8042),
        },
        PortDevice {
            id: "cmos",
            port: CMOS_PORT,
            len: 2,
            device: cmos.clone(),
            component: Some(cmos),
        },
        PortDevice {
            id: "acpi-pm",
            port: ACPI_PM_PORT,
            len: ACPI_PM_SIZE,
            device: acpi_pm.clone(),
            component: Some(acpi_pm),
        },
        PortDevice {
            id: "acpi-ged",
            port: ACPI_GED_PORT,
            len: ACPI_GED_SIZE,
            device: ged.clone(),
            component: Some(ged.clone()),
        },
        PortDevice {
            id: "pci-config-io",
            port: PCI_CONFIG_IO_PORT,
            len: PCI_CONFIG_IO_SIZE,
            device: Arc::new(Mutex::new(PciConfigIo::new(pci_bus.clone()))),
            component: None,
        },
    ];
    if let Some(s) = &serial {
        table.push(PortDevice {
            id: "serial0",
            port: SERIAL_PORT,
            len: 8,
            device: s.clone(),
            component: Some(s.clone()),
        });
    }
    for d in table {
        pio.insert(d.device, u64::from(d.port), d.len)
            .map_err(|source| VmError::Bus { id: d.id, source })?;
        if let Some(c) = d.component {
            registry.register(d.id, d.id, None, c)?;
        }
    }
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(
            pci_bus.clone(),
            PCI_LAST_BUS,
        ))),
        PCI_ECAM_START,
        boot::ecam_size(),
    )
    .map_err(|source| VmError::Bus {
        id: "pci-ecam",
        source,
    })?;
    Ok(LegacyDevices {
        serial,
        ged,
        triggers,
    })
}

/// Unbuffered writer to standard output, so guest output appears as it is produced.
struct StdoutWriter;

impl std::io::Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}
