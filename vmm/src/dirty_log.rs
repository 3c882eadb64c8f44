//! KVM dirty page tracking for live migration, in one of three modes chosen when the VM is
//! created (a restored or migrated-in VM is built by the same code, so it gets the same mode):
//!
//! - [`DirtyLogMode::Legacy`]: `KVM_GET_DIRTY_LOG` per slot, which copies *and clears* the slot's
//!   bitmap and write-protects the whole slot in one ioctl (one long `mmu_lock` hold per slot).
//! - [`DirtyLogMode::Manual`]: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (with
//!   `KVM_DIRTY_LOG_INITIALLY_SET` when offered): `KVM_GET_DIRTY_LOG` only copies the bitmap, and
//!   the pages found dirty are cleared (re-protected) with `KVM_CLEAR_DIRTY_LOG` in chunks of at
//!   most [`CLEAR_CHUNK_PAGES`] pages, each covering only 64-page groups that hold a dirty page.
//! - [`DirtyLogMode::Ring`]: `KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)`: every vCPU pushes the pages it
//!   dirties into its own ring (mmapped from the vCPU fd); a sync harvests every ring into a
//!   VMM-side set and `KVM_RESET_DIRTY_RINGS` re-protects the harvested pages. A vCPU whose ring
//!   fills exits with `KVM_EXIT_DIRTY_RING_FULL` and harvests on its own thread
//!   ([`DirtyLog::ring_full`]). `KVM_GET_DIRTY_LOG` is unavailable in this mode.
//!
//! Every mode re-protects a page *before* [`DirtyLog::sync`] returns it, so a caller that reads
//! and sends the returned pages afterwards never loses a write made between the read and the
//! re-protection: such a write shows up in the next sync.
//!
//! Measured (`cargo bench -p vmm --bench migration -- dirty-log`, figures in the README), manual
//! protection is the default: a sync of a large guest is faster than legacy (equal at 1 GiB),
//! starting to log costs more (once, outside the downtime), guest stalls and downtime are equal
//! within noise; and it re-protects pages right before they are read, in bounded pieces. The ring is refused on PVM hosts (it falls back to manual there): KVM's instruction
//! emulator, which runs guest kernel code on such hosts, pushes one entry per emulated store and
//! never stops at the ring's soft limit, so a ring overflows and entries are overwritten. Should
//! it happen anyway, a sync or a vCPU that finds a whole ring published (or a full ring with no
//! entry) reports an error instead of spinning or silently losing pages.
//!
//! The mode: [`DEFAULT_MODE`] unless the `SKIFF_DIRTY_LOG` environment variable says
//! `legacy`, `manual` or `ring` (read once per VM, at creation; used by the benchmark that picked
//! the default), or [`set_mode_override`] was called (benchmarks in one process).
//!
//! kvm-ioctls 0.25 has `VmFd::get_dirty_log` and `VmFd::enable_cap` but no `KVM_CLEAR_DIRTY_LOG`,
//! `KVM_RESET_DIRTY_RINGS` nor any dirty-ring mapping: those three are hand-written here.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use migration::dirty::DirtyError;
use migration::DirtyBitmap;
use thiserror::Error;

/// Guest page size the dirty logs count in.
const PAGE: u64 = 4096;
/// Largest range one `KVM_CLEAR_DIRTY_LOG` covers (16 MiB): bounds how long KVM holds its
/// `mmu_lock` against faulting vCPUs.
pub const CLEAR_CHUNK_PAGES: u64 = 4096;
/// Bytes of one vCPU's dirty ring (4096 entries of 16 bytes, the size QEMU users commonly pick),
/// or the host's maximum if smaller.
const RING_BYTES: u32 = 64 * 1024;
/// Entry flag: KVM pushed this entry (`KVM_DIRTY_GFN_F_DIRTY`).
const GFN_F_DIRTY: u32 = 1;
/// Entry flag: userspace harvested this entry (`KVM_DIRTY_GFN_F_RESET`).
const GFN_F_RESET: u32 = 2;

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// How KVM reports the pages vCPUs write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` clears and write-protects a whole slot per call.
    Legacy,
    /// Manual protection: get the bitmap, clear the dirty parts in chunks.
    Manual,
    /// Per-vCPU dirty rings.
    Ring,
}

/// The mode a VM gets unless told otherwise (see the module documentation and the README for
/// the measurement that chose it).
pub const DEFAULT_MODE: DirtyLogMode = DirtyLogMode::Manual;

