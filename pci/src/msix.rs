//! MSI-X: the capability's message control, the vector table and the pending bit array (PBA).
//!
//! [`MsixConfig`] owns one [`MsiVector`] (GSI + irqfd) per table entry, allocated from an
//! [`InterruptManager`] up front. The device that embeds it:
//! - adds the capability built by [`MsixConfig::capability`] to its configuration space, makes the
//!   top two bits of the message control writable (see [`MSIX_CAP_WRITABLE_MASK`]) and, after every
//!   guest write to that register, passes the new message control to
//!   [`MsixConfig::set_message_control`];
//! - forwards BAR accesses of the table and PBA to [`MsixConfig::read_table`] /
//!   [`MsixConfig::write_table`] / [`MsixConfig::read_pba`];
//! - raises vector `n` with [`MsixConfig::trigger`].
//!
//! A vector is *deliverable* when MSI-X is enabled, the function is not masked and the vector is
//! not masked. Whenever a deliverable vector's message differs from the route KVM has, the route is
//! updated. Triggering an undeliverable vector sets its pending bit; the vector is delivered (and
//! the bit cleared) as soon as it becomes deliverable.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use devices::legacy::{LogLimiter, StateReader, StateWriter};
use migration::StateError;

use crate::configuration::CAP_ID_MSIX;
use crate::interrupt::{InterruptManager, MsiVector};

/// Bytes per MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Largest number of vectors a function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Guest-writable bits of the capability's first dword (the enable and function-mask bits of the
/// message control in its upper half).
pub const MSIX_CAP_WRITABLE_MASK: u32 = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) as u32) << 16;
/// Length of the MSI-X capability in configuration space.
pub const MSIX_CAP_LEN: usize = 12;
/// Vector control: the vector is masked.
const VECTOR_CTL_MASKED: u32 = 1;
/// Version of the MSI-X state encoding.
pub const MSIX_STATE_VERSION: u16 = 1;

/// One table entry as the guest programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixTableEntry {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub vector_ctl: u32,
}

impl Default for MsixTableEntry {
    /// Entries come out of reset masked.
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector_ctl: VECTOR_CTL_MASKED,
        }
    }
}

impl MsixTableEntry {
    /// The 64-bit message address.
    pub fn address(&self) -> u64 {
        u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo)
    }

    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CTL_MASKED != 0
    }

    fn dword(&self, i: u64) -> u32 {
        match i {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.vector_ctl,
        }
    }

    fn set_dword(&mut self, i: u64, v: u32) {
        match i {
            0 => self.addr_lo = v,
            1 => self.addr_hi = v,
            2 => self.data = v,
            // Only the mask bit is defined; the rest is reserved (reads as 0).
            _ => self.vector_ctl = v & VECTOR_CTL_MASKED,
        }
    }
}

