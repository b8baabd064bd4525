//! The heap: how the `hall` binary's allocator is tuned, and handing freed memory back.
//!
//! The binary allocates with mimalloc (src/main.rs): glibc malloc cost ~11 % more
//! instructions per decision and, with its per-thread arenas, about a quarter of the
//! decisions per second at 64 connections (docs/performance.md). mimalloc's defaults keep
//! what it frees committed for reuse, which left the idle daemon at ~75 MB of RSS with a
//! 10,000-rule policy set instead of ~28 MB; [`configure`] makes it hand freed pages back.
//! Test binaries use the system allocator; every function here is harmless there.

// mimalloc's option numbers (the `mi_option_e` enum of the vendored v3 `mimalloc.h`; the
// Rust bindings' constants predate it). mimalloc keeps retired options as placeholders so the
// numbers do not move; `option_numbers_match_mimalloc_defaults` checks them.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tune the allocator before the program allocates much: do not commit whole arenas up front,
/// and return freed pages to the OS at once instead of a second later (memory freed by a reload
/// or by sled's node copies otherwise stayed in RSS). src/main.rs calls it from an
/// `.init_array` entry, before mimalloc initializes: set in `main`, the arena option came too
/// late (measured: idle RSS stayed at 71 MB).
pub fn configure() {
    // SAFETY: mi_option_set only stores an option value; any thread, any time.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
    }
}

/// Hand free heap pages back to the OS. Parsing a policy set makes many MB of short-lived
/// TOML trees on several threads, and allocators keep freed pages for reuse. mimalloc's
/// `mi_collect` returns what it holds; glibc's `malloc_trim` what C code and the test
/// binaries (system allocator) hold. Takes a few ms: call it off the runtime threads.
pub fn trim() {
    // SAFETY: mi_collect only frees memory mimalloc holds and no live allocation uses; it is
    // safe from any thread, whether or not mimalloc is the global allocator.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mimalloc upgrade that renumbered its options would make `configure` set the wrong
    /// ones: the numbers used must still name options with the documented defaults (this test
    /// binary does not call `configure`).
    #[test]
    fn option_numbers_match_mimalloc_defaults() {
        // SAFETY: reading an option value.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        assert_eq!(
            eager, 2,
            "arena_eager_commit defaults to 2 (on overcommit systems)"
        );
        assert_eq!(delay, 1000, "purge_delay defaults to 1000 ms");
    }
}
