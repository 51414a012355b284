//! Staging for consistent (transactional) mode. Not built yet: `meridian start`
//! applies every request immediately (`--bestEffortOnly` behaviour).