/// The MSI-X state of one PCI function.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    vectors: Vec<MsiVector>,
    /// The message each GSI is routed to in the VMM, when known.
    routed: Vec<Option<(u64, u32)>>,
    enabled: bool,
    function_masked: bool,
    interrupt_manager: Arc<dyn InterruptManager>,
    bad_access: LogLimiter,
    route_errors: LogLimiter,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixConfig {
    /// MSI-X with `num_vectors` (1..=2048) vectors, each with a GSI and irqfd from
    /// `interrupt_manager`. MSI-X starts disabled and every vector masked.
    pub fn new(num_vectors: u16, interrupt_manager: Arc<dyn InterruptManager>) -> io::Result<Self> {
        if num_vectors == 0 || num_vectors > MSIX_MAX_VECTORS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector count {num_vectors} is not in 1..={MSIX_MAX_VECTORS}"),
            ));
        }
        let n = usize::from(num_vectors);
        let vectors = (0..n)
            .map(|_| interrupt_manager.allocate_msi())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            table: vec![MsixTableEntry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            vectors,
            routed: vec![None; n],
            enabled: false,
            function_masked: false,
            interrupt_manager,
            bad_access: LogLimiter::new(),
            route_errors: LogLimiter::new(),
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the PBA occupies in its BAR (a multiple of 8).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The GSIs of the vectors, in vector order.
    pub fn gsis(&self) -> Vec<u32> {
        self.vectors.iter().map(|v| v.gsi).collect()
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the whole function is masked.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Table entry `vector`.
    pub fn entry(&self, vector: u16) -> Option<&MsixTableEntry> {
        self.table.get(usize::from(vector))
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// The message control register: table size - 1 and the enable / function-mask bits.
    pub fn message_control(&self) -> u16 {
        (self.table.len() as u16 - 1)
            | if self.enabled { MSIX_ENABLE } else { 0 }
            | if self.function_masked {
                MSIX_FUNCTION_MASK
            } else {
                0
            }
    }

    /// The capability body for configuration space: id, next pointer (filled in by
    /// [`crate::PciConfiguration::add_capability`]), message control, table and PBA locations.
    /// Offsets must be 8-byte aligned; BIRs are BAR indices (0..=5).
    pub fn capability(
        &self,
        table_bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> [u8; MSIX_CAP_LEN] {
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = CAP_ID_MSIX;
        cap[2..4].copy_from_slice(&self.message_control().to_le_bytes());
        cap[4..8].copy_from_slice(&((table_offset & !7) | u32::from(table_bir & 7)).to_le_bytes());
        cap[8..12].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bir & 7)).to_le_bytes());
        cap
    }

    /// Apply the enable and function-mask bits of a message control value the guest wrote.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & MSIX_ENABLE != 0;
        let masked = control & MSIX_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.table.len() {
            self.sync_vector(v);
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.table[v].masked()
    }

    /// Whether vector `vector` would be delivered now (MSI-X enabled, function and vector
    /// unmasked). A device that signals irqfds itself (passthrough) switches a vector's eventfd
    /// when this changes.
    pub fn is_deliverable(&self, vector: u16) -> bool {
        usize::from(vector) < self.table.len() && self.deliverable(usize::from(vector))
    }

    /// The irqfd of vector `vector` (its GSI's route is kept current while it is deliverable).
    pub fn vector_irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irqfd)
    }

    /// Make sure vector `vector`'s route is programmed (call when handing its irqfd to a device
    /// that signals it directly).
    pub fn ensure_route(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < self.table.len() && self.sync_route(v)
    }

    fn log_bad(&mut self, what: std::fmt::Arguments<'_>) {
        if self.bad_access.allow() {
            log::warn!(
                "MSI-X: ignoring {what} (occurrence {})",
                self.bad_access.count()
            );
        }
    }

    /// Make sure KVM routes vector `v`'s GSI to its current message. Returns false when the
    /// route could not be updated.
    fn sync_route(&mut self, v: usize) -> bool {
        let e = self.table[v];
        let msg = (e.address(), e.data);
        if self.routed[v] == Some(msg) {
            return true;
        }
        match self
            .interrupt_manager
            .update_msi(self.vectors[v].gsi, msg.0, msg.1)
        {
            Ok(()) => {
                self.routed[v] = Some(msg);
                true
            }
            Err(e) => {
                if self.route_errors.allow() {
                    log::error!(
                        "MSI-X: cannot route GSI {} to {:#x}/{:#x}: {e}",
                        self.vectors[v].gsi,
                        msg.0,
                        msg.1
                    );
                }
                false
            }
        }
    }

    /// After a change that may affect vector `v`: update its route when deliverable, and deliver
    /// it when it was pending.
    fn sync_vector(&mut self, v: usize) {
        if !self.deliverable(v) || !self.sync_route(v) {
            return;
        }
        let (word, bit) = (v / 64, 1u64 << (v % 64));
        if self.pba[word] & bit != 0 {
            self.pba[word] &= !bit;
            if let Err(e) = self.vectors[v].irqfd.write(1) {
                log::error!("MSI-X: cannot deliver pending vector {v}: {e}");
            }
        }
    }

    /// Raise `vector`: inject it when deliverable, otherwise set its pending bit.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} out of range"),
            ));
        }
        if !self.deliverable(v) || !self.sync_route(v) {
            self.pba[v / 64] |= 1 << (v % 64);
            return Ok(());
        }
        self.vectors[v].irqfd.write(1)
    }

    fn valid_access(&self, offset: u64, len: usize, size: u64) -> bool {
        matches!(len, 4 | 8)
            && offset & (len as u64 - 1) == 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
    }

    /// Guest read of the table at `offset` (4- or 8-byte aligned accesses; others read as 0).
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        if !self.valid_access(offset, data.len(), self.table_size()) {
            self.log_bad(format_args!(
                "table read of {} bytes at {offset:#x}",
                data.len()
            ));
            data.fill(0);
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            let e = &self.table[(off / MSIX_TABLE_ENTRY_SIZE) as usize];
            chunk.copy_from_slice(&e.dword((off % MSIX_TABLE_ENTRY_SIZE) / 4).to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (4- or 8-byte aligned accesses; others are ignored).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !self.valid_access(offset, data.len(), self.table_size()) {
            self.log_bad(format_args!(
                "table write of {} bytes at {offset:#x}",
                data.len()
            ));
            return;
        }
        let v = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        for (i, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * i as u64;
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            self.table[v].set_dword((off % MSIX_TABLE_ENTRY_SIZE) / 4, u32::from_le_bytes(b));
        }
        self.sync_vector(v);
    }

    /// Guest read of the PBA at `offset` (4- or 8-byte aligned accesses; others read as 0).
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        if !self.valid_access(offset, data.len(), self.pba_size()) {
            self.log_bad(format_args!(
                "PBA read of {} bytes at {offset:#x}",
                data.len()
            ));
            data.fill(0);
            return;
        }
        let word = self.pba[(offset / 8) as usize].to_le_bytes();
        let within = (offset % 8) as usize;
        data.copy_from_slice(&word[within..within + data.len()]);
    }

    /// Guest write of the PBA: read-only, ignored.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        self.log_bad(format_args!(
            "write of {} bytes to the read-only PBA at {offset:#x}",
            data.len()
        ));
    }

    /// Append the guest-visible state (control bits, table, PBA) to `w`.
    pub fn save(&self, w: &mut StateWriter) {
        w.u16(MSIX_STATE_VERSION)
            .u16(self.num_vectors())
            .u8(u8::from(self.enabled))
            .u8(u8::from(self.function_masked));
        for e in &self.table {
            w.u32(e.addr_lo)
                .u32(e.addr_hi)
                .u32(e.data)
                .u32(e.vector_ctl);
        }
        for p in &self.pba {
            w.u64(*p);
        }
    }

    /// Read state written by [`Self::save`] (same vector count) and reprogram every deliverable
    /// vector's route.
    pub fn restore(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let version = r.u16()?;
        if version != MSIX_STATE_VERSION {
            return Err(r.malformed(format!("MSI-X state version {version} is not supported")));
        }
        let n = r.u16()?;
        if n != self.num_vectors() {
            return Err(r.malformed(format!(
                "MSI-X state has {n} vectors, the device has {}",
                self.num_vectors()
            )));
        }
        let enabled = r.u8()? != 0;
        let function_masked = r.u8()? != 0;
        let mut table = Vec::with_capacity(self.table.len());
        for _ in 0..n {
            table.push(MsixTableEntry {
                addr_lo: r.u32()?,
                addr_hi: r.u32()?,
                data: r.u32()?,
                vector_ctl: r.u32()? & VECTOR_CTL_MASKED,
            });
        }
        let mut pba = vec![0u64; self.pba.len()];
        for p in &mut pba {
            *p = r.u64()?;
        }
        self.table = table;
        self.pba = pba;
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.routed.fill(None);
        for v in 0..self.table.len() {
            self.sync_vector(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::fake::FakeInterruptManager;

    fn setup(n: u16) -> (Arc<FakeInterruptManager>, MsixConfig) {
        let im = Arc::new(FakeInterruptManager::default());
        let m = MsixConfig::new(n, im.clone()).unwrap();
        (im, m)
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32) {
        let base = v * MSIX_TABLE_ENTRY_SIZE;
        m.write_table(base, &addr.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(m: &mut MsixConfig, v: u64) {
        m.write_table(v * MSIX_TABLE_ENTRY_SIZE + 12, &0u32.to_le_bytes());
    }

    fn mask(m: &mut MsixConfig, v: u64) {
        m.write_table(v * MSIX_TABLE_ENTRY_SIZE + 12, &1u32.to_le_bytes());
    }

    #[test]
    fn construction_and_capability() {
        let (_, m) = setup(3);
        assert_eq!(m.num_vectors(), 3);
        assert_eq!(m.gsis(), [24, 25, 26]);
        assert_eq!(m.table_size(), 48);
        assert_eq!(m.pba_size(), 8);
        assert_eq!(m.message_control(), 2);
        let cap = m.capability(0, 0x4000, 0, 0x6000);
        assert_eq!(cap, [0x11, 0, 2, 0, 0, 0x40, 0, 0, 0, 0x60, 0, 0]);
        let im: Arc<dyn InterruptManager> = Arc::new(FakeInterruptManager::default());
        assert!(MsixConfig::new(0, im.clone()).is_err());
        assert!(MsixConfig::new(2049, im).is_err());
    }

    #[test]
    fn fires_on_programmed_vector() {
        let (im, mut m) = setup(2);
        m.set_message_control(MSIX_ENABLE);
        program(&mut m, 1, 0xfee0_1000, 0x41);
        assert_eq!(im.updates(), 0, "masked vectors are not routed");
        unmask(&mut m, 1);
        assert_eq!(im.route(25), Some((0xfee0_1000, 0x41)));
        assert_eq!(im.updates(), 1);
        m.trigger(1).unwrap();
        m.trigger(1).unwrap();
        assert_eq!(im.fired(1), 2);
        assert_eq!(im.fired(0), 0);
        // Reads return what was programmed, as dwords and qwords.
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        let mut d = [0u8; 4];
        m.read_table(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        m.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vector 0 still masked");
        assert!(m.trigger(2).is_err());
    }

    #[test]
    fn masked_vector_pends_until_unmasked() {
        let (im, mut m) = setup(2);
        // Disabled: pending.
        program(&mut m, 0, 0xfee0_0000, 0x30);
        m.trigger(0).unwrap();
        assert!(m.pending(0));
        assert_eq!(im.fired(0), 0);
        let mut q = [0u8; 8];
        m.read_pba(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1);
        // Enabled but vector masked: still pending.
        m.set_message_control(MSIX_ENABLE);
        assert!(m.pending(0));
        assert_eq!(im.fired(0), 0);
        // Unmasking delivers once and clears the bit.
        unmask(&mut m, 0);
        assert!(!m.pending(0));
        assert_eq!(im.fired(0), 1);
        mask(&mut m, 0);
        m.trigger(0).unwrap();
        assert!(m.pending(0));
        assert_eq!(im.fired(0), 0);
        unmask(&mut m, 0);
        assert_eq!(im.fired(0), 1);
        // Unmasking with nothing pending does not fire.
        mask(&mut m, 0);
        unmask(&mut m, 0);
        assert_eq!(im.fired(0), 0);
    }

    #[test]
    fn function_mask() {
        let (im, mut m) = setup(1);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        unmask(&mut m, 0);
        m.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(m.message_control(), MSIX_ENABLE | MSIX_FUNCTION_MASK);
        m.trigger(0).unwrap();
        assert_eq!(im.fired(0), 0);
        assert!(m.pending(0));
        m.set_message_control(MSIX_ENABLE);
        assert_eq!(im.fired(0), 1);
        assert!(!m.pending(0));
        m.trigger(0).unwrap();
        assert_eq!(im.fired(0), 1);
    }

    #[test]
    fn changing_a_running_vector_updates_the_route() {
        let (im, mut m) = setup(1);
        m.set_message_control(MSIX_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        unmask(&mut m, 0);
        let n = im.updates();
        // Rewriting the same message does not touch KVM.
        program(&mut m, 0, 0xfee0_0000, 0x30);
        assert_eq!(im.updates(), n);
        m.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(im.route(24), Some((0xfee0_0000, 0x31)));
        m.write_table(0, &0xfee0_2000u32.to_le_bytes());
        assert_eq!(im.route(24), Some((0xfee0_2000, 0x31)));
        assert_eq!(im.updates(), n + 2);
    }

    #[test]
    fn bogus_accesses_are_ignored() {
        let (im, mut m) = setup(2);
        m.set_message_control(MSIX_ENABLE);
        let before: Vec<_> = (0..2).map(|v| *m.entry(v).unwrap()).collect();
        // Past the table, misaligned, odd sizes.
        m.write_table(32, &1u32.to_le_bytes());
        m.write_table(2, &1u32.to_le_bytes());
        m.write_table(4, &1u64.to_le_bytes());
        m.write_table(0, &[1, 2]);
        m.write_table(0, &[1]);
        m.write_table(u64::MAX - 3, &1u32.to_le_bytes());
        m.write_pba(0, &u64::MAX.to_le_bytes());
        let after: Vec<_> = (0..2).map(|v| *m.entry(v).unwrap()).collect();
        assert_eq!(before, after);
        assert_eq!(im.updates(), 0);
        let mut d = [0xaau8; 4];
        m.read_table(64, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_pba(8, &mut d);
        assert_eq!(d, [0; 4]);
        let mut b = [0xaau8; 3];
        m.read_table(0, &mut b);
        assert_eq!(b, [0; 3]);
        // Reserved vector-control bits read as 0.
        m.write_table(12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }

    #[test]
    fn save_restore() {
        let (_, mut m) = setup(3);
        m.set_message_control(MSIX_ENABLE);
        program(&mut m, 2, 0xfee0_3000, 0x55);
        unmask(&mut m, 2);
        program(&mut m, 1, 0xfee0_4000, 0x66);
        m.trigger(1).unwrap();
        let mut w = StateWriter::new();
        m.save(&mut w);
        let bytes = w.into_bytes();

        let (im2, mut m2) = setup(3);
        let mut r = StateReader::from_bytes("msix", &bytes);
        m2.restore(&mut r).unwrap();
        r.finish().unwrap();
        assert!(m2.enabled());
        assert_eq!(m2.entry(2), m.entry(2));
        assert!(m2.pending(1));
        assert_eq!(im2.route(26), Some((0xfee0_3000, 0x55)));
        unmask(&mut m2, 1);
        assert_eq!(im2.fired(1), 1);

        let (_, mut small) = setup(2);
        let mut r = StateReader::from_bytes("msix", &bytes);
        assert!(small.restore(&mut r).is_err());
        let mut r = StateReader::from_bytes("msix", &bytes[..10]);
        assert!(m2.restore(&mut r).is_err());
    }
}
