//! JSON values → PostgreSQL input text, by the target column's type.
//!
//! Every value travels to the server as text inside a `text[]` and is cast to
//! the column's type there, so PostgreSQL's own input functions do the parsing
//! (exact numerics keep every digit). What can be checked cheaply here is, so
//! that the error names the column and the value.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::Value;

use super::schema::{Column, Kind};

/// Why a value does not fit its column.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column:?} ({sql_type}): cannot convert {value}: {reason}")]
pub struct ConvertError {
    pub column: String,
    pub sql_type: String,
    pub value: String,
    pub reason: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(kind: Kind) -> Column {
        Column {
            name: "c".into(),
            sql_type: "t".into(),
            kind,
            not_null: false,
            has_default: false,
            generated: false,
            identity: false,
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
}