/// The environment variable that selects the mode (`legacy`, `manual`, `ring`).
pub const MODE_VAR: &str = "SKIFF_DIRTY_LOG";

/// 0: no override; else 1 + the mode's index.
static MODE_OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Make every VM created from now on in this process use `mode` (`None`: back to the
/// environment / default). For benchmarks that compare modes in one process; it also forces the
/// ring on PVM hosts, where it is otherwise refused.
pub fn set_mode_override(mode: Option<DirtyLogMode>) {
    let v = match mode {
        None => 0,
        Some(DirtyLogMode::Legacy) => 1,
        Some(DirtyLogMode::Manual) => 2,
        Some(DirtyLogMode::Ring) => 3,
    };
    MODE_OVERRIDE.store(v, Ordering::SeqCst);
}

impl DirtyLogMode {
    /// Every mode, for benchmarks and tests.
    pub const ALL: [DirtyLogMode; 3] = [Self::Legacy, Self::Manual, Self::Ring];

    /// The mode's name as `SKIFF_DIRTY_LOG` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Manual => "manual",
            Self::Ring => "ring",
        }
    }

    /// Parse a name as `SKIFF_DIRTY_LOG` spells it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s.trim())
    }

    /// The mode a new VM asks for: the override, else `SKIFF_DIRTY_LOG`, else [`DEFAULT_MODE`].
    pub fn requested() -> Self {
        match MODE_OVERRIDE.load(Ordering::SeqCst) {
            1 => return Self::Legacy,
            2 => return Self::Manual,
            3 => return Self::Ring,
            _ => {}
        }
        match std::env::var(MODE_VAR) {
            Ok(v) => Self::parse(&v).unwrap_or_else(|| {
                log::warn!("{MODE_VAR}={v:?} is not legacy, manual or ring; using the default");
                DEFAULT_MODE
            }),
            Err(_) => DEFAULT_MODE,
        }
    }
}

/// Errors of dirty page tracking.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU's dirty ring could not be mapped.
    #[error("cannot map the dirty ring of vCPU {index}: {source}")]
    MapRing {
        /// vCPU index.
        index: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The dirty page set cannot be built.
    #[error("dirty page set: {0}")]
    Set(#[from] DirtyError),
    /// KVM wrote a whole dirty ring without exiting: entries were overwritten and lost.
    #[error("a vCPU dirty ring overflowed: dirty pages were lost")]
    RingOverflow,
    /// KVM reports a full ring that holds no entry: it cannot be reset, the vCPU cannot run.
    #[error("a vCPU dirty ring is full but holds no entry (after an overflow)")]
    RingStuck,
}

type Result<T> = std::result::Result<T, DirtyLogError>;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DirtyLogError {
    move |source| DirtyLogError::Kvm { what, source }
}

/// Enable `requested` on a VM that has no vCPU yet; returns the mode in effect (legacy when the
/// host lacks the capability, with a warning).
pub fn enable(vm_fd: &VmFd, requested: DirtyLogMode) -> Result<DirtyLogMode> {
    match requested {
        DirtyLogMode::Legacy => Ok(DirtyLogMode::Legacy),
        DirtyLogMode::Manual => {
            let offered = vm_fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
            let offered = u64::try_from(offered).unwrap_or(0);
            let wanted =
                u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
            if offered & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
                log::warn!("dirty log: KVM lacks MANUAL_DIRTY_LOG_PROTECT2; using legacy mode");
                return Ok(DirtyLogMode::Legacy);
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = offered & wanted;
            vm_fd
                .enable_cap(&cap)
                .map_err(kvm("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
            Ok(DirtyLogMode::Manual)
        }
        DirtyLogMode::Ring if pvm_host() && MODE_OVERRIDE.load(Ordering::SeqCst) != 3 => {
            log::warn!("dirty log: the dirty ring loses pages on PVM hosts (KVM's emulator pushes an entry per store and overflows the ring); using manual mode");
            enable(vm_fd, DirtyLogMode::Manual)
        }
        DirtyLogMode::Ring => {
            let Some((cap, bytes)) = ring_capability(vm_fd) else {
                log::warn!("dirty log: KVM lacks the dirty ring; using legacy mode");
                return Ok(DirtyLogMode::Legacy);
            };
            let mut enable = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            enable.args[0] = u64::from(bytes);
            vm_fd
                .enable_cap(&enable)
                .map_err(kvm("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))?;
            Ok(DirtyLogMode::Ring)
        }
    }
}

/// The dirty-ring capability this KVM offers (the ACQ_REL variant first) and the ring size, in
/// bytes, skiff uses with it (at most [`RING_BYTES`]); `None` when it has none. [`enable`] turns
/// the ring on with this size and [`DirtyLog::new`] maps rings of this size.
fn ring_capability(vm_fd: &VmFd) -> Option<(u32, u32)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .map(|c| (c, vm_fd.check_extension_raw(u64::from(c))))
        .find(|(_, max)| *max > 0)
        .map(|(c, max)| (c, RING_BYTES.min(max as u32)))
}

/// Whether this host is a PVM-based nested KVM (HOST.md), where the dirty ring is unusable.
pub fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// One RAM slot as the dirty log sees it.
#[derive(Debug, Clone, Copy)]
pub struct LogSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address of the slot's first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl LogSlot {
    fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE)
    }
}

/// The `(first_page, num_pages, first_word)` ranges to hand to `KVM_CLEAR_DIRTY_LOG` for a slot of
/// `slot_pages` pages whose dirty bitmap is `words`: every 64-page group with a dirty page is
/// covered, groups without one are not, `first_page` is a multiple of 64, `num_pages` is a
/// multiple of 64 unless the range ends at the slot's end, and no range exceeds
/// [`CLEAR_CHUNK_PAGES`]. `first_word` indexes `words` where the range's bitmap starts.
pub fn clear_chunks(words: &[u64], slot_pages: u64) -> Vec<(u64, u32, usize)> {
    let max_words = (CLEAR_CHUNK_PAGES / 64) as usize;
    let slot_words = slot_pages.div_ceil(64) as usize;
    let words = &words[..words.len().min(slot_words)];
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < words.len() && words[i] != 0 && i - start < max_words {
            i += 1;
        }
        let first_page = start as u64 * 64;
        let end_page = (i as u64 * 64).min(slot_pages);
        out.push((first_page, (end_page - first_page) as u32, start));
    }
    out
}

