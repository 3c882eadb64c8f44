//! Scenarios: what the guest does after boot, chosen with `scenario=NAME` on the command line.
//!
//! To add one: write `src/scenario/<name>.rs` with `pub fn run(boot: &BootInfo)`, declare the
//! module below and add a line to [`SCENARIOS`]. A scenario that returns is followed by an ACPI
//! power-off (a successful VM exit); a scenario that fails panics (a triple fault, i.e. a failing
//! VM exit).

mod boot;
mod clock;
mod counter;
mod demo;
mod dirty;
mod dirty_log;
mod hostile;
mod idle;
mod intx;
mod iommu;
mod iommu_bad;
mod msix;
mod panic;
mod platform;
mod poweroff;
mod reboot;
pub mod report;
mod serial_stream;
mod vfio;
mod virtio_blk;
mod virtio_console;
mod virtio_net;
mod virtio_rng;

use crate::bootinfo::BootInfo;

/// A named test program.
pub struct Scenario {
    /// Name used in `scenario=NAME`.
    pub name: &'static str,
    /// One-line description (listed in the README and on an unknown name).
    pub about: &'static str,
    /// Body; return to power off, panic to fail.
    pub run: fn(&BootInfo),
}

/// Scenario used when the command line names none.
pub const DEFAULT: &str = "demo";

/// All scenarios.
pub static SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "demo",
        about: "short friendly report of memory, ACPI, CPUs and PCI, then power off",
        run: demo::run,
    },
    Scenario {
        name: "boot",
        about: "detailed platform checks (e820, ACPI checksums, MADT, SMP, PCI ECAM vs CF8)",
        run: boot::run,
    },
    Scenario {
        name: "panic",
        about: "panic on purpose (a guest panic must become a failing VM exit)",
        run: panic::run,
    },
    Scenario {
        name: "counter",
        about: "print an increasing counter and a checksum of memory it keeps rewriting (pause/snapshot tests)",
        run: counter::run,
    },
    Scenario {
        name: "idle",
        about: "print a line, then halt forever (for pause, signal and lifecycle tests)",
        run: idle::run,
    },
    Scenario {
        name: "reboot",
        about: "reset the machine through the FADT's reset register",
        run: reboot::run,
    },
    Scenario {
        name: "poweroff",
        about: "power off through ACPI at once (the shortest successful run)",
        run: poweroff::run,
    },
    Scenario {
        name: "virtio-blk",
        about: "virtio-blk: capacity, sector 0 vs blk.expect=, write/flush/read back, GET_ID, read-only device",
        run: virtio_blk::run,
    },
    Scenario {
        name: "virtio-net",
        about: "virtio-net: MAC, send a 0x88B5 broadcast, wait for the host's reply frame",
        run: virtio_net::run,
    },
    Scenario {
        name: "virtio-console",
        about: "virtio-console: write a line through the transmit queue",
        run: virtio_console::run,
    },
    Scenario {
        name: "virtio-rng",
        about: "virtio-rng: two 64-byte reads that are not constant and differ",
        run: virtio_rng::run,
    },
    Scenario {
        name: "msix",
        about: "MSI-X on virtio-rng: delivery, mask + pending bit, unmask, re-target to a new vector",
        run: msix::run,
    },
    Scenario {
        name: "intx",
        about: "INTx of virtio-rng through the I/O APIC (intx.gsi= or the Interrupt Line)",
        run: intx::run,
    },
    Scenario {
        name: "iommu",
        about: "virtio-iommu: VIOT, probe, attach, virtio-blk through IOVA mappings (split buffer), unmap -> IOERR + fault report",
        run: iommu::run,
    },
    Scenario {
        name: "iommu-bad",
        about: "virtio-iommu: malformed and invalid requests, each status checked against the virtio spec",
        run: iommu_bad::run,
    },
    Scenario {
        name: "hostile",
        about: "malformed descriptor chains against virtio-blk/rng; the device must keep serving",
        run: hostile::run,
    },
    Scenario {
        name: "serial-stream",
        about: "write numbered, checksummed lines to COM1 as fast as possible, forever (pause/snapshot serial tests)",
        run: serial_stream::run,
    },
    Scenario {
        name: "dirty-log",
        about: "write known guest pages (and one virtio-blk read) in rounds driven by a mailbox the host writes (dirty-log tests)",
        run: dirty_log::run,
    },
    Scenario {
        name: "dirty",
        about: "rewrite a working set at a set rate, every page carrying index, generation and checksum, verified before each rewrite and in full sweeps; reports the longest stall (live-migration tests)",
        run: dirty::run,
    },
    Scenario {
        name: "clock",
        about: "enable kvmclock and print the guest's wall-clock time (unix ms) periodically; fails if the kvmclock goes back (clock-across-migration tests)",
        run: clock::run,
    },
    Scenario {
        name: "vfio",
        about: "skiff-testdev (vfio-user): BARs, DMA with data checks, MSI-X, level INTx, device memory, virtio-iommu (vfio.iommu=1), peer-to-peer (vfio.p2p=1, vfio.p2p_off=1)",
        run: vfio::run,
    },
    Scenario {
        name: "vfio-bench",
        about: "passthrough benchmark (vmm/benches/passthrough.rs): trapped MMIO vs ioeventfd vs in-VMM register cost, P2P/RAM DMA command streams, MSI-X latency vs polling",
        run: vfio::bench::run,
    },
    Scenario {
        name: "vfio-migrate",
        about: "skiff-testdev streams (vfio_migrate.devices=1|2): DMA sequence numbers into guest RAM rings and P2P into each other's BAR 2 while the host live-migrates the VM; live and exact final checks for lost or stale writes, violation counters, longest stall",
        run: vfio::migrate::run,
    },
];

/// Look a scenario up by name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
