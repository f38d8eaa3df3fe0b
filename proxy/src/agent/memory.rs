//! How the agent uses glibc's allocator, so its resident size follows what
//! it holds rather than the peak of its largest transient work (parsing a
//! big apply, rebuilding the DNS index).
//!
//! glibc gives each thread that allocates under contention an arena of its
//! own (up to eight per core) and keeps freed pages in them; objects parsed
//! on one thread and freed on another leave every arena fragmented. Two
//! arenas are plenty for the agent's few busy threads, and trimming after
//! large transient work hands the freed pages back to the kernel.

/// Below this many objects touched, a batch leaves too little garbage to be
/// worth a trim (which walks every arena).
pub const TRIM_AFTER_OBJECTS: usize = 1_000;

/// Caps the number of malloc arenas. Call before the agent starts threads.
pub fn limit_arenas() {
    // SAFETY: mallopt only sets a malloc tunable; M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed in every arena back to the kernel.
pub fn release_freed() {
    // SAFETY: malloc_trim only walks and trims malloc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