/// One dirty ring entry (`struct kvm_dirty_gfn`), every field atomic because KVM writes the
/// entries while the VMM reads them.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingEntry {
    /// `KVM_DIRTY_GFN_F_*`.
    pub flags: AtomicU32,
    /// KVM slot (address space in bits 16-31).
    pub slot: AtomicU32,
    /// Page offset in the slot.
    pub offset: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RingEntry>() == 16);
const _: () =
    assert!(std::mem::size_of::<RingEntry>() == std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>());

/// Collect the entries KVM published in `ring` from `*fetch` on: each entry flagged DIRTY is
/// passed to `mark(slot, offset)` (acquire on the flags, so its slot/offset are KVM's) and then
/// flagged RESET (release), which hands it back to KVM at the next `KVM_RESET_DIRTY_RINGS`.
/// Stops at the first entry not flagged DIRTY, or after one full turn. Returns the count.
pub fn harvest_ring(ring: &[RingEntry], fetch: &mut u32, mut mark: impl FnMut(u32, u64)) -> u32 {
    let size = ring.len() as u32;
    let mut count = 0;
    while size > 0 && count < size {
        let entry = &ring[(*fetch % size) as usize];
        if entry.flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
            break;
        }
        mark(
            entry.slot.load(Ordering::Relaxed),
            entry.offset.load(Ordering::Relaxed),
        );
        entry.flags.store(GFN_F_RESET, Ordering::Release);
        *fetch = fetch.wrapping_add(1);
        count += 1;
    }
    count
}

/// One vCPU's dirty ring, mapped from its fd.
struct VcpuRing {
    ptr: *mut RingEntry,
    entries: usize,
    fetch: u32,
}

// SAFETY: the mapping is owned by this value (unmapped in Drop) and only accessed through atomic
// fields; the ring is reached only under the `DirtyLog`'s mutex.
unsafe impl Send for VcpuRing {}

impl VcpuRing {
    fn map(fd: &VcpuFd, index: u32, bytes: usize) -> Result<Self> {
        // SAFETY: sysconf has no side effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as libc::off_t;
        // SAFETY: maps `bytes` of the vCPU fd's dirty ring area (KVM_DIRTY_LOG_PAGE_OFFSET), a
        // fresh shared mapping that aliases no Rust object; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET as u16) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::MapRing {
                index,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            entries: bytes / std::mem::size_of::<RingEntry>(),
            fetch: 0,
        })
    }

    fn harvest(&mut self, mark: impl FnMut(u32, u64)) -> u32 {
        // SAFETY: `ptr` maps `entries` entries for as long as `self` lives; RingEntry has the
        // layout of kvm_dirty_gfn and only atomic fields, so shared access with KVM is sound.
        let ring = unsafe { std::slice::from_raw_parts(self.ptr, self.entries) };
        harvest_ring(ring, &mut self.fetch, mark)
    }
}

