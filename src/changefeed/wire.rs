//! Parsing a request body: a batch envelope (`{"payload":[…],"length":N}`),
//! a resolved checkpoint (`{"resolved":"…"}`), or newline-delimited rows.

use std::borrow::Cow;
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Before, Document, Hlc, Mutation};

/// What one request carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// Changed rows.
    Batch(Vec<Mutation>),
    /// Every change at or below this time has been sent.
    Resolved(Hlc),
}

/// Why a body could not be read. Always the sender's fault (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("malformed JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("payload[{index}]: {message}")]
    Row { index: usize, message: String },
    #[error("{0}")]
    Envelope(String),
}

impl ParseError {
    fn json(e: &serde_json::Error) -> Self {
        ParseError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    payload: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    length: Option<Value>,
    #[serde(default)]
    resolved: Option<Value>,
}

/// The common case read in one pass: an envelope whose rows all parse.
#[derive(Deserialize)]
struct FastEnvelope<'a> {
    #[serde(default, borrow)]
    payload: Option<Vec<FastRow<'a>>>,
    #[serde(default)]
    length: Option<u64>,
    #[serde(default)]
    resolved: Option<IgnoredAny>,
}

/// A payload line read straight into the types a [`Mutation`] needs, with
/// strings borrowed from the body where they have no escapes. Anything
/// unexpected fails the fast path, and [`RawRow`] then reports it.
#[derive(Deserialize)]
struct FastRow<'a> {
    /// `Some(None)`: JSON null (a delete).
    #[serde(default, deserialize_with = "document_or_null")]
    after: Option<Option<Document>>,
    #[serde(default, deserialize_with = "document_or_null")]
    before: Option<Option<Document>>,
    #[serde(default)]
    key: Option<Vec<Value>>,
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    updated: Option<Cow<'a, str>>,
    #[serde(default)]
    resolved: Option<IgnoredAny>,
}

/// An object or null, present (`Some`), so that an absent field (`None`,
/// from `default`) differs from a null one.
fn document_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Document>>, D::Error> {
    Option::<Document>::deserialize(d).map(Some)
}

/// Keeps an explicit JSON `null` as `Some(Value::Null)`, so a field that is
/// absent (`None`) differs from one that is null.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawRow {
    #[serde(default, deserialize_with = "present")]
    after: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    before: Option<Value>,
    #[serde(default)]
    key: Option<Value>,
    #[serde(default)]
    topic: Option<Value>,
    #[serde(default)]
    updated: Option<Value>,
    #[serde(default)]
    resolved: Option<Value>,
}

/// Parses a request body. Unknown fields are ignored; what is needed and
/// cannot be read is an error naming the row and field.
pub fn parse_body(body: &[u8]) -> Result<Envelope, ParseError> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Err(ParseError::Envelope("empty request body".into()));
    }
    if let Some(rows) = parse_batch_fast(trimmed) {
        return Ok(Envelope::Batch(rows));
    }
    // ndjson: several JSON objects, one per line (CockroachDB's cloud-storage style).
    let envelope: RawEnvelope = match serde_json::from_slice(trimmed) {
        Ok(e) => e,
        Err(e) if e.is_data() => {
            return Err(ParseError::Envelope(format!(
                "request body must be a JSON object with \"payload\" or \"resolved\": {e}"
            )))
        }
        Err(e) => {
            if trimmed.contains(&b'\n')
                && serde_json::from_slice::<Value>(first_line(trimmed)).is_ok()
            {
                return parse_ndjson(trimmed);
            }
            return Err(ParseError::json(&e));
        }
    };
    if let Some(resolved) = envelope.resolved {
        return Ok(Envelope::Resolved(
            parse_hlc("resolved", &resolved).map_err(ParseError::Envelope)?,
        ));
    }
    let Some(payload) = envelope.payload else {
        return Err(ParseError::Envelope(
            "request body has neither \"payload\" nor \"resolved\"".into(),
        ));
    };
    if let Some(length) = envelope.length {
        match length.as_u64() {
            Some(n) if n as usize == payload.len() => {}
            Some(n) => {
                return Err(ParseError::Envelope(format!(
                    "\"length\" is {n} but payload has {} rows",
                    payload.len()
                )))
            }
            None => {
                return Err(ParseError::Envelope(format!(
                    "\"length\" must be a number, got {length}"
                )))
            }
        }
    }
    let mut rows = Vec::with_capacity(payload.len());
    let mut topics = Topics::default();
    for (index, raw) in payload.into_iter().enumerate() {
        let row: RawRow = serde_json::from_str(raw.get()).map_err(|e| ParseError::Row {
            index,
            message: e.to_string(),
        })?;
        if row.resolved.is_some() && row.updated.is_none() && row.after.is_none() {
            // A resolved marker inside a payload carries no row.
            continue;
        }
        rows.push(
            to_mutation(row, &mut topics).map_err(|message| ParseError::Row { index, message })?,
        );
    }
    Ok(Envelope::Batch(rows))
}

