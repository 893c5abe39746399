//! The process's global allocator: mimalloc, counting live bytes (current and peak). On CPU
//! this is how st-tune measures memory and enforces `memory.limit`.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use mimalloc::MiMalloc;

pub struct CountingAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = MiMalloc.alloc(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = MiMalloc.alloc_zeroed(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        MiMalloc.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = MiMalloc.realloc(ptr, layout, new_size);
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

/// Keeps freed memory in the allocator instead of handing it back to the kernel. A training
/// step frees and re-allocates the same large activation and gradient buffers every step; handed
/// back, each comes back as fresh pages the kernel must fault in and clear (a sixth of a MiniLM
/// step's profile, `clear_page_erms`). Costs resident memory up to the step's peak, which the
/// process reaches anyway. Call before the first large allocation.
pub fn keep_freed_memory() {
    // mimalloc v3's `mi_option_purge_delay` (mimalloc.h; libmimalloc-sys names no constant for
    // it): -1 means never purge.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and takes effect at the next purge.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// Bytes allocated and not yet freed.
pub fn current() -> usize {
    CURRENT.load(Relaxed)
}

/// The highest `current()` since the last `reset_peak()`.
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak window at the current level.
pub fn reset_peak() {
    PEAK.store(current(), Relaxed);
}
