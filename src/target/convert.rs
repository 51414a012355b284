//! JSON values → PostgreSQL array parameters, by the target column's type.
//!
//! Each value is first checked and turned into its input text ([`to_sql`]),
//! so that an error names the column and the value. The common types then
//! travel as typed binary arrays ([`Values`]); everything else, and any value
//! that might not convert exactly as the server would read it, travels as
//! text inside a `text[]` and is cast to the column's type there, so
//! PostgreSQL's own input functions do the parsing (exact numerics keep every
//! digit).

use std::borrow::Cow;
use std::str::FromStr;

use base64::Engine as _;
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::schema::{Column, Kind};

/// A number's exact value, from JSON text (`3.50`, `35e-1`, `"3.5"`).
pub fn decimal(text: &str) -> Option<BigDecimal> {
    BigDecimal::from_str(text.trim()).ok()
}

/// A key value as the column reads it, so that spellings of one key are one
/// key: a string is its content (`"3"` is the integer `3`, as the column's
/// input function reads it), a number in a numeric column is its value
/// (`3.50` is `3.5`, `35e-1` too), anything else its JSON text.
pub fn key_text(v: &Value, numeric: bool) -> Cow<'_, str> {
    let text = match v {
        Value::String(s) => s.as_str(),
        Value::Number(n) => n.as_str(),
        other => return Cow::Owned(other.to_string()),
    };
    if numeric && text.contains(['.', 'e', 'E']) {
        if let Some(d) = decimal(text) {
            return Cow::Owned(d.normalized().to_string());
        }
    }
    Cow::Borrowed(text)
}

/// Why a value does not fit its column.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column:?} ({sql_type}): cannot convert {value}: {reason}")]
pub struct ConvertError {
    pub column: String,
    pub sql_type: String,
    pub value: String,
    pub reason: String,
}

impl ConvertError {
    /// `text`, which the target's input function for `col` refused with
    /// `reason`.
    pub fn refused(col: &Column, text: &str, reason: &str) -> Self {
        ConvertError {
            column: col.name.clone(),
            sql_type: col.sql_type.clone(),
            value: shorten(&Value::String(text.to_string())),
            reason: reason.to_string(),
        }
    }
}

fn shorten(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(117).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Converts one JSON value for `col`; `None` is SQL NULL.
pub fn to_sql_text(col: &Column, v: &Value) -> Result<Option<String>, ConvertError> {
    Ok(to_sql(col, v)?.map(Cow::into_owned))
}

/// [`to_sql_text`], borrowing the value's text where it is already the input
/// text (strings, numbers), so a batch does not copy every value.
pub fn to_sql<'a>(col: &Column, v: &'a Value) -> Result<Option<Cow<'a, str>>, ConvertError> {
    let err = |reason: &str| ConvertError {
        column: col.name.clone(),
        sql_type: col.sql_type.clone(),
        value: shorten(v),
        reason: reason.to_string(),
    };
    if v.is_null() {
        return Ok(None);
    }
    let text: Cow<'a, str> = match col.kind {
        Kind::Integer => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => number(n),
            Value::String(s) if is_integer(s) => Cow::Borrowed(s),
            _ => return Err(err("expected an integer")),
        },
        Kind::Number => match v {
            Value::Number(n) => number(n),
            Value::String(s) => Cow::Borrowed(s),
            _ => return Err(err("expected a number")),
        },
        Kind::Bool => match v {
            Value::Bool(true) => Cow::Borrowed("true"),
            Value::Bool(false) => Cow::Borrowed("false"),
            Value::String(s) if matches!(s.as_str(), "true" | "false" | "t" | "f") => {
                Cow::Borrowed(s)
            }
            _ => return Err(err("expected a boolean")),
        },
        Kind::Json => Cow::Owned(v.to_string()),
        Kind::Bytea => match v {
            Value::String(s) => bytea_text(s).ok_or_else(|| err("expected \\x hex or base64"))?,
            _ => return Err(err("expected a string of \\x hex or base64")),
        },
        Kind::Uuid => match v {
            Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => Cow::Borrowed(s),
            _ => return Err(err("expected a UUID string")),
        },
        Kind::Array => match v {
            Value::Array(items) => {
                let mut out = String::new();
                array_literal(items, &mut out);
                Cow::Owned(out)
            }
            Value::String(s) => Cow::Borrowed(s),
            _ => return Err(err("expected an array")),
        },
        Kind::Text => match v {
            Value::String(s) => Cow::Borrowed(s),
            Value::Number(n) => number(n),
            Value::Bool(b) => Cow::Owned(b.to_string()),
            other => Cow::Owned(other.to_string()),
        },
    };
    Ok(Some(text))
}