impl Drop for VcpuRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created, which nothing references any more.
        unsafe {
            libc::munmap(
                self.ptr.cast(),
                self.entries * std::mem::size_of::<RingEntry>(),
            )
        };
    }
}

/// What the ring mode keeps between syncs.
struct RingState {
    rings: Vec<VcpuRing>,
    /// Pages harvested (by a sync or a vCPU whose ring filled) and not yet returned.
    pending: DirtyBitmap,
    /// A ring overflowed: pages were lost and KVM's ring indices cannot be trusted again.
    overflowed: bool,
}

/// A VM's KVM dirty page tracking (see the module documentation).
pub struct DirtyLog {
    mode: DirtyLogMode,
    vm_fd: Arc<VmFd>,
    slots: Vec<LogSlot>,
    ring_bytes: usize,
    ring: Mutex<RingState>,
}

impl DirtyLog {
    /// Tracking of `slots` in `mode` (as returned by [`enable`]).
    pub fn new(vm_fd: Arc<VmFd>, mode: DirtyLogMode, slots: Vec<LogSlot>) -> Result<Self> {
        let layout: Vec<(u64, u64)> = slots.iter().map(|s| (s.guest_addr, s.len)).collect();
        let ring_bytes = match mode {
            DirtyLogMode::Ring => ring_capability(&vm_fd).map_or(0, |(_, bytes)| bytes as usize),
            _ => 0,
        };
        Ok(Self {
            mode,
            vm_fd,
            slots,
            ring_bytes,
            ring: Mutex::new(RingState {
                rings: Vec::new(),
                pending: DirtyBitmap::new(&layout)?,
                overflowed: false,
            }),
        })
    }

    /// The mode in effect.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Map vCPU `index`'s ring (ring mode; nothing otherwise). Call once per vCPU, in order.
    pub fn add_vcpu(&self, fd: &VcpuFd, index: u32) -> Result<()> {
        if self.mode == DirtyLogMode::Ring {
            let ring = VcpuRing::map(fd, index, self.ring_bytes)?;
            self.lock().rings.push(ring);
        }
        Ok(())
    }

    /// Add the pages written since the previous sync to `set` (region `i` of `set` is slot `i`)
    /// and re-protect them in KVM before returning.
    pub fn sync(&self, set: &mut DirtyBitmap) -> Result<()> {
        match self.mode {
            DirtyLogMode::Legacy => {
                for (index, s) in self.slots.iter().enumerate() {
                    let words = self
                        .vm_fd
                        .get_dirty_log(s.slot, s.len as usize)
                        .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
                    set.merge_words(index, &words)?;
                }
            }
            DirtyLogMode::Manual => {
                for (index, s) in self.slots.iter().enumerate() {
                    let words = self
                        .vm_fd
                        .get_dirty_log(s.slot, s.len as usize)
                        .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
                    self.clear(s, &words)?;
                    set.merge_words(index, &words)?;
                }
            }
            DirtyLogMode::Ring => {
                let mut state = self.lock();
                self.harvest(&mut state)?;
                set.merge(&state.pending)?;
                state.pending.clear();
            }
        }
        Ok(())
    }

    /// Forget what was logged so far (ring mode: harvested pages that were not returned).
    pub fn discard(&self) -> Result<()> {
        if self.mode == DirtyLogMode::Ring {
            let mut state = self.lock();
            self.harvest(&mut state)?;
            state.pending.clear();
        }
        Ok(())
    }

    /// A vCPU exited with `KVM_EXIT_DIRTY_RING_FULL`: harvest every ring into the pending set and
    /// reset them, so the vCPU can run on. The pages come out at the next [`Self::sync`].
    pub fn ring_full(&self) -> Result<()> {
        let mut state = self.lock();
        if self.harvest(&mut state)? == 0 {
            // KVM says full but published nothing: its indices ran past the ring (an overflow),
            // and it will never let the vCPU run again. Fail rather than spin.
            return Err(DirtyLogError::RingStuck);
        }
        Ok(())
    }