/// Reads a well-formed batch in one pass. `None` for anything else (a
/// resolved checkpoint, ndjson, any error), which [`parse_body`] then reads
/// row by row, so that errors name the row.
fn parse_batch_fast(body: &[u8]) -> Option<Vec<Mutation>> {
    let envelope: FastEnvelope = serde_json::from_slice(body).ok()?;
    if envelope.resolved.is_some() {
        return None;
    }
    let payload = envelope.payload?;
    if let Some(length) = envelope.length {
        if length != payload.len() as u64 {
            return None;
        }
    }
    let mut rows = Vec::with_capacity(payload.len());
    let mut topics = Topics::default();
    for row in payload {
        if row.resolved.is_some() && row.updated.is_none() && row.after.is_none() {
            continue;
        }
        rows.push(Mutation {
            updated: row.updated?.parse().ok()?,
            after: row.after?,
            before: before(row.before),
            key: row.key,
            topic: row.topic.map(|t| topics.get(&t)),
        });
    }
    Some(rows)
}

/// One shared name per distinct topic of a request.
#[derive(Default)]
struct Topics(Vec<Arc<str>>);

impl Topics {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.0.iter().rev().find(|t| &***t == name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        self.0.push(t.clone());
        t
    }
}

fn first_line(b: &[u8]) -> &[u8] {
    b.split(|c| *c == b'\n').next().unwrap_or(b)
}

fn parse_ndjson(body: &[u8]) -> Result<Envelope, ParseError> {
    let mut rows = Vec::new();
    let mut topics = Topics::default();
    let mut resolved = None;
    for (i, line) in body.split(|c| *c == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let row: RawRow = serde_json::from_slice(line).map_err(|e| ParseError::Json {
            line: i + 1,
            column: e.column(),
            message: e.to_string(),
        })?;
        if let (Some(r), None) = (&row.resolved, &row.updated) {
            resolved = Some(
                parse_hlc("resolved", r)
                    .map_err(|message| ParseError::Row { index: i, message })?,
            );
            continue;
        }
        rows.push(
            to_mutation(row, &mut topics)
                .map_err(|message| ParseError::Row { index: i, message })?,
        );
    }
    match (rows.is_empty(), resolved) {
        (true, Some(r)) => Ok(Envelope::Resolved(r)),
        _ => Ok(Envelope::Batch(rows)),
    }
}

fn parse_hlc(field: &str, v: &Value) -> Result<Hlc, String> {
    match v {
        Value::String(s) => s.parse().map_err(|e| format!("\"{field}\": {e}")),
        other => Err(format!(
            "\"{field}\" must be a string timestamp, got {other}"
        )),
    }
}

fn object(field: &str, v: Value) -> Result<Option<Document>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(m.into())),
        other => Err(format!(
            "\"{field}\" must be an object or null, got {other}"
        )),
    }
}

/// The `before` field: absent, `null` (`Some(None)`) or a row.
fn before(field: Option<Option<Document>>) -> Before {
    match field {
        None => Before::Absent,
        Some(None) => Before::Null,
        Some(Some(d)) => Before::Row(d),
    }
}

