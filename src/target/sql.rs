//! SQL text helpers shared by every statement meridian builds.

/// Quotes an identifier for PostgreSQL (and CockroachDB): always double-quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
