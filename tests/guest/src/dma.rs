//! DMA memory: zeroed, leaked heap allocations whose (identity-mapped) address is what devices
//! are given. Access goes through volatile reads/writes because devices change it behind the
//! compiler's back.

use alloc::vec::Vec;
use core::alloc::Layout;

/// Allocate `len` zeroed bytes aligned to `align` (a power of two) and return their physical
/// address. The memory is never freed.
pub fn alloc(len: usize, align: usize) -> u64 {
    let layout = Layout::from_size_align(len.max(1), align).expect("bad DMA layout");
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of heap for a {len}-byte DMA buffer");
    p as u64
}

/// Read a value of `T` at `addr`.
pub fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses inside DMA buffers from `alloc` (or MMIO registers), which
    // are identity mapped and suitably aligned for `T`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Write a value of `T` at `addr`.
pub fn write<T: Copy>(addr: u64, value: T) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

/// Copy `bytes` to `addr`.
pub fn write_bytes(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        write::<u8>(addr + i as u64, b);
    }
}

/// Fill `len` bytes at `addr` with `value`.
pub fn fill(addr: u64, len: usize, value: u8) {
    for i in 0..len {
        write::<u8>(addr + i as u64, value);
    }
}

/// Copy `len` bytes from `addr`.
pub fn read_bytes(addr: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| read::<u8>(addr + i as u64)).collect()
}

/// Lowercase hex of `bytes`, no separators.
pub fn hex(bytes: &[u8]) -> alloc::string::String {
    use core::fmt::Write;
    let mut s = alloc::string::String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The index of the first of `count` u64 words from `addr` that is not `v`, or `count`
/// (`repe scasq`: one instruction however long the run, which matters where guest code is
/// emulated).
pub fn scan(addr: u64, count: u64, v: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    let end: u64;
    // SAFETY: callers pass `count` 8-byte words from `addr` inside identity-mapped memory they
    // own (a DMA buffer, the dirty scenario's working set, a test device's mapped BAR); the
    // direction flag is clear.
    unsafe {
        core::arch::asm!(
            "repe scasq",
            inout("rcx") count => _,
            inout("rdi") addr => end,
            in("rax") v,
            options(nostack, readonly)
        )
    };
    // rdi is past the last word compared: it differs only if the scan stopped early or the very
    // last word differs.
    let last = (end - addr) / 8 - 1;
    if read::<u64>(addr + last * 8) != v {
        last
    } else {
        count
    }
}

/// Store `v` in `count` u64 words from `addr` (`rep stosq`: one instruction, which KVM's emulator
/// runs far faster than a loop of stores on this host).
pub fn fill_u64(addr: u64, count: u64, v: u64) {
    // SAFETY: callers pass `count` 8-byte words from `addr` inside identity-mapped memory they
    // own (a DMA buffer, the dirty scenario's working set, a test device's mapped BAR) and that
    // nothing else uses; the direction flag is clear (the ABI guarantees it between functions).
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") count => _,
            inout("rdi") addr => _,
            in("rax") v,
            options(nostack, preserves_flags)
        )
    };
}