    /// Harvest every ring into `state.pending`, then `KVM_RESET_DIRTY_RINGS`; returns the number
    /// of entries harvested. Once a ring overflowed, every harvest fails (pages were lost).
    fn harvest(&self, state: &mut RingState) -> Result<u64> {
        if state.overflowed {
            return Err(DirtyLogError::RingOverflow);
        }
        let RingState {
            rings,
            pending,
            overflowed,
        } = state;
        let mut total = 0u64;
        let mut overflow = false;
        for ring in rings.iter_mut() {
            let entries = ring.entries;
            let n = ring.harvest(|slot, offset| {
                let Some(s) = self.slots.iter().find(|s| s.slot == slot) else {
                    log::debug!("dirty ring: entry for slot {slot:#x}, not a RAM slot");
                    return;
                };
                if offset >= s.pages() {
                    log::warn!("dirty ring: page {offset} beyond slot {slot}");
                    return;
                }
                // In range by the check above: cannot fail.
                let _ = pending.mark(s.guest_addr + offset * PAGE, PAGE);
            });
            // KVM keeps reserved entries free and exits before using them: a whole ring of
            // published entries means it wrote past the end and earlier entries were lost.
            overflow |= n as usize >= entries;
            total += u64::from(n);
        }
        if total > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the VM's rings.
            let ret = unsafe { vmm_sys_util::ioctl::ioctl(&*self.vm_fd, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(DirtyLogError::Kvm {
                    what: "KVM_RESET_DIRTY_RINGS",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        if overflow {
            *overflowed = true;
            log::error!("dirty ring overflow: KVM filled a whole ring without a DIRTY_RING_FULL exit; pages may be lost (seen on PVM hosts, whose instruction emulator writes without checking the ring)");
            return Err(DirtyLogError::RingOverflow);
        }
        Ok(total)
    }

    /// Clear (re-protect) the dirty pages of `words` in `s`, chunk by chunk.
    fn clear(&self, s: &LogSlot, words: &[u64]) -> Result<()> {
        for (first_page, num_pages, first_word) in clear_chunks(words, s.pages()) {
            let bits = &words[first_word..];
            let log = kvm_clear_dirty_log {
                slot: s.slot,
                num_pages,
                first_page,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bits.as_ptr() as *mut libc::c_void,
                },
            };
            // SAFETY: the bitmap holds at least `num_pages` bits (the chunk lies within `words`,
            // which covers the slot); KVM only reads it during the call.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_ref(&*self.vm_fd, KVM_CLEAR_DIRTY_LOG(), &log)
            };
            if ret < 0 {
                return Err(DirtyLogError::Kvm {
                    what: "KVM_CLEAR_DIRTY_LOG",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_dirty_groups_only() {
        // Empty bitmap: nothing to clear.
        assert!(clear_chunks(&[0; 8], 512).is_empty());
        // One page in the third group.
        assert_eq!(clear_chunks(&[0, 0, 1 << 5, 0], 256), vec![(128, 64, 2)]);
        // Two runs of dirty groups.
        assert_eq!(
            clear_chunks(&[1, 1, 0, 0, u64::MAX, 0], 384),
            vec![(0, 128, 0), (256, 64, 4)]
        );
    }

    #[test]
    fn chunks_end_at_the_slot_end() {
        // 100 pages: the second group has 36 pages, the range ends at the slot's end.
        assert_eq!(clear_chunks(&[0, 1 << 35], 100), vec![(64, 36, 1)]);
        // Extra words beyond the slot are ignored.
        assert_eq!(clear_chunks(&[0, 1, 1, 1], 100), vec![(64, 36, 1)]);
    }

    #[test]
    fn all_set_bitmap_is_split_in_bounded_aligned_chunks() {
        let pages = 3 * CLEAR_CHUNK_PAGES + 70;
        let words = vec![u64::MAX; pages.div_ceil(64) as usize];
        let chunks = clear_chunks(&words, pages);
        assert_eq!(chunks.len(), 4);
        let mut next = 0;
        for (i, (first, num, word)) in chunks.iter().enumerate() {
            assert_eq!(*first, next);
            assert_eq!(*first % 64, 0);
            assert_eq!(*word as u64 * 64, *first);
            assert!(u64::from(*num) <= CLEAR_CHUNK_PAGES);
            if i + 1 < chunks.len() {
                assert_eq!(u64::from(*num) % 64, 0);
            }
            next = first + u64::from(*num);
        }
        assert_eq!(next, pages);
    }

    /// KVM's side of a ring, as the kernel drives it.
    struct FakeKvm {
        ring: Vec<RingEntry>,
        dirty_index: u32,
        reset_index: u32,
    }

    impl FakeKvm {
        fn new(size: usize) -> Self {
            Self {
                ring: (0..size).map(|_| RingEntry::default()).collect(),
                dirty_index: 0,
                reset_index: 0,
            }
        }

        /// Push an entry; false when the ring is full (KVM would exit DIRTY_RING_FULL).
        fn push(&mut self, slot: u32, offset: u64) -> bool {
            let size = self.ring.len() as u32;
            if self.dirty_index.wrapping_sub(self.reset_index) >= size {
                return false;
            }
            let e = &self.ring[(self.dirty_index % size) as usize];
            assert_eq!(
                e.flags.load(Ordering::Acquire),
                0,
                "KVM reuses a live entry"
            );
            e.slot.store(slot, Ordering::Relaxed);
            e.offset.store(offset, Ordering::Relaxed);
            e.flags.store(GFN_F_DIRTY, Ordering::Release);
            self.dirty_index = self.dirty_index.wrapping_add(1);
            true
        }

        /// KVM_RESET_DIRTY_RINGS: give back the entries flagged RESET, in order.
        fn reset(&mut self) -> u32 {
            let size = self.ring.len() as u32;
            let mut n = 0;
            while self.reset_index != self.dirty_index {
                let e = &self.ring[(self.reset_index % size) as usize];
                if e.flags.load(Ordering::Acquire) & GFN_F_RESET == 0 {
                    break;
                }
                e.flags.store(0, Ordering::Release);
                self.reset_index = self.reset_index.wrapping_add(1);
                n += 1;
            }
            n
        }
    }

    fn harvest(kvm: &FakeKvm, fetch: &mut u32) -> Vec<(u32, u64)> {
        let mut got = Vec::new();
        let n = harvest_ring(&kvm.ring, fetch, |s, o| got.push((s, o)));
        assert_eq!(n as usize, got.len());
        got
    }

    #[test]
    fn ring_harvest_wraps_around_and_hands_entries_back() {
        let mut kvm = FakeKvm::new(4);
        let mut fetch = 0;
        assert!(harvest(&kvm, &mut fetch).is_empty());
        for o in 0..3 {
            assert!(kvm.push(0, o));
        }
        assert_eq!(harvest(&kvm, &mut fetch), vec![(0, 0), (0, 1), (0, 2)]);
        // Harvested entries are flagged RESET, not yet free: the ring holds one more.
        assert!(kvm.push(1, 10));
        assert!(!kvm.push(1, 11), "full until KVM_RESET_DIRTY_RINGS");
        assert_eq!(kvm.reset(), 3);
        // Wrap-around: entries 4..6 land in slots 0..2 again.
        for o in 11..14 {
            assert!(kvm.push(1, o));
        }
        assert_eq!(
            harvest(&kvm, &mut fetch),
            vec![(1, 10), (1, 11), (1, 12), (1, 13)]
        );
        assert_eq!(kvm.reset(), 4);
        assert!(harvest(&kvm, &mut fetch).is_empty());
        assert_eq!(fetch, 7);
    }

    #[test]
    fn ring_harvest_stops_at_unpublished_entries_and_after_one_turn() {
        let mut kvm = FakeKvm::new(4);
        let mut fetch = 0;
        assert!(kvm.push(0, 1));
        // An entry KVM has not published (flags still 0) ends the harvest even if later ones
        // look dirty.
        kvm.ring[2].flags.store(GFN_F_DIRTY, Ordering::Release);
        assert_eq!(harvest(&kvm, &mut fetch), vec![(0, 1)]);
        assert_eq!(fetch, 1);
        // A corrupt ring where every entry is DIRTY is read at most once around.
        let bad = FakeKvm::new(4);
        for e in &bad.ring {
            e.flags.store(GFN_F_DIRTY, Ordering::Release);
        }
        let mut fetch = 0;
        assert_eq!(harvest(&bad, &mut fetch).len(), 4);
        // All flagged RESET now: nothing more.
        assert!(harvest(&bad, &mut fetch).is_empty());
    }

    #[test]
    fn modes_parse_by_name() {
        for m in DirtyLogMode::ALL {
            assert_eq!(DirtyLogMode::parse(m.name()), Some(m));
        }
        assert_eq!(DirtyLogMode::parse("bitmap"), None);
    }
}
