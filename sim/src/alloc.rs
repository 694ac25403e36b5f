//! The allocator of the simulator binary, its benchmarks and examples: mimalloc, called the way the standard
//! library calls the C allocator.
//!
//! `mimalloc::MiMalloc` hands every request to `mi_malloc_aligned`, even for the alignment any malloc already
//! guarantees. In mimalloc 3 that call takes a slow path whenever the size class has no free block at hand and
//! the size is not a power of two: it over-allocates from a larger class, so the right class never fills and
//! most small allocations of a run (about 115,000 of 200,000 over 40 standard seeds) pay for the detour. Here,
//! as in the standard library's `System`, an alignment malloc already gives (at most 16 bytes, and no larger
//! than the size) goes to plain `mi_malloc`; only larger alignments take the aligned entry points.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every malloc-compatible allocator gives a block of at least that size on the 64-bit targets
/// lockstep runs on (`alignof(max_align_t)`).
const MALLOC_ALIGN: usize = 16;

/// mimalloc, with plain `mi_malloc` for the alignments malloc guarantees anyway.
pub struct Allocator;

/// Whether a block of `size` bytes from plain malloc is aligned enough for `align`.
fn malloc_aligns(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every pointer comes from mimalloc and goes back to it; plain `mi_malloc` and `mi_realloc` are used only
// where malloc's alignment guarantee covers the layout, as `std::alloc::System` does on unix.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                ffi::mi_malloc(layout.size()) as *mut u8
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                ffi::mi_zalloc(layout.size()) as *mut u8
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { ffi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if malloc_aligns(layout.align(), new_size) {
                ffi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                ffi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let allocator = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 3, 8, 15, 16, 24, 40, 100, 1000, 5000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let ptr = allocator.alloc(layout);
                    assert!(!ptr.is_null());
                    assert_eq!(ptr as usize % align, 0, "alloc of {size} bytes aligned {align}");
                    ptr.write_bytes(0xAB, size);
                    let grown = allocator.realloc(ptr, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc of {size} bytes aligned {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xAB), "realloc kept the bytes");
                    allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0, "alloc_zeroed of {size} bytes aligned {align}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0), "alloc_zeroed zeroes");
                    allocator.dealloc(zeroed, layout);
                }
            }
        }
    }
}
