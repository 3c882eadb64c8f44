//! The register interface of `skiff-testdev`, the vfio-user test device: the contract between
//! the device (this crate), the no_std test guest (which includes this file with `#[path]`) and
//! the host tests. Constants only, no logic, `no_std`-clean.
//!
//! PCI identity: vendor [`VENDOR_ID`], device [`DEVICE_ID`], class 0xff (unassigned), one
//! function. Regions:
//! - BAR 0: 4 KiB of 32-bit registers ([`REG_*`](self)), trapped (every access reaches the
//!   device); the MSI-X table lives at [`MSIX_TABLE_OFFSET`] and the PBA at
//!   [`MSIX_PBA_OFFSET`] inside it (emulated by the VMM, like every VFIO client does).
//! - BAR 2: device memory, [`DEVICE_MEMORY_SIZE`] bytes by default (`--memory-mib N`: any power
//!   of two from 1 MiB to [`MAX_DEVICE_MEMORY_SIZE`]; read the size from the BAR), 64-bit, backed
//!   by a shareable file and offered as one sparse-mmap area covering the whole BAR (the VMM maps
//!   it into the guest). Peer-to-peer writes from another device land here.
//! - Interrupts: MSI-X with [`MSIX_VECTORS`] vectors, and INTx pin A; with `--msi` also an MSI
//!   capability (ID 0x05, 64-bit address, per-vector masking, [`MSI_VECTORS`] vectors capable).
//!
//! A command: write its parameters to `REG_ADDR_*`, `REG_ADDR2_*`, `REG_LEN`, `REG_SEED`, then
//! its code to `REG_DOORBELL`. The device runs it, then increments `REG_COMPLETED` (or
//! `REG_FAILED`, with the reason in `REG_LAST_ERROR`), sets `IRQ_DONE` in `REG_IRQ_STATUS` and,
//! when `REG_IRQ_CONTROL` allows, raises MSI-X vector 0 (if MSI-X is enabled), else MSI vector 0
//! (if MSI is enabled), else INTx (level: it stays asserted until the guest writes 1 to
//! `IRQ_DONE` in `REG_IRQ_STATUS`). Commands run in
//! order; a doorbell write while one runs is queued (at most [`QUEUE_DEPTH`]).
//!
//! Addresses are DMA addresses (IOVAs: guest physical addresses when the device is not behind
//! the virtual IOMMU).

/// PCI vendor id (Red Hat / QEMU range, test devices).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id of skiff-testdev.
pub const DEVICE_ID: u16 = 0x0f5f;
/// PCI class code (unassigned class).
pub const CLASS_CODE: u8 = 0xff;

/// BAR index of the registers.
pub const REGS_BAR: u8 = 0;
/// Size of the register BAR.
pub const REGS_BAR_SIZE: u64 = 0x1000;
/// BAR index of the device memory.
pub const MEMORY_BAR: u8 = 2;
/// Size of the device memory BAR by default, and the smallest one (`--memory-mib 1`).
pub const DEVICE_MEMORY_SIZE: u64 = 0x10_0000;
/// Largest device memory BAR (`--memory-mib 1024`).
pub const MAX_DEVICE_MEMORY_SIZE: u64 = 0x4000_0000;
/// Slots (u64) the stream writes into a peer's device memory: the first half of the
/// *smallest* device memory ([`DEVICE_MEMORY_SIZE`] / 16, 512 KiB), whatever the size of this
/// device's or the peer's BAR 2. A device does not know its peer's size, and this area fits
/// every peer; it is also what a guest that assumes the default size computes.
pub const STREAM_PEER_SLOTS: u64 = DEVICE_MEMORY_SIZE / 16;

/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 2;
/// MSI-X table offset in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x800;
/// MSI-X PBA offset in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0xc00;

/// MSI vectors the MSI capability offers (`--msi` only): Multiple Message Capable = log2 of it.
/// Completions use vector 0.
pub const MSI_VECTORS: u16 = 2;

/// Commands queued at most while one runs.
pub const QUEUE_DEPTH: usize = 16;
/// Largest `REG_LEN` accepted (1 MiB).
pub const MAX_LEN: u32 = 0x10_0000;