/// A number's text as it came (serde_json keeps it exactly).
fn number(n: &serde_json::Number) -> Cow<'_, str> {
    Cow::Borrowed(n.as_str())
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `\x…` hex passes through (checked); anything else is read as base64.
fn bytea_text(s: &str) -> Option<Cow<'_, str>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        return (hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(Cow::Borrowed(s));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s))
        .ok()?;
    Some(Cow::Owned(format!("\\x{}", hex::encode(bytes))))
}

/// Writes a PostgreSQL array literal (`{1,"a b",NULL,{2,3}}`).
fn array_literal(items: &[Value], out: &mut String) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => array_literal(inner, out),
            Value::String(s) => quote_element(s, out),
            other => quote_element(&other.to_string(), out),
        }
    }
    out.push('}');
}

fn quote_element(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// How a column's values travel to the server: typed binary arrays for the
/// common types, whose binary input is a copy rather than a parse (timestamp
/// text parsing in particular is expensive), and `text[]` cast on the server
/// for everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Text,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bool,
    Bytea,
    Timestamptz,
    Timestamp,
    Uuid,
}

/// One column's values for a batch of rows, as the array parameter that
/// carries them (`None` is NULL).
///
/// Values arrive as the validated input text [`to_sql`] produces. A typed
/// column takes a value only when its text converts exactly as the server's
/// input function would read it; the first value that does not (an
/// out-of-range integer, a timestamp without an offset or in another
/// spelling, `NaN`) turns the whole column back into text, so the server
/// parses it and accepts, rejects or interprets it exactly as before.
#[derive(Debug, Clone)]
pub enum Values<'a> {
    Text(Vec<Option<Cow<'a, str>>>),
    Int2(Vec<Option<i16>>),
    Int4(Vec<Option<i32>>),
    Int8(Vec<Option<i64>>),
    Float4(Vec<Option<f32>>),
    Float8(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Bytea(Vec<Option<Vec<u8>>>),
    Timestamptz(Vec<Option<DateTime<Utc>>>),
    Timestamp(Vec<Option<NaiveDateTime>>),
    Uuid(Vec<Option<uuid::Uuid>>),
}

macro_rules! each {
    ($self:expr, $v:ident => $e:expr) => {
        match $self {
            Values::Text($v) => $e,
            Values::Int2($v) => $e,
            Values::Int4($v) => $e,
            Values::Int8($v) => $e,
            Values::Float4($v) => $e,
            Values::Float8($v) => $e,
            Values::Bool($v) => $e,
            Values::Bytea($v) => $e,
            Values::Timestamptz($v) => $e,
            Values::Timestamp($v) => $e,
            Values::Uuid($v) => $e,
        }
    };
}

macro_rules! map_each {
    ($self:expr, $v:ident => $e:expr) => {
        match $self {
            Values::Text($v) => Values::Text($e),
            Values::Int2($v) => Values::Int2($e),
            Values::Int4($v) => Values::Int4($e),
            Values::Int8($v) => Values::Int8($e),
            Values::Float4($v) => Values::Float4($e),
            Values::Float8($v) => Values::Float8($e),
            Values::Bool($v) => Values::Bool($e),
            Values::Bytea($v) => Values::Bytea($e),
            Values::Timestamptz($v) => Values::Timestamptz($e),
            Values::Timestamp($v) => Values::Timestamp($e),
            Values::Uuid($v) => Values::Uuid($e),
        }
    };
}

impl<'a> Values<'a> {
    /// An empty column for `wire`, with room for `rows` values.
    pub fn new(wire: Wire, rows: usize) -> Self {
        match wire {
            Wire::Text => Values::Text(Vec::with_capacity(rows)),
            Wire::Int2 => Values::Int2(Vec::with_capacity(rows)),
            Wire::Int4 => Values::Int4(Vec::with_capacity(rows)),
            Wire::Int8 => Values::Int8(Vec::with_capacity(rows)),
            Wire::Float4 => Values::Float4(Vec::with_capacity(rows)),
            Wire::Float8 => Values::Float8(Vec::with_capacity(rows)),
            Wire::Bool => Values::Bool(Vec::with_capacity(rows)),
            Wire::Bytea => Values::Bytea(Vec::with_capacity(rows)),
            Wire::Timestamptz => Values::Timestamptz(Vec::with_capacity(rows)),
            Wire::Timestamp => Values::Timestamp(Vec::with_capacity(rows)),
            Wire::Uuid => Values::Uuid(Vec::with_capacity(rows)),
        }
    }

    /// The array parameter's SQL type (`int8[]`).
    pub fn array_type(&self) -> &'static str {
        match self {
            Values::Text(_) => "text[]",
            Values::Int2(_) => "int2[]",
            Values::Int4(_) => "int4[]",
            Values::Int8(_) => "int8[]",
            Values::Float4(_) => "float4[]",
            Values::Float8(_) => "float8[]",
            Values::Bool(_) => "bool[]",
            Values::Bytea(_) => "bytea[]",
            Values::Timestamptz(_) => "timestamptz[]",
            Values::Timestamp(_) => "timestamp[]",
            Values::Uuid(_) => "uuid[]",
        }
    }

    /// When the values travel as text, the first that `is` picks.
    pub fn find_text(&self, is: impl Fn(&str) -> bool) -> Option<&str> {
        match self {
            Values::Text(v) => v.iter().flatten().map(|t| &**t).find(|t| is(t)),
            _ => None,
        }
    }

    /// The values as a statement parameter.
    pub fn as_param(&self) -> &(dyn ToSql + Sync) {
        each!(self, v => v as &(dyn ToSql + Sync))
    }

    /// The values at positions `rows`.
    pub fn select(&self, rows: &[usize]) -> Self {
        fn pick<T: Clone>(v: &[T], rows: &[usize]) -> Vec<T> {
            rows.iter().map(|&r| v[r].clone()).collect()
        }
        map_each!(self, v => pick(v, rows))
    }

    /// Appends one value given as validated input text (from [`to_sql`]).
    pub fn push(&mut self, text: Option<Cow<'a, str>>) {
        let Some(t) = text else {
            each!(self, v => v.push(None));
            return;
        };
        if let Values::Text(v) = self {
            v.push(Some(t));
            return;
        }
        let fits = match self {
            Values::Text(_) => unreachable!("handled above"),
            Values::Int2(v) => put(v, t.parse().ok()),
            Values::Int4(v) => put(v, t.parse().ok()),
            Values::Int8(v) => put(v, t.parse().ok()),
            Values::Float4(v) => put(v, float::<f32>(&t)),
            Values::Float8(v) => put(v, float::<f64>(&t)),
            Values::Bool(v) => put(
                v,
                match &*t {
                    "true" | "t" => Some(true),
                    "false" | "f" => Some(false),
                    _ => None,
                },
            ),
            Values::Bytea(v) => put(v, t.strip_prefix("\\x").and_then(|h| hex::decode(h).ok())),
            Values::Timestamptz(v) => put(
                v,
                match timestamp(&t) {
                    // Checked: an offset can carry a time past the calendar's end.
                    Some((local, Some(offset))) => local
                        .checked_sub_signed(chrono::Duration::seconds(offset))
                        .map(|t| t.and_utc()),
                    _ => None,
                },
            ),
            // timestamp input ignores a zone offset in the text.
            Values::Timestamp(v) => put(v, timestamp(&t).map(|(local, _)| local)),
            Values::Uuid(v) => put(
                v,
                (t.len() == 32 || t.len() == 36)
                    .then(|| uuid::Uuid::parse_str(&t).ok())
                    .flatten(),
            ),
        };
        if !fits {
            self.demote();
            self.push(Some(t));
        }
    }

    /// Turns a typed column into text, each value printed exactly (every
    /// typed value came from text that converted exactly).
    fn demote(&mut self) {
        fn text<T>(v: &[Option<T>], f: impl Fn(&T) -> String) -> Values<'static> {
            Values::Text(
                v.iter()
                    .map(|x| x.as_ref().map(|x| Cow::Owned(f(x))))
                    .collect(),
            )
        }
        let t = match self {
            Values::Text(_) => return,
            Values::Int2(v) => text(v, |x| x.to_string()),
            Values::Int4(v) => text(v, |x| x.to_string()),
            Values::Int8(v) => text(v, |x| x.to_string()),
            // Display prints the shortest text that reads back as the same value.
            Values::Float4(v) => text(v, |x| x.to_string()),
            Values::Float8(v) => text(v, |x| x.to_string()),
            Values::Bool(v) => text(v, |x| x.to_string()),
            Values::Bytea(v) => text(v, |x| format!("\\x{}", hex::encode(x))),
            Values::Timestamptz(v) => {
                text(v, |x| x.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string())
            }
            Values::Timestamp(v) => text(v, |x| x.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()),
            Values::Uuid(v) => text(v, |x| x.to_string()),
        };
        *self = t;
    }
}

