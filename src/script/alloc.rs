//! The allocator QuickJS runs on: mimalloc, called directly.
//!
//! A userscript allocates an object, a string or an array for nearly every
//! value it touches, and frees them all again at the end of each batch. With
//! glibc's malloc that churn (free, consolidate, malloc) was more than a third
//! of the time a batch spent in the script; mimalloc's thread-local free lists
//! make it a small fraction. mimalloc knows each block's size, so no header
//! is needed for QuickJS's `usable_size`, which its memory limit relies on.

use std::ffi::c_void;

use libmimalloc_sys as mi;
use rquickjs::allocator::Allocator;

/// QuickJS's `malloc`/`free` backed by mimalloc.
pub struct MiAllocator;

// SAFETY: every pointer comes from mimalloc, which returns blocks aligned to
// at least 16 bytes (more than QuickJS's 8) and tracks their sizes itself.
unsafe impl Allocator for MiAllocator {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        unsafe { mi::mi_malloc(size) as *mut u8 }
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        unsafe { mi::mi_calloc(count, size) as *mut u8 }
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        unsafe { mi::mi_usable_size(ptr as *const c_void) }
    }
}