// Registers (offsets in BAR 0, 32-bit, little endian). 64-bit values are LO/HI pairs.
/// RO: [`MAGIC`].
pub const REG_MAGIC: u64 = 0x000;
/// RO: interface version, [`VERSION`].
pub const REG_VERSION: u64 = 0x004;
/// RO: `STATUS_*` bits.
pub const REG_STATUS: u64 = 0x008;
/// WO: a command code (`CMD_*`) starts the command.
pub const REG_DOORBELL: u64 = 0x00c;
/// RW: command address, low 32 bits.
pub const REG_ADDR_LO: u64 = 0x010;
/// RW: command address, high 32 bits.
pub const REG_ADDR_HI: u64 = 0x014;
/// RW: second address (copy destination), low 32 bits.
pub const REG_ADDR2_LO: u64 = 0x018;
/// RW: second address, high 32 bits.
pub const REG_ADDR2_HI: u64 = 0x01c;
/// RW: length in bytes (1..=[`MAX_LEN`]).
pub const REG_LEN: u64 = 0x020;
/// RW: pattern seed.
pub const REG_SEED: u64 = 0x024;
/// RO: result of the last READ_CHECKSUM, low 32 bits.
pub const REG_RESULT_LO: u64 = 0x028;
/// RO: result, high 32 bits.
pub const REG_RESULT_HI: u64 = 0x02c;
/// RO: commands completed.
pub const REG_COMPLETED: u64 = 0x030;
/// RO: commands failed.
pub const REG_FAILED: u64 = 0x034;
/// RO: why the last command failed (`ERR_*`).
pub const REG_LAST_ERROR: u64 = 0x038;
/// RW1C: `IRQ_*` bits pending.
pub const REG_IRQ_STATUS: u64 = 0x03c;
/// RW: `IRQ_*` bits that raise an interrupt.
pub const REG_IRQ_CONTROL: u64 = 0x040;
/// RO: violations of any kind (the sum of the `REG_VIOL_*` counters).
pub const REG_VIOLATIONS: u64 = 0x044;
/// RO: DMA started in a migration state other than RUNNING/PRE_COPY (the device's own check).
pub const REG_VIOL_DMA_STATE: u64 = 0x048;
/// RO: a guest MMIO access (BAR0 through the VMM) while not RUNNING/PRE_COPY.
pub const REG_VIOL_MMIO_STATE: u64 = 0x04c;
/// RO: a peer write into device memory (REGION_WRITE into BAR 2, or a change of BAR 2 through
/// the mapping, one per 4 KiB chunk) while the device is in STOP, STOP_COPY or RESUMING, where
/// its memory must not change (the write would be lost or corrupt the saved state).
pub const REG_VIOL_LATE_PEER_WRITE: u64 = 0x050;
/// RO: peer-to-peer DMA started in RUNNING_P2P/PRE_COPY_P2P or a stopped state (the device's
/// own check).
pub const REG_VIOL_P2P_STATE: u64 = 0x054;
/// RO: bytes the device wrote by DMA, low 32 bits (wraps).
pub const REG_DMA_WRITTEN: u64 = 0x058;
/// RO: bytes the device read by DMA, low 32 bits (wraps).
pub const REG_DMA_READ: u64 = 0x05c;
/// RO: peer writes received into device memory (count).
pub const REG_PEER_WRITES: u64 = 0x060;
/// RW: stream ring address (guest RAM), low 32 bits.
pub const REG_STREAM_RING_LO: u64 = 0x080;
/// RW: stream ring address, high 32 bits.
pub const REG_STREAM_RING_HI: u64 = 0x084;
/// RW: stream ring size in 8-byte entries (power of two, ≤ 65536).
pub const REG_STREAM_RING_ENTRIES: u64 = 0x088;
/// RW: peer device memory address for stream P2P writes, low 32 bits (0: no peer).
pub const REG_STREAM_PEER_LO: u64 = 0x08c;
/// RW: peer address, high 32 bits.
pub const REG_STREAM_PEER_HI: u64 = 0x090;
/// RW: stream period in microseconds between sequence numbers (0: as fast as it can).
pub const REG_STREAM_PERIOD_US: u64 = 0x094;
/// RO: next sequence number the stream writes (low 32 bits).
pub const REG_STREAM_SEQ: u64 = 0x098;

/// Value of `REG_MAGIC`: "SKTD".
pub const MAGIC: u32 = 0x4454_4b53;
/// Value of `REG_VERSION`.
pub const VERSION: u32 = 1;

/// `REG_STATUS`: a command is running or queued.
pub const STATUS_BUSY: u32 = 1 << 0;
/// `REG_STATUS`: the stream is running.
pub const STATUS_STREAMING: u32 = 1 << 1;

/// Fill `LEN` bytes at `ADDR` with [`pattern_byte`]`(SEED, i)`.
pub const CMD_WRITE_PATTERN: u32 = 1;
/// Copy `LEN` bytes from `ADDR` to `ADDR2`.
pub const CMD_COPY: u32 = 2;
/// Read `LEN` bytes at `ADDR`; `RESULT` = [`fnv1a64`] of them.
pub const CMD_READ_CHECKSUM: u32 = 3;
/// Like WRITE_PATTERN, to a peer's device memory (`ADDR` is in a peer's BAR): peer-to-peer.
pub const CMD_P2P_WRITE: u32 = 4;
/// Start the stream: every period, write the next sequence number (u64) into the next ring
/// entry (`ring[seq % entries]`) and, with a peer, into the peer's device memory at
/// `peer + 8 * (seq % STREAM_PEER_SLOTS)` (see [`STREAM_PEER_SLOTS`]: the first 512 KiB of
/// the peer's memory, whatever its size).
pub const CMD_STREAM_START: u32 = 5;
/// Stop the stream (it finishes the sequence number in flight).
pub const CMD_STREAM_STOP: u32 = 6;
/// Zero the counters (`COMPLETED`, `FAILED`, DMA byte counters, `PEER_WRITES`); violations are
/// never cleared.
pub const CMD_CLEAR_COUNTERS: u32 = 7;

/// `REG_LAST_ERROR`: no error.
pub const ERR_NONE: u32 = 0;
/// `REG_LAST_ERROR`: unknown command.
pub const ERR_BAD_COMMAND: u32 = 1;
/// `REG_LAST_ERROR`: length 0 or above [`MAX_LEN`].
pub const ERR_BAD_LEN: u32 = 2;
/// `REG_LAST_ERROR`: the DMA access failed (address not mapped, or refused by the VMM).
pub const ERR_DMA: u32 = 3;
/// `REG_LAST_ERROR`: the command queue is full.
pub const ERR_QUEUE_FULL: u32 = 4;

/// `REG_IRQ_STATUS`/`REG_IRQ_CONTROL`: a command finished (completed or failed).
pub const IRQ_DONE: u32 = 1 << 0;

/// Byte `i` of the pattern with `seed`.
pub const fn pattern_byte(seed: u32, i: u32) -> u8 {
    let x = seed
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(i.wrapping_mul(0x85eb_ca6b));
    (x ^ (x >> 13) ^ (x >> 24)) as u8
}

/// FNV-1a 64 of `data` (what READ_CHECKSUM reports).
pub const fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < data.len() {
        h ^= data[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}
