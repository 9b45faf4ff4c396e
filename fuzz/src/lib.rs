//! What every fuzz target shares: an allocator that treats any single allocation over
//! `ALLOC_MAX_BYTES` as a crash. Inputs are at most a few hundred KB, so such an allocation
//! can only come from a length read out of the input that the decoder trusted. (libFuzzer's
//! own -malloc_limit_mb needs a sanitizer's allocator; this works without one.)

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a target may make.
pub const ALLOC_MAX_BYTES: usize = 8 << 20;

struct Limited;

fn check(bytes: usize) {
    if bytes > ALLOC_MAX_BYTES {
        // No allocation here (we are inside the allocator); eprintln of integers does not.
        eprintln!("fuzz: allocation of {bytes} bytes (limit {ALLOC_MAX_BYTES}): a length from the input was trusted");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, after a size check.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;

/// Runs one input through a target's entry point.
pub fn run(data: &[u8], target: fn(&[u8])) {
    target(data);
}
