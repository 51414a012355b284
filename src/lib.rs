//! meridian: active-active change-data-capture between two SQL clusters.
//!
//! The receive path reads `server → changefeed → script/stage → target`; the
//! PostgreSQL producer lives in `source::postgres`. See DESIGN.md for the flow.

pub mod changefeed;
pub mod cli;
pub mod demo;
pub mod metrics;
pub mod pgcluster;
pub mod script;
pub mod server;
pub mod source;
pub mod target;

/// mimalloc for the whole process: request bodies, JSON documents and SQL
/// arrays are many short-lived allocations shared across tokio's threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps memory freed by one request for the next one a while longer.
///
/// mimalloc returns freed pages to the kernel 10 ms after they empty, and
/// each batch frees its documents and arrays at once; under steady load the
/// next batch then faults the same pages back in, zero-filled by the kernel
/// (about a tenth of the receiver's CPU in a profile of the apply bench).
/// One second still hands memory back soon after a burst ends. An operator's
/// `MIMALLOC_PURGE_DELAY` wins.
pub fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys
    // names no constant for it.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
}
