//! Producers: read a source database's changes and send them as changefeed
//! batches. Today: PostgreSQL logical decoding (`meridian changefeed`).

pub mod postgres;
