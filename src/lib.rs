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
