//! The changefeed wire format: what a CockroachDB webhook changefeed (or
//! `meridian changefeed`) POSTs, parsed into [`Mutation`]s and [`Hlc`] timestamps.
//!
//! This module owns the envelope (`payload`/`length`, `resolved`), the hybrid
//! logical clock, and the receive-side orchestration in [`receiver`] that takes a
//! parsed batch through the userscript into the target in one transaction.

pub mod document;
pub mod hlc;
pub mod receiver;
pub mod wire;

pub use document::Document;
pub use hlc::Hlc;
pub use wire::{parse_body, Envelope, ParseError};

use std::sync::Arc;

use serde_json::Value;

/// One changed row as the changefeed reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// The payload line's `topic` (a table name), if the changefeed sent one.
    /// Shared: every row of a batch usually names the same table.
    pub topic: Option<Arc<str>>,
    /// The primary key values, in key order, if sent.
    pub key: Option<Vec<Value>>,
    /// The new row; `None` for a delete.
    pub after: Option<Document>,
    /// The previous row. `Before::Absent` when the changefeed was created
    /// without `diff`, `Before::Null` when the row did not exist before.
    pub before: Before,
    /// When the change happened at the source.
    pub updated: Hlc,
}

/// The `before` field, whose absence and JSON `null` mean different things.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Before {
    /// No `before` field: the changefeed does not send diffs.
    #[default]
    Absent,
    /// `"before": null`: the row did not exist at the source.
    Null,
    /// The row as it was before this change.
    Row(Document),
}

impl Before {
    /// The previous row, if one was sent.
    pub fn row(&self) -> Option<&Document> {
        match self {
            Before::Row(d) => Some(d),
            _ => None,
        }
    }

    /// As JSON: the row, or `null` when absent or null (what the DLQ stores).
    pub fn to_json(&self) -> Value {
        match self {
            Before::Row(d) => d.to_value(),
            _ => Value::Null,
        }
    }
}

impl Mutation {
    /// True when this mutation deletes its row.
    pub fn is_delete(&self) -> bool {
        self.after.is_none()
    }
}