fn put<T>(v: &mut Vec<Option<T>>, x: Option<T>) -> bool {
    let fits = x.is_some();
    if fits {
        v.push(x);
    }
    fits
}

/// A float read as the server reads it, or `None` where it might read it
/// differently: out of range (the server rejects what Rust reads as
/// infinity or zero), subnormal, NaN and infinity spellings.
fn float<F: FromStr + Copy + Into<f64>>(t: &str) -> Option<F> {
    let x: F = t.parse().ok()?;
    let f: f64 = x.into();
    let zero_literal = || {
        t.split(['e', 'E'])
            .next()
            .is_some_and(|m| m.bytes().all(|b| matches!(b, b'0' | b'.' | b'+' | b'-')))
    };
    let normal = if std::mem::size_of::<F>() == 4 {
        (f as f32).is_normal()
    } else {
        f.is_normal()
    };
    (normal || (f == 0.0 && zero_literal())).then_some(x)
}

/// Reads `YYYY-MM-DD[T ]HH:MM:SS[.ffffff][offset]`, with an offset of `Z` or
/// `±HH[[:]MM[[:]SS]]`: the local date-time and the offset in seconds east
/// of UTC. Anything else (more than six fractional digits, which the server
/// rounds; other spellings; years outside 1–9999; `infinity`) is `None` and
/// left to the server.
fn timestamp(s: &str) -> Option<(NaiveDateTime, Option<i64>)> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(digits(0..4)?).ok().filter(|&y| y >= 1)?,
        digits(5..7)?,
        digits(8..10)?,
    )?;
    let (h, m, sec) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let mut i = 19;
    let mut micros = 0u32;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 6 {
            return None;
        }
        micros = digits(start..i)? * 10u32.pow(6 - n as u32);
    }
    let time = NaiveTime::from_hms_micro_opt(h, m, sec, micros)?;
    let offset = match &b[i..] {
        [] => None,
        [b'Z'] => Some(0),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let part = |r: &[u8]| -> Option<i64> {
                (r.len() == 2 && r.iter().all(u8::is_ascii_digit))
                    .then(|| i64::from((r[0] - b'0') * 10 + (r[1] - b'0')))
            };
            let (oh, om, os) = match rest {
                [a, b] => (part(&[*a, *b])?, 0, 0),
                [a, b, b':', c, d] | [a, b, c, d] => (part(&[*a, *b])?, part(&[*c, *d])?, 0),
                [a, b, b':', c, d, b':', e, f] | [a, b, c, d, e, f] => {
                    (part(&[*a, *b])?, part(&[*c, *d])?, part(&[*e, *f])?)
                }
                _ => return None,
            };
            if oh > 15 || om > 59 || os > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60 + os;
            Some(if *sign == b'-' { -secs } else { secs })
        }
        _ => return None,
    };
    Some((NaiveDateTime::new(date, time), offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(kind: Kind) -> Column {
        Column {
            name: "c".into(),
            sql_type: "t".into(),
            kind,
            wire: Wire::Text,
            not_null: false,
            has_default: false,
            generated: false,
            identity: false,
            always_identity: false,
            pk_position: None,
        }
    }

    #[test]
    fn converts_by_kind() {
        let t = |k, v: Value| to_sql_text(&col(k), &v).unwrap();
        assert_eq!(t(Kind::Integer, json!(42)), Some("42".into()));
        assert_eq!(t(Kind::Integer, json!("-7")), Some("-7".into()));
        let exact: Value = serde_json::from_str("12345678901234567890.123456789012345").unwrap();
        assert_eq!(
            t(Kind::Number, exact),
            Some("12345678901234567890.123456789012345".into())
        );
        assert_eq!(t(Kind::Bool, json!(true)), Some("true".into()));
        assert_eq!(t(Kind::Json, json!({"a":[1]})), Some(r#"{"a":[1]}"#.into()));
        assert_eq!(t(Kind::Bytea, json!("\\x01ff")), Some("\\x01ff".into()));
        assert_eq!(t(Kind::Bytea, json!("AQI=")), Some("\\x0102".into()));
        assert_eq!(
            t(Kind::Array, json!(["a\"b", null, "c"])),
            Some(r#"{"a\"b",NULL,"c"}"#.into())
        );
        assert_eq!(t(Kind::Text, json!(null)), None);
    }

    #[test]
    fn errors_name_column_and_value() {
        let e = to_sql_text(&col(Kind::Integer), &json!("abc")).unwrap_err();
        assert!(
            e.to_string().contains("\"c\"") && e.to_string().contains("\"abc\""),
            "{e}"
        );
        assert!(to_sql_text(&col(Kind::Bytea), &json!("\\xzz")).is_err());
        assert!(to_sql_text(&col(Kind::Uuid), &json!("nope")).is_err());
        assert!(to_sql_text(&col(Kind::Bool), &json!(1)).is_err());
        assert!(to_sql_text(&col(Kind::Integer), &json!(1.5)).is_err());
    }

    fn column(wire: Wire, texts: &[Option<&'static str>]) -> Values<'static> {
        let mut v = Values::new(wire, texts.len());
        for t in texts {
            v.push(t.map(Cow::Borrowed));
        }
        v
    }

    #[test]
    fn exact_values_travel_typed() {
        let ts = column(
            Wire::Timestamptz,
            &[
                Some("2026-03-04T05:06:07.123456Z"),
                None,
                Some("2026-03-04 05:06:07+05:30"),
            ],
        );
        let Values::Timestamptz(v) = &ts else {
            panic!("{ts:?}")
        };
        assert_eq!(
            v[0].unwrap().to_rfc3339(),
            "2026-03-04T05:06:07.123456+00:00"
        );
        assert_eq!(v[1], None);
        assert_eq!(v[2].unwrap().to_rfc3339(), "2026-03-03T23:36:07+00:00");
        let naive = column(Wire::Timestamp, &[Some("2026-03-04T05:06:07.5-08:00")]);
        assert!(
            matches!(&naive, Values::Timestamp(v) if v[0].unwrap().to_string() == "2026-03-04 05:06:07.500"),
            "{naive:?}"
        );
        assert!(matches!(
            column(Wire::Int2, &[Some("-32768")]),
            Values::Int2(_)
        ));
        assert!(matches!(
            column(Wire::Float8, &[Some("0"), Some("-2.5e-300")]),
            Values::Float8(_)
        ));
        assert!(matches!(
            column(Wire::Float4, &[Some("3.4028235e38")]),
            Values::Float4(_)
        ));
        assert!(matches!(
            column(Wire::Bool, &[Some("t"), Some("false")]),
            Values::Bool(_)
        ));
        assert!(
            matches!(column(Wire::Bytea, &[Some("\\x01FF")]), Values::Bytea(v) if v[0].as_deref() == Some(&[1, 255][..]))
        );
        assert!(matches!(
            column(Wire::Uuid, &[Some("6F1C1A585D0B4A558F5E0D9B6A3B2C11")]),
            Values::Uuid(_)
        ));
    }

    #[test]
    fn inexact_values_turn_the_column_into_text() {
        let text = |v: Values| match v {
            Values::Text(t) => t
                .into_iter()
                .map(|x| x.map(Cow::into_owned))
                .collect::<Vec<_>>(),
            other => panic!("not text: {other:?}"),
        };
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            text(column(
                Wire::Timestamptz,
                &[
                    Some("2026-03-04T05:06:07.5+01:00"),
                    None,
                    Some("2026-03-04 05:06:07")
                ]
            )),
            vec![
                s("2026-03-04T04:06:07.500000+00:00"),
                None,
                s("2026-03-04 05:06:07")
            ]
        );
        assert_eq!(
            text(column(
                Wire::Timestamp,
                &[Some("2026-03-04T05:06:07"), Some("infinity")]
            )),
            vec![s("2026-03-04T05:06:07.000000"), s("infinity")]
        );
        for odd in [
            "2026-03-04T05:06:07.1234567Z",
            "2026-02-30T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "2026-03-04T24:00:00Z",
            "2026-03-04T05:06:60Z",
            "2026-03-04T05:06:07+16:00",
            "2026-03-04T05:06:07 Europe/Paris",
            "10000-01-01T00:00:00Z",
        ] {
            assert!(
                matches!(column(Wire::Timestamptz, &[Some(odd)]), Values::Text(_)),
                "{odd}"
            );
        }
        assert_eq!(
            text(column(Wire::Int2, &[Some("7"), Some("40000")])),
            vec![s("7"), s("40000")]
        );
        assert_eq!(
            text(column(Wire::Float8, &[Some("0.1"), Some("1e-310")])),
            vec![s("0.1"), s("1e-310")]
        );
        for odd in ["1e39", "1e-40", "NaN", "inf", " 1"] {
            assert!(
                matches!(column(Wire::Float4, &[Some(odd)]), Values::Text(_)),
                "{odd}"
            );
        }
        assert!(matches!(
            column(Wire::Float8, &[Some("1e309")]),
            Values::Text(_)
        ));
        assert!(matches!(
            column(Wire::Bytea, &[Some("\\x00ff"), None]).select(&[1, 0, 0]),
            Values::Bytea(v) if v == [None, Some(vec![0, 255]), Some(vec![0, 255])]
        ));
        assert!(matches!(
            column(
                Wire::Uuid,
                &[Some("{6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11}")]
            ),
            Values::Text(_)
        ));
    }
}
