//! A bump allocator over a static region, so scenarios can use `alloc` (`Vec`, `String`, `Box`).
//! Memory is never reused except when the most recent allocation is freed; guests are short-lived.
//! Addresses are physical (identity mapping), so heap buffers can be handed to devices for DMA.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Heap size.
pub const HEAP_SIZE: usize = 4 * 1024 * 1024;

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_SIZE]);

#[link_section = ".noinit.heap"]
static mut HEAP: HeapArea = HeapArea([0; HEAP_SIZE]);

struct Bump {
    next: AtomicUsize,
}

#[global_allocator]
static ALLOCATOR: Bump = Bump {
    next: AtomicUsize::new(0),
};

fn heap_start() -> usize {
    // Only the address is taken; no reference to the mutable static is created.
    core::ptr::addr_of_mut!(HEAP) as usize
}

// SAFETY: allocations are disjoint ranges of the static heap handed out with a CAS on `next`.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let start = heap_start();
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let addr = (start + cur).next_multiple_of(layout.align());
            let end = addr - start + layout.size();
            if end > HEAP_SIZE {
                return core::ptr::null_mut();
            }
            match self
                .next
                .compare_exchange_weak(cur, end, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => return addr as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Reclaim only the most recent allocation.
        let off = ptr as usize - heap_start();
        let _ = self.next.compare_exchange(
            off + layout.size(),
            off,
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
    }
}

/// Bytes handed out so far.
pub fn used() -> usize {
    ALLOCATOR.next.load(Ordering::Relaxed)
}