fn to_mutation(row: RawRow, topics: &mut Topics) -> Result<Mutation, String> {
    let updated =
        match row.updated {
            Some(v) => parse_hlc("updated", &v)?,
            None => return Err(
                "missing \"updated\": create the changefeed WITH updated so rows carry their time"
                    .into(),
            ),
        };
    let after = match row.after {
        Some(v) => object("after", v)?,
        None => return Err("missing \"after\" (null for a delete)".into()),
    };
    let before = before(row.before.map(|v| object("before", v)).transpose()?);
    let key = match row.key {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a),
        Some(other) => return Err(format!("\"key\" must be an array, got {other}")),
    };
    let topic = match row.topic {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(topics.get(&s)),
        Some(other) => return Err(format!("\"topic\" must be a string, got {other}")),
    };
    Ok(Mutation {
        topic,
        key,
        after,
        before,
        updated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_batch_with_diff() {
        let body = br#"{"payload":[{"after":{"k":1,"v":"\\x01"},"before":null,"key":[1],"topic":"kv","updated":"1700000000123456789.0000000001","mvcc_timestamp":"x"}],"length":1}"#;
        let Envelope::Batch(rows) = parse_body(body).unwrap() else {
            panic!()
        };
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].topic.as_deref(), Some("kv"));
        assert_eq!(rows[0].before, Before::Null);
        assert_eq!(rows[0].updated, Hlc::new(1_700_000_000_123_456_789, 1));
        assert_eq!(rows[0].after.as_ref().unwrap()["k"], serde_json::json!(1));
    }

    /// Well-formed rows of every kind read in the one-pass parse (the
    /// row-by-row parse behind it would give the same rows, only slower).
    #[test]
    fn well_formed_batches_take_the_fast_path() {
        let body = br#"{"payload":[
            {"after":{"k":1,"v":"a"},"before":null,"key":[1],"topic":"kv","updated":"5.0","extra":[1]},
            {"after":null,"before":{"k":2,"v":"b"},"key":[2],"topic":"kv","updated":"6.1"},
            {"after":{"k":3},"key":[3],"topic":"t\u0031","updated":"7.0"}],"length":3}"#;
        let rows = parse_batch_fast(body).expect("the fast path reads it");
        let doc = |v: serde_json::Value| v.try_into().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0].after,
            Some(doc(serde_json::json!({"k": 1, "v": "a"})))
        );
        assert_eq!(rows[0].before, Before::Null);
        assert_eq!(rows[1].after, None);
        assert_eq!(
            rows[1].before,
            Before::Row(doc(serde_json::json!({"k": 2, "v": "b"})))
        );
        assert_eq!(rows[1].updated, Hlc::new(6, 1));
        assert_eq!(rows[2].before, Before::Absent);
        assert_eq!(rows[2].topic.as_deref(), Some("t1"));
        assert_eq!(rows[2].key, Some(vec![serde_json::json!(3)]));
    }

    #[test]
    fn parses_resolved() {
        let body = br#"{"resolved":"1700000000123456789.0000000000"}"#;
        assert_eq!(
            parse_body(body).unwrap(),
            Envelope::Resolved(Hlc::new(1_700_000_000_123_456_789, 0))
        );
    }

    #[test]
    fn delete_and_absent_before() {
        let body =
            br#"{"payload":[{"after":null,"key":[1],"topic":"kv","updated":"5.0"}],"length":1}"#;
        let Envelope::Batch(rows) = parse_body(body).unwrap() else {
            panic!()
        };
        assert!(rows[0].is_delete());
        assert_eq!(rows[0].before, Before::Absent);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse_body(b"{\"payload\": [").unwrap_err();
        assert!(matches!(e, ParseError::Json { line: 1, .. }), "{e}");
        let e = parse_body(br#"{"payload":[{"after":{},"topic":"kv"}]}"#).unwrap_err();
        assert!(
            e.to_string().contains("payload[0]") && e.to_string().contains("updated"),
            "{e}"
        );
        let e = parse_body(br#"{"payload":[],"length":3}"#).unwrap_err();
        assert!(e.to_string().contains("length"), "{e}");
        let e = parse_body(br#"[1,2]"#).unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
        let e = parse_body(br#"{"payload":[{"after":5,"updated":"1.0"}]}"#).unwrap_err();
        assert!(e.to_string().contains("\"after\" must be an object"), "{e}");
    }
}
